// QEMU's command line as Rust CI's run.py starts an image (seed 001): BIOS boot of a disk (an
// overlay here), the config ISO on an IDE CD-ROM, user networking; the console to a file.
// The baseline the cycle benches compare civm with.
export function runPyQemuArgs(o: { overlay: string; iso: string; consoleLog: string; accel: string }): string[] {
  return [
    "-machine", `pc,accel=${o.accel}`, "-cpu", o.accel === "kvm" ? "host" : "max", "-smp", "2", "-m", "1024M",
    "-nodefaults", "-display", "none", "-no-reboot", "-serial", `file:${o.consoleLog}`,
    "-drive", `file=${o.overlay},if=virtio,format=qcow2`, "-drive", `file=${o.iso},media=cdrom,readonly=on,if=ide,index=2`,
    "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
  ];
}
