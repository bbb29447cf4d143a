// The reconciler when GitHub is slow, hangs, rate-limits or is unreachable: targets are
// independent, polls adapt to the budget, the repository list is cached, health is reported.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Registry } from "prom-client";
import { StateStore } from "../../src/store/index.js";
import { createGitHubAccess } from "../../src/github/app-auth.js";
import { Daemon, type LaunchOutcome, type LaunchRequest, type VmHandle, type VmLauncher, type DaemonLogger } from "../../src/pool/daemon.js";
import { budgetReserve, nextPollDelay } from "../../src/pool/github-poll.js";
import type { PoolSpec } from "../../src/pool/types.js";
import { createApp, type ServerPool } from "../../src/server/index.js";
import { startFakeGitHub, type FakeGitHub } from "../support/fake-github.js";
import { poolSpec } from "../support/pool-spec.js";
import { waitFor } from "../support/civm-cli.js";

class Launcher implements VmLauncher {
  started: LaunchRequest[] = [];
  private ends: ((o: LaunchOutcome) => void)[] = [];
  async imageKey(): Promise<string> {
    return "img";
  }
  start(req: LaunchRequest): VmHandle {
    this.started.push(req);
    let end!: (o: LaunchOutcome) => void;
    const result = new Promise<LaunchOutcome>((r) => (end = r));
    this.ends.push(end);
    return { result, stop: () => end({ reason: "stopped", exitCode: 5 }) };
  }
  endAll(): void {
    for (const e of this.ends) e({ reason: "stopped", exitCode: 5 });
  }
}

const logger = (): DaemonLogger & { lines: { level: string; msg: string; fields: Record<string, unknown> }[] } => {
  const lines: { level: string; msg: string; fields: Record<string, unknown> }[] = [];
  const at = (level: string) => (fields: Record<string, unknown>, msg: string) => void lines.push({ level, fields, msg });
  return { lines, info: at("info"), warn: at("warn"), error: at("error") };
};

const repoPool = (name: string, owner: string, repo: string, over: Partial<PoolSpec> = {}) =>
  poolSpec({ name, minRunners: 1, maxRunners: 2, ...over, runner: { ...poolSpec().runner, namePrefix: `civm-${name}`, labels: [name], target: { kind: "repo", owner, repo } } });

async function setup(t: { after: (fn: () => Promise<void> | void) => void }, pools: PoolSpec[], o: { gh?: FakeGitHub; throttle?: boolean; degradedAfterMs?: number } = {}) {
  const gh = o.gh ?? (await startFakeGitHub({ repos: ["rust-lang-ci/rust", "acme/slow"], orgs: ["rust-lang-ci", "acme"] }));
  t.after(() => gh.close());
  let clock = 1_000_000;
  const launcher = new Launcher();
  const log = logger();
  const registry = new Registry();
  // As civm serve builds its clients: throttling on, no rate-limit wait.
  const access = createGitHubAccess({ kind: "token", token: gh.validToken }, { baseUrl: gh.url, throttle: o.throttle ?? true, maxRateLimitWaitSeconds: 0, retries: 0, timeoutMs: 5_000, warn: () => {} });
  const daemon = new Daemon({
    pools,
    store: new StateStore(":memory:"),
    access,
    launcher,
    logger: log,
    registry,
    now: () => clock,
    pollIntervalMs: 60_000,
    shutdownTimeoutMs: 1_000,
    apiUrl: gh.url,
    targetWaitMs: 500,
    ...(o.degradedAfterMs !== undefined ? { githubDegradedAfterMs: o.degradedAfterMs } : {}),
  });
  t.after(async () => {
    launcher.endAll();
    await daemon.shutdown();
  });
  return { gh, launcher, log, registry, daemon, advance: (ms: number) => (clock += ms) };
}

