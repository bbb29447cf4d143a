// civm serve's timing histograms (boot, job, pickup), the GitHub API request counters and
// the pruning of old state: the reconciler against the fake GitHub with a fake launcher and
// a fake clock, the webhook server on the same registry and store.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Registry } from "prom-client";
import { StateStore } from "../../src/store/index.js";
import { createGitHubAccess } from "../../src/github/app-auth.js";
import { createOctokit, routeTemplate } from "../../src/github/client.js";
import { getRunner, listRunners } from "../../src/github/runners.js";
import { Daemon, type DaemonLogger, type LaunchOutcome, type LaunchRequest, type VmHandle, type VmLauncher } from "../../src/pool/daemon.js";
import { githubRequestObserver, pickupSeconds } from "../../src/pool/metrics.js";
import type { PoolSpec } from "../../src/pool/types.js";
import { createApp } from "../../src/server/index.js";
import { signWebhook, startFakeGitHub, workflowJobPayload } from "../support/fake-github.js";
import { poolSpec } from "../support/pool-spec.js";
import { waitFor } from "../support/civm-cli.js";

class FakeLauncher implements VmLauncher {
  vms: { req: LaunchRequest; exit: (o?: Partial<LaunchOutcome>) => void }[] = [];
  async imageKey(): Promise<string> {
    return "img-1";
  }
  start(req: LaunchRequest): VmHandle {
    let resolve!: (o: LaunchOutcome) => void;
    const result = new Promise<LaunchOutcome>((r) => (resolve = r));
    const exit = (o: Partial<LaunchOutcome> = {}) => resolve({ reason: "poweroff", exitCode: 0, ...o });
    this.vms.push({ req, exit });
    return { result, stop: () => exit({ reason: "stopped", exitCode: 5 }) };
  }
}

const pool = (over: Partial<PoolSpec> = {}): PoolSpec => poolSpec({ maxRunners: 2, idleTimeoutSeconds: 600, ...over });

const logger = (): DaemonLogger & { lines: { msg: string; fields: Record<string, unknown> }[] } => {
  const lines: { msg: string; fields: Record<string, unknown> }[] = [];
  const at = (fields: Record<string, unknown>, msg: string) => void lines.push({ fields, msg });
  return { lines, info: at, warn: at, error: at };
};

async function setup(t: { after: (fn: () => Promise<void> | void) => void }, over: { retentionMs?: number } = {}) {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  let clock = 1_000_000;
  const store = new StateStore(":memory:");
  const registry = new Registry();
  const launcher = new FakeLauncher();
  const log = logger();
  const access = createGitHubAccess({ kind: "token", token: gh.validToken }, { baseUrl: gh.url, throttle: false, retries: 0, warn: () => {}, onRequest: githubRequestObserver(registry) });
  const daemon = new Daemon({ pools: [pool()], store, access, launcher, logger: log, registry, now: () => clock, pollIntervalMs: 60_000, shutdownTimeoutMs: 2_000, apiUrl: gh.url, ...over });
  const app = createApp({ store, pools: [{ name: "linux", labels: ["linux", "x64"], target: { kind: "repo", owner: "rust-lang-ci", repo: "rust" }, groupId: 1, minRunners: 1, maxRunners: 2 }], webhookSecret: "s3cret", apiToken: undefined, maxWebhookBytes: 1 << 20, registry, now: () => clock });
  const webhook = async (payload: Record<string, unknown>, status = 202) => {
    // app.request: no socket needed; signed, with GitHub's headers and a fresh delivery id.
    const body = JSON.stringify(payload);
    const headers = { "content-type": "application/json", "x-github-event": "workflow_job", "x-github-delivery": crypto.randomUUID(), "x-hub-signature-256": signWebhook(body, "s3cret") };
    const res = await app.request("/webhook", { method: "POST", headers, body });
    assert.equal(res.status, status, await res.text());
  };
  return { gh, store, registry, launcher, daemon, log, webhook, advance: (ms: number) => (clock += ms), now: () => clock };
}

/** The histogram's _count and _sum for `pool`. */
async function histogram(registry: Registry, name: string, pool: string): Promise<{ count: number; sum: number }> {
  const text = (await registry.getSingleMetricAsString(name)).split("\n");
  const value = (suffix: string) => Number(text.find((l) => l.startsWith(`${name}_${suffix}{pool="${pool}"}`))?.split(" ").pop() ?? "NaN");
  return { count: value("count"), sum: value("sum") };
}

