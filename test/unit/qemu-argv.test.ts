import { test } from "node:test";
import assert from "node:assert/strict";
import { buildQemuArgs, DEFAULT_CMDLINE, type QemuPlan } from "../../src/vm/argv.js";

function plan(over: Partial<QemuPlan> = {}): QemuPlan {
  return {
    binary: "qemu-system-x86_64",
    name: "vm-1",
    accel: "tcg",
    machine: "pc",
    cpus: 4,
    ramBytes: 4 * 1024 ** 3,
    overlay: "/s/vms/x/disk.qcow2",
    configIso: "/s/vms/x/config.iso",
    qmpSocket: "/s/vms/x/qmp.sock",
    consoleSocket: "/s/vms/x/console.sock",
    forwards: [{ proto: "tcp", hostAddr: "127.0.0.1", hostPort: 2201, guestPort: 22 }],
    mounts: [],
    kernel: undefined,
    extraArgs: [],
    ...over,
  };
}

function optAfter(args: string[], flag: string): string[] {
  return args.flatMap((a, i) => (a === flag ? [args[i + 1]!] : []));
}

test("cpu and ram come from the instance; TCG uses -cpu max, KVM -cpu host", () => {
  const a = buildQemuArgs(plan());
  assert.deepEqual(optAfter(a, "-smp"), ["4"]);
  assert.deepEqual(optAfter(a, "-m"), ["4096M"]);
  assert.deepEqual(optAfter(a, "-machine"), ["pc,accel=tcg"]);
  assert.deepEqual(optAfter(a, "-cpu"), ["max"]);
  const k = buildQemuArgs(plan({ accel: "kvm" }));
  assert.deepEqual(optAfter(k, "-machine"), ["pc,accel=kvm"]);
  assert.deepEqual(optAfter(k, "-cpu"), ["host"]);
});

test("starts paused with no display, no reboot, no default devices", () => {
  const a = buildQemuArgs(plan());
  for (const f of ["-S", "-no-reboot", "-nodefaults", "-no-user-config"]) assert.ok(a.includes(f), f);
  assert.deepEqual(optAfter(a, "-display"), ["none"]);
});

test("SSH forward listens on the given address only, never on every interface", () => {
  const a = buildQemuArgs(plan());
  assert.deepEqual(optAfter(a, "-netdev"), ["user,id=net0,hostfwd=tcp:127.0.0.1:2201-:22"]);
  const none = buildQemuArgs(plan({ forwards: [] }));
  assert.deepEqual(optAfter(none, "-netdev"), ["user,id=net0"]);
});

test("overlay is a virtio disk; config ISO is a read-only CD-ROM with a tray on IDE", () => {
  const a = buildQemuArgs(plan());
  const drives = optAfter(a, "-drive");
  assert.equal(drives[0], "file=/s/vms/x/disk.qcow2,if=none,id=root,format=qcow2,discard=unmap,cache=writeback");
  assert.equal(drives[1], "file=/s/vms/x/config.iso,if=none,id=cfgdrive,media=cdrom,readonly=on,format=raw");
  const devices = optAfter(a, "-device");
  assert.ok(devices.includes("virtio-blk-pci,drive=root,bootindex=0"));
  assert.ok(devices.includes("ide-cd,drive=cfgdrive,id=cfgcd,bus=ide.1"));
});

test("microvm uses virtio-mmio devices and a SCSI CD-ROM", () => {
  const a = buildQemuArgs(plan({ machine: "microvm", kernel: { path: "/k", initrd: undefined, cmdline: "console=ttyS0" } }));
  const devices = optAfter(a, "-device");
  assert.ok(devices.includes("virtio-blk-device,drive=root"));
  assert.ok(devices.includes("scsi-cd,drive=cfgdrive,id=cfgcd"));
  assert.ok(devices.includes("virtio-net-device,netdev=net0"));
  assert.deepEqual(optAfter(a, "-machine"), ["microvm,rtc=on,accel=tcg"]);
});

