// The fleet's control plane (issue 16) on a throwaway PostgreSQL (test/support/postgres.ts),
// the fake GitHub, and daemons in this process with a launcher that boots nothing: the same
// code paths as civm serve (claims, JIT configs, webhooks recorded through the store, the
// poller, VM exits) without QEMU. Two measures:
//   placements: --hosts simulated hosts (default 20, each a daemon with its own connections)
//               fill one pool of --runners runners (default 1000; each host's capacity its
//               share); placements per second from start until every runner was placed
//               (claim transaction + JIT config + launch). Also the claim transaction alone:
//               the same number of claims from --hosts concurrent claimers.
//   jobs:       three daemons, one pool (maxRunners 6, 2 per host), --jobs jobs (default 60)
//               queued at once through one daemon's store (as its webhook records them); a
//               fake VM comes online after 1 s, takes a queued job, runs it 5 s and powers
//               off. Jobs per minute, and queued → VM start latency (the start of the VM that
//               ran the job).
// Usage: npm run build && node dist/bench/fleet.js [--hosts 20] [--runners 1000] [--jobs 60]
//          [--only placements|jobs] [--out FILE]
import { writeFileSync } from "node:fs";
import { Registry } from "prom-client";
import { Daemon, type LaunchOutcome, type LaunchRequest, type VmHandle, type VmLauncher } from "../src/pool/daemon.js";
import { createGitHubAccess } from "../src/github/app-auth.js";
import { PostgresStore } from "../src/store/postgres.js";
import { startFakeGitHub, type FakeGitHub } from "../test/support/fake-github.js";
import { startPostgres } from "../test/support/postgres.js";
import { poolSpec } from "../test/support/pool-spec.js";
import type { PoolSpec } from "../src/pool/types.js";
import { benchArg } from "./args.js";

const hostCount = Number(benchArg("hosts", "20"));
const runnerCount = Number(benchArg("runners", "1000"));
const jobCount = Number(benchArg("jobs", "60"));
const out = process.argv.includes("--out") ? benchArg("out", "") : undefined;
/** "placements" or "jobs": run one measure only. */
const only = benchArg("only", "");
const quiet = { info: () => {}, warn: () => {}, error: () => {} };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** VMs that never boot: placements only. */
class NullLauncher implements VmLauncher {
  started = 0;
  async imageKey(): Promise<string> {
    return "img";
  }
  start(): VmHandle {
    this.started++;
    return { stop: () => {}, result: new Promise<LaunchOutcome>(() => {}) };
  }
}

/** A runner VM as the tiny guest plays it: online after bootMs, takes a queued job, runs it jobMs, powers off. */
class JobLauncher implements VmLauncher {
  readonly startedAt = new Map<string, number>();
  readonly ranBy = new Map<number, string>();
  constructor(
    private readonly gh: FakeGitHub,
    private readonly store: PostgresStore,
    private readonly o: { bootMs: number; jobMs: number },
  ) {}
  async imageKey(): Promise<string> {
    return "img";
  }
  start(req: LaunchRequest): VmHandle {
    this.startedAt.set(req.name, Date.now());
    let stopped = false;
    const result = (async (): Promise<LaunchOutcome> => {
      await sleep(this.o.bootMs);
      if (stopped) return { reason: "stopped", exitCode: 5 };
      this.gh.setRunner(req.name, { status: "online" });
      for (;;) {
        if (stopped) return { reason: "stopped", exitCode: 5 };
        const job = this.gh.state.jobs.find((j) => j.status === "queued");
        if (job) {
          job.status = "in_progress";
          job.runnerName = req.name;
          this.ranBy.set(job.id, req.name);
          this.gh.setRunner(req.name, { busy: true });
          await this.store.recordWebhook({ delivery: { id: `ip-${job.id}`, event: "workflow_job", action: "in_progress", jobId: job.id }, at: Date.now(), job: { id: job.id, labels: job.labels, status: "in_progress", runnerName: req.name } });
          await sleep(this.o.jobMs);
          job.status = "completed";
          this.gh.setRunner(req.name, { busy: false, status: "offline" });
          await this.store.recordWebhook({ delivery: { id: `c-${job.id}`, event: "workflow_job", action: "completed", jobId: job.id }, at: Date.now(), job: { id: job.id, labels: job.labels, status: "completed", runnerName: req.name } });
          return { reason: "poweroff", exitCode: 0 };
        }
        await sleep(200);
      }
    })();
    return { stop: () => void (stopped = true), result };
  }
}

async function daemonFor(o: { url: string; gh: FakeGitHub; id: string; pool: PoolSpec; cpus: number; launcher: (store: PostgresStore) => VmLauncher }) {
  const store = await PostgresStore.open(o.url, { host: o.id, poolSize: 2 });
  const launcher = o.launcher(store);
  const daemon = new Daemon({
    pools: [o.pool],
    store,
    host: { id: o.id, address: "", cpus: o.cpus, ramBytes: 1024 * 2 ** 30, heartbeatMs: 2000, deadAfterMs: 20_000, placementGraceMs: 3000 },
    access: createGitHubAccess({ kind: "token", token: o.gh.validToken }, { baseUrl: o.gh.url, throttle: false, retries: 0, warn: () => {} }),
    launcher,
    logger: quiet,
    registry: new Registry(),
    pollIntervalMs: 5000,
    shutdownTimeoutMs: 1000,
    tickMs: 1000,
    apiUrl: o.gh.url,
  });
  return { store, launcher, daemon };
}

