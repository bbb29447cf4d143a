// A child civm starts in a session of its own (QEMU, a dev VM's supervisor) gets civm's nice
// value for its scheduling group: with sched_autogroup a new session is a new group at nice 0,
// and `nice -n 19 civm run` would otherwise lower nothing for the VM.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { inheritNiceInAutogroup } from "../../src/host/autogroup.js";

const autogroup = existsSync("/proc/self/autogroup");

test("a detached child's autogroup gets the nice value asked for; 0 and below leave it alone", { skip: autogroup ? false : "this kernel has no sched_autogroup" }, async (t) => {
  const spawnSleeper = () => {
    const c = spawn("sleep", ["30"], { detached: true, stdio: "ignore" });
    t.after(() => c.kill("SIGKILL"));
    return c.pid!;
  };
  const niceOf = (pid: number) => Number(/nice (-?\d+)/.exec(readFileSync(`/proc/${pid}/autogroup`, "utf8"))?.[1]);
  const a = spawnSleeper();
  assert.equal(niceOf(a), 0, "a new session starts at nice 0");
  inheritNiceInAutogroup(a, 7);
  assert.equal(niceOf(a), 7);
  const b = spawnSleeper();
  inheritNiceInAutogroup(b, 0);
  assert.equal(niceOf(b), 0);
  inheritNiceInAutogroup(undefined, 7); // a spawn that failed has no pid: nothing to do
  inheritNiceInAutogroup(999_999_999, 7); // gone: best effort, no throw
});

test("a civm started with nice 19 runs its detached children's group at 19", { skip: autogroup ? false : "this kernel has no sched_autogroup" }, async () => {
  // The default nice is the caller's own: run the check in a child started under nice 19.
  const code = `import("${new URL("../../src/host/autogroup.js", import.meta.url).href}").then(({ inheritNiceInAutogroup }) => {
    const { spawn } = require("node:child_process");
    const c = spawn("sleep", ["30"], { detached: true, stdio: "ignore" });
    inheritNiceInAutogroup(c.pid);
    process.stdout.write(require("node:fs").readFileSync("/proc/" + c.pid + "/autogroup", "utf8"));
    c.kill("SIGKILL");
  })`;
  const out = await new Promise<string>((resolve, reject) => {
    const p = spawn("nice", ["-n", "19", process.execPath, "-e", code], { stdio: ["ignore", "pipe", "inherit"] });
    let s = "";
    p.stdout.on("data", (d: Buffer) => (s += d.toString()));
    p.on("close", (c) => (c === 0 ? resolve(s) : reject(new Error(`exit ${c}`))));
  });
  assert.match(out, /nice 19/);
});
