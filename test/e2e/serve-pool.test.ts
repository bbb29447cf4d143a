// civm serve end to end on real QEMU (TCG): the tiny guest in "runner" mode plays a GitHub
// runner against the fake GitHub through a small hub on the host (10.0.2.2 from the guest).
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { createServer as createHttpServer, type IncomingMessage } from "node:http";
import { createServer } from "node:net";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { civmEnv, startCivm, waitFor, qemuProcessesOf, leftovers } from "../support/civm-cli.js";
import { startFakeGitHub, sendWebhook, workflowJobPayload, type FakeGitHub } from "../support/fake-github.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

const SECRET = "serve-e2e-webhook-secret";
const TOKEN = "serve-e2e-api-token";
const REPO = "rust-lang-ci/rust";

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

function body(req: IncomingMessage): Promise<string> {
  return new Promise((resolve) => {
    let b = "";
    req.on("data", (c) => (b += c));
    req.on("end", () => resolve(b));
  });
}

/** The guest's side of GitHub: registration, job assignment, completion (with webhooks to civm). */
async function startHub(gh: FakeGitHub, webhookUrl: () => string) {
  const events: string[] = [];
  const runnerOf = (jit: string) => [...gh.state.runners.values()].find((r) => r.encodedJitConfig === jit.trim());
  const srv = createHttpServer((req, res) => {
    void (async () => {
      const r = runnerOf(await body(req));
      if (!r) return res.writeHead(404).end("unknown runner");
      if (req.url === "/register") {
        gh.setRunner(r.id, { status: "online" });
        events.push(`register ${r.name}`);
        return res.end("ok");
      }
      if (req.url === "/job") {
        const job = gh.state.jobs.find((j) => j.status === "queued");
        if (!job || r.busy) return res.end("wait");
        job.status = "in_progress";
        job.runnerName = r.name;
        gh.setRunner(r.id, { busy: true });
        events.push(`job ${job.id} ${r.name}`);
        await sendWebhook(webhookUrl(), { secret: SECRET, payload: await workflowJobPayload("in_progress", { id: job.id, runId: job.runId, labels: job.labels, repository: REPO, runnerName: r.name }) });
        return res.end("run");
      }
      if (req.url === "/done") {
        const job = gh.state.jobs.find((j) => j.runnerName === r.name);
        if (job) job.status = "completed";
        gh.setRunner(r.id, { busy: false, status: "offline" });
        events.push(`done ${r.name}`);
        if (job) await sendWebhook(webhookUrl(), { secret: SECRET, payload: await workflowJobPayload("completed", { id: job.id, runId: job.runId, labels: job.labels, repository: REPO, runnerName: r.name }) });
        return res.end("ok");
      }
      res.writeHead(404).end();
    })();
  });
  await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
  return { port: (srv.address() as { port: number }).port, events, close: () => new Promise<void>((r) => { srv.closeAllConnections(); srv.close(() => r()); }) };
}

test("civm serve: minRunners boot and register, a queued webhook starts another, the job's VM ends and its runner is deregistered, back to minRunners; SIGTERM drains", { timeout: 600_000 }, async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const hub = await startHub(gh, () => `${base}/webhook`);
  t.after(() => hub.close());
  const e = civmEnv();
  const config = {
    listen: `127.0.0.1:${port}`,
    github: { apiUrl: gh.url, token: gh.validToken },
    webhookSecret: SECRET,
    apiToken: TOKEN,
    pollInterval: 5,
    shutdownTimeout: 60,
    pools: [
      {
        name: "tiny",
        minRunners: 1,
        maxRunners: 2,
        idleTimeout: 0,
        cpus: 1,
        ram: "256M",
        "timeout-seconds": 300,
        cmdline: `console=ttyS0 panic=-1 quiet tiny.hub=10.0.2.2:${hub.port}`,
        runner: { name: "tiny", image: guest.disk, repository: REPO, labels: ["tiny"] },
      },
    ],
  };
  const file = join(e.root, "serve.json");
  writeFileSync(file, JSON.stringify(config, null, 2));
  const p = startCivm(["serve", "--config", file, "--grace", "10"], e);
  let stdout = "";
  p.child.stdout!.on("data", (d) => (stdout += d));
  t.after(() => {
    if (p.child.exitCode === null) p.child.kill("SIGKILL");
  });
  const api = async (path: string) => (await fetch(`${base}${path}`, { headers: { authorization: `Bearer ${TOKEN}` } })).json() as Promise<Record<string, unknown>[]>;
  const liveVms = async () => (await api("/api/vms").catch(() => [])) as { name: string; state: string }[];
  const poll = async (cond: () => Promise<boolean>, ms: number, what: string) => {
    const end = Date.now() + ms;
    while (!(await cond())) {
      if (Date.now() > end || p.child.exitCode !== null) throw new Error(`timed out waiting for ${what}\n--- stderr ---\n${p.stderrSoFar()}\n--- stdout ---\n${stdout.slice(-4000)}`);
      await new Promise((r) => setTimeout(r, 500));
    }
  };

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
  p.child.kill("SIGTERM");
  const r = await p.done;
  assert.equal(r.code, 0, `${r.stderr}\n${stdout.slice(-4000)}`);
  assert.equal(gh.state.runners.size, 0, "every runner deregistered");
  assert.deepEqual(qemuProcessesOf(e), []);
  assert.deepEqual(leftovers(e), []);
  // JSON logs with pool/vm/runner fields and no JIT config.
  const lines = stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
  assert.ok(lines.some((l) => l.msg === "runner VM starting" && l.pool === "tiny" && typeof l.vm === "string" && typeof l.runner === "string"));
  assert.ok(!/"\.credentials"/.test(stdout));
  assert.deepEqual(hub.events.filter((x) => x.startsWith("job")).length, 1);
});