test("boot, pickup and job histograms: one observation each, labelled with the pool, after the transition", async (t) => {
  const { gh, store, registry, launcher, daemon, webhook, advance } = await setup(t);
  await daemon.pass();
  const vm = launcher.vms[0]!;
  assert.deepEqual(await histogram(registry, "civm_vm_boot_seconds", "linux"), { count: NaN, sum: NaN }, "nothing before the runner is online");

  // 42 s later the runner is online: boot = 42 s.
  advance(42_000);
  gh.setRunner(vm.req.name, { status: "online" });
  await daemon.pass({ poll: true });
  assert.equal(store.vm(vm.req.id)?.state, "idle");
  assert.deepEqual(await histogram(registry, "civm_vm_boot_seconds", "linux"), { count: 1, sum: 42 });
  assert.match(await registry.getSingleMetricAsString("civm_vm_boot_seconds"), /civm_vm_boot_seconds_bucket\{le="45",pool="linux"\} 1/);

  // Job queued (webhook), then in progress on our runner: GitHub's created_at → started_at (7 s).
  const queued = await workflowJobPayload("queued", { id: 501, labels: ["linux", "x64"], repository: "rust-lang-ci/rust" });
  await webhook(queued);
  advance(9_000);
  const running = await workflowJobPayload("in_progress", { id: 501, labels: ["linux", "x64"], repository: "rust-lang-ci/rust", runnerName: vm.req.name });
  Object.assign(running.workflow_job as object, { created_at: "2026-01-01T10:00:00Z", started_at: "2026-01-01T10:00:07Z" });
  await webhook(running);
  assert.equal(store.vm(vm.req.id)?.state, "busy");
  assert.deepEqual(await histogram(registry, "civm_job_pickup_seconds", "linux"), { count: 1, sum: 7 });
  // A replay under a new id is a duplicate: it changes nothing.
  await webhook(running, 200);
  assert.equal((await histogram(registry, "civm_job_pickup_seconds", "linux")).count, 1);

  // The job runs 120 s and completes; the VM powers off 3 s later: job = 120 s.
  advance(120_000);
  await webhook(await workflowJobPayload("completed", { id: 501, labels: ["linux", "x64"], repository: "rust-lang-ci/rust", runnerName: vm.req.name }));
  advance(3_000);
  vm.exit();
  await daemon.settled();
  assert.equal(store.vm(vm.req.id)?.state, "finished");
  assert.deepEqual(await histogram(registry, "civm_job_seconds", "linux"), { count: 1, sum: 120 });
  assert.equal((await histogram(registry, "civm_vm_boot_seconds", "linux")).count, 1, "one boot observation per VM");
});

test("job time without a completed webhook ends at the VM exit; pickup falls back to first seen queued", async (t) => {
  const { gh, store, registry, launcher, daemon, webhook, advance } = await setup(t);
  await daemon.pass();
  const vm = launcher.vms[0]!;
  advance(5_000);
  // The runner goes straight to busy (the runners API says so): that ends its boot too.
  gh.setRunner(vm.req.name, { status: "online", busy: true });
  await daemon.pass({ poll: true });
  assert.equal(store.vm(vm.req.id)?.state, "busy");
  assert.deepEqual(await histogram(registry, "civm_vm_boot_seconds", "linux"), { count: 1, sum: 5 });
  advance(60_000);
  vm.exit();
  await daemon.settled();
  assert.deepEqual(await histogram(registry, "civm_job_seconds", "linux"), { count: 1, sum: 60 });

  // Pickup without GitHub's timestamps: store's queued time → the in_progress delivery.
  await daemon.pass();
  const vm2 = launcher.vms.at(-1)!;
  assert.notEqual(vm2, vm);
  gh.setRunner(vm2.req.name, { status: "online" });
  await daemon.pass({ poll: true });
  const queued = await workflowJobPayload("queued", { id: 601, labels: ["linux", "x64"], repository: "rust-lang-ci/rust" });
  await webhook(queued);
  advance(2_500);
  const running = await workflowJobPayload("in_progress", { id: 601, labels: ["linux", "x64"], repository: "rust-lang-ci/rust", runnerName: vm2.req.name });
  delete (running.workflow_job as Record<string, unknown>).created_at;
  await webhook(running);
  assert.deepEqual(await histogram(registry, "civm_job_pickup_seconds", "linux"), { count: 1, sum: 2.5 });
  assert.equal(pickupSeconds({ created_at: "2026-01-01T10:00:00Z", started_at: "2026-01-01T10:00:00.250Z" }, undefined, 0), 0.25);
  assert.equal(pickupSeconds({ created_at: "garbage" }, undefined, 0), undefined);
});

