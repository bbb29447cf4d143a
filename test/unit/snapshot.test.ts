// Snapshots' pure parts: the QEMU arguments of a snapshot's VM, the key, what a difference
// in settings is called, and the pool's `start` key.
import { test } from "node:test";
import assert from "node:assert/strict";
import { buildQemuArgs, type QemuPlan } from "../../src/vm/argv.js";
import { describeDifference, snapshotKey, snapshotUnsupported, type SnapshotSettings } from "../../src/images/snapshot.js";
import type { StoredImage } from "../../src/images/store.js";
import type { InstanceSpec } from "../../src/config/types.js";
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { VmRun, resultSummary } from "../../src/vm/run.js";
import { resolvePaths } from "../../src/host/paths.js";
import { tempDir } from "../support/paths.js";

const basePlan: QemuPlan = {
  binary: "qemu-system-x86_64", name: "vm", accel: "tcg", machine: "pc", cpus: 2, ramBytes: 1024 ** 3,
  overlay: "/s/disk.qcow2", configIso: undefined, qmpSocket: "/s/qmp.sock", consoleSocket: "/s/console.sock",
  forwards: [], mounts: [], kernel: { path: "/i/vmlinuz", initrd: "/i/initrd.img", cmdline: "console=ttyS0 civm.snapshot" }, extraArgs: [],
};

test("a snapshot's VM: an empty CD drive (no file), a vmgenid device with the GUID, -incoming last", () => {
  const a = buildQemuArgs({ ...basePlan, emptyCd: true, vmgenid: "0b6c6bd1-4f55-4b3c-9d4e-1a2b3c4d5e6f", incoming: "fd:3" });
  const drives = a.flatMap((x, i) => (x === "-drive" ? [a[i + 1]!] : []));
  assert.ok(drives.includes("if=none,id=cfgdrive,media=cdrom,readonly=on"), drives.join("\n"));
  assert.ok(a.includes("ide-cd,drive=cfgdrive,id=cfgcd,bus=ide.1"));
  assert.ok(a.includes("vmgenid,guid=0b6c6bd1-4f55-4b3c-9d4e-1a2b3c4d5e6f"));
  assert.deepEqual(a.slice(-2), ["-incoming", "fd:3"]);
  // A plain VM has none of these.
  const plain = buildQemuArgs({ ...basePlan, configIso: "/s/config.iso" });
  assert.ok(!plain.some((x) => x.startsWith("vmgenid") || x === "-incoming"));
  assert.ok(plain.some((x) => x.startsWith("file=/s/config.iso,")));
});

const img = { name: "civm-runner", dir: "/s/images/civm-runner", diskPath: "/s/images/civm-runner/disk.qcow2", manifest: { key: "k".repeat(64), sha256: "d".repeat(64) } } as unknown as StoredImage;
const settings: SnapshotSettings = {
  accel: "tcg", machine: "pc", cpuModel: "max", cpus: 2, ramBytes: 2 * 1024 ** 3, diskBytes: 4 * 1024 ** 3,
  kernel: { path: "/k", size: 1, mtimeMs: 1 }, initrd: null, cmdline: "console=ttyS0", network: "user", qemuArgs: [],
};
const qemu = { path: "/usr/bin/qemu-system-x86_64", size: 100, mtimeMs: 5 };

test("the key changes with the image, the QEMU binary and every setting", () => {
  const k = snapshotKey(img, qemu, settings);
  assert.match(k, /^[0-9a-f]{32}$/);
  assert.equal(snapshotKey(img, qemu, { ...settings }), k);
  assert.notEqual(snapshotKey(img, { ...qemu, mtimeMs: 6 }, settings), k);
  assert.notEqual(snapshotKey({ ...img, manifest: { ...img.manifest, sha256: "e".repeat(64) } } as StoredImage, qemu, settings), k);
  for (const over of [{ cpus: 1 }, { ramBytes: 1024 ** 3 }, { machine: "q35" }, { cmdline: "x" }, { network: "none" as const }, { qemuArgs: ["-x"] }, { diskBytes: 1 }, { accel: "kvm" as const }]) {
    assert.notEqual(snapshotKey(img, qemu, { ...settings, ...over }), k, JSON.stringify(over));
  }
});

test("a difference in settings is named", () => {
  assert.equal(describeDifference(settings, { ...settings, ramBytes: 1024 ** 3 }), "memory 2 GiB (snapshot) vs 1 GiB");
  assert.match(describeDifference(settings, { ...settings, cpus: 4, cmdline: "quiet" }), /^cpus 2 \(snapshot\) vs 4, kernel command line "console=ttyS0" \(snapshot\) vs "quiet"$/);
});

test("what cannot have a snapshot says why", () => {
  const spec = { kernel: "/k", machine: "pc" } as InstanceSpec;
  assert.equal(snapshotUnsupported(spec), undefined);
  assert.match(snapshotUnsupported({ ...spec, kernel: undefined })!, /firmware/);
  assert.match(snapshotUnsupported({ ...spec, machine: "microvm" })!, /vmgenid/);
  assert.match(snapshotUnsupported(spec, { mounts: 1 })!, /host mounts/);
});

test("a stop while the snapshot is prepared (made) aborts it: run() returns at once, start none, nothing of the VM made", async () => {
  const stateDir = tempDir("civm-unit-snap-");
  const spec = { name: "vm", image: "/nonexistent.qcow2", kernel: "/k", machine: "pc", cpus: 1, ramBytes: 256 << 20, config: {}, qemuArgs: [], timeoutSeconds: 60, source: { file: "t", index: 0 } } as unknown as InstanceSpec;
  let seen: AbortSignal | undefined;
  const vm = new VmRun({
    spec, paths: resolvePaths({ stateDir }), accel: "tcg", graceSeconds: 1, log: () => {},
    // Stands for makeSnapshot: ends only when its signal says so.
    prepareSnapshot: (signal) => {
      seen = signal;
      return new Promise((_, reject) => signal.addEventListener("abort", () => reject(signal.reason), { once: true }));
    },
  });
  const running = vm.run();
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(seen?.aborted, false);
  vm.stop("signal");
  const r = await running;
  assert.equal(seen?.aborted, true);
  assert.equal(r.start, "none");
  assert.equal(r.reason, "signal");
  assert.equal(r.exitCode, 5);
  assert.match(resultSummary(r), /^vm: signal after [\d.]+ s \(exit 5\), before it started$/);
  assert.ok(!existsSync(join(stateDir, "registry")) || readdirSync(join(stateDir, "registry")).length === 0, "no registry entry");
  assert.ok(!existsSync(r.workDir), "no work dir");
});
