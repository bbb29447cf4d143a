// civm pools / civm vms against a real server (createApp over an in-memory store).
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { Registry } from "prom-client";
import { StateStore } from "../../src/store/index.js";
import { createApp, listen } from "../../src/server/index.js";
import { civmBin } from "../support/paths.js";

const TOKEN = "api-token-for-cli-test";

function civm(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [civmBin, ...args], { env: { ...process.env, ...env } }, (err, stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

test("civm pools, pools scale/pause/resume and civm vms over the API (--json and tables)", async (t) => {
  const store = new StateStore(":memory:");
  const pools = [{ name: "linux", labels: ["linux"], minRunners: 1, maxRunners: 3 }];
  const srv = await listen(createApp({ store, pools, webhookSecret: "s", apiToken: TOKEN, maxWebhookBytes: 1024, registry: new Registry() }), "127.0.0.1", 0);
  t.after(() => srv.close());
  store.insertVm({ id: "abcd0001", pool: "linux", name: "linux-abcd0001", imageKey: "k", createdAt: Date.now() - 65_000 });
  store.markIdle("abcd0001", Date.now());
  const env = { CIVM_API_URL: srv.url, CIVM_API_TOKEN: TOKEN };

  const list = await civm(["pools", "--json"], env);
  assert.equal(list.code, 0, list.stderr);
  assert.deepEqual(JSON.parse(list.stdout), [{ name: "linux", state: "active", minRunners: 1, maxRunners: 3, desired: 1, queued: 0, starting: 0, idle: 1, busy: 0, failures: 0 }]);
  const tableOut = await civm(["pools"], env);
  assert.match(tableOut.stdout, /^POOL\s+STATE\s+MIN/m);
  assert.match(tableOut.stdout, /^linux\s+active\s+1\s+3/m);

  const scaled = await civm(["pools", "scale", "linux", "2", "--json"], env);
  assert.equal(scaled.code, 0, scaled.stderr);
  assert.equal(JSON.parse(scaled.stdout)[0].minRunners, 2);
  assert.equal(store.pool("linux").minRunnersOverride, 2);
  const tooMany = await civm(["pools", "scale", "linux", "9"], env);
  assert.equal(tooMany.code, 2);
  assert.match(tooMany.stderr, /minRunners must be a whole number from 0 to maxRunners \(3\)/);
  assert.equal((await civm(["pools", "scale", "linux", "reset"], env)).code, 0);
  assert.equal(store.pool("linux").minRunnersOverride, undefined);

  assert.equal((await civm(["pools", "pause", "linux"], env)).code, 0);
  assert.equal(store.pool("linux").paused, true);
  assert.match((await civm(["pools"], env)).stdout, /linux\s+paused/);
  assert.equal((await civm(["pools", "resume", "linux"], env)).code, 0);
  assert.equal(store.pool("linux").paused, false);
  const missing = await civm(["pools", "pause", "nope"], env);
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /no pool named "nope"/);

  const vms = await civm(["vms", "--json"], env);
  assert.equal(vms.code, 0, vms.stderr);
  const [vm] = JSON.parse(vms.stdout) as { id: string; state: string; ageSeconds: number }[];
  assert.equal(vm?.id, "abcd0001");
  assert.equal(vm?.state, "idle");
  assert.match((await civm(["vms"], env)).stdout, /abcd0001\s+linux\s+linux-abcd0001\s+idle\s+-\s+-\s+1m\d+s/);

  const noToken = await civm(["pools"], { CIVM_API_URL: srv.url, CIVM_API_TOKEN: "" });
  assert.equal(noToken.code, 2);
  assert.match(noToken.stderr, /no API token/);
  const wrong = await civm(["pools", "--api-token", "wrong"], env);
  assert.equal(wrong.code, 7);
  assert.match(wrong.stderr, /401: missing or wrong bearer token/);
});
