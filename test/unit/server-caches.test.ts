// GET /api/caches, /healthz with caches (degraded while one has failed) and `civm caches`
// (table, --json, -q) against the server with a stand-in for the caches.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Registry } from "prom-client";
import { StateStore } from "../../src/store/index.js";
import { createApp, listen, type ServerOptions } from "../../src/server/index.js";
import type { CacheStatus } from "../../src/caches/types.js";
import { civmEnv, runCivm } from "../support/civm-cli.js";

const TOKEN = "api-token-caches";

function status(over: Partial<CacheStatus>): CacheStatus {
  return {
    name: "registry/docker.io", kind: "registry", managed: true, state: "up", since: new Date(Date.now() - 90_000).toISOString(), message: null,
    url: "http://127.0.0.1:41001", guestUrl: "http://10.0.2.2:41001", registry: "docker.io", upstream: "https://registry-1.docker.io", pid: 4242, restarts: 1,
    sizeBytes: 3 * 1024 ** 3, maxSizeBytes: 50 * 1024 ** 3, requests: 40, hits: 30, misses: 10, hitRatio: 0.75, servedBytes: 1000, upstreamBytes: 250, ...over,
  };
}

async function start(t: { after: (fn: () => Promise<void> | void) => void }, extra: Partial<ServerOptions> = {}) {
  const opts: ServerOptions = { store: new StateStore(":memory:"), pools: [], webhookSecret: "s", apiToken: TOKEN, maxWebhookBytes: 1024, registry: new Registry(), ...extra };
  const srv = await listen(createApp(opts), "127.0.0.1", 0);
  t.after(() => srv.close());
  return srv;
}

test("GET /api/caches (token required) and /healthz: degraded while a cache has failed, with the reason", async (t) => {
  let rows = [status({}), status({ name: "http", kind: "http", state: "up", registry: undefined, upstream: undefined, url: "http://127.0.0.1:41003", guestUrl: "http://10.0.2.2:41003" })];
  const caches = {
    status: async () => rows,
    health: () => ({ status: rows.some((r) => r.state === "failed") ? ("degraded" as const) : ("ok" as const), caches: rows.map((r) => ({ name: r.name, state: r.state, message: r.message })) }),
  };
  const srv = await start(t, { caches });
  assert.equal((await fetch(`${srv.url}/api/caches`)).status, 401);
  const got = await fetch(`${srv.url}/api/caches`, { headers: { authorization: `Bearer ${TOKEN}` } });
  assert.deepEqual(await got.json(), JSON.parse(JSON.stringify(rows)));
  assert.deepEqual(await (await fetch(`${srv.url}/healthz`)).json(), { ok: true, status: "ok", caches: [{ name: "registry/docker.io", state: "up", message: null }, { name: "http", state: "up", message: null }] });
  rows = [status({ state: "failed", message: "docker-registry exited with status 1: listen tcp 127.0.0.1:41001: bind: address already in use" })];
  const h = await (await fetch(`${srv.url}/healthz`)).json();
  assert.equal(h.status, "degraded");
  assert.match(h.caches[0].message, /address already in use/);
  // Without caches: an empty list, and /healthz as before.
  const plain = await start(t);
  assert.deepEqual(await (await fetch(`${plain.url}/api/caches`, { headers: { authorization: `Bearer ${TOKEN}` } })).json(), []);
  assert.deepEqual(await (await fetch(`${plain.url}/healthz`)).json(), { ok: true, status: "ok" });
});

test("civm caches: a table with state, size, hit ratio and where VMs reach each cache; reasons below; --json; -q; ls and list", async (t) => {
  const rows = [
    status({}),
    status({ name: "registry/quay.io", registry: "quay.io", managed: false, state: "failed", message: "http://cache.corp:5001/v2/ does not answer: connection refused", url: "http://cache.corp:5001", guestUrl: "http://cache.corp:5001", upstream: undefined, pid: null, sizeBytes: null, maxSizeBytes: null, requests: 0, hits: 0, misses: 0, hitRatio: null }),
  ];
  const srv = await start(t, { caches: { status: async () => rows, health: () => ({ status: "degraded", caches: [] }) } });
  const e = civmEnv({ CIVM_API_URL: srv.url, CIVM_API_TOKEN: TOKEN });
  const r = await runCivm(["caches"], e);
  assert.equal(r.code, 0, r.stderr);
  const [head, first, second] = r.stdout.trimEnd().split("\n");
  assert.match(head!, /^CACHE\s+STATE\s+SIZE\s+MAX\s+REQUESTS\s+HIT RATIO\s+RESTARTS\s+VMS USE\s+UPSTREAM$/);
  assert.match(first!, /^registry\/docker\.io\s+up 1m3\ds\s+3G\s+50G\s+40\s+75\.0%\s+1\s+http:\/\/10\.0\.2\.2:41001\s+https:\/\/registry-1\.docker\.io$/);
  assert.match(second!, /^registry\/quay\.io\s+failed \d+m\d+s\s+-\s+-\s+-\s+-\s+1\s+http:\/\/cache\.corp:5001\s+existing http:\/\/cache\.corp:5001$/);
  assert.match(r.stderr, /civm: cache registry\/quay\.io failed: http:\/\/cache\.corp:5001\/v2\/ does not answer: connection refused/);
  for (const args of [["caches", "--json"], ["caches", "ls", "--json"], ["caches", "list", "--json"]]) {
    const j = await runCivm(args, e);
    assert.deepEqual(JSON.parse(j.stdout), JSON.parse(JSON.stringify(rows)), args.join(" "));
  }
  assert.equal((await runCivm(["caches", "-q"], e)).stdout, "registry/docker.io\nregistry/quay.io\n");
  const none = await start(t);
  const n = await runCivm(["caches"], civmEnv({ CIVM_API_URL: none.url, CIVM_API_TOKEN: TOKEN }));
  assert.equal(n.code, 0);
  assert.match(n.stderr, /civm serve runs no caches/);
});
