// A fleet on PostgreSQL (issue 16) with real QEMU: three `civm serve` processes sharing a
// throwaway PostgreSQL (test/support/postgres.ts), each with its own state dir, port and a
// capacity of two 1-cpu runner VMs, one pool of the tests' tiny guest (TCG) with maxRunners 6;
// against a baseline in the same run: one `civm serve` on SQLite with the same pool, capacity
// for the same six VMs, and the same jobs. The fake GitHub and the hub (test/support/
// serve-harness.ts) play GitHub; webhooks go round-robin to the daemons (a load balancer in
// front of the fleet); the baseline gets them all. Each scenario, in order:
//   single: --singles jobs one at a time (queued, served, the VM gone, then the next): queued
//           → VM start with a free slot (placement: webhook, claim transaction, JIT config,
//           QEMU exec), and queued → the job taken by the VM's pretend runner.
//   burst:  --jobs jobs queued at once: jobs per minute (first webhook → last job completed),
//           and the distribution of queued → VM start (the start of the VM that ran the job;
//           past the first six that is mostly waiting for a slot) and queued → job taken.
// "VM start" is civm's "runner VM starting" log line (QEMU spawned) of the runner that took
// the job. All VMs share this machine's cores whichever daemon runs them: the ratios measure
// what the fleet's control plane costs or gains, not more hardware.
// Usage: npm run build && node dist/bench/fleet-qemu.js [--jobs 24] [--singles 3]
//          [--only fleet|sqlite] [--first sqlite|fleet] [--out FILE] [--log-dir DIR]
//        (--first: which scenario runs first, to tell the load's drift from the difference)
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest } from "../test/support/tiny-guest.js";
import { qemuProcessesOf } from "../test/support/civm-cli.js";
import { sendWebhook, startFakeGitHub, workflowJobPayload, type FakeGitHub, type FakeJob } from "../test/support/fake-github.js";
import { freePort } from "../test/support/net.js";
import { logLines, REPO, SECRET, serveConfig, startHub, startServe, type Hub, type Serve } from "../test/support/serve-harness.js";
import { startPostgres, type TestPostgres } from "../test/support/postgres.js";
import { benchArg } from "./args.js";

const jobCount = Number(benchArg("jobs", "24")) || 24;
const singles = Number(benchArg("singles", "3")) || 3;
const only = benchArg("only", "");
const first = benchArg("first", "sqlite");
const out = process.argv.includes("--out") ? benchArg("out", "") : undefined;
const logDir = process.argv.includes("--log-dir") ? benchArg("log-dir", "") : undefined;
const MAX_RUNNERS = 6;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const loadavg = () => readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).map(Number);
const log = (m: string) => process.stderr.write(`[bench fleet-qemu] ${new Date().toISOString().slice(11, 19)} ${m}\n`);
const r2 = (x: number) => Math.round(x * 100) / 100;

function stats(xs: number[]): { n: number; min: number; p50: number; p90: number; max: number; mean: number } | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const at = (q: number) => s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
  return { n: s.length, min: r2(s[0]!), p50: r2(at(0.5)), p90: r2(at(0.9)), max: r2(s.at(-1)!), mean: r2(s.reduce((a, b) => a + b, 0) / s.length) };
}

const guest = await buildTinyGuest();

interface Scenario {
  name: "fleet" | "sqlite";
  gh: FakeGitHub;
  hub: Hub;
  daemons: Serve[];
  /** Where the next webhook goes (round-robin over the daemons). */
  next(): string;
}

