import { test } from "node:test";
import assert from "node:assert/strict";
import { Registry } from "prom-client";
import { StateStore } from "../../src/store/index.js";
import { createApp, listen, type ServerPool } from "../../src/server/index.js";
import { createGitHubAccess } from "../../src/github/app-auth.js";
import { JobRouter } from "../../src/pool/routing.js";
import { sendWebhook, startFakeGitHub, workflowJobPayload } from "../support/fake-github.js";

const SECRET = "webhook-secret-0123";
const TOKEN = "api-token-abcdef";

async function start(t: { after: (fn: () => Promise<void> | void) => void }, o: { store?: StateStore; pools?: ServerPool[]; router?: (registry: Registry) => JobRouter } = {}) {
  const store = o.store ?? new StateStore(":memory:");
  const registry = new Registry();
  let woken = 0;
  const pools: ServerPool[] = o.pools ?? [
    { name: "linux", labels: ["self-hosted", "linux"], target: { kind: "repo", owner: "o", repo: "r" }, groupId: 1, minRunners: 1, maxRunners: 3 },
    { name: "arm", labels: ["arm64"], target: { kind: "org", org: "o" }, groupId: 1, minRunners: 0, maxRunners: 2 },
  ];
  const app = createApp({ store, pools, webhookSecret: SECRET, apiToken: TOKEN, maxWebhookBytes: 64 * 1024, registry, onDemand: () => woken++, ...(o.router ? { router: o.router(registry) } : {}) });
  const srv = await listen(app, "127.0.0.1", 0);
  t.after(() => srv.close());
  const api = (path: string, init: RequestInit = {}) => fetch(`${srv.url}${path}`, { ...init, headers: { authorization: `Bearer ${TOKEN}`, "content-type": "application/json", ...(init.headers as Record<string, string>) } });
  return { store, registry, srv, api, woken: () => woken };
}

test("signed workflow_job deliveries are recorded: queued, in_progress (runner busy), completed", async (t) => {
  const { store, srv, woken } = await start(t);
  store.insertVm({ id: "aaaa0001", pool: "linux", name: "runner-aaaa0001", imageKey: "k", createdAt: 1 });
  store.markIdle("aaaa0001", 2);
  const url = `${srv.url}/webhook`;
  const queued = await sendWebhook(url, { secret: SECRET, payload: await workflowJobPayload("queued", { id: 11, labels: ["self-hosted", "Linux"], repository: "o/r" }) });
  assert.equal(queued.status, 202);
  assert.deepEqual(JSON.parse(queued.body), { result: "accepted", pool: "linux" });
  assert.equal(store.job(11)?.status, "queued");
  assert.equal(store.job(11)?.pool, "linux");
  assert.equal(store.job(11)?.repository, "o/r");
  const running = await sendWebhook(url, { secret: SECRET, payload: await workflowJobPayload("in_progress", { id: 11, labels: ["self-hosted", "linux"], runnerName: "runner-aaaa0001" }) });
  assert.equal(running.status, 202);
  assert.equal(store.vm("aaaa0001")?.state, "busy");
  assert.equal(store.vm("aaaa0001")?.jobId, 11);
  await sendWebhook(url, { secret: SECRET, payload: await workflowJobPayload("completed", { id: 11, labels: ["self-hosted", "linux"], runnerName: "runner-aaaa0001" }) });
  assert.equal(store.job(11)?.status, "completed");
  assert.equal(woken(), 3);
  const unmatched = await sendWebhook(url, { secret: SECRET, payload: await workflowJobPayload("queued", { id: 12, labels: ["windows"], repository: "o/r" }) });
  assert.deepEqual(JSON.parse(unmatched.body), { result: "ignored", reason: "no_pool_for_labels" });
  assert.equal(store.job(12), undefined, "a job no pool serves is not demand");
});