const pg = await startPostgres();
const results: Record<string, unknown> = { hosts: hostCount, runners: runnerCount, jobs: jobCount };
try {
  // ---- placements ---------------------------------------------------------------------------
  if (only !== "jobs") {
    const gh = await startFakeGitHub();
    const url = await pg.createDatabase("placements");
    const pool = poolSpec({ minRunners: runnerCount, maxRunners: runnerCount, idleTimeoutSeconds: 3600 });
    const members = await Promise.all(Array.from({ length: hostCount }, (_, i) => daemonFor({ url, gh, id: `sim-${String(i).padStart(2, "0")}`, pool, cpus: Math.ceil(runnerCount / hostCount), launcher: () => new NullLauncher() })));
    const t0 = Date.now();
    await Promise.all(members.map((m) => m.daemon.start()));
    const placed = () => members.reduce((n, m) => n + (m.launcher as NullLauncher).started, 0);
    while (placed() < runnerCount) {
      if (Date.now() - t0 > 600_000) throw new Error(`only ${placed()} of ${runnerCount} placed in 10 min`);
      await sleep(50);
    }
    const seconds = (Date.now() - t0) / 1000;
    const perHost = members.map((m) => (m.launcher as NullLauncher).started);
    results.placements = { seconds, perSecond: Math.round(runnerCount / seconds), perHostMin: Math.min(...perHost), perHostMax: Math.max(...perHost), jitConfigs: gh.requests.filter((r) => r.path.endsWith("generate-jitconfig")).length };
    for (const m of members) await m.daemon.shutdown();
    for (const m of members) await m.store.close();
    await gh.close();

    // The claim transaction alone: as many claims from hostCount concurrent claimers.
    const url2 = await pg.createDatabase("claims");
    const stores = await Promise.all(Array.from({ length: hostCount }, (_, i) => PostgresStore.open(url2, { host: `c${i}`, poolSize: 1 })));
    for (let i = 0; i < hostCount; i++) await stores[0]!.registerHost({ id: `c${i}`, address: "", cpus: Math.ceil(runnerCount / hostCount), ramBytes: 1024 * 2 ** 30, pools: ["linux"], version: "bench" });
    let n = 0;
    const c0 = Date.now();
    await Promise.all(
      stores.map(async (s, i) => {
        for (;;) {
          const id = `v${String(n++).padStart(7, "0")}`;
          const r = await s.claimVm({ vm: { id, pool: "linux", name: `r-${id}`, imageKey: "k", createdAt: Date.now(), host: `c${i}`, cpus: 1, ramBytes: 2 ** 28 }, host: `c${i}`, minRunners: runnerCount, maxRunners: runnerCount, waitedMs: 1e9, graceMs: 0, deadAfterMs: 60_000 });
          if (!r.claimed) return;
        }
      }),
    );
    const cs = (Date.now() - c0) / 1000;
    const live = (await stores[0]!.vms({ live: true })).length;
    results.claims = { seconds: cs, perSecond: Math.round(live / cs), live };
    for (const s of stores) await s.close();
  }

  // ---- jobs through three daemons -------------------------------------------------------------
  if (only !== "placements") {
    const gh = await startFakeGitHub();
    const url = await pg.createDatabase("jobs");
    const pool = poolSpec({ minRunners: 0, maxRunners: 6, idleTimeoutSeconds: 0, runner: { ...poolSpec().runner, labels: ["linux"] } });
    const members = await Promise.all(["a", "b", "c"].map((id) => daemonFor({ url, gh, id, pool, cpus: 2, launcher: (store) => new JobLauncher(gh, store, { bootMs: 1000, jobMs: 5000 }) })));
    await Promise.all(members.map((m) => m.daemon.start()));
    const queuedAt = new Map<number, number>();
    const t0 = Date.now();
    for (let j = 1; j <= jobCount; j++) {
      const job = gh.addJob({ id: 50_000 + j, repository: "rust-lang-ci/rust", labels: ["linux"] });
      queuedAt.set(job.id, Date.now());
      await members[0]!.store.recordWebhook({ delivery: { id: `q-${job.id}`, event: "workflow_job", action: "queued", jobId: job.id }, at: Date.now(), job: { id: job.id, labels: job.labels, status: "queued", pool: "linux", repository: job.repository } });
    }
    while (gh.state.jobs.some((j) => j.status !== "completed")) {
      if (Date.now() - t0 > 900_000) throw new Error("jobs did not finish in 15 min");
      await sleep(100);
    }
    const minutes = (Date.now() - t0) / 60_000;
    const latencies: number[] = [];
    for (const [job, at] of queuedAt) {
      const vm = members.map((m) => m.launcher as JobLauncher).find((l) => l.ranBy.has(job));
      const name = vm?.ranBy.get(job);
      const started = name ? vm!.startedAt.get(name) : undefined;
      if (started !== undefined) latencies.push(Math.max(0, started - at) / 1000);
    }
    latencies.sort((x, y) => x - y);
    const pct = (p: number) => latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))]!;
    const perHost = members.map((m) => (m.launcher as JobLauncher).startedAt.size);
    // The first six found a free slot (maxRunners 6): their latency is placement alone; the
    // rest also waited for a slot, so theirs is mostly queueing.
    const firstWave = latencies.slice(0, 6);
    results.jobs = {
      minutes: Number(minutes.toFixed(2)),
      perMinute: Math.round(jobCount / minutes),
      idealPerMinute: Math.round((6 * 60) / 6),
      startLatencySeconds: { freeSlot: { min: firstWave[0], max: firstWave.at(-1) }, p50: pct(50), p90: pct(90), max: latencies.at(-1) },
      vmsPerHost: perHost,
    };
    for (const m of members) await m.daemon.shutdown();
    for (const m of members) await m.store.close();
    await gh.close();
  }
} finally {
  await pg.stop();
}
process.stdout.write(JSON.stringify(results, null, 2) + "\n");
if (out) writeFileSync(out, JSON.stringify(results, null, 2) + "\n");