async function withScenario<T>(name: Scenario["name"], pg: TestPostgres | undefined, fn: (s: Scenario) => Promise<T>): Promise<T> {
  const gh = await startFakeGitHub();
  const hosts = name === "fleet" ? ["host-a", "host-b", "host-c"] : ["single"];
  const ports = await Promise.all(hosts.map(() => freePort()));
  let rr = 0;
  const next = () => `http://127.0.0.1:${ports[rr++ % ports.length]}/webhook`;
  const hub = await startHub(gh, next, { offlineAfterMs: 6_000 });
  const url = pg ? await pg.createDatabase(`bench_${Date.now()}`) : undefined;
  const daemons = hosts.map((hostId, i) =>
    startServe({
      port: ports[i]!,
      config: {
        ...serveConfig({ port: ports[i]!, gh, hub, image: guest.disk, pollInterval: 30, shutdownTimeout: 30, pools: [{ minRunners: 0, maxRunners: MAX_RUNNERS, idleTimeout: 0 }] }),
        ...(url ? { store: url } : {}),
        // The fleet: two 1-cpu VMs per host; the baseline: all six on its one host.
        fleet: { hostId, cpus: url ? 2 : MAX_RUNNERS, ram: url ? "2G" : "6G", ...(url ? { heartbeat: 2, deadAfter: 20, placementGrace: 3 } : {}) },
      },
    }),
  );
  try {
    for (const d of daemons) await d.listening(60_000);
    return await fn({ name, gh, hub, daemons, next });
  } finally {
    for (const [i, d] of daemons.entries()) {
      const r = await d.stop();
      if (r.code !== 0) log(`${name}: civm serve ${hosts[i]} exited ${r.code}: ${r.stderr.slice(-2000)}`);
      if (logDir) writeFileSync(join(logDir, `fleet-qemu-${name}-${hosts[i]}.log`), d.stdout());
      const left = qemuProcessesOf(d.e);
      if (left.length) log(`QEMU processes left: ${left.join(" ")}`);
      rmSync(d.e.root, { recursive: true, force: true });
    }
    await hub.close();
    await gh.close();
  }
}

/** Runner name → when its VM started ("runner VM starting"), from every daemon's log. */
function vmStarts(s: Scenario): Map<string, { at: number; host: number }> {
  const m = new Map<string, { at: number; host: number }>();
  s.daemons.forEach((d, host) => {
    for (const l of logLines(d.stdout())) if (l.msg === "runner VM starting") m.set(String(l.runner), { at: Date.parse(String(l.time)), host });
  });
  return m;
}

async function queue(s: Scenario, queuedAt: Map<number, number>): Promise<FakeJob> {
  const job = s.gh.addJob({ repository: REPO, labels: ["self-hosted", "tiny"] });
  queuedAt.set(job.id, Date.now());
  const r = await sendWebhook(s.next(), { secret: SECRET, payload: await workflowJobPayload("queued", { id: job.id, runId: job.runId, labels: job.labels, repository: REPO }) });
  if (r.status !== 202) throw new Error(`webhook answered ${r.status}: ${r.body}`);
  return job;
}

function latencies(s: Scenario, jobs: FakeJob[], queuedAt: Map<number, number>) {
  const starts = vmStarts(s);
  const toStart: number[] = [];
  const toTaken: number[] = [];
  const bootToTaken: number[] = [];
  const perHost = s.daemons.map(() => 0);
  for (const j of jobs) {
    const q = queuedAt.get(j.id)!;
    const st = j.runnerName ? starts.get(j.runnerName) : undefined;
    if (st) {
      toStart.push(Math.max(0, st.at - q) / 1000);
      perHost[st.host]!++;
    }
    const took = j.runnerName ? s.hub.tookJobAt.get(j.runnerName) : undefined;
    if (took !== undefined) toTaken.push((took - q) / 1000);
    if (took !== undefined && st) bootToTaken.push((took - st.at) / 1000);
  }
  return { toStart, toTaken, bootToTaken, perHost };
}