test("bad or missing signature → 401, malformed JSON → 400, oversized → 413; nothing recorded", async (t) => {
  const { store, srv, registry } = await start(t);
  const url = `${srv.url}/webhook`;
  const payload = await workflowJobPayload("queued", { id: 21, labels: ["linux"] });
  assert.equal((await sendWebhook(url, { payload })).status, 401, "no signature");
  assert.equal((await sendWebhook(url, { payload, secret: "wrong-secret" })).status, 401);
  assert.equal((await sendWebhook(url, { payload, signature: "sha256=zz" })).status, 401);
  assert.equal((await sendWebhook(url, { payload: null, rawBody: "{not json", secret: SECRET })).status, 400);
  const big = { ...payload, padding: "x".repeat(70 * 1024) };
  assert.equal((await sendWebhook(url, { payload: big, secret: SECRET })).status, 413);
  assert.equal(store.job(21), undefined);
  assert.deepEqual(store.jobs(), []);
  const metrics = await registry.metrics();
  assert.match(metrics, /civm_webhook_deliveries_total\{result="bad-signature"\} 3/);
  assert.match(metrics, /civm_webhook_deliveries_total\{result="malformed"\} 1/);
  assert.match(metrics, /civm_webhook_deliveries_total\{result="too-large"\} 1/);
});

test("a repeated X-GitHub-Delivery is ignored", async (t) => {
  const { store, srv, woken } = await start(t);
  const url = `${srv.url}/webhook`;
  const payload = await workflowJobPayload("queued", { id: 31, labels: ["arm64"], repository: "o/r" });
  const first = await sendWebhook(url, { secret: SECRET, payload, deliveryId: "d-31" });
  assert.equal(first.status, 202);
  store.upsertJob({ id: 31, labels: ["arm64"], status: "completed", at: 5 });
  const again = await sendWebhook(url, { secret: SECRET, payload, deliveryId: "d-31" });
  assert.equal(again.status, 200);
  assert.deepEqual(JSON.parse(again.body), { result: "duplicate" });
  assert.equal(woken(), 1);
  const ping = await sendWebhook(url, { secret: SECRET, event: "ping", payload: { zen: "x" } });
  assert.equal(ping.status, 202);
});

test("/healthz and /metrics need no token; the API needs the bearer token", async (t) => {
  const { srv } = await start(t);
  assert.equal((await fetch(`${srv.url}/healthz`)).status, 200);
  const m = await fetch(`${srv.url}/metrics`);
  assert.equal(m.status, 200);
  assert.match(await m.text(), /civm_webhook_deliveries_total/);
  assert.equal((await fetch(`${srv.url}/api/pools`)).status, 401);
  assert.equal((await fetch(`${srv.url}/api/pools`, { headers: { authorization: "Bearer nope" } })).status, 401);
});

test("API: pools with counts and state, one pool, scale, pause, resume, vms", async (t) => {
  const { store, api } = await start(t);
  store.insertVm({ id: "b0000001", pool: "linux", name: "r-1", imageKey: "k", createdAt: Date.now() });
  store.insertVm({ id: "b0000002", pool: "linux", name: "r-2", imageKey: "k", createdAt: Date.now() });
  store.markIdle("b0000002", Date.now());
  store.upsertJob({ id: 41, labels: ["linux"], status: "queued", at: 1, pool: "linux" });
  const pools = (await (await api("/api/pools")).json()) as { name: string }[];
  assert.deepEqual(pools[0], { name: "linux", state: "active", minRunners: 1, maxRunners: 3, desired: 2, queued: 1, starting: 1, idle: 1, busy: 0, failures: 0 });
  assert.equal(pools[1]?.name, "arm");
  assert.equal((await api("/api/pools/nope")).status, 404);
  const scaled = await api("/api/pools/linux/scale", { method: "POST", body: JSON.stringify({ minRunners: 2 }) });
  assert.equal(((await scaled.json()) as { minRunners: number; desired: number }).desired, 3);
  assert.equal((await api("/api/pools/linux/scale", { method: "POST", body: JSON.stringify({ minRunners: 9 }) })).status, 400);
  assert.equal((await api("/api/pools/linux/scale", { method: "POST", body: JSON.stringify({ minRunners: -1 }) })).status, 400);
  const paused = (await (await api("/api/pools/linux/pause", { method: "POST" })).json()) as { state: string; desired: number };
  assert.deepEqual([paused.state, paused.desired], ["paused", 0]);
  assert.equal(store.pool("linux").paused, true);
  const resumed = (await (await api("/api/pools/linux/resume", { method: "POST" })).json()) as { state: string };
  assert.equal(resumed.state, "active");
  const vms = (await (await api("/api/vms?pool=linux")).json()) as { id: string; state: string }[];
  assert.deepEqual(vms.map((v) => [v.id, v.state]), [["b0000001", "starting"], ["b0000002", "idle"]]);
});

