// civm serve on real QEMU (TCG) with the tiny guest and the fake GitHub:
// - kill -9 of the daemon with runner VMs running, then a restart on the same state dir: the
//   orphan QEMU processes are ended, their work dirs removed, the runners civm created for them
//   removed from GitHub once offline (marked, then deleted on the next poll), runners civm did
//   not create left alone, and the pool back at minRunners;
// - then, on the restarted daemon, scale-down with a busy runner: `civm pools scale tiny 0`
//   stops the idle runners once idle for idleTimeout, the busy runner's VM keeps running.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { leftovers, qemuProcessesOf, runCivm } from "../support/civm-cli.js";
import type { FakeRunner } from "../support/fake-github.js";
import { logLines, REPO, startServeWithHub, TOKEN, type ApiVm } from "../support/serve-harness.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

/** The process exists and is not a zombie. */
function alive(pid: number): boolean {
  try {
    return !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, "utf8"));
  } catch {
    return false;
  }
}

const IDLE_TIMEOUT = 10;

test("civm serve: kill -9 with runners up, restart: no orphan QEMU or work dir, stale registrations removed (not foreign ones), back to minRunners; scale-down keeps the busy runner", { timeout: 600_000 }, async (t) => {
  const serving = await startServeWithHub(t, {
    image: guest.disk,
    pollInterval: 5,
    pools: [{ minRunners: 2, maxRunners: 3, idleTimeout: IDLE_TIMEOUT }],
    // Runners whose guest stops polling go offline after 6 s, as GitHub's heartbeat does.
    hubOptions: { offlineAfterMs: 6_000 },
  });
  const { gh, hub, s: first } = serving;
  const e = first.e;

  // Runners civm did not create: a hand-made one, and one that merely looks like civm's
  // (same prefix and 8-hex suffix, but no record in civm's store). Both offline.
  const foreign: FakeRunner[] = ["hand-made-runner", "tiny-0badc0de"].map((name) => {
    const r: FakeRunner = { id: gh.state.nextRunnerId++, name, owner: `repo:${REPO}`, os: "Linux", status: "offline", busy: false, labels: ["self-hosted", "tiny"], runnerGroupId: 1, workFolder: undefined, encodedJitConfig: undefined };
    gh.state.runners.set(r.id, r);
    return r;
  });

  await first.poll(async () => (await first.liveVms()).filter((v) => v.state === "idle").length === 2, 180_000, "two idle runners");
  const before = await first.liveVms();
  const oldPids = qemuProcessesOf(e);
  assert.equal(oldPids.length, 2, "two QEMU processes");
  const oldNames = before.map((v) => v.name);
  for (const n of oldNames) assert.equal(gh.runner(n)?.status, "online");

  // --- kill -9 -----------------------------------------------------------------------------
  first.child.kill("SIGKILL");
  const killed = await first.done;
  assert.equal(killed.code, null);
  assert.deepEqual(qemuProcessesOf(e).sort(), [...oldPids].sort(), "the VMs outlive the daemon (orphans)");
  assert.ok(before.every((v) => leftovers(e).some((l) => l.includes(v.id))), `work dirs of ${before.map((v) => v.id).join(", ")} are left: ${leftovers(e).join(", ")}`);

  const s = serving.restart();
  await s.listening();
  // Start-up reconciliation ends the orphans and removes their files.
  await s.poll(() => oldPids.every((p) => !alive(p)), 30_000, "the orphan QEMU processes to be ended");
  await s.poll(() => !leftovers(e).some((l) => before.some((v) => l.includes(v.id))), 30_000, "the old VMs' work dirs and registry entries to be removed");
  // Marked once start-up reconciliation (which also sweeps stale nftables tables) returns.
  await s.poll(async () => (await s.allVms()).filter((v) => oldNames.includes(v.name) && v.state === "finished").length === 2, 30_000, "the old VMs to be marked finished");
  const finishedOld = (await s.allVms()).filter((v) => oldNames.includes(v.name));
  assert.deepEqual(finishedOld.map((v) => [v.state, v.exitReason]), [["finished", "civm-restarted"], ["finished", "civm-restarted"]]);

  // Their registrations go offline (no heartbeat), are marked, then deleted on a later poll.
  await s.poll(() => oldNames.every((n) => gh.runner(n) === undefined), 90_000, "the stale registrations to be removed");
  // The fake GitHub has answered the DELETE before the daemon logs it: wait for the log lines.
  const deletedLogged = () => oldNames.every((n) => logLines(s.stdout()).some((l) => l.msg === "stale runner deregistered" && l.runner === n));
  await s.poll(deletedLogged, 30_000, "the daemon's log of the stale registrations' removal").catch(() => undefined);
  const logs = logLines(s.stdout());
  for (const n of oldNames) {
    const marked = logs.findIndex((l) => l.msg?.toString().startsWith("stale runner registration") && l.runner === n);
    const deleted = logs.findIndex((l) => l.msg === "stale runner deregistered" && l.runner === n);
    assert.ok(marked >= 0 && deleted > marked, `${n}: marked, then deleted on a later pass`);
  }
  const deletes = gh.requests.filter((r) => r.method === "DELETE");
  for (const f of foreign) {
    assert.ok(gh.runner(f.id), `${f.name} (not civm's) is still registered`);
    assert.ok(!deletes.some((r) => r.path.endsWith(`/runners/${f.id}`)), `civm never tried to delete ${f.name}`);
  }
  // Back to minRunners with new VMs.
  await s.poll(async () => (await s.liveVms()).filter((v) => v.state === "idle" && !oldNames.includes(v.name)).length === 2, 180_000, "two new idle runners");
  assert.equal(qemuProcessesOf(e).length, 2, "exactly the two new VMs run");
  const pool = (await s.pools())[0]!;
  assert.equal(pool.idle, 2);
  assert.equal(pool.desired, 2);

  // --- scale-down with a busy runner --------------------------------------------------------
  const [busyVm, idleVm] = (await s.liveVms()) as [ApiVm, ApiVm];
  gh.setRunner(busyVm.name, { busy: true }); // GitHub assigned it a job; no webhook
  await s.poll(async () => (await s.liveVms()).find((v) => v.id === busyVm.id)?.state === "busy", 30_000, "civm to see the runner busy (runners poll)");
  // minRunners 2 idle on top of 1 busy: desired 3, a third VM starts.
  await s.poll(async () => (await s.liveVms()).length === 3, 30_000, "a third VM (minRunners idle on top of the busy one)");
  const cli = await runCivm(["pools", "scale", "tiny", "0", "--api-url", s.base], { ...e, env: { ...e.env, CIVM_API_TOKEN: TOKEN } });
  assert.equal(cli.code, 0, cli.stderr);
  const scaledAt = Date.now();
  assert.match(cli.stdout, /tiny/);
  assert.equal((await s.pools())[0]!.minRunners, 0);
  assert.equal((await s.pools())[0]!.desired, 1, "desired = the busy runner");

  // Every non-busy VM ends (stopped after idleTimeout); the busy one keeps running.
  await s.poll(async () => {
    const live = await s.liveVms();
    return live.length === 1 && live[0]!.id === busyVm.id;
  }, 180_000, "the idle runners to stop");
  const busyPid = qemuProcessesOf(e);
  assert.equal(busyPid.length, 1, "one QEMU left: the busy runner's");
  const stopped = (await s.allVms()).filter((v) => v.state === "finished" && !oldNames.includes(v.name));
  assert.equal(stopped.length, 2);
  for (const v of stopped) assert.equal(v.exitReason, "stopped:idle-timeout", `${v.name}`);
  // Each idle runner was stopped only after idleTimeout of idleness.
  const lines = logLines(s.stdout());
  const at = (msg: string, vm: string) => Date.parse(String(lines.find((l) => l.msg === msg && l.vm === vm)?.time));
  for (const v of stopped) {
    const idleFor = (at("stopping runner VM", v.id) - at("runner online (idle)", v.id)) / 1000;
    assert.ok(idleFor >= IDLE_TIMEOUT - 0.5, `${v.name} stopped after ${idleFor} s idle (idleTimeout ${IDLE_TIMEOUT} s)`);
  }
  assert.ok(stopped.some((v) => v.id === idleVm.id));
  // Well past idleTimeout, the busy runner still runs and is still registered.
  await new Promise((r) => setTimeout(r, Math.max(0, scaledAt + (IDLE_TIMEOUT + 10) * 1000 - Date.now())));
  const still = await s.liveVms();
  assert.deepEqual(still.map((v) => [v.id, v.state]), [[busyVm.id, "busy"]]);
  assert.ok(busyPid.every(alive), "the busy runner's QEMU still runs");
  assert.equal(gh.runner(busyVm.name)?.busy, true);
  assert.ok(!logLines(s.stdout()).some((l) => l.msg === "stopping runner VM" && l.vm === busyVm.id), "civm never asked the busy VM to stop");

  // Its job ends: the VM powers off, the runner is deregistered, the pool (minRunners 0) is empty.
  gh.setRunner(busyVm.name, { busy: false });
  hub.finish(busyVm.name);
  await s.poll(async () => (await s.liveVms()).length === 0, 60_000, "the busy runner's VM to finish");
  assert.equal((await s.allVms()).find((v) => v.id === busyVm.id)?.exitReason, "poweroff");
  await s.poll(() => gh.runner(busyVm.name) === undefined, 15_000, "its runner to be deregistered");

  await s.stopClean();
  assert.deepEqual([...gh.state.runners.values()].map((x) => x.name).sort(), foreign.map((f) => f.name).sort(), "only the runners civm did not create remain");
});
