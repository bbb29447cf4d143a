import { test } from "node:test";
import assert from "node:assert/strict";
import { Registry } from "prom-client";
import { StateStore } from "../../src/store/index.js";
import { createApp, listen } from "../../src/server/index.js";
import { sendWebhook, workflowJobPayload } from "../support/fake-github.js";

const SECRET = "webhook-secret-0123";
const TOKEN = "api-token-abcdef";

async function start(t: { after: (fn: () => Promise<void> | void) => void }) {
  const store = new StateStore(":memory:");
  const registry = new Registry();
  let woken = 0;
  const pools = [{ name: "linux", labels: ["self-hosted", "linux"], minRunners: 1, maxRunners: 3 }, { name: "arm", labels: ["arm64"], minRunners: 0, maxRunners: 2 }];
  const app = createApp({ store, pools, webhookSecret: SECRET, apiToken: TOKEN, maxWebhookBytes: 64 * 1024, registry, onDemand: () => woken++ });
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
  const unmatched = await sendWebhook(url, { secret: SECRET, payload: await workflowJobPayload("queued", { id: 12, labels: ["windows"] }) });
  assert.deepEqual(JSON.parse(unmatched.body), { result: "accepted", pool: null });
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
  const payload = await workflowJobPayload("queued", { id: 31, labels: ["arm64"] });
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
