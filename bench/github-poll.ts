// GitHub polling of `civm serve` (issue 11) against the fake GitHub, which counts what it is
// asked. The daemon runs in this process with a launcher that starts nothing, so only its
// GitHub traffic is measured. Two measures, for this build and, with --before DIR, for
// another build's dist/ (e.g. the commit before issue 11 built in a temp worktree):
//   org-hour: an organization of --repos repositories (default 200), the default poll interval
//             (60 s), one simulated hour (the daemon's clock; 60 polls), a job appearing in
//             one repository every 10 min and done 3 min later (labels no pool has, so no VM
//             starts). Requests the fake answered, those that cost rate-limit budget, 304s.
//   limited:  two repository targets, one answering 403 "secondary rate limit" with
//             retry-after 3600 to everything; a job for the other's pool arrives (as a webhook
//             would record it): time until that pool starts a runner (real clock, capped at
//             --cap seconds).
// Usage: npm run build && node dist/bench/github-poll.js [--repos 200] [--minutes 60] [--cap 60]
//          [--before /tmp/civm-old/dist] [--out FILE]
import { writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { Registry } from "prom-client";
import { startFakeGitHub } from "../test/support/fake-github.js";
import { poolSpec } from "../test/support/pool-spec.js";
import type { PoolSpec } from "../src/pool/types.js";
import { benchArg } from "./args.js";

const repoCount = Number(benchArg("repos", "200")) || 200;
const capSeconds = Number(benchArg("cap", "60")) || 60;
/** Simulated minutes of org-hour (one poll each); the counts are scaled to an hour. */
const minutes = Number(benchArg("minutes", "60")) || 60;
const before = process.argv.includes("--before") ? resolve(benchArg("before", "")) : undefined;
const out = process.argv.includes("--out") ? benchArg("out", "") : undefined;

interface Build {
  name: string;
  Daemon: new (o: Record<string, unknown>) => {
    pass(o?: { poll?: boolean }): Promise<void>;
    start(): Promise<void>;
    wake(): void;
    shutdown(): Promise<void>;
    githubSettled?: () => Promise<void>;
  };
  createGitHubAccess: (c: unknown, o: Record<string, unknown>) => unknown;
  StateStore: new (p: string) => { upsertJob(j: Record<string, unknown>): void; close(): void };
}

async function load(dist: string, name: string): Promise<Build> {
  const url = (p: string) => pathToFileURL(join(dist, p)).href;
  const d = (await import(url("src/pool/daemon.js"))) as { Daemon: Build["Daemon"] };
  const a = (await import(url("src/github/app-auth.js"))) as { createGitHubAccess: Build["createGitHubAccess"] };
  const s = (await import(url("src/store/index.js"))) as { StateStore: Build["StateStore"] };
  return { name, Daemon: d.Daemon, createGitHubAccess: a.createGitHubAccess, StateStore: s.StateStore };
}

const quiet = { info: () => {}, warn: () => {}, error: () => {} };

/** A launcher whose VMs never come online and end when stopped. */
function launcher(started: { pool: string; at: number }[]) {
  return {
    imageKey: async () => "img",
    start: (req: { pool: PoolSpec }) => {
      started.push({ pool: req.pool.name, at: Date.now() });
      let end!: (o: unknown) => void;
      const result = new Promise((r) => (end = r));
      return { result, stop: () => end({ reason: "stopped", exitCode: 5 }) };
    },
  };
}

/** civm serve's client options (the old build ignores the ones it does not know). */
const serveClient = (url: string) => ({ baseUrl: url, warn: () => {}, maxRateLimitWaitSeconds: 0 });

async function orgHour(b: Build): Promise<Record<string, number>> {
  const repos = Array.from({ length: repoCount }, (_, i) => `acme/repo-${i}`);
  const gh = await startFakeGitHub({ repos, orgs: ["acme"] });
  // Counting, not limiting: the old build would run out of budget within the hour.
  gh.setRateLimit({ remaining: 10_000_000, limit: 10_000_000 });
  let clock = Date.parse("2026-01-01T00:00:00Z");
  const pool = poolSpec({ name: "org", minRunners: 0, runner: { ...poolSpec().runner, namePrefix: "civm-org", labels: ["org"], target: { kind: "org", org: "acme" } } });
  const store = new b.StateStore(":memory:");
  const daemon = new b.Daemon({
    pools: [pool],
    store,
    access: b.createGitHubAccess({ kind: "token", token: gh.validToken }, serveClient(gh.url)),
    launcher: launcher([]),
    logger: quiet,
    registry: new Registry(),
    now: () => clock,
    pollIntervalMs: 60_000,
    shutdownTimeoutMs: 1000,
    apiUrl: gh.url,
  });
  const t0 = Date.now();
  const jobs: { job: { status: string }; doneAt: number }[] = [];
  for (let minute = 0; minute < minutes; minute++) {
    if (minute % 10 === 0) jobs.push({ job: gh.addJob({ repository: repos[(minute * 7) % repos.length]!, labels: ["other"] }), doneAt: minute + 3 });
    for (const j of jobs) if (j.doneAt === minute) j.job.status = "completed";
    // Local passes every 5 s between polls cost nothing; one pass per simulated minute polls.
    await daemon.pass();
    await daemon.githubSettled?.();
    clock += 60_000;
  }
  const wall = (Date.now() - t0) / 1000;
  await daemon.shutdown();
  store.close();
  await gh.close();
  const perHour = (n: number) => Math.round((n * 60) / minutes);
  return { simulatedMinutes: minutes, requestsPerHour: perHour(gh.state.counts.total), budgetCountedPerHour: perHour(gh.state.counts.counted), notModifiedPerHour: perHour(gh.state.counts.notModified), wallSeconds: Math.round(wall * 10) / 10 };
}

async function limited(b: Build): Promise<Record<string, number | string>> {
  const gh = await startFakeGitHub({ repos: ["acme/limited", "acme/fine"], orgs: ["acme"] });
  gh.respondWith(/^\/repos\/acme\/limited\//, 403, { message: "You have exceeded a secondary rate limit." }, { headers: { "retry-after": "3600" } });
  const mk = (name: string, repo: string) => poolSpec({ name, minRunners: 0, maxRunners: 1, runner: { ...poolSpec().runner, namePrefix: `civm-${name}`, labels: [name], target: { kind: "repo", owner: "acme", repo } } });
  const started: { pool: string; at: number }[] = [];
  const store = new b.StateStore(":memory:");
  const daemon = new b.Daemon({
    pools: [mk("limited", "limited"), mk("fine", "fine")],
    store,
    access: b.createGitHubAccess({ kind: "token", token: gh.validToken }, serveClient(gh.url)),
    launcher: launcher(started),
    logger: quiet,
    registry: new Registry(),
    pollIntervalMs: 60_000,
    shutdownTimeoutMs: 1000,
    apiUrl: gh.url,
  });
  await daemon.start();
  const until = Date.now() + 30_000;
  while (!gh.requests.some((r) => r.path.startsWith("/repos/acme/limited/")) && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
  await new Promise((r) => setTimeout(r, 500)); // the 403 has been answered
  // What POST /webhook does with a queued job: record it, wake the reconciler.
  const t0 = Date.now();
  store.upsertJob({ id: 1, labels: ["fine"], status: "queued", at: t0, pool: "fine", repository: "acme/fine" });
  daemon.wake();
  while (!started.some((s) => s.pool === "fine") && Date.now() - t0 < capSeconds * 1000) await new Promise((r) => setTimeout(r, 10));
  const got = started.find((s) => s.pool === "fine");
  const result = got ? { seconds: Math.round((got.at - t0) / 10) / 100 } : { seconds: `> ${capSeconds} (no runner started)` };
  // The old build may be stuck in a one-hour wait: do not wait for its shutdown.
  void daemon.shutdown().catch(() => {});
  await gh.close();
  return result;
}

const builds: Build[] = [];
if (before) builds.push(await load(before, `before (${before})`));
builds.push(await load(resolve(new URL("..", import.meta.url).pathname), "after (this build)"));
const results: Record<string, unknown> = { repos: repoCount, pollIntervalSeconds: 60 };
for (const b of builds) {
  const r = { orgHour: await orgHour(b), limited: await limited(b) };
  results[b.name] = r;
  process.stdout.write(`${b.name}: ${JSON.stringify(r)}\n`);
}
if (out) writeFileSync(out, JSON.stringify(results, null, 2));
// The old build's daemon may still sleep in a rate-limit wait.
process.exit(0);