test("a target whose GitHub hangs does not hold up another target's pool: the pass goes on after targetWaitMs", { timeout: 20_000 }, async (t) => {
  const { gh, launcher, daemon } = await setup(t, [repoPool("slow", "acme", "slow"), repoPool("fast", "rust-lang-ci", "rust")]);
  gh.delay(/^\/repos\/acme\/slow\//, Infinity);
  const t0 = Date.now();
  await daemon.pass();
  assert.ok(Date.now() - t0 < 2000, `the pass took ${Date.now() - t0} ms`);
  // GitHub asks for writes 1 s apart (the throttling plugin): the healthy target's JIT config
  // comes a second after the hanging one was asked for.
  await waitFor(() => launcher.started.length > 0, 4000, "the healthy target's runner");
  assert.deepEqual(launcher.started.map((r) => r.pool.name), ["fast"], "the healthy target's pool started its runner; the hanging one has none yet");
  // The next pass does not start a second request to the target still waiting on GitHub.
  const calls = () => gh.requests.filter((r) => r.path.startsWith("/repos/acme/slow/")).length;
  const before = calls();
  await daemon.pass({ poll: true });
  assert.equal(calls(), before, "one GitHub call at a time per target: none while the first hangs");
});

test("a rate-limited target (403, retry-after 1 h) waits without a request, no failure counted; another target's pool starts its runner at once", { timeout: 20_000 }, async (t) => {
  const { gh, launcher, daemon, advance, log } = await setup(t, [repoPool("limited", "acme", "slow", { minRunners: 0 }), repoPool("fast", "rust-lang-ci", "rust", { minRunners: 0 })]);
  gh.respondWith(/^\/repos\/acme\/slow\//, 403, { message: "You have exceeded a secondary rate limit." }, { headers: { "retry-after": "3600" } });
  const t0 = Date.now();
  await daemon.pass({ poll: true });
  assert.ok(Date.now() - t0 < 2000, "no rate-limit wait");
  assert.equal(daemon.githubHealth().targets.find((x) => x.target === "repo:acme/slow")?.state, "rate-limited");
  assert.ok(log.lines.some((l) => l.msg.startsWith("GitHub rate-limits this target")));
  // A job for each pool: the healthy one starts a runner in the same pass; the limited one
  // neither asks GitHub for a JIT config nor counts a failure.
  const store = (daemon as unknown as { opts: { store: StateStore } }).opts.store;
  store.upsertJob({ id: 1, labels: ["limited"], status: "queued", at: 1, pool: "limited", repository: "acme/slow" });
  gh.addJob({ repository: "rust-lang-ci/rust", labels: ["fast"] }); // found by the healthy target's poll
  const calls = gh.requests.filter((r) => r.path.startsWith("/repos/acme/slow")).length;
  advance(60_000);
  await daemon.pass();
  await daemon.githubSettled();
  assert.deepEqual(launcher.started.map((r) => r.pool.name), ["fast"]);
  assert.equal(gh.requests.filter((r) => r.path.startsWith("/repos/acme/slow")).length, calls, "no request to the limited target while the limit lasts");
  assert.equal(store.pool("limited").failures, 0, "a rate limit is not a boot failure");
  // The limit ends (the daemon's clock passes it): the target is polled and served again.
  gh.clearResponses();
  advance(3600_000 + 2000);
  await daemon.pass();
  await daemon.githubSettled();
  await daemon.pass();
  await daemon.githubSettled();
  assert.ok(gh.requests.filter((r) => r.path.startsWith("/repos/acme/slow")).length > calls, "polled again after the limit");
  assert.deepEqual(launcher.started.map((r) => r.pool.name).sort(), ["fast", "limited"]);
});

test("polls adapt to the rate-limit budget: the configured interval while it lasts, stretched when it runs low, after the reset when it is gone", async (t) => {
  const now = Date.now();
  const budget = (remaining: number) => ({ remaining, limit: 5000, resetAt: now + 3600_000 });
  assert.equal(nextPollDelay({ intervalMs: 60_000, now, cost: 3, sharers: 1, budget: budget(4000) }), 60_000);
  // 1000 left − 500 reserve (10 %) = 500 requests for an hour; 25 per poll of 5 targets sharing it: 20 polls, one every 3 min.
  assert.equal(nextPollDelay({ intervalMs: 60_000, now, cost: 5, sharers: 5, budget: budget(1000) }), 180_000);
  assert.equal(nextPollDelay({ intervalMs: 60_000, now, cost: 5, sharers: 1, budget: budget(400) }), 3601_000);
  assert.equal(nextPollDelay({ intervalMs: 60_000, now, cost: 0, sharers: 1, budget: budget(0) }), 60_000, "a poll answered by 304s costs nothing");

  // In the daemon: with 600 of 5000 left, the next poll of a target is pushed back.
  const { gh, daemon, log, registry } = await setup(t, [repoPool("fast", "rust-lang-ci", "rust", { minRunners: 0 })]);
  gh.addJob({ repository: "rust-lang-ci/rust", labels: ["other"] }); // the runs list changes: a poll costs budget
  gh.setRateLimit({ remaining: 520, resetInSeconds: 3600 });
  await daemon.pass({ poll: true });
  const h = daemon.githubHealth().targets[0]!;
  assert.equal(h.state, "ok");
  assert.ok(Date.parse(h.nextPollAt!) - 1_000_000 > 60_000, `next poll later than the interval: ${h.nextPollAt}`);
  assert.ok(log.lines.some((l) => l.msg.startsWith("GitHub rate-limit budget low")));
  assert.match(await registry.getSingleMetricAsString("civm_github_rate_limit_remaining"), /civm_github_rate_limit_remaining\{target="repo:rust-lang-ci\/rust"\} 5\d\d/);
  // github.rateLimitReserve 0 %: the same 520 requests are all spendable, the interval holds.
  await daemon.reload(daemon.currentPools(), { budgetReserveShare: 0 });
  gh.addJob({ repository: "rust-lang-ci/rust", labels: ["other"] });
  gh.setRateLimit({ remaining: 520, resetInSeconds: 3600 });
  await daemon.pass({ poll: true });
  await daemon.githubSettled();
  assert.equal(Date.parse(daemon.githubHealth().targets[0]!.nextPollAt!) - 1_000_000, 60_000, "no reserve: the next poll after pollInterval");
});

test("an organization's poll: the repository list is cached, and repositories with nothing new cost no budget (304)", async (t) => {
  const repos = Array.from({ length: 30 }, (_, i) => `acme/r${i}`);
  const gh = await startFakeGitHub({ repos, orgs: ["acme"] });
  const org = poolSpec({ name: "org", minRunners: 0, runner: { ...poolSpec().runner, namePrefix: "civm-org", labels: ["org"], target: { kind: "org", org: "acme" } } });
  const { daemon, advance } = await setup(t, [org], { gh });
  await daemon.pass({ poll: true });
  await daemon.githubSettled();
  const listed = () => gh.requests.filter((r) => r.path === "/orgs/acme/repos").length;
  assert.equal(listed(), 1);
  assert.equal(gh.requests.filter((r) => r.path.endsWith("/actions/runs")).length, 30, "one request per repository (all statuses at once)");
  const counted = gh.state.counts.counted;
  advance(60_000);
  await daemon.pass();
  await daemon.githubSettled();
  assert.equal(listed(), 1, "the list is not read again within repoListTtl");
  assert.equal(gh.state.counts.counted, counted, "nothing changed: every answer a 304");
  assert.equal(gh.state.counts.notModified, 31, "30 repositories and the runners list");
  // A job appears: found, at the cost of that repository's answers only.
  const job = gh.addJob({ repository: "acme/r7", labels: ["org"] });
  advance(60_000);
  await daemon.pass();
  await daemon.githubSettled();
  const store = (daemon as unknown as { opts: { store: StateStore } }).opts.store;
  assert.equal(store.job(job.id)?.status, "queued");
  // The runner for the job starts in the background: its JIT config may come after the pass.
  await waitFor(() => gh.requests.some((r) => r.path.endsWith("/actions/runners/generate-jitconfig")), 30_000, "the JIT config of the runner started for the job");
  await daemon.githubSettled();
  assert.equal(gh.state.counts.counted - counted, 3, "the changed runs list, its run's jobs, and the JIT config of the runner started for the job");
  advance(10 * 60_000);
  await daemon.pass();
  await daemon.githubSettled();
  assert.equal(listed(), 2, "read again after 10 min");
});

test("the thresholds are settings: the rate-limit reserve share, and a reload's repository-list lifetime and degraded threshold apply at once", async (t) => {
  const now = Date.now();
  const budget = { remaining: 1000, limit: 5000, resetAt: now + 3600_000 };
  assert.equal(budgetReserve(5000), 500);
  assert.equal(budgetReserve(500), 100, "at least 100 requests");
  assert.equal(budgetReserve(5000, 0), 0, "0 %: no reserve");
  // 5 requests a poll, an hour to the reset: 500 spendable (10 %) → 100 polls, one every 36 s;
  // no reserve → 200 polls, every 18 s; 15 % (750) → 50 polls, every 72 s; 25 % (1250) → none before the reset.
  assert.equal(nextPollDelay({ intervalMs: 1000, now, cost: 5, sharers: 1, budget }), 36_000);
  assert.equal(nextPollDelay({ intervalMs: 1000, now, cost: 5, sharers: 1, budget, reserveShare: 0 }), 18_000);
  assert.equal(nextPollDelay({ intervalMs: 1000, now, cost: 5, sharers: 1, budget, reserveShare: 0.15 }), 72_000);
  assert.equal(nextPollDelay({ intervalMs: 1000, now, cost: 5, sharers: 1, budget, reserveShare: 0.25 }), 3601_000);

  const gh = await startFakeGitHub({ repos: ["acme/a", "acme/b"], orgs: ["acme"] });
  const org = poolSpec({ name: "org", minRunners: 0, runner: { ...poolSpec().runner, namePrefix: "civm-org", labels: ["org"], target: { kind: "org", org: "acme" } } });
  const { daemon, advance } = await setup(t, [org], { gh });
  const listed = () => gh.requests.filter((r) => r.path === "/orgs/acme/repos").length;
  const poll = async () => {
    advance(60_000);
    await daemon.pass();
    await daemon.githubSettled();
  };
  await daemon.pass({ poll: true });
  await daemon.githubSettled();
  await poll();
  assert.equal(listed(), 1, "the default lifetime (10 min) keeps the list");
  await daemon.reload([org], { repoListTtlMs: 0 });
  await poll();
  await poll();
  assert.equal(listed(), 3, "repositoryListCache 0: read on every poll");

  gh.respondWith(/^\/orgs\/acme\//, 502);
  await poll();
  await poll();
  const h = daemon.githubHealth();
  assert.deepEqual([h.targets[0]!.state, h.status], ["failing", "ok"], "failing for 1 min: not degraded under the default 5 min");
  await daemon.reload([org], { githubDegradedAfterMs: 30_000 });
  assert.equal(daemon.githubHealth().status, "degraded", "degradedAfter 30 s applies at once");
});

test("GitHub unreachable longer than githubDegradedAfterMs: degraded on /healthz and in the pools API; ok again once it answers", async (t) => {
  const { gh, daemon, advance } = await setup(t, [repoPool("fast", "rust-lang-ci", "rust", { minRunners: 0 })], { degradedAfterMs: 120_000 });
  const p = daemon.currentPools()[0]!;
  const pools = (): ServerPool[] => [{ name: p.name, labels: p.runner.labels, minRunners: 0, maxRunners: 2, target: p.runner.target, groupId: p.runner.groupId, github: (({ state, degraded, since, reason }) => ({ state, degraded, since, reason }))(daemon.poolGitHubHealth(p)) }];
  const store = (daemon as unknown as { opts: { store: StateStore } }).opts.store;
  const app = createApp({ store, pools, webhookSecret: "s", apiToken: "tok", maxWebhookBytes: 1 << 20, registry: new Registry(), health: () => daemon.githubHealth() });
  const healthz = async () => (await (await app.request("/healthz")).json()) as { ok: boolean; status: string; github: { targets: { state: string; degraded: boolean; reason: string | null }[] } };
  const apiPool = async () => ((await (await app.request("/api/pools", { headers: { authorization: "Bearer tok" } })).json()) as { state: string; github: { state: string; degraded: boolean } }[])[0]!;

  assert.equal((await healthz()).status, "ok");
  gh.respondWith(/actions\/runners$/, 502);
  await daemon.pass({ poll: true });
  let h = await healthz();
  assert.equal(h.status, "ok", "failing, not yet degraded");
  assert.equal(h.github.targets[0]!.state, "failing");
  assert.match(h.github.targets[0]!.reason ?? "", /502/);
  advance(130_000);
  await daemon.pass({ poll: true });
  h = await healthz();
  assert.equal(h.ok, true, "the process itself is fine");
  assert.equal(h.status, "degraded");
  assert.equal(h.github.targets[0]!.degraded, true);
  const ap = await apiPool();
  assert.equal(ap.state, "degraded");
  assert.deepEqual([ap.github.state, ap.github.degraded], ["failing", true]);

  gh.clearResponses();
  advance(60_000);
  await daemon.pass({ poll: true });
  assert.equal((await healthz()).status, "ok");
  assert.equal((await apiPool()).state, "active");
});

test("the registration timeout holds while GitHub cannot list the runners", async (t) => {
  const { gh, launcher, daemon, advance, log } = await setup(t, [repoPool("fast", "rust-lang-ci", "rust", { minRunners: 1, maxRunners: 1 })]);
  await daemon.pass();
  await daemon.githubSettled();
  assert.equal(launcher.started.length, 1);
  gh.respondWith(/actions\/runners$/, 502, undefined, { method: "GET" });
  advance(601_000);
  await daemon.pass({ poll: true });
  await daemon.githubSettled();
  await daemon.settled();
  assert.ok(log.lines.some((l) => l.msg === "stopping runner VM" && l.fields.reason === "registration-timeout"), "stopped for its registration timeout");
});
