// The API's reload, drain and status endpoints (control injected), a VM's console log, and
// options a reload changes on the running server (pools, apiToken, webhookSecret).
import { test } from "node:test";
import assert from "node:assert/strict";
import { appendFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Registry } from "prom-client";
import { StateStore } from "../../src/store/index.js";
import { createApp, listen, type DaemonStatusJson, type ReloadOutcome, type ServerOptions } from "../../src/server/index.js";
import { sendWebhook, workflowJobPayload } from "../support/fake-github.js";
import { tempDir } from "../support/paths.js";

const TOKEN = "api-token-control";

async function start(t: { after: (fn: () => Promise<void> | void) => void }, extra: Partial<ServerOptions> = {}) {
  const store = new StateStore(":memory:");
  const opts: ServerOptions = { store, pools: [{ name: "linux", labels: ["linux"], target: { kind: "repo" as const, owner: "o", repo: "r" }, groupId: 1, minRunners: 1, maxRunners: 3 }], webhookSecret: "s1", apiToken: TOKEN, maxWebhookBytes: 64 * 1024, registry: new Registry(), ...extra };
  const srv = await listen(createApp(opts), "127.0.0.1", 0);
  t.after(() => srv.close());
  const api = (path: string, init: RequestInit = {}, token = TOKEN) => fetch(`${srv.url}${path}`, { ...init, headers: { authorization: `Bearer ${token}`, ...(init.headers as Record<string, string>) } });
  return { store, srv, api, opts };
}

test("reload: 200 with what changed, 400 with the config's problems, 401 without the token, 501 without a daemon", async (t) => {
  let answer: ReloadOutcome = { ok: true, pools: { added: ["gpu"] } };
  let calls = 0;
  const status: DaemonStatusJson = { state: "serving" };
  const control = { reload: async () => (calls++, answer), drain: () => status, undrain: () => status, status: () => status };
  const { api } = await start(t, { control });
  assert.equal((await api("/api/reload", { method: "POST" }, "wrong")).status, 401);
  assert.equal(calls, 0);
  const ok = await api("/api/reload", { method: "POST" });
  assert.equal(ok.status, 200);
  assert.deepEqual(await ok.json(), { ok: true, pools: { added: ["gpu"] } });
  answer = { ok: false, error: 'serve.yaml: pool "a" (#1): "minRunners" (5) is greater than "maxRunners" (2); raise maxRunners or lower minRunners.' };
  const bad = await api("/api/reload", { method: "POST" });
  assert.equal(bad.status, 400);
  assert.deepEqual(await bad.json(), { error: answer.error });
  answer = { ok: false, status: 409, error: "civm serve is shutting down; the config was not reloaded." };
  assert.equal((await api("/api/reload", { method: "POST" })).status, 409);

  const none = await start(t);
  assert.equal((await none.api("/api/reload", { method: "POST" })).status, 501);
  assert.equal((await none.api("/api/drain", { method: "POST" })).status, 501);
});

test("drain: POST /api/drain (exit flag), /api/undrain, /api/status; pools report draining and desire nothing", async (t) => {
  const seen: boolean[] = [];
  let state = "serving";
  const st = () => ({ state, runners: { starting: 0, idle: 0, busy: 1 } });
  const control = {
    reload: async (): Promise<ReloadOutcome> => ({ ok: true }),
    drain: (o: { exitWhenDrained: boolean }) => (seen.push(o.exitWhenDrained), (state = "draining"), st()),
    undrain: () => ((state = "serving"), st()),
    status: st,
  };
  const { api, store } = await start(t, { control });
  store.insertVm({ id: "aaaa0001", pool: "linux", name: "linux-aaaa0001", imageKey: "k", createdAt: 1 });
  store.markBusy("aaaa0001", 5, 2);
  assert.equal(((await (await api("/api/pools")).json()) as { state: string }[])[0]?.state, "active");
  const d = await api("/api/drain", { method: "POST" });
  assert.equal(d.status, 202);
  assert.equal(((await d.json()) as { state: string }).state, "draining");
  assert.deepEqual(seen, [false]);
  const [p] = (await (await api("/api/pools")).json()) as { state: string; desired: number; busy: number }[];
  assert.deepEqual([p?.state, p?.desired, p?.busy], ["draining", 0, 1]);
  assert.equal(((await (await api("/api/status")).json()) as { state: string }).state, "draining");
  assert.equal((await api("/api/drain", { method: "POST", body: '{"exit": true}', headers: { "content-type": "application/json" } })).status, 202);
  assert.deepEqual(seen, [false, true]);
  const badBody = await api("/api/drain", { method: "POST", body: '{"exit": "yes"}' });
  assert.equal(badBody.status, 400);
  assert.match(((await badBody.json()) as { error: string }).error, /"exit" must be true or false/);
  assert.equal((await api("/api/drain", { method: "POST", body: "{nope" })).status, 400);
  assert.equal(((await (await api("/api/undrain", { method: "POST" })).json()) as { state: string }).state, "serving");
  assert.equal((await api("/api/status", {}, "wrong")).status, 401);
});

