// /init of the initrd civm generates for a stored kernel (civm kernel add). busybox sh, PID 1.
//
// It loads the modules needed to reach the root filesystem (listed by the builder in
// /etc/civm/modules, dependencies first), mounts root= (LABEL=, UUID=, PARTUUID= or a
// /dev path, honouring rootfstype=, rootflags=, ro/rw), mounts the kernel's own modules
// from the read-only disk labelled civm-modules at /lib/modules/<release> inside the
// root, so modprobe, udev and systemd find them, and hands over with switch_root to init=
// (default /sbin/init). Any failure prints "civm-initrd: error: ..." and exits, which
// panics the kernel (with panic=-1 QEMU then exits and civm reports the console tail).
export const MODULES_LABEL = "civm-modules";

export const INITRD_INIT = `#!/bin/sh
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox --install -s /bin
export PATH=/bin

say() { echo "civm-initrd: $*"; }
fail() {
  say "error: $*"
  sleep 1
  exit 1
}

root=""
rootfstype=""
rootflags=""
mode=ro
init=/sbin/init
read -r cmdline </proc/cmdline
for arg in $cmdline; do
  case $arg in
    root=*) root=\${arg#root=} ;;
    rootfstype=*) rootfstype=\${arg#rootfstype=} ;;
    rootflags=*) rootflags=\${arg#rootflags=} ;;
    init=*) init=\${arg#init=} ;;
    ro) mode=ro ;;
    rw) mode=rw ;;
  esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"

while read -r ko; do
  [ -n "$ko" ] || continue
  out=$(insmod "/$ko" 2>&1) || say "insmod $ko failed: $out"
done </etc/civm/modules

release=$(uname -r)
dev=""
i=0
while [ $i -lt 300 ]; do # 300 x 0.1 s
  case $root in
    LABEL=* | UUID=*) dev=$(findfs "$root" 2>/dev/null) ;;
    PARTUUID=*)
      want=\${root#PARTUUID=}
      for b in /sys/class/block/*; do
        if [ "$(sed -n 's/^PARTUUID=//p' "$b/uevent" 2>/dev/null)" = "$want" ]; then dev=/dev/\${b##*/}; fi
      done
      ;;
    *) [ -b "$root" ] && dev=$root ;;
  esac
  [ -n "$dev" ] && break
  i=$((i + 1))
  usleep 100000
done
[ -n "$dev" ] || fail "root device $root did not appear within 30 s (block devices: $(cd /sys/class/block && echo *))"

mkdir -p /newroot
opts=$mode\${rootflags:+,$rootflags}
if [ -n "$rootfstype" ]; then
  mount -t "$rootfstype" -o "$opts" "$dev" /newroot || fail "cannot mount $dev ($rootfstype) on /newroot"
else
  mount -o "$opts" "$dev" /newroot || fail "cannot mount $dev on /newroot"
fi
say "root $dev mounted ($opts), kernel $release"

if [ -f /etc/civm/has-modules ]; then
  target=/newroot/lib/modules/$release
  mdev=""
  i=0
  while [ $i -lt 50 ]; do # 50 x 0.1 s: probed with the root disk, so it is there already or soon
    mdev=$(findfs LABEL=${MODULES_LABEL} 2>/dev/null) && [ -n "$mdev" ] && break
    i=$((i + 1))
    usleep 100000
  done
  if [ -z "$mdev" ]; then
    say "warning: no disk labelled ${MODULES_LABEL}; modprobe will not find the modules of $release"
  elif mkdir -p "$target" 2>/dev/null && mount -t ext4 -o ro "$mdev" "$target"; then
    say "modules of $release mounted from $mdev (${MODULES_LABEL}) at /lib/modules/$release"
  else
    say "warning: cannot mount $mdev (${MODULES_LABEL}) at /lib/modules/$release; modprobe will not find this kernel's modules"
  fi
fi

[ -x "/newroot$init" ] || [ -L "/newroot$init" ] || fail "no $init in the root filesystem"
mount --move /dev /newroot/dev 2>/dev/null || umount /dev 2>/dev/null
umount /proc /sys 2>/dev/null
exec switch_root /newroot "$init"
`;
