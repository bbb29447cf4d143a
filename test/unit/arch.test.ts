// Guest architectures: QEMU's command line for x86_64 and arm64, the instances file's "arch",
// --arch, the accelerator for a foreign guest, the kernel command line, the host checks.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildQemuArgs, type QemuPlan } from "../../src/vm/argv.js";
import { ARCH_INFO, accelFor, archProblems, cmdlineFor, hostArch, parseArch, requireArch, withArch } from "../../src/vm/arch.js";
import { VmRun } from "../../src/vm/run.js";
import { NoBootWatch } from "../../src/vm/console.js";
import { loadInstances } from "../../src/config/index.js";
import { ConfigError, HostError } from "../../src/errors/index.js";
import { detectAccel } from "../../src/host/kvm.js";
import { foreignArchChecks } from "../../src/host/doctor.js";
import { archFlag } from "../../src/cli/commands/run.js";
import { snapshotUnsupported } from "../../src/images/snapshot.js";
import type { InstanceSpec } from "../../src/config/types.js";
import { ejectProgram } from "../support/tiny-guest.js";
import { tempDir } from "../support/paths.js";

function plan(over: Partial<QemuPlan> = {}): QemuPlan {
  return {
    binary: "qemu-system-x86_64", name: "vm-1", accel: "tcg", machine: "pc", cpus: 2, ramBytes: 1024 ** 3,
    overlay: "/s/vms/x/disk.qcow2", configIso: "/s/vms/x/config.iso", qmpSocket: "/s/vms/x/qmp.sock", consoleSocket: "/s/vms/x/console.sock",
    forwards: [], mounts: [], kernel: undefined, extraArgs: [], ...over,
  };
}

const optAfter = (args: string[], flag: string): string[] => args.flatMap((a, i) => (a === flag ? [args[i + 1]!] : []));

function spec(over: Partial<InstanceSpec> = {}): InstanceSpec {
  return {
    name: "vm-1", image: "/i/disk.qcow2", cpus: 1, ramBytes: 512 * 1024 ** 2, rootDiskBytes: undefined, timeoutSeconds: 60, sshPort: undefined,
    config: {}, kernel: undefined, initrd: undefined, cmdline: undefined, machine: "pc", qemuArgs: [], source: { file: "instances.json", index: 0 }, ...over,
  };
}

function vmPlan(s: InstanceSpec, accel: "kvm" | "tcg" = "tcg"): QemuPlan {
  return new VmRun({ spec: s, paths: { stateDir: "/s", logsDir: "/l" } as never, accel, graceSeconds: 1, log: () => {} }).plan();
}

test("x86_64 and arm64 command lines: machine, CPU under TCG and KVM, the config CD's bus", () => {
  const x = buildQemuArgs(plan());
  assert.deepEqual(optAfter(x, "-machine"), ["pc,accel=tcg"]);
  assert.deepEqual(optAfter(x, "-cpu"), ["max"]);
  assert.ok(optAfter(x, "-device").some((d) => d.startsWith("ide-cd,drive=cfgdrive,id=cfgcd")));

  const a = buildQemuArgs(plan({ arch: "arm64", machine: "virt", binary: "qemu-system-aarch64" }));
  assert.deepEqual(optAfter(a, "-machine"), ["virt,accel=tcg"]);
  assert.deepEqual(optAfter(a, "-cpu"), ["cortex-a57"]);
  // virt has no IDE: a SCSI CD on virtio-scsi, which has a tray (the eject contract), same QMP id.
  const dev = optAfter(a, "-device");
  assert.ok(dev.includes("virtio-scsi-pci,id=scsi0"), dev.join(" "));
  assert.ok(dev.includes("scsi-cd,drive=cfgdrive,id=cfgcd"), dev.join(" "));
  assert.ok(dev.includes("virtio-blk-pci,drive=root,bootindex=0"));
  assert.ok(dev.some((d) => d.startsWith("virtio-net-pci,")));
  assert.ok(!a.includes("ide-cd"));

  const k = buildQemuArgs(plan({ arch: "arm64", machine: "virt", accel: "kvm" }));
  assert.deepEqual(optAfter(k, "-machine"), ["virt,gic-version=host,accel=kvm"]);
  assert.deepEqual(optAfter(k, "-cpu"), ["host"]);
});