test("GitHub API requests are counted by route template and status (each attempt); failures and rate limits as errors", async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const registry = new Registry();
  const client = createOctokit({ token: gh.validToken, baseUrl: gh.url, throttle: false, retries: 0, warn: () => {}, onRequest: githubRequestObserver(registry) });
  const target = { kind: "repo" as const, owner: "rust-lang-ci", repo: "rust" };
  const unknown = { kind: "repo" as const, owner: "nobody", repo: "nothing" };
  const { generateJitConfig } = await import("../../src/github/runners.js");
  const jit = await generateJitConfig(client, target, { name: "civm-x-0000000a", runnerGroupId: 1, labels: ["self-hosted"], workFolder: "_work" });
  assert.ok(await getRunner(client, target, jit.runnerId));
  // getRunner answers undefined for a 404: a request that failed, counted as an error.
  assert.equal(await getRunner(client, target, 999_999), undefined);
  await assert.rejects(generateJitConfig(client, unknown, { name: "civm-x-0000000b", runnerGroupId: 1, labels: [], workFolder: "_work" }));
  const requests = await registry.getSingleMetricAsString("civm_github_api_requests_total");
  const errors = await registry.getSingleMetricAsString("civm_github_api_errors_total");
  assert.match(requests, /civm_github_api_requests_total\{route="POST \/repos\/\{owner\}\/\{repo\}\/actions\/runners\/generate-jitconfig",status="201"\} 1/);
  assert.match(requests, /civm_github_api_requests_total\{route="POST \/repos\/\{owner\}\/\{repo\}\/actions\/runners\/generate-jitconfig",status="404"\} 1/);
  assert.match(requests, /civm_github_api_requests_total\{route="GET \/repos\/\{owner\}\/\{repo\}\/actions\/runners\/\{runner_id\}",status="200"\} 1/);
  assert.match(requests, /civm_github_api_requests_total\{route="GET \/repos\/\{owner\}\/\{repo\}\/actions\/runners\/\{runner_id\}",status="404"\} 1/);
  assert.match(errors, /civm_github_api_errors_total\{route="GET \/repos\/\{owner\}\/\{repo\}\/actions\/runners\/\{runner_id\}"\} 1/);
  assert.match(errors, /civm_github_api_errors_total\{route="POST \/repos\/\{owner\}\/\{repo\}\/actions\/runners\/generate-jitconfig"\} 1/);
  for (const text of [requests, errors]) {
    assert.doesNotMatch(text, /rust-lang-ci|nobody|999999|civm-x-/, "no names or ids in the labels");
    assert.doesNotMatch(text, new RegExp(gh.validToken), "no token");
  }

  // Each attempt counts: a 502 that the retry plugin repeats, then a 200; a 429 is an error.
  const retrying = createOctokit({ token: gh.validToken, baseUrl: gh.url, throttle: false, retries: 1, retryBaseMs: 1, warn: () => {}, onRequest: githubRequestObserver(registry) });
  gh.respondWith(/\/actions\/runners$/, 502, undefined, { method: "GET", times: 1 });
  await listRunners(retrying, target);
  gh.respondWith(/\/actions\/runners$/, 429, undefined, { method: "GET", times: 1 });
  await assert.rejects(listRunners(client, target));
  const list = 'civm_github_api_requests_total{route="GET /repos/{owner}/{repo}/actions/runners"';
  const after = await registry.getSingleMetricAsString("civm_github_api_requests_total");
  for (const [status, n] of [["502", 1], ["200", 1], ["429", 1]] as const) assert.ok(after.includes(`${list},status="${status}"} ${n}`), `${status} × ${n} in\n${after}`);
  assert.ok((await registry.getSingleMetricAsString("civm_github_api_errors_total")).includes('civm_github_api_errors_total{route="GET /repos/{owner}/{repo}/actions/runners"} 2'));

  assert.equal(routeTemplate("GET", `${gh.url}/orgs/acme/actions/runners?per_page=100&page=2`, gh.url), "GET /orgs/{org}/actions/runners");
  assert.equal(routeTemplate("post", "/app/installations/77/access_tokens"), "POST /app/installations/{installation_id}/access_tokens");
  assert.equal(routeTemplate("GET", "/repos/{owner}/{repo}/actions/runs/{run_id}/jobs"), "GET /repos/{owner}/{repo}/actions/runs/{run_id}/jobs");
  const observe = githubRequestObserver(registry);
  observe("GET /rate_limited", 429);
  observe("GET /rate_limited", 403);
  observe("GET /rate_limited", undefined);
  assert.match(await registry.getSingleMetricAsString("civm_github_api_errors_total"), /\{route="GET \/rate_limited"\} 3/);
  assert.match(await registry.getSingleMetricAsString("civm_github_api_requests_total"), /\{route="GET \/rate_limited",status="0"\} 1/);
});

