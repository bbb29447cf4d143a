// The caches' supervisor (src/caches/child.ts) with stand-in programs: start and health check,
// restart with backoff after a crash or when it stops answering, a start that fails with the
// program's own words, stop, the parent-death signal, and the sweep of copies a killed civm
// left (only processes whose start time and command line are the recorded ones).
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { restartDelay, SupervisedChild, sweepChildren, childArgv, type ChildRecord, type SupervisorTiming } from "../../src/caches/child.js";
import { freePort, httpGet } from "../../src/caches/manager.js";
import { processStartTime } from "../../src/host/proc.js";
import { realTool } from "../support/stub-path.js";
import { tempDir } from "../support/paths.js";

const FAST: SupervisorTiming = { startTimeoutMs: 3000, checkIntervalMs: 100, failedChecks: 2, backoffBaseMs: 50, backoffMaxMs: 400, stableMs: 60_000, stopGraceMs: 2000 };

/** A program that answers GET / with 200 on PORT (or 503 once FILE exists), printing a line at start. */
function server(dir: string): string {
  const file = join(dir, "server.cjs");
  writeFileSync(file, `const [port, sick] = process.argv.slice(2);
console.log("stand-in listening on " + port);
require("node:http").createServer((q, r) => { r.statusCode = require("node:fs").existsSync(sick) ? 503 : 200; r.end("ok"); }).listen(Number(port), "127.0.0.1");
`);
  return file;
}

async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const alive = (pid: number | undefined) => pid !== undefined && processStartTime(pid) !== undefined && !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, "utf8"));

