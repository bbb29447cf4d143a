#!/bin/sh
# /init of the tiny test guest (busybox sh, runs as PID 1 from the initramfs that
# test/support/tiny-guest.ts builds). It plays the part of a real civm guest just far enough
# for tests: read instance.json from the config CD (label instance-configuration), eject the
# CD, then act on config.tiny:
#   poweroff (default)  print "tiny-guest: powering off", power off via ACPI (QEMU exits)
#   hang                print "tiny-guest: hanging", sleep forever, ignore the power button
#   reboot              print "tiny-guest: rebooting", reboot -f (with -no-reboot QEMU exits)
#   acpi                print "tiny-guest: waiting for acpi power button", power off when the
#                       ACPI power button is pressed (QMP system_powerdown)
#   fail                print "tiny-guest: failing", exit this init so the kernel panics.
#                       With panic=-1 on the kernel command line the kernel reboots at once and
#                       -no-reboot makes QEMU exit; without panic=... the guest hangs after the
#                       panic (the default panic timeout is 0 = wait forever).
#   probe               bring eth0 up (or print "tiny-guest: probe: no eth0"), then for each
#                       HOST:PORT in config.probe (one string, space-separated) fetch
#                       http://HOST:PORT/ and print "tiny-guest: probe HOST:PORT ok BODY" or
#                       "tiny-guest: probe HOST:PORT fail"; then power off.
#   network             bring eth0 up with udhcpc, print "tiny-guest: network eth0 <ip>
#                       gateway <gw>", then behave like acpi.
#   runner              (also chosen when config.runner is "github", as `civm serve` writes it)
#                       a pretend GitHub runner for the serve tests: bring eth0 up, POST the
#                       config's jitconfig to http://HUB/register, then poll http://HUB/job
#                       every second; on the answer "run" print "tiny-guest: runner: running
#                       job", run the hub's job script if it has one (GET http://HUB/tiny-script,
#                       output prefixed "tiny-guest: job: "), POST http://HUB/done and power off. HUB is tiny.hub=HOST:PORT on
#                       the kernel command line (e.g. 10.0.2.2:PORT, the host under QEMU user
#                       networking). The ACPI power button powers it off at any time.
#   date                print "tiny-guest: date <seconds since the epoch>.<microseconds>", power off (clock checks)
#   mounts              (also chosen by tiny.mode=mounts on the kernel command line, for
#                       civm run --image ... --append) mount every 9p share in config.mounts
#                       ({tag, path, ro}, as civm run --host-mount writes them), run
#                       PATH/tiny-script.sh of each share that has one (its output prefixed
#                       "tiny-guest: script: "), print "tiny-guest: scripts done", power off.
# Every line goes to /dev/console (console=ttyS0 on the kernel command line; ttyAMA0 on arm64).
# On arm64 (qemu-system-aarch64's virt machine) the "ACPI power button" is virt's GPIO key.

/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
# The initramfs has no /dev/console node (built without root), so the kernel could not give
# us one: attach stdio to the console ourselves.
exec </dev/console >/dev/console 2>&1
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mkdir -p /tmp /mnt/cfg /run
mount -t tmpfs tmpfs /tmp

say() { echo "tiny-guest: $*"; }

# Modules, in dependency order (written by the builder, one path per line).
while read -r ko; do
  [ -n "$ko" ] || continue
  out=$(insmod "/$ko" 2>&1) || say "insmod $ko failed: $out"
done </etc/tiny-guest/modules

say "booted (kernel $(uname -r))"

# --- config CD -------------------------------------------------------------------------
# civm.snapshot on the kernel command line (a snapshot boot, docs/images.md): announce the
# snapshot point, wait for the disc without a limit (polled every 0.1 s: a restored copy
# gets it right away), then step the clock to the RTC (the host's time) at its next tick.
dev=""
i=0
restored=""
if grep -qw civm.snapshot /proc/cmdline; then
  say "snapshot point: waiting for the configuration disc"
  until dev=$(findfs LABEL=instance-configuration 2>/dev/null) && [ -n "$dev" ]; do usleep 100000; done
  # Read right away: must differ between copies restored from one snapshot.
  rand=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  say "restored: config disc $dev"
  restored=1
fi
while [ -z "$dev" ] && [ $i -lt 100 ]; do # 100 x 0.2 s = 20 s
  dev=$(findfs LABEL=instance-configuration 2>/dev/null)
  [ -n "$dev" ] && break
  i=$((i + 1))
  usleep 200000
