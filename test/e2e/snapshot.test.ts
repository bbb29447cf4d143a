// Memory snapshots end to end on real QEMU (TCG) with the tiny guest stored as an image
// (docs/images.md "Snapshots"): made on first use, restored with the config disc inserted
// over QMP, unique per restore, never holding the configuration; and the fallbacks (other
// settings, another QEMU, a truncated or damaged memory file). The tests share one state
// dir and run in order: the first makes the snapshot the others use.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync, truncateSync, utimesSync, writeFileSync, existsSync, openSync, writeSync, closeSync } from "node:fs";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { civmEnv, runCivm, startCivm, leftovers, qemuProcessesOf, qemuStarts, type CivmEnv } from "../support/civm-cli.js";
import { storeTinyGuest, TINY_IMAGE } from "../support/tiny-store.js";
import { sendWebhook, workflowJobPayload } from "../support/fake-github.js";
import { logLines, REPO, SECRET, startServeWithHub } from "../support/serve-harness.js";

let e: CivmEnv;
const marker = `cfg-marker-${randomBytes(8).toString("hex")}`;

before(async () => {
  e = civmEnv();
  await storeTinyGuest(e.stateDir);
});

function snapshotsDir(): string {
  return join(e.stateDir, "images", TINY_IMAGE, "snapshots");
}

function snapshots(): string[] {
  return existsSync(snapshotsDir()) ? readdirSync(snapshotsDir()).filter((n) => !n.startsWith(".")).sort() : [];
}

function writeInstances(ram = "256M"): void {
  const inst = (name: string, config: Record<string, unknown>) => ({ name, image: TINY_IMAGE, "cpu-cores": 1, ram, "timeout-seconds": 180, config });
  writeFileSync(join(e.root, "instances.json"), JSON.stringify([inst("clock", { tiny: "date", marker }), inst("plain", { tiny: "poweroff" })], null, 2));
}

function assertClean(): void {
  assert.deepEqual(leftovers(e), [], "work dirs or registry entries were left behind");
  assert.deepEqual(qemuProcessesOf(e), [], "a QEMU process was left running");
}

function resultJson(stdout: string): { start: string; reason: string } {
  return JSON.parse(stdout) as { start: string; reason: string };
}

test("first use makes the snapshot; the restored VM gets its config disc, runs it, powers off; the clock is the host's; the memory file holds no configuration", async () => {
  writeInstances();
  // The guest's clock line is timed as it arrives on civm's stdout (--console).
  const started = startCivm(["run", "clock", "--snapshot", "--console"], e);
  let guestClock: number | undefined;
  let hostClock: number | undefined;
  let buf = "";
  started.child.stdout!.on("data", (d: Buffer) => {
    buf += d.toString();
    const m = /tiny-guest: date (\d+\.\d+)/.exec(buf);
    if (m && guestClock === undefined) {
      hostClock = Date.now() / 1000;
      guestClock = Number(m[1]);
    }
  });
  const r = await started.done;
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /no usable snapshot \(image tiny has no snapshot\): making one first/);
  assert.match(r.stderr, /snapshot [0-9a-f]{8} made in [\d.]+ s \(memory file /);
  assert.match(r.stderr, /clock: running \(pid \d+, tcg, .*restored from snapshot [0-9a-f]{8} of tiny\)/);
  // The disc came after the restore, the guest read it (and ejected it) and did what it said.
  assert.match(r.stdout, /tiny-guest: restored: RNG reseeded/);
  assert.match(r.stdout, new RegExp(`instance.json: .*${marker}`));
  assert.match(r.stderr, /medium removed \(confirmed by query-block\)/);
  assert.match(r.stdout, /tiny-guest: mode date/);
  assert.ok(guestClock !== undefined && hostClock !== undefined, "the guest printed its clock");
  assert.ok(Math.abs(guestClock - hostClock) < 1, `guest clock ${guestClock} vs host ${hostClock}: more than a second apart`);
  // The snapshot: made before any disc, so no configuration in it.
  const [key] = snapshots();
  assert.ok(key, "a snapshot is stored beside the image");
  const mem = readFileSync(join(snapshotsDir(), key, "memory"));
  assert.ok(mem.length > 1024 * 1024, `memory file of ${mem.length} bytes`);
  assert.equal(mem.indexOf(marker), -1, "the instance configuration is in the snapshot's memory file");
  assert.equal(mem.indexOf('"tiny": "date"'), -1, "instance.json is in the snapshot's memory file");
  assert.equal(statSync(join(snapshotsDir(), key, "memory")).mode & 0o777, 0o600);
  // civm image ls shows it.
  const ls = await runCivm(["image", "ls", "--json"], e);
  assert.equal(ls.code, 0, ls.stderr);
  const tiny = (JSON.parse(ls.stdout) as { name: string; snapshots?: { key: string; memoryBytes: number }[] }[]).find((i) => i.name === TINY_IMAGE);
  assert.equal(tiny?.snapshots?.length, 1, ls.stdout);
  assert.equal(tiny!.snapshots![0]!.memoryBytes, mem.length);
  assertClean();
});