test("VmRun's plan: qemu-system-aarch64, AAVMF only for a disk without a kernel, no SeaBIOS console port, ttyAMA0", () => {
  const x = vmPlan(spec());
  assert.equal(x.binary, "qemu-system-x86_64");
  assert.equal(x.firmware, undefined);
  assert.ok(x.serconPortFile, "SeaBIOS mirrors its screen on x86_64");

  const fw = vmPlan(spec({ arch: "arm64", machine: "virt" }));
  assert.equal(fw.binary, "qemu-system-aarch64");
  assert.equal(fw.serconPortFile, undefined);
  assert.equal(fw.firmware, ARCH_INFO.arm64.firmware!.path);
  const args = buildQemuArgs(fw);
  assert.deepEqual(optAfter(args, "-bios"), ["/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"]);
  assert.deepEqual(optAfter(args, "-fw_cfg"), []);

  const direct = vmPlan(spec({ arch: "arm64", machine: "virt", kernel: "/k/Image", initrd: "/k/initrd", cmdline: "console=ttyS0,115200 root=/dev/vda1 quiet tsc=reliable 8250.nr_uarts=1 no_timer_check" }));
  const d = buildQemuArgs(direct);
  assert.deepEqual(optAfter(d, "-bios"), [], "direct kernel boot needs no firmware");
  assert.deepEqual(optAfter(d, "-append"), ["console=ttyAMA0,115200 root=/dev/vda1 quiet"]);
  assert.deepEqual(optAfter(d, "-kernel"), ["/k/Image"]);
});

test("cmdlineFor: x86_64 lines unchanged; arm64 gets the PL011 console and loses x86-only parameters", () => {
  const line = "console=ttyS0 root=LABEL=civm-root rw panic=-1 quiet tsc=reliable no_timer_check 8250.nr_uarts=1";
  assert.equal(cmdlineFor("x86_64", line), line);
  assert.equal(cmdlineFor("arm64", line), "console=ttyAMA0 root=LABEL=civm-root rw panic=-1 quiet");
  assert.equal(cmdlineFor("arm64", "console=ttyS01 console=tty0"), "console=ttyS01 console=tty0");
});

test("parseArch and --arch: spellings, and a refusal naming the flag and the choices", () => {
  assert.equal(parseArch("aarch64"), "arm64");
  assert.equal(parseArch("ARM64"), "arm64");
  assert.equal(parseArch("amd64"), "x86_64");
  assert.equal(parseArch("riscv64"), undefined);
  assert.equal(archFlag("aarch64"), "arm64");
  assert.throws(() => archFlag("mips"), (e: unknown) => e instanceof ConfigError && /--arch "mips" is not an architecture civm runs; give x86_64 \(also amd64\) or arm64 \(also aarch64\)/.test(e.message));
  assert.equal(hostArch("x64"), "x86_64");
  assert.equal(hostArch("arm64"), "arm64");
  assert.equal(hostArch("riscv64"), undefined);
});

test("--arch on an instance: the arch, and virt when the instance's machine is an x86 one", () => {
  const a = withArch(spec({ machine: "q35" }), "arm64");
  assert.equal(a.arch, "arm64");
  assert.equal(a.machine, "virt");
  const back = withArch(a, "x86_64");
  assert.equal(back.arch, undefined);
  assert.equal(back.machine, "pc");
});

