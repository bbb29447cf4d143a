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

# The network: DHCP with systemd-networkd on every Ethernet NIC, unless the image brings its
# own network manager (NetworkManager, or ifupdown configuring more than lo). An image's own
# .network files sort first and win; civm's agent and SSH need an address either way.
network_setup() {
  if [ -e "$root/usr/sbin/NetworkManager" ]; then
    echo "install.sh: NetworkManager is installed: leaving the network to it"
    return 0
  fi
  if [ -e "$root/sbin/ifup" ] && grep -hsE '^[[:space:]]*iface[[:space:]]' "$root/etc/network/interfaces" "$root"/etc/network/interfaces.d/* |
    grep -qvE '^[[:space:]]*iface[[:space:]]+lo[[:space:]]'; then
    echo "install.sh: ifupdown configures interfaces (/etc/network/interfaces): leaving the network to it"
    return 0
  fi
  unitdir=""
  for d in /lib/systemd/system /usr/lib/systemd/system; do
    if [ -e "$root$d/systemd-networkd.service" ]; then
      unitdir=$d
      break
    fi
  done
  if [ -z "$unitdir" ]; then
    echo "install.sh: warning: systemd-networkd is not installed: the image configures no network (add the systemd-networkd package, or a DHCP client of your own)"
    return 0
  fi
  install -d -m 0755 "$root/etc/systemd/network" "$root$UNITS/systemd-networkd-wait-online.service.d"
  install -m 0644 "$src/network/99-civm-dhcp.network" "$root/etc/systemd/network/"
  install -m 0644 "$src/network/civm-wait-online.conf" "$root$UNITS/systemd-networkd-wait-online.service.d/00-civm.conf"
  # What `systemctl enable systemd-networkd` does (its [Install]: WantedBy, Also, Alias).
  for link in multi-user.target.wants/systemd-networkd.service sockets.target.wants/systemd-networkd.socket \
    network-online.target.wants/systemd-networkd-wait-online.service; do
    unit=${link#*/}
    [ -e "$root$unitdir/$unit" ] || continue
    install -d -m 0755 "$root$UNITS/${link%%/*}"
    ln -sfn "$unitdir/$unit" "$root$UNITS/$link"
  done
  ln -sfn "$unitdir/systemd-networkd.service" "$root$UNITS/dbus-org.freedesktop.network1.service"
  echo "install.sh: DHCP on en*/eth* with systemd-networkd"
}
network_setup

echo "installed civm guest runtime $(cat "$src/VERSION") into ${root:-/}"
