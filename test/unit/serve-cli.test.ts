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
  const pools = [{ name: "linux", labels: ["linux"], target: { kind: "repo" as const, owner: "o", repo: "r" }, groupId: 1, minRunners: 1, maxRunners: 3 }];
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

// ---- a real `civm serve` process (no VM: minRunners 0, nothing queued) ----------------------

import { writeFileSync as writeFile } from "node:fs";
import { join as joinPath } from "node:path";
import { startFakeGitHub } from "../support/fake-github.js";
import { civmEnv, runCivm, startCivm } from "../support/civm-cli.js";
import { killAfter, logLines, spawnServe } from "../support/serve-harness.js";

interface ServeFile {
  listen?: string;
  apiToken: string;
  minRunners?: number;
  maxRunners?: number;
  extraPools?: Record<string, unknown>[];
}

test("civm serve: civm reload and SIGHUP re-read the config (pools added, changed, removed; apiToken applied; listen needs a restart); an invalid config changes nothing; civm drain --exit --wait ends it", { timeout: 120_000 }, async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const e = civmEnv();
  const disk = joinPath(e.root, "runner.img");
  writeFile(disk, "not booted: minRunners 0 and no jobs");
  const cfgFile = joinPath(e.root, "serve.json");
  const write = (c: ServeFile) =>
    writeFile(
      cfgFile,
      JSON.stringify({
        listen: c.listen ?? "127.0.0.1:0",
        github: { apiUrl: gh.url, token: gh.validToken },
        webhookSecret: "hook-secret-1",
        apiToken: c.apiToken,
        pollInterval: 5,
        pools: [
          { name: "linux", minRunners: c.minRunners ?? 0, maxRunners: c.maxRunners ?? 2, runner: { image: disk, repository: "rust-lang-ci/rust", labels: ["linux"] } },
          ...(c.extraPools ?? []),
        ],
      }),
    );
  const token1 = "first-api-token-1234";
  write({ apiToken: token1 });
  const serve = spawnServe(["--config", cfgFile, "--accel", "tcg"], e);
  killAfter(t, serve);
  const lines = () => logLines(serve.stdout());
  const until = async (cond: () => boolean | Promise<boolean>, what: string, ms = 30_000) => {
    const end = Date.now() + ms;
    while (!(await cond())) {
      if (Date.now() > end || serve.child.exitCode !== null) throw new Error(`timed out waiting for ${what}; stderr:\n${serve.stderrSoFar()}\nstdout:\n${serve.stdout().slice(-3000)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };
  const { url } = await serve.listening();
  const env = (token: string) => ({ ...e, env: { ...e.env, CIVM_API_URL: url, CIVM_API_TOKEN: token } });
  const pools = async (token: string) => JSON.parse((await runCivm(["pools", "--json"], env(token))).stdout) as { name: string; state: string; maxRunners: number }[];
  assert.deepEqual((await pools(token1)).map((p) => p.name), ["linux"]);

  // A valid new config: a pool added, one changed, the API token rotated, listen changed.
  const token2 = "second-api-token-5678";
  const gpu = { name: "gpu", maxRunners: 1, runner: { image: disk, repository: "rust-lang-ci/rust", labels: ["gpu"] } };
  write({ apiToken: token2, maxRunners: 4, listen: "127.0.0.1:1", extraPools: [gpu] });
  const r = await runCivm(["reload", "--json"], env(token1));
  assert.equal(r.code, 0, r.stderr);
  const answer = JSON.parse(r.stdout) as { pools: unknown; applied: string[]; restartNeeded: { field: string }[]; message: string };
  assert.deepEqual(answer.pools, { added: ["gpu"], removed: [], changed: [{ name: "linux", fields: ["maxRunners"], replaceIdle: false }], unchanged: [] });
  assert.deepEqual(answer.applied, ["apiToken"]);
  assert.deepEqual(answer.restartNeeded.map((x) => x.field), ["listen"]);
  assert.match(answer.message, /restart civm serve to apply listen \(running 127\.0\.0\.1:0, configured 127\.0\.0\.1:1\)/);
  assert.equal((await runCivm(["pools"], env(token1))).code, 7, "the old API token no longer works");
  const after = await pools(token2);
  assert.deepEqual(after.map((p) => [p.name, p.maxRunners]), [["linux", 4], ["gpu", 1]]);
  const human = await runCivm(["reload"], env(token2));
  assert.equal(human.code, 0, human.stderr);
  assert.match(human.stderr, /reloaded .*serve\.json/);
  assert.match(human.stderr, /pools: no change/);

  // An invalid config: 400 with its problems, exit 2, the running config stays, one log line without secrets.
  write({ apiToken: token2, minRunners: 5, maxRunners: 2, extraPools: [gpu] });
  const bad = await runCivm(["reload"], env(token2));
  assert.equal(bad.code, 2, bad.stderr);
  assert.match(bad.stderr, /civm serve kept its previous config; the new one has problems:/);
  assert.match(bad.stderr, /pool "linux" \(#1\): "minRunners" \(5\) is greater than "maxRunners" \(2\)/);
  assert.deepEqual((await pools(token2)).map((p) => [p.name, p.maxRunners]), [["linux", 4], ["gpu", 1]]);
  await until(() => lines().some((l) => l.msg === "config reload failed; still running the previous config"), "the failed reload's log line");
  const failed = lines().find((l) => l.msg === "config reload failed; still running the previous config")!;
  assert.match(String(failed.err), /"minRunners" \(5\) is greater than "maxRunners" \(2\)/);

  // SIGHUP: gpu removed (it has no runners, so it is gone at once).
  write({ apiToken: token2, maxRunners: 4 });
  serve.child.kill("SIGHUP");
  await until(async () => (await pools(token2)).length === 1, "SIGHUP to remove pool gpu");
  assert.ok(lines().some((l) => l.msg === "config reloaded" && l.trigger === "SIGHUP"));
  assert.ok(lines().some((l) => l.msg === "removed pool has no runners left; it is gone" && l.pool === "gpu"));
  for (const secret of [token1, token2, gh.validToken, "hook-secret-1"]) assert.ok(!serve.stdout().includes(secret), "a secret in the log");

  // Drain, cancel, then drain and exit.
  const d = await runCivm(["drain", "--json"], env(token2));
  assert.equal(d.code, 0, d.stderr);
  assert.ok(["draining", "drained"].includes((JSON.parse(d.stdout) as { state: string }).state));
  await until(async () => (await pools(token2))[0]?.state === "draining", "pools to report draining");
  assert.equal(JSON.parse((await runCivm(["drain", "--cancel", "--json"], env(token2))).stdout).state, "serving");
  const end = await runCivm(["drain", "--exit", "--wait"], env(token2));
  assert.equal(end.code, 0, end.stderr);
  assert.match(end.stderr, /drained and (exited|exiting)/);
  const done = await serve.done;
  assert.equal(done.code, 0, done.stderr);
  assert.ok(lines().some((l) => l.msg === "drained; exiting"));
});

test("civm logs VM [-f] --api-url: a runner VM's console over the API, followed until the VM has finished; unknown VMs fall back to dev VMs", { timeout: 60_000 }, async (t) => {
  const store = new StateStore(":memory:");
  const e = civmEnv();
  const file = joinPath(e.root, "linux-20261122-061200-cccc0003.log");
  writeFile(file, "tiny-guest: booted\n");
  const srv = await listen(
    createApp({ store, pools: [{ name: "linux", labels: ["linux"], target: { kind: "repo" as const, owner: "o", repo: "r" }, groupId: 1, minRunners: 0, maxRunners: 1 }], webhookSecret: "s", apiToken: TOKEN, maxWebhookBytes: 1024, registry: new Registry(), consoleLog: async (v) => (v.id === "cccc0003" ? file : undefined) }),
    "127.0.0.1",
    0,
  );
  t.after(() => srv.close());
  store.insertVm({ id: "cccc0003", pool: "linux", name: "linux-cccc0003", imageKey: "k", createdAt: Date.now() });
  const env = { ...e, env: { ...e.env, CIVM_API_TOKEN: TOKEN } };
  const once = await runCivm(["logs", "--api-url", srv.url, "cccc0003"], env);
  assert.equal(once.code, 0, once.stderr);
  assert.equal(once.stdout, "tiny-guest: booted\n");

  const follow = startCivm(["logs", "-f", "--interval", "0.2", "linux-cccc0003"], { ...env, env: { ...env.env, CIVM_API_URL: srv.url } });
  await new Promise((r) => setTimeout(r, 1500));
  const { appendFileSync } = await import("node:fs");
  appendFileSync(file, "tiny-guest: runner: running job\n");
  await new Promise((r) => setTimeout(r, 1000));
  assert.equal(follow.child.exitCode, null, "-f keeps following a running VM");
  appendFileSync(file, "tiny-guest: powering off");
  store.markFinished("cccc0003", "poweroff", Date.now());
  const f = await follow.done;
  assert.equal(f.code, 0, f.stderr);
  assert.equal(f.stdout, "tiny-guest: booted\ntiny-guest: runner: running job\ntiny-guest: powering off");

  const unknown = await runCivm(["logs", "--api-url", srv.url, "nope"], env);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /no running VM named "nope".*civm serve at http:\/\/127\.0\.0\.1:\d+ has no runner VM "nope" either/);
  const local = await runCivm(["logs", "nope"], { ...e, env: { ...e.env, CIVM_API_URL: "" } });
  assert.match(local.stderr, /for a runner VM of civm serve, pass --api-url or set CIVM_API_URL/);
});