test("jobs go only to a pool whose target covers their repository and whose labels match; runner groups limit an org pool; the rest is ignored and counted", async (t) => {
  const gh = await startFakeGitHub({ orgs: ["org-a", "Org-B"], repos: ["org-a/web", "org-a/api", "org-a/secret", "Org-B/app", "stranger/x"] });
  t.after(() => gh.close());
  gh.addRunnerGroup("org-a", { id: 5, name: "secure", visibility: "selected", repositories: ["org-a/api"] });
  gh.addRunnerGroup("org-a", { id: 6, name: "private only", visibility: "private" });
  gh.state.privateRepos.add("org-a/secret");
  const access = createGitHubAccess({ kind: "token", token: gh.validToken }, { baseUrl: gh.url, throttle: false, retries: 0, warn: () => {} });
  const pools: ServerPool[] = [
    // Two organizations with the same labels: the bug was org B's jobs going to org A's pool.
    { name: "a-linux", labels: ["linux"], target: { kind: "org", org: "org-a" }, groupId: 1, minRunners: 0, maxRunners: 2 },
    { name: "b-linux", labels: ["linux"], target: { kind: "org", org: "org-b" }, groupId: 1, minRunners: 0, maxRunners: 2 },
    { name: "a-secure", labels: ["linux", "secure"], target: { kind: "org", org: "org-a" }, groupId: 5, minRunners: 0, maxRunners: 2 },
    { name: "a-private", labels: ["linux", "private"], target: { kind: "org", org: "org-a" }, groupId: 6, minRunners: 0, maxRunners: 2 },
    { name: "web-gpu", labels: ["gpu"], target: { kind: "repo", owner: "org-a", repo: "web" }, groupId: 1, minRunners: 0, maxRunners: 2 },
  ];
  const { store, srv, registry } = await start(t, { pools, router: (registry) => new JobRouter({ registry, access: () => access }) });
  const url = `${srv.url}/webhook`;
  const send = async (action: "queued" | "in_progress", id: number, repository: string, labels: string[]) => {
    const payload = await workflowJobPayload(action, { id, labels, repository });
    // The example payloads carry their own "private"; what matters here is GitHub's answer.
    delete (payload.repository as Record<string, unknown>).private;
    return JSON.parse((await sendWebhook(url, { secret: SECRET, payload })).body) as { result: string; pool?: string | null; reason?: string };
  };
  assert.deepEqual(await send("queued", 101, "org-b/App", ["self-hosted", "Linux"]), { result: "accepted", pool: "b-linux" }, "owner and repository compare case-insensitively");
  assert.deepEqual(await send("queued", 102, "org-a/web", ["self-hosted", "linux"]), { result: "accepted", pool: "a-linux" });
  assert.deepEqual(await send("queued", 103, "stranger/x", ["self-hosted", "linux"]), { result: "ignored", reason: "no_pool_for_repository" });
  assert.deepEqual(await send("queued", 104, "org-a/web", ["windows"]), { result: "ignored", reason: "no_pool_for_labels" });
  assert.deepEqual(await send("queued", 105, "org-a/api", ["linux", "secure"]), { result: "accepted", pool: "a-secure" });
  assert.deepEqual(await send("queued", 106, "org-a/web", ["linux", "secure"]), { result: "ignored", reason: "repository_not_in_runner_group" });
  assert.deepEqual(await send("queued", 107, "org-b/app", ["gpu"]), { result: "ignored", reason: "no_pool_for_labels" }, "a repository pool serves its repository only");
  assert.deepEqual(await send("queued", 108, "Org-A/Web", ["gpu"]), { result: "accepted", pool: "web-gpu" });
  assert.deepEqual(await send("queued", 109, "org-a/secret", ["linux", "private"]), { result: "accepted", pool: "a-private" });
  assert.deepEqual(await send("queued", 110, "org-a/web", ["linux", "private"]), { result: "ignored", reason: "repository_not_in_runner_group" }, "a public repository and a private-only group");
  // Another delivery for an ignored job (not a replay: another action) is ignored, counted once.
  assert.deepEqual(await send("in_progress", 103, "stranger/x", ["self-hosted", "linux"]), { result: "ignored", reason: "no_pool_for_repository" });
  for (const id of [103, 104, 106, 107, 110]) assert.equal(store.job(id), undefined, `job ${id} is no demand`);
  assert.deepEqual(store.jobs({ status: "queued" }).map((j) => [j.id, j.pool]), [[101, "b-linux"], [102, "a-linux"], [105, "a-secure"], [108, "web-gpu"], [109, "a-private"]]);
  const metrics = await registry.metrics();
  assert.match(metrics, /civm_jobs_ignored_total\{reason="no_pool_for_repository"\} 1\n/);
  assert.match(metrics, /civm_jobs_ignored_total\{reason="no_pool_for_labels"\} 2\n/);
  assert.match(metrics, /civm_jobs_ignored_total\{reason="repository_not_in_runner_group"\} 2\n/);
  // Runner-group access is cached: one look-up per group however many jobs asked.
  const groupCalls = gh.requests.filter((r) => r.path === "/orgs/org-a/actions/runner-groups/5").length;
  assert.equal(groupCalls, 1);
  assert.equal(gh.requests.filter((r) => r.path.startsWith("/orgs/org-a/actions/runner-groups/1")).length, 0, "the default group serves every repository: no look-up");
});

