// civm-gha against civm-runner (issue 12): the ephemeral cycle of each image (`civm run` with
// a command printing one line, through the guest's power-off to civm's exit), alternating so
// both see the same load, and civm-gha's cycle with a command that uses Docker (dockerd is
// socket-activated: its start is paid by the first docker call, not by the boot).
// Both images must be in the store (tests build them: test/support/gha-image.ts).
// Usage: npm run build && node dist/bench/gha-cycle.js [--runs 3] [--state DIR]
import { spawn } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { loadavg } from "node:os";
import { join } from "node:path";
import { civmBin, tempDir, testCacheDir } from "../test/support/paths.js";
import { benchArg } from "./args.js";

const runs = Number(benchArg("runs", "3"));
const stateDir = benchArg("state", join(testCacheDir, "store-gha"));
const root = tempDir("civm-bench-gha-");
mkdirSync(join(root, "logs"), { recursive: true });
const env = { ...process.env, CIVM_STATE_DIR: stateDir, CIVM_LOGS_DIR: join(root, "logs"), CIVM_ACCEL: process.env.CIVM_ACCEL ?? "tcg" };

const CASES: Record<string, { image: string; command: string }> = {
  "civm-runner, echo": { image: "civm-runner", command: "echo bench-done" },
  "civm-gha, echo": { image: "civm-gha", command: "echo bench-done" },
  "civm-gha, docker info": { image: "civm-gha", command: "docker info --format '{{.ServerVersion}}' && echo bench-done" },
};

writeFileSync(join(root, "instances.json"), JSON.stringify(Object.entries(CASES).map(([, c], i) => ({ name: `bench-${i}`, image: c.image, "cpu-cores": 2, ram: "2G", "timeout-seconds": 600, config: { command: c.command } }))));

function cycle(name: string): Promise<number> {
  const t0 = process.hrtime.bigint();
  const child = spawn(process.execPath, [civmBin, "run", name], { cwd: root, env, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (out += d));
  return new Promise((resolve, reject) =>
    child.on("close", (code) => (code === 0 ? resolve(Number(process.hrtime.bigint() - t0) / 1e9) : reject(new Error(`civm run ${name}: ${code}\n${out}`)))),
  );
}

const times: Record<string, number[]> = Object.fromEntries(Object.keys(CASES).map((k) => [k, []]));
console.log(`load avg at start: ${loadavg().map((l) => l.toFixed(2)).join(" / ")}`);
for (let r = 0; r < runs; r++) {
  for (const [i, k] of Object.keys(CASES).entries()) {
    const s = await cycle(`bench-${i}`);
    times[k]!.push(s);
    console.log(`run ${r + 1} ${k}: ${s.toFixed(1)} s`);
  }
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]!;
for (const [k, xs] of Object.entries(times)) console.log(`${k}: median ${median(xs).toFixed(1)} s (${xs.map((x) => x.toFixed(1)).join(", ")})`);
console.log(`load avg at end: ${loadavg().map((l) => l.toFixed(2)).join(" / ")}`);
console.log(`console logs: ${join(root, "logs")}`);
