// A signal while a snapshot is made on first use ends the make at once (docs/images.md
// "Snapshots"): the snapshot's VM is ended, its unfinished folder removed, and civm exits as
// any interrupted run does, instead of finishing the make first. Real QEMU (TCG), the tiny
// guest stored as an image; the signal is sent as soon as the snapshot's VM runs, seconds
// before its guest could reach the snapshot point.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { civmEnv, leftovers, qemuProcessesOf, qemuStarts, startCivm, waitFor, type CivmEnv } from "../support/civm-cli.js";
import { storeTinyGuest, TINY_IMAGE } from "../support/tiny-store.js";
import { logLines, startServeWithHub } from "../support/serve-harness.js";

/** Everything in the image's snapshots folder, unfinished ones (.tmp-*) included. */
function snapshotFiles(e: CivmEnv): string[] {
  const d = join(e.stateDir, "images", TINY_IMAGE, "snapshots");
  return existsSync(d) ? readdirSync(d) : [];
}

function assertNothingLeft(e: CivmEnv, what: string): void {
  assert.deepEqual(snapshotFiles(e), [], `${what}: the unfinished snapshot was left`);
  assert.deepEqual(leftovers(e), [], `${what}: work dirs or registry entries were left`);
  assert.deepEqual(qemuProcessesOf(e), [], `${what}: a QEMU process was left running`);
}

test("civm run --snapshot: Ctrl-C while the snapshot is made ends its VM at once, removes the unfinished snapshot and exits 5", async () => {
  const e = civmEnv();
  await storeTinyGuest(e.stateDir);
  writeFileSync(join(e.root, "instances.json"), JSON.stringify([{ name: "plain", image: TINY_IMAGE, "cpu-cores": 1, ram: "256M", "timeout-seconds": 180, config: { tiny: "poweroff" } }]));
  const p = startCivm(["run", "plain", "--snapshot"], e);
  await waitFor(() => /tiny-snapshot: running \(pid \d+/.test(p.stderrSoFar()) || p.child.exitCode !== null, 120_000, "the snapshot's VM to run");
  assert.equal(p.child.exitCode, null, p.stderrSoFar());
  const signalled = performance.now();
  p.child.kill("SIGINT");
  const r = await p.done;
  const seconds = (performance.now() - signalled) / 1000;
  assert.equal(r.code, 5, r.stderr);
  assert.match(r.stderr, /making the snapshot was interrupted: ending its VM/);
  assert.match(r.stderr, /plain: signal after [\d.]+ ?m?s \(exit 5\), before it started/);
  assert.doesNotMatch(r.stderr, /snapshot [0-9a-f]{8} made in|booting cold|plain: running/);
  assert.ok(seconds < 20, `civm took ${seconds.toFixed(1)} s to exit after SIGINT`);
  assert.equal(qemuStarts(e), 1, "only the snapshot's VM was started");
  assertNothingLeft(e, "civm run");
});

test("civm serve: SIGTERM while a pool's first VM makes the image's snapshot ends the make at once and exits cleanly", { timeout: 600_000 }, async (t) => {
  const e = civmEnv();
  await storeTinyGuest(e.stateDir);
  const { s } = await startServeWithHub(t, { e, image: TINY_IMAGE, pollInterval: 5, shutdownTimeout: 60, pools: [{ minRunners: 1, maxRunners: 1, start: "snapshot" }] });
  await s.poll(() => logLines(s.stdout()).some((l) => typeof l.msg === "string" && /tiny-snapshot: running \(pid \d+/.test(l.msg)), 180_000, "the snapshot's VM to run");
  const signalled = performance.now();
  const r = await s.stop();
  const seconds = (performance.now() - signalled) / 1000;
  assert.equal(r.code, 0, `${r.stderr}\n${s.stdout().slice(-4000)}`);
  const msgs = logLines(s.stdout()).map((l) => String(l.msg ?? ""));
  assert.ok(msgs.some((m) => /making the snapshot was interrupted: ending its VM/.test(m)), msgs.join("\n"));
  assert.ok(msgs.some((m) => /stopped while its image's snapshot was being made; it never started/.test(m)), msgs.join("\n"));
  assert.ok(!msgs.some((m) => /snapshot [0-9a-f]{8} made in/.test(m)), "the snapshot was made anyway");
  assert.ok(seconds < 30, `civm serve took ${seconds.toFixed(1)} s to exit after SIGTERM`);
  assert.equal(qemuStarts(e), 1, "only the snapshot's VM was started");
  assertNothingLeft(e, "civm serve");
});
