#!/usr/bin/env bash
# Installs the Debian packages civm and its test suite call (as root, Debian 12).
# Idempotent: a package already installed is left alone, and apt-get update runs only
# when something is missing.
set -euo pipefail
PACKAGES=(
  qemu-system-x86 qemu-utils   # the VMM and qemu-img
  qemu-system-arm qemu-efi-aarch64   # arm64 guests: qemu-system-aarch64's virt machine, AAVMF (UEFI) for disks without a kernel
  qemu-user-static binfmt-support arch-test   # arm64 images: mmdebstrap --arch arm64 runs the root tree's programs through binfmt_misc (arch-test: its check)
  xorriso genisoimage          # config drive ISO (genisoimage starts faster)
  mmdebstrap e2fsprogs fdisk   # image builder: root tree, ext4 without mounting, partitions
  dpkg-repack                  # images with civm inside (civm-host): the host's Node.js package
  busybox-static cpio kmod     # initramfs of the tiny test guest and of civm kernel add (depmod)
  openssh-client               # civm exec/ssh, per-VM keys
  zstd jq shellcheck ovmf      # compressed images, guest agent tests, lint
  nftables                     # the per-VM network policy
  grub-pc-bin                  # tests: a GRUB-on-BIOS disk built without civm (grub-mkimage, boot.img) for foreign-image direct boot
  iproute2                     # tests: network namespaces for the policy tests
  postgresql                   # tests: a throwaway PostgreSQL cluster for the fleet store (civm serve store: postgres://...)
  zsh fish                     # tests: civm completion zsh|fish loaded in the real shells
  docker-registry squid        # civm serve's registry and HTTP caches (docs/caches.md); tests: a local OCI registry
  build-essential flex bison bc libelf-dev libssl-dev   # civm kernel build (make, gcc, Kconfig, objtool)
  linux-source-6.1             # tests: the source tarball of the small kernel civm kernel build makes
)
# Packages whose Debian service civm does not want: civm serve runs its own instances.
OWN_SERVICES=(docker-registry squid)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "install-deps: missing packages: ${missing[*]}; run this script as root (sudo $0)" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No package starts its service while installing (policy-rc.d, unless the host has one).
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && own_policy=1
  fi
  status=0
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
  ((own_policy)) && rm -f "$policy"
  ((status == 0)) || exit "$status"
  # ... nor at the next boot: civm serve starts its caches itself (on loopback, its own ports).
  if [[ -d /run/systemd/system ]]; then
    for s in "${OWN_SERVICES[@]}"; do
      if [[ " ${missing[*]} " == *" $s "* ]]; then
        systemctl disable --now "$s.service" >/dev/null 2>&1 || true
      fi
    done
  fi
fi
# arm64 image builds run the tree's programs through qemu-user: binfmt_misc mounted and
# qemu-user-static's qemu-aarch64 entry enabled (a container without systemd gets neither when
# the packages install). Only a warning when it cannot be done: civm doctor says what is missing.
binfmt=/proc/sys/fs/binfmt_misc
if [[ $(id -u) == 0 ]]; then
  [[ -e $binfmt/status ]] || mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null ||
    echo "install-deps: warning: cannot mount binfmt_misc at $binfmt; arm64 image builds will be refused" >&2
  if [[ -e $binfmt/status && ! -e $binfmt/qemu-aarch64 ]]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 ||
      echo "install-deps: warning: update-binfmts --enable qemu-aarch64 failed; arm64 image builds will be refused" >&2
  fi
fi
echo "install-deps: all system packages present" >&2
