// VmRunLauncher's image identity: a stored image rebuilt under the same name (new build key
// or disk) is a new image for the pool, so its idle runners are replaced; console logs by id.
import { DEFAULT_NETWORK } from "../../src/net/policy.js";
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, readFileSync, utimesSync, writeFileSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { VmRunLauncher, findConsoleLog } from "../../src/pool/launcher.js";
import type { PoolSpec } from "../../src/pool/types.js";
import { resolvePaths } from "../../src/host/paths.js";
import { accelFor, cmdlineFor } from "../../src/vm/arch.js";
import { tempDir } from "../support/paths.js";

function pool(image: PoolSpec["runner"]["image"]): PoolSpec {
  return {
    name: "linux",
    index: 0,
    maxRunners: 1,
    minRunners: 0,
    runner: { namePrefix: "linux", image, imagePullPolicy: "IfNotPresent", target: { kind: "org", org: "o" }, labels: ["linux"], groupId: 1, registration: "jit", workFolder: "_work" },
    vm: { cpus: 1, ramBytes: 256 << 20, rootDiskBytes: undefined, timeoutSeconds: 60, cmdline: undefined, network: DEFAULT_NETWORK },
    idleTimeoutSeconds: 60,
  };
}

function storeImage(stateDir: string, name: string, key: string, sha: string): void {
  const dir = join(stateDir, "images", name);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "disk.qcow2"), `disk of ${key}`);
  const manifest = { name, key, format: "qcow2", disk: "disk.qcow2", sha256: sha, diskBytes: 10, virtualSize: 10, packages: {}, buildSeconds: 1, createdAt: new Date().toISOString(), source: "build" };
  writeFileSync(join(dir, "manifest.json"), JSON.stringify(manifest));
}

test("imageKey: a stored image rebuilt under the same name (new key or new disk) changes it; a disk path's changes with its mtime", async () => {
  const root = tempDir();
  const paths = resolvePaths({ stateDir: join(root, "state"), logsDir: join(root, "logs") });
  const launcher = new VmRunLauncher({ paths, accel: "tcg", graceSeconds: 1, log: () => {} });
  const stored = pool({ ref: "runner", kind: "stored" });
  storeImage(paths.stateDir, "runner", "a".repeat(64), "1".repeat(64));
  const k1 = await launcher.imageKey(stored);
  assert.equal(await launcher.imageKey(stored), k1, "stable while nothing changes");
  storeImage(paths.stateDir, "runner", "b".repeat(64), "2".repeat(64));
  const k2 = await launcher.imageKey(stored);
  assert.notEqual(k2, k1, "rebuilt: new key");
  storeImage(paths.stateDir, "runner", "b".repeat(64), "3".repeat(64));
  assert.notEqual(await launcher.imageKey(stored), k2, "same key, new disk (forced rebuild)");
  await assert.rejects(launcher.imageKey(pool({ ref: "gone", kind: "stored" })), /image "gone" is not in the image store/);

  const disk = join(root, "disk.img");
  writeFileSync(disk, "x");
  const byPath = pool({ ref: disk, kind: "path", path: disk });
  utimesSync(disk, new Date(1_000_000), new Date(1_000_000));
  const p1 = await launcher.imageKey(byPath);
  utimesSync(disk, new Date(2_000_000), new Date(2_000_000));
  assert.notEqual(await launcher.imageKey(byPath), p1);
});

test("findConsoleLog: the log VmRun wrote for a VM id", async () => {
  const dir = tempDir();
  writeFileSync(join(dir, "linux-20261122-061200-0a0b0c0d.log"), "");
  writeFileSync(join(dir, "linux-20261122-061200-0a0b0c0e.log.old"), "");
  assert.equal(await findConsoleLog(dir, "0a0b0c0d"), join(dir, "linux-20261122-061200-0a0b0c0d.log"));
  assert.equal(await findConsoleLog(dir, "0a0b0c0e"), undefined);
  assert.equal(await findConsoleLog(dir, "../etc"), undefined);
  assert.equal(await findConsoleLog(join(dir, "missing"), "0a0b0c0d"), undefined);
});