test("backoff doubles from the base up to the cap", () => {
  assert.deepEqual([1, 2, 3, 4, 5, 10, 100].map((n) => restartDelay(n, { backoffBaseMs: 1000, backoffMaxMs: 120_000 })), [1000, 2000, 4000, 8000, 16_000, 120_000, 120_000]);
  assert.deepEqual(childArgv({ program: "/usr/bin/docker-registry", args: ["serve", "c.yml"], user: { uid: 100, gid: 101 } }), ["--reuid=100", "--regid=101", "--groups=101", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--pdeathsig", "TERM", "--", "/usr/bin/docker-registry", "serve", "c.yml"]);
  assert.deepEqual(childArgv({ program: "/usr/sbin/squid", args: [], user: undefined }), ["--no-new-privs", "--pdeathsig", "TERM", "--", "/usr/sbin/squid"]);
});

test("a cache program: up once it answers; killed, it is restarted; unhealthy, it is replaced; stopped, it is gone with its record", async (t) => {
  const dir = tempDir();
  const port = await freePort();
  const sick = join(dir, "sick");
  const states: string[] = [];
  const lines: string[] = [];
  const child = new SupervisedChild(
    { name: "test", program: process.execPath, args: [server(dir), String(port), sick], user: undefined, recordFile: join(dir, "child.json"), check: async () => { const r = await httpGet(`http://127.0.0.1:${port}/`, 500).catch((e: Error) => ({ status: 0, body: e.message })); return r.status === 200 ? undefined : `status ${r.status || r.body}`; }, onLine: (l) => lines.push(l) },
    { onState: (s) => states.push(s) },
    FAST,
  );
  t.after(() => child.stop());
  await child.start();
  assert.equal(child.state, "up");
  const first = child.pid!;
  assert.ok(alive(first));
  const rec = JSON.parse(readFileSync(join(dir, "child.json"), "utf8")) as ChildRecord;
  assert.equal(rec.pid, first);
  assert.equal(rec.start, processStartTime(first));
  assert.deepEqual(rec.argv, [process.execPath, server(dir), String(port), sick]);
  assert.deepEqual(lines, [`stand-in listening on ${port}`]);

  process.kill(first, "SIGKILL");
  await until(() => child.state === "up" && child.pid !== first, 5000, "the restart");
  assert.equal(child.restarts, 1);
  assert.ok(states.includes("restarting"));
  assert.equal((JSON.parse(readFileSync(join(dir, "child.json"), "utf8")) as ChildRecord).pid, child.pid, "the record names the new copy");

  // Stops answering: two failed checks, killed and started again.
  const second = child.pid!;
  writeFileSync(sick, "");
  await until(() => child.state === "restarting", 5000, "the unhealthy copy to be replaced");
  assert.match(child.message ?? "", /stopped answering: status 503/);
  await until(() => !alive(second), 3000, "the unhealthy copy to end");
  await import("node:fs/promises").then((f) => f.rm(sick));
  await until(() => child.state === "up", 5000, "the replacement");
  assert.equal(child.restarts, 2);

  const last = child.pid!;
  await child.stop();
  assert.equal(child.state, "stopped");
  assert.ok(!alive(last));
  assert.ok(!existsSync(join(dir, "child.json")));
});

test("a program that cannot start: failed, with its own words, retried with backoff", async (t) => {
  const dir = tempDir();
  const script = join(dir, "fail.cjs");
  writeFileSync(script, `console.error("2026/12/06 10:00:00| FATAL: Unable to open HTTP Socket"); console.error("Squid Cache (Version 5.7): Terminated abnormally."); process.exit(3);`);
  const child = new SupervisedChild({ name: "test", program: process.execPath, args: [script], user: undefined, recordFile: join(dir, "child.json"), check: async () => "not yet" }, {}, FAST);
  t.after(() => child.stop());
  await child.start();
  assert.equal(child.state, "failed");
  assert.equal(child.message, "node exited with status 3: 2026/12/06 10:00:00| FATAL: Unable to open HTTP Socket", "the line that says why");
  await until(() => child.starts >= 3, 3000, "retries");
  assert.equal(child.state, "failed");
  await child.stop();
  const n = child.starts;
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(child.starts, n, "no retry after stop");

  const silent = new SupervisedChild({ name: "test", program: realTool("sleep"), args: ["30"], user: undefined, recordFile: join(dir, "silent.json"), check: async () => "connection refused" }, {}, { ...FAST, startTimeoutMs: 300 });
  t.after(() => silent.stop());
  await silent.start();
  assert.equal(silent.state, "failed");
  assert.match(silent.message!, /^sleep did not answer within 0 s \(connection refused\)/);
});

test("the parent-death signal: a cache program ends with the civm that started it (kill -9)", async () => {
  const dir = tempDir();
  const port = await freePort();
  const mod = join(process.cwd(), "dist", "src", "caches", "child.js");
  const host = join(dir, "host.mjs");
  writeFileSync(host, `import { SupervisedChild } from ${JSON.stringify(mod)};
const c = new SupervisedChild({ name: "t", program: ${JSON.stringify(process.execPath)}, args: [${JSON.stringify(server(dir))}, "${port}", "/nonexistent"], user: undefined, recordFile: ${JSON.stringify(join(dir, "child.json"))}, check: async () => undefined });
await c.start();
console.log(c.pid);
setInterval(() => {}, 1000);
`);
  const p = spawn(process.execPath, [host], { stdio: ["ignore", "pipe", "inherit"] });
  const pid = await new Promise<number>((resolve) => p.stdout!.once("data", (d: Buffer) => resolve(Number(d.toString().trim()))));
  await until(() => alive(pid), 3000, "the program");
  p.kill("SIGKILL");
  await until(() => !alive(pid), 5000, "the program to end with its parent");
});

test("sweep: a cache program a killed civm left is ended; a record naming another process or program is not acted on", async (t) => {
  const dir = tempDir();
  const run = join(dir, "run");
  const bin = join(dir, "bin");
  for (const d of [run, bin, join(run, "http"), join(run, "registry-docker.io"), join(run, "other")]) await import("node:fs/promises").then((f) => f.mkdir(d, { recursive: true }));
  symlinkSync(realTool("sleep"), join(bin, "squid"));
  const start = (argv: string[]) => {
    const c = spawn(argv[0]!, argv.slice(1), { stdio: "ignore" });
    t.after(() => c.kill("SIGKILL"));
    return c.pid!;
  };
  const left = start([join(bin, "squid"), "600"]);
  const reused = start([join(bin, "squid"), "601"]);
  const notOurs = start([realTool("sleep"), "602"]);
  await until(() => [left, reused, notOurs].every((p) => processStartTime(p) !== undefined), 3000, "the stand-ins");
  const rec = (pid: number, argv: string[], start = processStartTime(pid)!): string => JSON.stringify({ pid, start, argv, owner: "1:1" });
  writeFileSync(join(run, "http", "child.json"), rec(left, [join(bin, "squid"), "600"]));
  writeFileSync(join(run, "registry-docker.io", "child.json"), rec(reused, [join(bin, "squid"), "601"], processStartTime(reused)! - 1));
  writeFileSync(join(run, "other", "child.json"), rec(notOurs, [realTool("sleep"), "602"]));
  const log: string[] = [];
  const ended = await sweepChildren(run, (l) => log.push(l), 2000);
  assert.deepEqual(ended, [`http (pid ${left})`]);
  await until(() => !alive(left), 3000, "the leftover to end");
  assert.ok(alive(reused), "a pid whose start time differs is another process");
  assert.ok(alive(notOurs), "a program that is not a cache is never signalled");
  assert.ok(log.some((l) => /ended the cache http/.test(l)));
  for (const d of ["http", "registry-docker.io", "other"]) assert.ok(!existsSync(join(run, d, "child.json")), `${d}'s record is removed`);
});
