#!/bin/sh
# Install the civm guest runtime into the root filesystem at $1 (the image
# builder runs this against a mounted image, or with / inside the guest).
# Units are enabled by creating the .wants symlinks that `systemctl enable`
# would create, so no running systemd is needed.
#   guest/install.sh ROOT
set -eu

usage() {
  echo "usage: $0 ROOT   (use / to install into the running system)" >&2
  exit 2
}

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
  usage
fi
if [ ! -d "$1" ]; then
  echo "install.sh: $1 is not a directory" >&2
  exit 1
fi
root=${1%/}
src=$(cd "$(dirname "$0")" && pwd)

LIB=/usr/local/lib/civm
SBIN=/usr/local/sbin
UNITS=/etc/systemd/system

install -d -m 0755 "$root$LIB" "$root$SBIN" "$root$UNITS"
install -m 0644 "$src/VERSION" "$src/lib/civm-agent.sh" "$src/lib/civm-caches.sh" "$root$LIB/"
install -m 0755 "$src/lib/civm-runner.sh" "$root$LIB/"
install -m 0755 "$src/bin/civm-agent" "$src/bin/civm-growfs" "$src/bin/civm-hostkeys" "$root$SBIN/"

# The unit's own WantedBy= decides where the enable symlink goes, as with systemctl.
for unit in "$src"/systemd/*.service; do
  name=$(basename "$unit")
  install -m 0644 "$unit" "$root$UNITS/$name"
  targets=$(sed -n 's/^WantedBy=//p' "$unit")
  for target in $targets; do
    install -d -m 0755 "$root$UNITS/$target.wants"
    ln -sfn "$UNITS/$name" "$root$UNITS/$target.wants/$name"
  done
done

echo "installed civm guest runtime $(cat "$src/VERSION") into ${root:-/}"