test("pools, apiToken and webhookSecret are read per request (a reload changes them); removed pools show as removing", async (t) => {
  let pools = [{ name: "linux", labels: ["linux"], target: { kind: "repo" as const, owner: "o", repo: "r" }, groupId: 1, minRunners: 1, maxRunners: 3 }];
  const { api, opts, srv, store } = await start(t);
  opts.pools = () => pools;
  pools = [
    { name: "gpu", labels: ["gpu"], target: { kind: "repo" as const, owner: "o", repo: "r" }, groupId: 1, minRunners: 0, maxRunners: 1 },
    { name: "linux", labels: ["linux"], target: { kind: "repo" as const, owner: "o", repo: "r" }, groupId: 1, minRunners: 1, maxRunners: 3, removing: true } as (typeof pools)[number],
  ];
  const list = (await (await api("/api/pools")).json()) as { name: string; state: string; desired: number }[];
  assert.deepEqual(list.map((p) => [p.name, p.state, p.desired]), [["gpu", "active", 0], ["linux", "removing", 0]]);
  assert.equal((await api("/api/pools/linux/pause", { method: "POST" })).status, 404, "a removed pool takes no commands");
  // A job for the removed pool's labels goes to no pool.
  const r = await sendWebhook(`${srv.url}/webhook`, { secret: "s1", payload: await workflowJobPayload("queued", { id: 3, labels: ["linux"], repository: "o/r" }) });
  assert.deepEqual(JSON.parse(r.body), { result: "ignored", reason: "no_pool_for_labels" });
  opts.apiToken = "rotated";
  assert.equal((await api("/api/pools")).status, 401);
  assert.equal((await api("/api/pools", {}, "rotated")).status, 200);
  opts.webhookSecret = "s2";
  const old = await sendWebhook(`${srv.url}/webhook`, { secret: "s1", payload: await workflowJobPayload("queued", { id: 4, labels: ["gpu"], repository: "o/r" }) });
  assert.equal(old.status, 401);
  const fresh = await sendWebhook(`${srv.url}/webhook`, { secret: "s2", payload: await workflowJobPayload("queued", { id: 4, labels: ["gpu"], repository: "o/r" }) });
  assert.equal(fresh.status, 202);
  assert.equal(store.job(4)?.pool, "gpu");
});

test("a VM's console log: by id or runner name, from an offset, whole lines while it runs, redacted; 404 for an unknown VM", async (t) => {
  const dir = tempDir();
  const file = join(dir, "linux-20261122-061200-aaaa0001.log");
  writeFileSync(file, "boot line 1\nsecret is JITSECRET123\npartial");
  const { api, store } = await start(t, {
    consoleLog: async (vm) => (vm.id === "aaaa0001" ? file : undefined),
    redact: (s) => s.split("JITSECRET123").join("***"),
  });
  store.insertVm({ id: "aaaa0001", pool: "linux", name: "linux-aaaa0001", imageKey: "k", createdAt: 1 });
  store.insertVm({ id: "bbbb0002", pool: "linux", name: "linux-bbbb0002", imageKey: "k", createdAt: 1 });
  const first = await api("/api/vms/aaaa0001/log");
  assert.equal(first.status, 200);
  assert.equal(await first.text(), "boot line 1\nsecret is ***\n", "the unfinished last line waits");
  const offset = Number(first.headers.get("x-civm-log-offset"));
  assert.equal(offset, Buffer.byteLength("boot line 1\nsecret is JITSECRET123\n"));
  assert.equal(first.headers.get("x-civm-vm-state"), "starting");
  assert.equal(first.headers.get("x-civm-log-more"), "0");
  assert.equal(await (await api(`/api/vms/aaaa0001/log?offset=${offset}`)).text(), "");
  appendFileSync(file, " line\nlast");
  store.markFinished("aaaa0001", "poweroff", 5);
  const byName = await api(`/api/vms/linux-aaaa0001/log?offset=${offset}`);
  assert.equal(await byName.text(), "partial line\nlast", "a finished VM's log is served to the end");
  assert.equal(byName.headers.get("x-civm-vm-state"), "finished");
  const noLog = await api("/api/vms/bbbb0002/log");
  assert.equal(noLog.status, 200);
  assert.equal(await noLog.text(), "");
  const missing = await api("/api/vms/nope/log");
  assert.equal(missing.status, 404);
  assert.match(((await missing.json()) as { error: string }).error, /no runner VM with the id or runner name "nope"/);
  assert.equal((await api("/api/vms/aaaa0001/log?offset=-1")).status, 400);
  assert.equal((await api("/api/vms/aaaa0001/log", {}, "wrong")).status, 401);
});
