#!/usr/bin/env bash
# The lvh GitHub Action's way to a usable VM (cilium/little-vm-helper action.yaml: "Start VM"
# with `lvh run --daemonize -p PORT:22`, then "Wait for VM's SSH Server": retry ssh once a
# second, then run the command over ssh), reproduced with plain QEMU so that bench/dev-vm.ts
# can time it against civm run --detach + civm exec on the same image, the same config ISO
# and the same guest devices. Prints the milliseconds from start to the command's return.
# One deviation: the action first greps the console for systemd's "Started ssh" line, which a
# `quiet` kernel command line never shows, so each ssh gets ConnectTimeout=5 instead (without
# it, an ssh started before the guest's network is up waits for a banner forever).
# Usage: lvh-loop.sh WORK IMAGE KERNEL INITRD CONFIG_ISO KEY PORT HOST_DIR
set -euo pipefail
work=$1 image=$2 kernel=$3 initrd=$4 iso=$5 key=$6 port=$7 hostdir=$8
t0=$(date +%s%N)
qemu-img create -q -f qcow2 -F qcow2 -b "$image" "$work/disk.qcow2"
qemu-system-x86_64 -name lvh-loop -nodefaults -no-user-config -display none -daemonize -pidfile "$work/qemu.pid" \
  -machine pc,accel="${CIVM_ACCEL:-tcg}" -cpu max -smp 2 -m 1024M \
  -serial "file:$work/console.log" \
  -drive "file=$work/disk.qcow2,if=none,id=root,format=qcow2" -device virtio-blk-pci,drive=root \
  -drive "file=$iso,if=none,id=cfg,media=cdrom,readonly=on,format=raw" -device ide-cd,drive=cfg,bus=ide.1 \
  -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=net0 -device virtio-rng-pci \
  -fsdev "local,id=fs0,path=$hostdir,security_model=none" -device virtio-9p-pci,fsdev=fs0,mount_tag=host \
  -kernel "$kernel" -initrd "$initrd" -append "console=ttyS0 root=LABEL=civm-root rw panic=-1 quiet"
ssh_opts=(-F /dev/null -i "$key" -p "$port" -o ConnectTimeout=5 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes)
n=0
until ssh "${ssh_opts[@]}" root@localhost exit 2>/dev/null; do
  n=$((n + 1))
  if [ "$n" -ge 300 ]; then
    echo "lvh-loop: no SSH after 300 tries" >&2
    exit 42
  fi
  sleep 1
done
ssh "${ssh_opts[@]}" root@localhost true
t1=$(date +%s%N)
echo $(((t1 - t0) / 1000000))