test("the daemon's own GitHub calls are counted on its registry", async (t) => {
  const { registry, daemon } = await setup(t);
  await daemon.pass({ poll: true });
  const requests = await registry.getSingleMetricAsString("civm_github_api_requests_total");
  assert.match(requests, /route="GET \/repos\/\{owner\}\/\{repo\}\/actions\/runners",status="200"\} [1-9]/);
  assert.match(requests, /route="POST \/repos\/\{owner\}\/\{repo\}\/actions\/runners\/generate-jitconfig",status="201"\} 1/);
});

/** Wakes the daemon loop and waits (in real time, with a deadline) until a whole iteration has started after the wake. */
async function nextLoopPass(daemon: Daemon): Promise<void> {
  // Wake twice, one whole iteration each: an iteration under way at the first wake may have
  // checked the prune time before the clock moved; the second then surely starts after it.
  const before = daemon.loopPasses;
  daemon.wake();
  await waitFor(() => daemon.loopPasses >= before + 1, 30_000, "a daemon loop pass after a wake");
  daemon.wake();
  await waitFor(() => daemon.loopPasses >= before + 2, 30_000, "a second daemon loop pass after a wake");
}

test("pruning: old finished VMs, completed jobs and deliveries go; live VMs, open jobs and recent rows stay; on start and hourly", async (t) => {
  const day = 86_400_000;
  const { store, daemon, advance, now, log } = await setup(t, { retentionMs: 2 * day });
  const t0 = now();
  // Old rows (10 days ago) and recent ones (1 hour ago).
  const old = t0 - 10 * day;
  const recent = t0 - 3_600_000;
  store.insertVm({ id: "0000old1", pool: "linux", name: "civm-linux-0000old1", imageKey: "k", createdAt: old });
  store.markFinished("0000old1", "poweroff", old);
  store.insertVm({ id: "0000new1", pool: "linux", name: "civm-linux-0000new1", imageKey: "k", createdAt: recent });
  store.markFinished("0000new1", "poweroff", recent);
  // A VM that started long ago and is still busy (a long job): never pruned.
  store.insertVm({ id: "0000busy", pool: "linux", name: "civm-linux-0000busy", imageKey: "k", createdAt: old });
  store.markBusy("0000busy", 9, old);
  store.upsertJob({ id: 1, labels: ["linux"], status: "completed", at: old });
  store.upsertJob({ id: 2, labels: ["linux"], status: "completed", at: recent });
  store.upsertJob({ id: 3, labels: ["linux"], status: "queued", at: old });
  store.upsertJob({ id: 4, labels: ["linux"], status: "in_progress", at: old });
  store.recordDelivery({ id: "d-old", event: "workflow_job", at: old });
  store.recordDelivery({ id: "d-new", event: "workflow_job", at: recent });

  assert.deepEqual(await daemon.prune(), { vms: 1, jobs: 1, deliveries: 1 });
  assert.equal(store.vm("0000old1"), undefined);
  assert.equal(store.vm("0000new1")?.state, "finished");
  assert.equal(store.vm("0000busy")?.state, "busy");
  assert.deepEqual(store.jobs().map((j) => j.id), [2, 3, 4]);
  assert.equal(store.recordDelivery({ id: "d-new", event: "workflow_job", at: t0 }), false, "a recent delivery id still dedups");
  assert.equal(store.recordDelivery({ id: "d-old", event: "workflow_job", at: t0 }), true, "an old one is forgotten");
  assert.ok(log.lines.some((l) => l.msg === "pruned old state" && l.fields.vms === 1));

  // start() prunes once; the loop again an hour later, not before.
  store.recordDelivery({ id: "d-2", event: "workflow_job", at: t0 - 3 * day });
  await daemon.start();
  t.after(() => daemon.shutdown());
  assert.equal(store.recordDelivery({ id: "d-2", event: "workflow_job", at: t0 }), true, "pruned at start");
  store.recordDelivery({ id: "d-3", event: "workflow_job", at: t0 - 3 * day });
  advance(30 * 60_000);
  await nextLoopPass(daemon);
  assert.equal(store.recordDelivery({ id: "d-3", event: "workflow_job", at: t0 }), false, "not pruned within the hour");
  store.recordDelivery({ id: "d-4", event: "workflow_job", at: t0 - 3 * day });
  advance(31 * 60_000);
  await nextLoopPass(daemon);
  assert.equal(store.recordDelivery({ id: "d-4", event: "workflow_job", at: t0 }), true, "pruned after an hour");
});
