// civm serve end to end on real QEMU (TCG): the tiny guest in "runner" mode plays a GitHub
// runner against the fake GitHub through a small hub on the host (10.0.2.2 from the guest).
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { sendWebhook, workflowJobPayload } from "../support/fake-github.js";
import { logLines, REPO, SECRET, startServeWithHub } from "../support/serve-harness.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

test("civm serve: minRunners boot and register, a queued webhook starts another, the job's VM ends and its runner is deregistered, back to minRunners; SIGTERM drains", { timeout: 600_000 }, async (t) => {
  const { gh, hub, s } = await startServeWithHub(t, { image: guest.disk, pollInterval: 5, shutdownTimeout: 60, pools: [{ minRunners: 1, maxRunners: 2 }] });
  const base = s.base;
  const api = (path: string) => s.api<Record<string, unknown>[]>(path);
  const liveVms = () => s.liveVms();
  const poll = s.poll;

  // minRunners 1: one VM boots, its runner registers (online) and civm marks it idle.
  await poll(async () => (await liveVms()).some((v) => v.state === "idle"), 120_000, "an idle runner");
  const first = (await liveVms())[0]!;
  assert.equal((await liveVms()).length, 1);
  assert.equal(gh.runner(first.name)?.status, "online");
  assert.deepEqual(gh.runner(first.name)?.labels, ["self-hosted", "tiny"]);

  // A job is queued (webhook): a second VM starts; one of the runners takes the job.
  const job = gh.addJob({ repository: REPO, labels: ["self-hosted", "tiny"] });
  const q = await sendWebhook(`${base}/webhook`, { secret: SECRET, payload: await workflowJobPayload("queued", { id: job.id, runId: job.runId, labels: job.labels, repository: REPO }) });
  assert.equal(q.status, 202);
  let maxLive = 1;
  await poll(async () => {
    const n = (await liveVms()).length;
    maxLive = Math.max(maxLive, n);
    return n === 2;
  }, 60_000, "a second runner VM");
  await poll(async () => gh.state.jobs[0]?.status === "completed", 180_000, "the job to complete");
  const ran = gh.state.jobs[0]!.runnerName!;
  // Its VM powers off, civm deregisters the runner and records the outcome.
  await poll(async () => {
    const all = (await api("/api/vms?all=1")) as { name: string; state: string; exitReason: string | null; job: number | null }[];
    return all.some((v) => v.name === ran && v.state === "finished");
  }, 60_000, "the job's VM to finish");
  const all = (await api("/api/vms?all=1")) as { name: string; state: string; exitReason: string | null; job: number | null }[];
  const done = all.find((v) => v.name === ran)!;
  assert.equal(done.exitReason, "poweroff");
  assert.equal(done.job, job.id);
  await poll(async () => gh.runner(ran) === undefined, 10_000, "the runner to be deregistered");
  // Back to minRunners: one idle runner.
  await poll(async () => {
    const live = await liveVms();
    maxLive = Math.max(maxLive, live.length);
    return live.length === 1 && live[0]!.state === "idle";
  }, 120_000, "the pool back at minRunners (one idle runner)");
  assert.ok(maxLive <= 2, "maxRunners exceeded");
  const pools = await api("/api/pools");
  assert.equal(pools[0]?.idle, 1);

  // SIGTERM: the idle runner stops (ACPI), is deregistered, civm exits 0.
  await s.stopClean();
  assert.equal(gh.state.runners.size, 0, "every runner deregistered");
  // JSON logs with pool/vm/runner fields and no JIT config.
  const stdout = s.stdout();
  const lines = logLines(stdout);
  assert.ok(lines.some((l) => l.msg === "runner VM starting" && l.pool === "tiny" && typeof l.vm === "string" && typeof l.runner === "string"));
  assert.ok(!/"\.credentials"/.test(stdout));
  assert.deepEqual(hub.events.filter((x) => x.startsWith("job")).length, 1);
});