test("instances file: arch arm64 defaults to virt; bad arch, x86 machines for arm64 and virt without arch are refused with the fix", async () => {
  const root = tempDir();
  mkdirSync(join(root, "img"));
  writeFileSync(join(root, "img", "d.qcow2"), "");
  const file = join(root, "instances.json");
  writeFileSync(file, JSON.stringify([{ name: "a", image: "img/d.qcow2", arch: "aarch64" }, { name: "b", image: "img/d.qcow2" }]));
  const ok = await loadInstances(file);
  assert.equal(ok.instances[0]!.arch, "arm64");
  assert.equal(ok.instances[0]!.machine, "virt");
  assert.equal(ok.instances[1]!.arch, undefined);
  assert.equal(ok.instances[1]!.machine, "pc");

  writeFileSync(file, JSON.stringify([
    { name: "a", image: "img/d.qcow2", arch: "sparc" },
    { name: "b", image: "img/d.qcow2", arch: "arm64", machine: "q35" },
    { name: "c", image: "img/d.qcow2", machine: "virt" },
    { name: "d", image: "img/d.qcow2", arch: 64 },
  ]));
  const err = await loadInstances(file).then(() => assert.fail("expected a ConfigError"), (e: unknown) => e);
  assert.ok(err instanceof ConfigError);
  const lines = err.message.split("\n");
  assert.equal(lines.length, 4, err.message);
  assert.match(lines[0]!, /instances\.json: instance "a" \(#1\): "arch" must be the guest's architecture: .* \(got "sparc"\)\.$/);
  assert.match(lines[1]!, /instance "b" \(#2\): "machine" "q35" cannot run an arm64 guest: remove "machine" \(arm64 uses "virt"\) or set it to "virt"\.$/);
  assert.match(lines[2]!, /instance "c" \(#3\): "machine" "virt" is an arm64 machine, and the instance has no "arch" \(x86_64 by default\): add "arch": "arm64", or set "machine" to "pc" or "q35" or "microvm"\.$/);
  assert.match(lines[3]!, /instance "d" \(#4\): "arch" must be .* \(got 64\)\.$/);
});

test("accelerator: a foreign guest is emulated (TCG), --accel kvm for it is refused; the host's own arch on arm64 uses a usable /dev/kvm", async () => {
  const stateDir = tempDir();
  const r = await detectAccel({ stateDir, arch: "arm64", hostNodeArch: "x64", env: {} });
  assert.equal(r.accel, "tcg");
  assert.match(r.reason, /an arm64 guest on an x86_64 host is emulated/);
  await assert.rejects(detectAccel({ stateDir, arch: "arm64", hostNodeArch: "x64", env: { CIVM_ACCEL: "kvm" } }), (e: unknown) => e instanceof ConfigError && /KVM cannot run an arm64 guest on this x86_64 host/.test(e.message));
  const x86OnArm = await detectAccel({ stateDir, arch: "x86_64", hostNodeArch: "arm64", env: {} });
  assert.equal(x86OnArm.accel, "tcg");
  const dev = join(stateDir, "kvm");
  writeFileSync(dev, "");
  const native = await detectAccel({ stateDir, arch: "arm64", hostNodeArch: "arm64", env: {}, kvmDevice: dev });
  assert.equal(native.accel, "kvm");
  const noKvm = await detectAccel({ stateDir, arch: "arm64", hostNodeArch: "arm64", env: {}, kvmDevice: join(stateDir, "none") });
  assert.equal(noKvm.accel, "tcg");
});

test("host checks: the missing emulator and firmware are named with their Debian packages; requireArch says where and how to fix", async () => {
  const none = { which: async () => undefined, exists: () => false };
  assert.deepEqual(await archProblems("x86_64", { firmware: true, which: async () => "/usr/bin/qemu-system-x86_64", exists: () => false }), []);
  const p = await archProblems("arm64", { firmware: true, ...none });
  assert.equal(p.length, 2);
  assert.match(p[0]!, /qemu-system-aarch64 is not installed \(Debian package qemu-system-arm/);
  assert.match(p[1]!, /QEMU_EFI\.fd is missing \(Debian package qemu-efi-aarch64\)/);
  assert.equal((await archProblems("arm64", { firmware: false, ...none })).length, 1, "a kernel booted directly needs no firmware");
  // requireArch against this host: passes when installed; otherwise the paragraph names it all.
  const installed = (await archProblems("arm64", { firmware: true })).length === 0;
  const call = requireArch("arm64", { firmware: true, where: "instances.json: instance \"a\" (#1)", field: '"arch":', dropHint: 'remove "arch"' });
  if (installed) await call;
  else await assert.rejects(call, (e: unknown) => e instanceof HostError && /^instances\.json: instance "a" \(#1\): "arch": arm64 needs what this host lacks: .*Install it \(apt-get install qemu-system-arm qemu-efi-aarch64\), or remove "arch"\.$/.test(e.message));
});

test("snapshots are refused for arm64 guests with the reason", () => {
  assert.match(snapshotUnsupported(spec({ arch: "arm64", machine: "virt", kernel: "/k" })) ?? "", /arm64 guests have no snapshots yet/);
  assert.equal(snapshotUnsupported(spec({ kernel: "/k" })), undefined);
});

test("the tiny guest's eject is an ELF for its architecture", () => {
  const x = ejectProgram("x86_64");
  const a = ejectProgram("arm64");
  assert.equal(x.readUInt16LE(18), 0x3e);
  assert.equal(a.readUInt16LE(18), 0xb7);
  assert.equal(a.readUInt32LE(120), 0xf9400be1, "ldr x1, [sp, #16] first");
  assert.equal(a.length, 120 + 20 * 4);
});

test("civm doctor: what arm64 guests need on an x86_64 host, optional (warnings with fixes, never failures)", async () => {
  const dir = tempDir();
  const noPath = { PATH: dir };
  const fail = await foreignArchChecks({ binfmtDir: join(dir, "binfmt"), fileExists: async () => false, hostNodeArch: "x64" }, noPath);
  assert.deepEqual(fail.map((c) => c.name), ["arm64 guests: qemu-system-aarch64", "arm64 guests: UEFI firmware", "arm64 image builds: binfmt_misc"]);
  assert.ok(fail.every((c) => c.severity === "optional" && c.status === "warn"), JSON.stringify(fail));
  assert.equal(fail[0]!.fix, "apt-get install -y qemu-system-arm");
  assert.equal(fail[1]!.fix, "apt-get install -y qemu-efi-aarch64");
  assert.match(fail[2]!.detail, /binfmt_misc is not mounted/);
  assert.match(fail[2]!.fix!, /mount -t binfmt_misc binfmt_misc .*update-binfmts --enable qemu-aarch64/);

  // Present: a qemu-system-aarch64 on PATH, the firmware, an enabled F entry.
  writeFileSync(join(dir, "qemu-system-aarch64"), "#!/bin/sh\necho 'QEMU emulator version 7.2.19'\n", { mode: 0o755 });
  const binfmt = join(dir, "binfmt");
  mkdirSync(binfmt);
  writeFileSync(join(binfmt, "status"), "enabled\n");
  writeFileSync(join(binfmt, "qemu-aarch64"), "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\n");
  const ok = await foreignArchChecks({ binfmtDir: binfmt, fileExists: async () => true, hostNodeArch: "x64" }, { PATH: `${dir}:/usr/bin:/bin` });
  assert.ok(ok.every((c) => c.status === "pass"), JSON.stringify(ok));
  assert.match(ok[0]!.detail, /7\.2\.19.*TCG on this x86_64 host/);
  writeFileSync(join(binfmt, "qemu-aarch64"), "enabled\ninterpreter /usr/bin/qemu-aarch64\nflags: \n");
  const noF = await foreignArchChecks({ binfmtDir: binfmt, fileExists: async () => true, hostNodeArch: "x64" }, { PATH: `${dir}:/usr/bin:/bin` });
  assert.match(noF[2]!.detail, /lacks the F flag/);
  // On an arm64 host arm64 guests are native: nothing extra to report.
  assert.deepEqual(await foreignArchChecks({ hostNodeArch: "arm64" }, noPath), []);
});

test("no-boot: AAVMF (arm64's UEFI) giving up on the disks and starting its shell ends the VM like SeaBIOS's message", () => {
  const w = new NoBootWatch();
  assert.equal(w.push('BdsDxe: failed to load Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x1,0x0): Not Found\r\n'), undefined);
  assert.equal(w.push('BdsDxe: starting Boot0002 "EFI Internal Shell" from Fv(64074AFE-340A-4BE6-94BA-91B5B4D0F71E)/FvFile(7C04A583-9E3E-4F1C-AD65-E05268D0B4D1)\r\n'),
    'BdsDxe: starting Boot0002 "EFI Internal Shell" from Fv(64074AFE-340A-4BE6-94BA-91B5B4D0F71E)/FvFile(7C04A583-9E3E-4F1C-AD65-E05268D0B4D1)');
  const booted = new NoBootWatch();
  assert.equal(booted.push('EFI stub: Booting Linux Kernel...\r\nBdsDxe: starting Boot0002 "EFI Internal Shell"\r\n'), undefined);
});