async function scenario(name: Scenario["name"], pg: TestPostgres | undefined) {
  return withScenario(name, pg, async (s) => {
    const la0 = loadavg();
    // ---- one at a time: a free slot ----
    const q1 = new Map<number, number>();
    const one: FakeJob[] = [];
    for (let i = 0; i < singles; i++) {
      const job = await queue(s, q1);
      one.push(job);
      await s.daemons[0]!.poll(() => job.status === "completed", 300_000, `single job ${i + 1} to complete`);
      await s.daemons[0]!.poll(async () => (await s.daemons[0]!.liveVms()).length === 0, 120_000, "no live VM");
      log(`${name}: single ${i + 1}/${singles} served by ${job.runnerName}`);
    }
    const single = latencies(s, one, q1);
    // ---- a burst ----
    const q2 = new Map<number, number>();
    const burst: FakeJob[] = [];
    const t0 = Date.now();
    for (let i = 0; i < jobCount; i++) burst.push(await queue(s, q2));
    let shown = -1;
    while (burst.some((j) => j.status !== "completed")) {
      if (Date.now() - t0 > 1_800_000) throw new Error(`${name}: the burst did not finish in 30 min`);
      const done = burst.filter((j) => j.status === "completed").length;
      if (done !== shown && done % 4 === 0) log(`${name}: ${done}/${jobCount} jobs completed`);
      shown = done;
      for (const d of s.daemons) if (d.child.exitCode !== null) throw new Error(`${name}: a daemon exited: ${d.stdout().slice(-3000)}`);
      await sleep(250);
    }
    const minutes = (Date.now() - t0) / 60_000;
    const b = latencies(s, burst, q2);
    const taken = s.hub.events.filter((e) => e.startsWith("job "));
    const servedTwice = burst.concat(one).filter((j) => taken.filter((e) => e.startsWith(`job ${j.id} `)).length !== 1).map((j) => j.id);
    const res = {
      singles: { queuedToVmStartSeconds: stats(single.toStart), queuedToJobTakenSeconds: stats(single.toTaken), vmStartToJobTakenSeconds: stats(single.bootToTaken) },
      burst: {
        jobs: jobCount,
        minutes: r2(minutes),
        jobsPerMinute: r2(jobCount / minutes),
        queuedToVmStartSeconds: stats(b.toStart),
        queuedToJobTakenSeconds: stats(b.toTaken),
        vmStartToJobTakenSeconds: stats(b.bootToTaken),
        vmsPerHost: b.perHost,
      },
      jobsNotServedExactlyOnce: servedTwice,
      loadavg: [la0, loadavg()],
    };
    log(`${name}: ${JSON.stringify(res)}`);
    return res;
  });
}

const report: Record<string, unknown> = { date: new Date().toISOString(), jobs: jobCount, singles, maxRunners: MAX_RUNNERS, loadavgStart: loadavg() };
type Res = Awaited<ReturnType<typeof scenario>>;
let base: Res | undefined;
let fleet: Res | undefined;
const runSqlite = async () => {
  log("baseline: one civm serve on SQLite");
  base = await scenario("sqlite", undefined);
  report.sqlite = base;
};
const runFleet = async () => {
  const pg = await startPostgres();
  try {
    log("fleet: three civm serve on one PostgreSQL");
    fleet = await scenario("fleet", pg);
    report.fleet = fleet;
  } finally {
    await pg.stop();
  }
};
const order = first === "fleet" ? [runFleet, runSqlite] : [runSqlite, runFleet];
report.order = first === "fleet" ? ["fleet", "sqlite"] : ["sqlite", "fleet"];
for (const [i, run] of order.entries()) {
  const name = (report.order as string[])[i];
  if (only && only !== name) continue;
  await run();
}
if (base && fleet) {
  const ratio = (a: number | undefined, b: number | undefined) => (a !== undefined && b ? r2(a / b) : null);
  report.ratiosFleetOverSqlite = {
    jobsPerMinute: ratio(fleet.burst.jobsPerMinute, base.burst.jobsPerMinute),
    singleQueuedToVmStartP50: ratio(fleet.singles.queuedToVmStartSeconds?.p50, base.singles.queuedToVmStartSeconds?.p50),
    burstQueuedToVmStartP50: ratio(fleet.burst.queuedToVmStartSeconds?.p50, base.burst.queuedToVmStartSeconds?.p50),
    burstQueuedToVmStartP90: ratio(fleet.burst.queuedToVmStartSeconds?.p90, base.burst.queuedToVmStartSeconds?.p90),
    burstQueuedToJobTakenP50: ratio(fleet.burst.queuedToJobTakenSeconds?.p50, base.burst.queuedToJobTakenSeconds?.p50),
  };
}
report.loadavgEnd = loadavg();
const text = JSON.stringify(report, null, 2);
process.stdout.write(text + "\n");
if (out) writeFileSync(out, text + "\n");