test("a failure between recording the delivery and the job records neither: GitHub's redelivery is processed", async (t) => {
  class FailingStore extends StateStore {
    failures = 1;
    override upsertJob(j: Parameters<StateStore["upsertJob"]>[0]): ReturnType<StateStore["upsertJob"]> {
      if (this.failures > 0) {
        this.failures--;
        throw new Error("SQLITE_FULL: database or disk is full");
      }
      return super.upsertJob(j);
    }
  }
  const store = new FailingStore(":memory:");
  const { srv, registry, woken } = await start(t, { store });
  const url = `${srv.url}/webhook`;
  const payload = await workflowJobPayload("queued", { id: 51, labels: ["linux"], repository: "o/r" });
  const first = await sendWebhook(url, { secret: SECRET, payload, deliveryId: "d-51" });
  assert.equal(first.status, 500);
  assert.doesNotMatch(first.body, /SQLITE|at .*\.js/, "no internals in the answer");
  assert.equal(store.job(51), undefined);
  const redelivery = await sendWebhook(url, { secret: SECRET, payload, deliveryId: "d-51" });
  assert.equal(redelivery.status, 202);
  assert.deepEqual(JSON.parse(redelivery.body), { result: "accepted", pool: "linux" });
  assert.equal(store.job(51)?.status, "queued");
  assert.equal(woken(), 1);
  assert.match(await registry.metrics(), /civm_webhook_deliveries_total\{result="failed"\} 1/);
});

test("a signed body replayed under a new delivery id is a duplicate and changes nothing", async (t) => {
  const { store, srv, woken } = await start(t);
  const url = `${srv.url}/webhook`;
  const queued = await workflowJobPayload("queued", { id: 61, labels: ["linux"], repository: "o/r" });
  assert.equal((await sendWebhook(url, { secret: SECRET, payload: queued, deliveryId: "d-61a" })).status, 202);
  const completed = await workflowJobPayload("completed", { id: 61, labels: ["linux"], repository: "o/r" });
  assert.equal((await sendWebhook(url, { secret: SECRET, payload: completed, deliveryId: "d-61b" })).status, 202);
  const before = store.job(61);
  assert.equal(before?.status, "completed");
  // An attacker (or a proxy) re-sends the captured queued delivery with a fresh id.
  const replay = await sendWebhook(url, { secret: SECRET, payload: queued, deliveryId: "d-61c" });
  assert.equal(replay.status, 200);
  assert.deepEqual(JSON.parse(replay.body), { result: "duplicate" });
  assert.deepEqual(store.job(61), before);
  assert.equal(woken(), 2);
  // Re-sent with a new job id it is another job (a different body), accepted.
  const other = await sendWebhook(url, { secret: SECRET, payload: await workflowJobPayload("queued", { id: 62, labels: ["linux"], repository: "o/r" }), deliveryId: "d-62" });
  assert.equal(other.status, 202);
});