test("QMP socket, and the serial console to a socket civm reads (QEMU writes no log file)", () => {
  const a = buildQemuArgs(plan());
  assert.deepEqual(optAfter(a, "-qmp"), ["unix:/s/vms/x/qmp.sock,server=on,wait=off"]);
  assert.deepEqual(optAfter(a, "-chardev"), ["socket,id=console0,path=/s/vms/x/console.sock,server=on,wait=off"]);
  assert.deepEqual(optAfter(a, "-serial"), ["chardev:console0"]);
  assert.ok(!a.some((x) => x.includes(".log")), `no log path in QEMU's argv: ${a.join(" ")}`);
});

test("firmware boot mirrors SeaBIOS's screen to the serial console; direct kernel boot does not", () => {
  const fw = buildQemuArgs(plan({ serconPortFile: "/s/vms/x/sercon-port" }));
  assert.deepEqual(optAfter(fw, "-fw_cfg"), ["name=etc/sercon-port,file=/s/vms/x/sercon-port"]);
  const k = buildQemuArgs(plan({ serconPortFile: "/s/vms/x/sercon-port", kernel: { path: "/k", initrd: undefined, cmdline: "console=ttyS0" } }));
  assert.deepEqual(optAfter(k, "-fw_cfg"), []);
});

test("direct kernel boot, default and custom command lines", () => {
  const a = buildQemuArgs(plan({ kernel: { path: "/k/vmlinuz", initrd: "/k/initrd", cmdline: DEFAULT_CMDLINE } }));
  assert.deepEqual(optAfter(a, "-kernel"), ["/k/vmlinuz"]);
  assert.deepEqual(optAfter(a, "-initrd"), ["/k/initrd"]);
  assert.deepEqual(optAfter(a, "-append"), [DEFAULT_CMDLINE]);
  assert.ok(optAfter(a, "-device").includes("virtio-blk-pci,drive=root"), "bootindex 0 belongs to the linuxboot ROM");
  assert.deepEqual(optAfter(buildQemuArgs(plan()), "-kernel"), []);
});

test("commas in paths are escaped for QEMU's option syntax", () => {
  const a = buildQemuArgs(plan({ overlay: "/a,b/disk.qcow2" }));
  assert.ok(optAfter(a, "-drive")[0]!.startsWith("file=/a,,b/disk.qcow2,"));
});

test("9p host mounts: mapped-xattr by default (guest files 0644/0755 on the host), read-only when asked", () => {
  const a = buildQemuArgs(plan({ mounts: [{ path: "/src", tag: "host", readOnly: false }, { path: "/ro", tag: "data", readOnly: true }] }));
  assert.deepEqual(optAfter(a, "-fsdev"), [
    "local,id=fsdev0,path=/src,security_model=mapped-xattr,fmode=0644,dmode=0755",
    "local,id=fsdev1,path=/ro,security_model=mapped-xattr,fmode=0644,dmode=0755,readonly=on",
  ]);
  assert.ok(optAfter(a, "-device").includes("virtio-9p-pci,fsdev=fsdev1,mount_tag=data"));
  assert.ok(!a.some((x) => x.includes("security_model=none")));
});

test("9p host mounts: mapped-file and passthrough only when the mount says so (passthrough takes no fmode)", () => {
  const a = buildQemuArgs(plan({ mounts: [
    { path: "/vfat", tag: "a", readOnly: false, securityModel: "mapped-file" },
    { path: "/trusted", tag: "b", readOnly: false, securityModel: "passthrough" },
    { path: "/x,y", tag: "c", readOnly: true, securityModel: "mapped-xattr" },
  ] }));
  assert.deepEqual(optAfter(a, "-fsdev"), [
    "local,id=fsdev0,path=/vfat,security_model=mapped-file,fmode=0644,dmode=0755",
    "local,id=fsdev1,path=/trusted,security_model=passthrough",
    "local,id=fsdev2,path=/x,,y,security_model=mapped-xattr,fmode=0644,dmode=0755,readonly=on",
  ]);
});

test("extra qemu-args come last", () => {
  const a = buildQemuArgs(plan({ extraArgs: ["-device", "virtio-balloon"] }));
  assert.deepEqual(a.slice(-2), ["-device", "virtio-balloon"]);
});