test("two VMs restored from one snapshot differ in boot_id and in random bytes read right after the restore", async () => {
  const starts = qemuStarts(e);
  const [a, b] = await Promise.all([runCivm(["run", "plain", "--snapshot", "--console"], e), runCivm(["run", "plain", "--snapshot", "--console"], e)]);
  for (const r of [a, b]) {
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /restored from snapshot/);
  }
  assert.equal(qemuStarts(e) - starts, 2, "both restored from the one snapshot (no new snapshot made)");
  const ids = [a, b].map((r) => {
    const m = /tiny-guest: restored: boot_id (\S+) random ([0-9a-f]+)/.exec(r.stdout);
    assert.ok(m, r.stdout);
    return { bootId: m[1], random: m[2] };
  });
  assert.notEqual(ids[0]!.bootId, ids[1]!.bootId, "boot_id");
  assert.notEqual(ids[0]!.random, ids[1]!.random, "random bytes");
  assertClean();
});

test("fallbacks: other settings and another QEMU are not restored (reason logged; a stale snapshot is removed); a truncated memory file is removed and remade; a damaged one boots cold", async () => {
  const [first] = snapshots();
  // Other settings: the 256M snapshot does not fit a 320M VM; a second one is made beside it.
  writeInstances("320M");
  let r = await runCivm(["run", "plain", "--snapshot"], e);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /made with other settings: memory 256 MiB \(snapshot\) vs 320 MiB/);
  assert.match(r.stderr, /restored from snapshot/);
  assert.equal(snapshots().length, 2);
  assert.ok(snapshots().includes(first!), "the other settings' snapshot is kept");
  writeInstances("256M");

  // Another QEMU binary (an upgrade changes its size or mtime): stale, removed, remade.
  const shim = join(e.shimDir, "qemu-system-x86_64");
  const later = new Date(Date.now() + 5000);
  utimesSync(shim, later, later);
  r = await runCivm(["run", "plain", "--snapshot"], e);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /was made with another QEMU binary .*: removed \(stale\)/);
  assert.match(r.stderr, /restored from snapshot/);
  assert.ok(!snapshots().includes(first!), "the stale snapshot is gone");

  // Truncated memory file: found before QEMU starts, removed and made again.
  const current = snapshots().find((k) => existsSync(join(snapshotsDir(), k, "memory")) && JSON.parse(readFileSync(join(snapshotsDir(), k, "snapshot.json"), "utf8")).settings.ramBytes === 256 * 1024 ** 2)!;
  const memPath = join(snapshotsDir(), current, "memory");
  truncateSync(memPath, Math.floor(statSync(memPath).size / 2));
  r = await runCivm(["run", "plain", "--snapshot"], e);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /is damaged \(its memory file is \d+ bytes, \d+ were saved \(truncated or damaged\)\): removed/);
  assert.match(r.stderr, /restored from snapshot/);

  // Damaged in place (same size): QEMU refuses the stream, the VM boots cold, the snapshot goes.
  const fd = openSync(memPath, "r+");
  writeSync(fd, Buffer.alloc(64), 0, 64, 0);
  closeSync(fd);
  r = await runCivm(["run", "plain", "--snapshot", "--json"], e);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /restoring snapshot [0-9a-f]{8} of tiny failed \(.*migration.*\); booting cold instead/);
  assert.equal(resultJson(r.stdout).start, "boot-after-failed-restore");
  assert.ok(!existsSync(memPath), "the snapshot that failed to restore is removed");
  assertClean();
});

test("a pool with start: snapshot serves jobs end to end from restored VMs (the snapshot made once, on first use)", { timeout: 900_000 }, async (t) => {
  const pe = civmEnv();
  await storeTinyGuest(pe.stateDir);
  const { gh, s } = await startServeWithHub(t, { e: pe, image: TINY_IMAGE, pollInterval: 5, shutdownTimeout: 60, pools: [{ minRunners: 0, maxRunners: 1, start: "snapshot" }] });
  await s.listening();
  for (let n = 1; n <= 2; n++) {
    const job = gh.addJob({ repository: REPO, labels: ["self-hosted", "tiny"] });
    const q = await sendWebhook(`${s.base}/webhook`, { secret: SECRET, payload: await workflowJobPayload("queued", { id: job.id, runId: job.runId, labels: job.labels, repository: REPO }) });
    assert.equal(q.status, 202);
    await s.poll(async () => gh.state.jobs.find((j) => j.id === job.id)?.status === "completed", 300_000, `job ${n} to complete`);
    await s.poll(async () => (await s.liveVms()).length === 0, 60_000, `job ${n}'s VM to finish`);
  }
  const finished = (await s.allVms()).filter((v) => v.state === "finished");
  assert.equal(finished.length, 2);
  for (const v of finished) assert.equal(v.exitReason, "poweroff");
  const lines = logLines(s.stdout());
  assert.equal(lines.filter((l) => l.start === "restore").length, 2, "both runner VMs were restored");
  assert.equal(lines.filter((l) => typeof l.msg === "string" && /snapshot [0-9a-f]{8} made in/.test(l.msg)).length, 1, "the snapshot was made once");
  assert.equal(qemuStarts(pe), 3, "one snapshot VM and two restored runner VMs");
  await s.stopClean();
});