done
if [ -z "$dev" ] && [ -b /dev/sr0 ]; then
  say "no device labelled instance-configuration, trying /dev/sr0"
  dev=/dev/sr0
fi

if [ -z "$dev" ]; then
  say "no config CD found"
  : >/tmp/instance.json
elif mount -t iso9660 -o ro "$dev" /mnt/cfg; then
  if [ -f /mnt/cfg/instance.json ]; then
    say "instance.json: $(tr -d '\n' </mnt/cfg/instance.json)"
    cp /mnt/cfg/instance.json /tmp/instance.json
  else
    say "config CD $dev has no instance.json"
    : >/tmp/instance.json
  fi
  umount /mnt/cfg
  # busybox (Debian) has no eject applet: /bin/eject is a tiny static program from the
  # builder that issues the CDROMEJECT ioctl; its exit status is the errno (0 = ejected).
  if eject "$dev"; then
    say "eject $dev: ok"
  else
    say "eject $dev: failed (errno $?)"
  fi
else
  say "cannot mount config CD $dev"
  : >/tmp/instance.json
fi

# --- a restored copy: clock and what must differ -----------------------------------------
# The RTC keeps the host's time but lags it by restore.rtcLagMicros (civm measured it): wait
# for its next tick, then for the rest of that second, and set the clock to the whole second.
if [ -n "$restored" ]; then
  lag=$(tr -d '\n' </tmp/instance.json | sed -n 's/.*"rtcLagMicros"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p')
  read -r first </sys/class/rtc/rtc0/since_epoch
  now=$first
  while [ "$now" = "$first" ]; do usleep 2000; read -r now </sys/class/rtc/rtc0/since_epoch; done
  usleep $((1000000 - ${lag:-0}))
  date -s "@$((now + 1))" >/dev/null
  if dmesg | grep -q 'crng reseeded due to virtual machine fork'; then say "restored: RNG reseeded"; else say "restored: no VM generation change seen"; fi
  say "restored: boot_id $(cat /proc/sys/kernel/random/boot_id) random $rand clock $(date +%s)"
fi