test("a pool on a foreign GRUB disk boots its own kernel directly (GRUB's arguments, the pool's appended); firmware-boot: true keeps the firmware", async () => {
  const root = tempDir();
  const paths = resolvePaths({ stateDir: join(root, "state"), logsDir: join(root, "logs") });
  const lines: string[] = [];
  const launcher = new VmRunLauncher({ paths, accel: "tcg", graceSeconds: 1, log: (l) => lines.push(l) });
  // One MBR partition, ext4, /boot/grub/grub.cfg as grub-mkconfig writes its essentials.
  const tree = join(root, "tree");
  mkdirSync(join(tree, "boot", "grub"), { recursive: true });
  const kernel = Buffer.alloc(0x1000);
  kernel.write("HdrS", 0x202, "latin1");
  kernel.writeUInt16LE(0x600, 0x20e);
  kernel.write("7.7.7-pool (test@example) #1 SMP", 0x800, "latin1");
  writeFileSync(join(tree, "boot", "vmlinuz-7.7.7-pool"), kernel);
  writeFileSync(join(tree, "boot", "initrd.img-7.7.7-pool"), "INITRD");
  writeFileSync(join(tree, "boot", "grub", "grub.cfg"), "set default=0\nmenuentry 'Debian' {\n  set root='hd0,msdos1'\n  linux /boot/vmlinuz-7.7.7-pool root=/dev/vda1 ro quiet\n  initrd /boot/initrd.img-7.7.7-pool\n}\n");
  const disk = join(root, "foreign.raw");
  execFileSync("truncate", ["-s", "16M", disk]);
  execFileSync("sfdisk", ["--quiet", "--no-reread", "--no-tell-kernel", disk], { input: "label: dos\nstart=2048, type=83\n" });
  execFileSync("mke2fs", ["-q", "-F", "-t", "ext4", "-d", tree, "-E", `offset=${2048 * 512}`, disk, `${15 * 1024}k`]);

  const p = pool({ ref: disk, kind: "path", path: disk });
  p.vm.cmdline = "quiet=1 extra.opt";
  const spec = await launcher.spec(p, "00000001", (l) => lines.push(l));
  assert.ok(spec.kernel?.startsWith(join(paths.stateDir, "boot-cache")), spec.kernel);
  assert.ok(spec.initrd?.startsWith(join(paths.stateDir, "boot-cache")), spec.initrd);
  assert.match(spec.cmdline!, /^BOOT_IMAGE=\/boot\/vmlinuz-7\.7\.7-pool root=\/dev\/vda1 ro .*extra\.opt/);
  assert.match(spec.cmdline!, /console=ttyS0/);
  assert.ok(lines.some((l) => /booting the image's own kernel 7\.7\.7-pool directly/.test(l)), lines.join("\n"));
  // The opt-out: SeaBIOS and GRUB, no kernel.
  const fw = pool({ ref: disk, kind: "path", path: disk });
  fw.vm.firmwareBoot = true;
  const fwSpec = await launcher.spec(fw, "00000002");
  assert.equal(fwSpec.kernel, undefined);
  assert.equal(fwSpec.firmwareBoot, true);
  // A disk civm cannot read boots through the firmware, with the reason.
  const blank = join(root, "blank.raw");
  execFileSync("truncate", ["-s", "4M", blank]);
  lines.length = 0;
  const blankSpec = await launcher.spec(pool({ ref: blank, kind: "path", path: blank }), "00000003", (l) => lines.push(l));
  assert.equal(blankSpec.kernel, undefined);
  assert.ok(lines.some((l) => /cannot boot .* directly/.test(l)), lines.join("\n"));
});

test("a pool on a stored arm64 image runs arm64 guests: virt, its kernel, TCG on an x86_64 host even when the host has KVM", async () => {
  const root = tempDir();
  const paths = resolvePaths({ stateDir: join(root, "state"), logsDir: join(root, "logs") });
  const launcher = new VmRunLauncher({ paths, accel: "kvm", graceSeconds: 1, log: () => {} });
  for (const [name, arch] of [["runner-a64", "arm64"], ["runner", undefined]] as const) {
    storeImage(paths.stateDir, name, "c".repeat(64), "4".repeat(64));
    const dir = join(paths.stateDir, "images", name);
    writeFileSync(join(dir, "vmlinuz"), "kernel");
    writeFileSync(join(dir, "initrd.img"), "initrd");
    const m = JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8")) as Record<string, unknown>;
    writeFileSync(join(dir, "manifest.json"), JSON.stringify({ ...m, kernel: "vmlinuz", initrd: "initrd.img", ...(arch ? { arch } : {}) }));
  }
  const arm = await launcher.spec(pool({ ref: "runner-a64", kind: "stored" }), "00000001");
  assert.equal(arm.arch, "arm64");
  assert.equal(arm.machine, "virt");
  assert.equal(arm.kernel, join(paths.stateDir, "images", "runner-a64", "vmlinuz"));
  // QEMU's argv makes console=ttyS0 the virt machine's ttyAMA0 (cmdlineFor), as for instances.
  assert.match(cmdlineFor("arm64", arm.cmdline!), /console=ttyAMA0/);
  const x86 = await launcher.spec(pool({ ref: "runner", kind: "stored" }), "00000002");
  assert.equal(x86.arch, undefined);
  assert.equal(x86.machine, "pc");
  assert.match(x86.cmdline!, /console=ttyS0/);
  // KVM only for the host's own architecture.
  assert.equal(accelFor("arm64", "kvm", "x64"), "tcg");
  assert.equal(accelFor(undefined, "kvm", "x64"), "kvm");
  assert.equal(accelFor("arm64", "kvm", "arm64"), "kvm");
  assert.equal(accelFor(undefined, "kvm", "arm64"), "tcg");
  assert.equal(accelFor(undefined, "tcg", "x64"), "tcg");
});