# --- act on config.tiny -----------------------------------------------------------------
mode=$(tr -d '\n' </tmp/instance.json | sed -n 's/.*"tiny"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
if [ -z "$mode" ] && tr -d '\n' </tmp/instance.json | grep -q '"runner"[[:space:]]*:[[:space:]]*"github"'; then mode=runner; fi
[ -n "$mode" ] || mode=$(sed -n 's/.*tiny\.mode=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$mode" ] || mode=poweroff
say "mode $mode"

power_off() {
  say "powering off"
  sync
  poweroff -f
  sleep 5
  say "poweroff -f returned"
}

arm_power_button() {
  found=""
  for d in /sys/class/input/event*; do
    [ -e "$d/device/name" ] || continue
    case "$(cat "$d/device/name")" in
      "Power Button" | gpio-keys)
        found="$found /dev/input/${d##*/}"
        ;;
    esac
  done
  if [ -z "$found" ]; then
    say "no power button input device (button.ko or gpio_keys.ko, evdev.ko loaded?)"
    sleep 2147483647
  fi
  rm -f /tmp/pressed
  # Open every device here, before announcing that we wait: a press that comes before a
  # background reader has started is then queued on the open descriptor, not lost.
  fd=3
  for ev in $found; do
    [ $fd -le 9 ] || break
    eval "exec $fd<$ev"
    # One input_event (24 bytes) arrives when the button is pressed.
    (
      if eval "dd of=/dev/null bs=24 count=1 <&$fd" 2>/dev/null; then
        : >/tmp/pressed
      else
        say "cannot read $ev"
      fi
    ) &
    fd=$((fd + 1))
  done
}

wait_power_button() {
  arm_power_button
  say "waiting for acpi power button"
  while [ ! -e /tmp/pressed ]; do usleep 100000; done
  say "acpi power button pressed"
  power_off
}

# One "TAG PATH RO" line per object of config.mounts.
share_list() {
  tr -d '\n' </tmp/instance.json | sed 's/}/}\n/g' |
    sed -n 's/.*"tag"[[:space:]]*:[[:space:]]*"\([^"]*\)"[[:space:]]*,[[:space:]]*"path"[[:space:]]*:[[:space:]]*"\([^"]*\)"[[:space:]]*,[[:space:]]*"ro"[[:space:]]*:[[:space:]]*\([a-z]*\).*/\1 \2 \3/p'
}

case "$mode" in
  mounts)
    share_list >/tmp/shares
    while read -r tag path ro; do
      opts=trans=virtio,version=9p2000.L
      [ "$ro" = true ] && opts="$opts,ro"
      mkdir -p "$path"
      if out=$(mount -t 9p -o "$opts" "$tag" "$path" 2>&1); then say "mounted $tag at $path ($opts)"; else say "mount $tag failed: $out"; fi
    done </tmp/shares
    while read -r tag path ro; do
      [ -f "$path/tiny-script.sh" ] || continue
      (cd "$path" && sh "$path/tiny-script.sh" 2>&1) | sed 's/^/tiny-guest: script: /'
    done </tmp/shares
    say "scripts done"
    power_off
    ;;
  poweroff)
    power_off
    ;;
  date)
    # busybox's date has no %N; adjtimex shows the clock to the microsecond.
    t=$(adjtimex 2>/dev/null | sed -n 's/.*tv_sec: *\([0-9]*\).*/\1/p;s/.*tv_usec: *\([0-9]*\).*/\1/p' | tr '\n' ' ')
    set -- $t
    if [ -n "${2:-}" ]; then say "date $1.$(printf %06d "$2")"; else say "date $(date +%s).0"; fi
    power_off
    ;;
  hang)
    say "hanging"
    trap '' HUP INT TERM USR1 USR2
    while :; do sleep 3600; done
    ;;
  reboot)
    say "rebooting"
    sync
    reboot -f
    ;;
  acpi)
    wait_power_button
    ;;
  fail)
    say "failing (init exits, the kernel panics)"
    exit 1
    ;;
  probe)
    ip link set lo up
    if ip link set eth0 up 2>/dev/null; then
      udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 10 -T 1 >/tmp/udhcpc.log 2>&1 || say "probe: udhcpc failed"
      say "probe: eth0 $(ip -4 -o addr show dev eth0 | sed -n 's/.* inet \([0-9.]*\).*/\1/p') routes $(ip route | tr '\n' ';')"
    else
      say "probe: no eth0"
    fi
    targets=$(tr -d '\n' </tmp/instance.json | sed -n 's/.*"probe"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
    for t in $targets; do
      if timeout 6 wget -q -O /tmp/probe "http://$t/" 2>/tmp/probe.err; then
        say "probe $t ok $(head -c 60 /tmp/probe | tr -d '\n')"
      else
        say "probe $t fail $(head -c 100 /tmp/probe.err | tr -d '\n')"
      fi
    done
    say "probe: done"
    power_off
    ;;
  network | runner)
    ip link set lo up
    ip link set eth0 up || say "no eth0"
    if udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 10 -T 1 >/tmp/udhcpc.log 2>&1; then
      ip=$(ip -4 -o addr show dev eth0 | sed -n 's/.* inet \([0-9.]*\).*/\1/p')
      gw=$(ip route | sed -n 's/^default via \([0-9.]*\).*/\1/p')
      say "network eth0 $ip gateway $gw"
    else
      say "network: udhcpc failed: $(tr '\n' ' ' </tmp/udhcpc.log)"
    fi
    [ "$mode" = runner ] || wait_power_button
    arm_power_button
    hub=$(sed -n 's/.*tiny\.hub=\([^ ]*\).*/\1/p' /proc/cmdline)
    jit=$(tr -d '\n' </tmp/instance.json | sed -n 's/.*"jitconfig"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
    say "runner: hub $hub"
    until wget -q -O /tmp/reg --post-data="$jit" "http://$hub/register" 2>/dev/null; do
      [ -e /tmp/pressed ] && power_off
      sleep 1
    done
    say "runner: registered"
    while :; do
      if [ -e /tmp/pressed ]; then
        say "acpi power button pressed"
        power_off
      fi
      if wget -q -O /tmp/job --post-data="$jit" "http://$hub/job" 2>/dev/null && [ "$(cat /tmp/job)" = run ]; then
        say "runner: running job"
        # The hub may hand out a job script (GET /tiny-script; 404: none).
        if wget -q -O /tmp/job.sh "http://$hub/tiny-script" 2>/dev/null; then
          sh /tmp/job.sh 2>&1 | sed 's/^/tiny-guest: job: /'
        fi
        sleep 1
        wget -q -O /dev/null --post-data="$jit" "http://$hub/done" 2>/dev/null || say "runner: /done failed"
        say "runner: job done"
        power_off
      fi
      sleep 1
    done
    ;;
  *)
    say "unknown mode $mode, powering off"
    power_off
    ;;
esac
# Falling off the end would also panic the kernel; stay put instead.
while :; do sleep 3600; done
