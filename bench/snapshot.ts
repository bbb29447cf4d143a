// Snapshots (issue 15): a cold boot against a restore of the same image, side by side in one
// run (they alternate, and which goes first alternates too, so both see the same load).
// Measured from the bench's side, on civm's stdout (--console) as lines arrive:
//   config: civm started -> the agent logs "reading instance configuration" (the agent has
//           its config: for a runner VM, what registration waits for)
//   ready:  civm started -> "civm-agent: ready" (keys, mounts, network, caches done)
//   cycle:  civm started -> civm exited (the config's command is `true`; the VM powers off)
//   restore->config: civm's "running (... restored from ...)" line (the guest runs) -> "reading
//           instance configuration"
// Then the memory file's size and QEMU's load time (spawn -> stream loaded and disc inserted,
// civm's timings) against the VM's RAM size.
// Usage: npm run build && node dist/bench/snapshot.js [--runs 3] [--images civm-runner,civm-gha] [--rams 512M,1G,2G] [--out FILE]
//        [--state-dir DIR: a state dir whose store already holds the images (nothing is built)]
import { spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { civmBin, tempDir } from "../test/support/paths.js";
import { ensureRunnerImage } from "../test/support/runner-image.js";
import { ensureGhaImage } from "../test/support/gha-image.js";
import { benchArg } from "./args.js";

const runs = Number(benchArg("runs", "3"));
const images = benchArg("images", "civm-runner").split(",");
const rams = benchArg("rams", "512M,1G,2G").split(",");
const out = benchArg("out", "");
const givenState = benchArg("state-dir", "");
const RAM = "1G";

const root = tempDir("civm-bench-snapshot-");

interface Once {
  config: number;
  ready: number;
  cycle: number;
  restoreToConfig?: number;
  loadMs?: number;
  start: string;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)]! : NaN;
}

function instancesFile(image: string, ram: string): string {
  const f = join(root, `instances-${image}-${ram}.json`);
  writeFileSync(f, JSON.stringify([{ name: "bench", image, "cpu-cores": 2, ram, "timeout-seconds": 900, config: { command: "true" } }]));
  return f;
}

async function once(stateDir: string, file: string, snapshot: boolean): Promise<Once> {
  const timings = join(root, `timings-${process.hrtime.bigint()}.json`);
  const args = [civmBin, "run", "-f", file, "bench", "--console", "--timings-file", timings, ...(snapshot ? ["--snapshot"] : [])];
  const env = { ...process.env, CIVM_STATE_DIR: stateDir, CIVM_LOGS_DIR: join(root, "logs"), CIVM_ACCEL: process.env.CIVM_ACCEL ?? "tcg" };
  const t0 = performance.now();
  const child = spawn(process.execPath, args, { cwd: root, env, stdio: ["ignore", "pipe", "pipe"] });
  const seen: Record<string, number> = {};
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d: Buffer) => {
    stdout += d.toString();
    const now = performance.now() - t0;
    if (seen.config === undefined && stdout.includes("civm-agent: reading instance configuration")) seen.config = now;
    if (seen.ready === undefined && stdout.includes("civm-agent: ready")) seen.ready = now;
  });
  child.stderr.on("data", (d: Buffer) => {
    stderr += d.toString();
    if (seen.running === undefined && /: running \(pid/.test(stderr) && /restored from snapshot/.test(stderr)) seen.running = performance.now() - t0;
  });
  const code = await new Promise<number | null>((r) => child.on("close", r));
  const cycle = performance.now() - t0;
  if (code !== 0 || seen.config === undefined || seen.ready === undefined) throw new Error(`civm run ${snapshot ? "--snapshot " : ""}failed (${code}):\n${stderr}`);
  const t = JSON.parse(readFileSync(timings, "utf8")) as { spawnedAt: number; restoredAt?: number; start: string };
  return {
    config: seen.config, ready: seen.ready, cycle, start: t.start,
    ...(seen.running !== undefined ? { restoreToConfig: seen.config - seen.running } : {}),
    ...(t.restoredAt !== undefined ? { loadMs: t.restoredAt - t.spawnedAt } : {}),
  };
}

async function snapshotMeta(stateDir: string, image: string, ramBytes: number): Promise<{ memoryBytes: number }> {
  const r = await new Promise<string>((resolve, reject) => {
    const c = spawn(process.execPath, [civmBin, "image", "ls", "--json"], { env: { ...process.env, CIVM_STATE_DIR: stateDir }, stdio: ["ignore", "pipe", "inherit"] });
    let o = "";
    c.stdout.on("data", (d) => (o += d));
    c.on("close", (code) => (code === 0 ? resolve(o) : reject(new Error("civm image ls failed"))));
  });
  const img = (JSON.parse(r) as { name: string; snapshots: { ramBytes: number; memoryBytes: number }[] }[]).find((i) => i.name === image);
  const s = img?.snapshots.find((x) => x.ramBytes === ramBytes);
  if (!s) throw new Error(`no snapshot of ${image} with ${ramBytes} bytes of RAM`);
  return s;
}

const s = (ms: number) => (ms / 1000).toFixed(1);
const lines: string[] = [];
const say = (l: string) => {
  lines.push(l);
  process.stdout.write(l + "\n");
};
const host = `${process.env.CIVM_ACCEL ?? "tcg"}, load average ${readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ")} at start`;
say(`# civm snapshot bench (${new Date().toISOString()}, ${host}, ${runs} runs each, median)`);
say("");
say(`| image | start | config (s) | ready (s) | cycle (s) | restore -> config (s) | ratio config | ratio ready |`);
say(`| --- | --- | --- | --- | --- | --- | --- | --- |`);
const stores: Record<string, string> = {};
for (const image of images) {
  const stateDir = givenState || (image === "civm-gha" ? (await ensureGhaImage()).stateDir : (await ensureRunnerImage()).stateDir);
  stores[image] = stateDir;
  const file = instancesFile(image, RAM);
  // The snapshot exists before timing starts (first use makes it).
  await once(stateDir, file, true);
  const cold: Once[] = [];
  const warm: Once[] = [];
  for (let i = 0; i < runs; i++) {
    if (i % 2 === 0) {
      cold.push(await once(stateDir, file, false));
      warm.push(await once(stateDir, file, true));
    } else {
      warm.push(await once(stateDir, file, true));
      cold.push(await once(stateDir, file, false));
    }
  }
  if (warm.some((w) => w.start !== "restore")) throw new Error(`a --snapshot run did not restore: ${JSON.stringify(warm)}`);
  const m = (xs: Once[], k: "config" | "ready" | "cycle") => median(xs.map((x) => x[k]));
  say(`| ${image} | boot | ${s(m(cold, "config"))} | ${s(m(cold, "ready"))} | ${s(m(cold, "cycle"))} | | | |`);
  say(`| ${image} | restore | ${s(m(warm, "config"))} | ${s(m(warm, "ready"))} | ${s(m(warm, "cycle"))} | ${s(median(warm.map((w) => w.restoreToConfig!)))} | ${(m(warm, "config") / m(cold, "config")).toFixed(2)} | ${(m(warm, "ready") / m(cold, "ready")).toFixed(2)} |`);
}
say("");
say(`| image | RAM | memory file (MiB) | QEMU load + disc (s) | config (s) |`);
say(`| --- | --- | --- | --- | --- |`);
const image = images[0]!;
for (const ram of rams) {
  const file = instancesFile(image, ram);
  await once(stores[image]!, file, true); // made on first use
  const xs: Once[] = [];
  for (let i = 0; i < runs; i++) xs.push(await once(stores[image]!, file, true));
  const bytes = /^(\d+)([MG])$/.exec(ram)!;
  const ramBytes = Number(bytes[1]) * (bytes[2] === "G" ? 1024 ** 3 : 1024 ** 2);
  const meta = await snapshotMeta(stores[image]!, image, ramBytes);
  say(`| ${image} | ${ram} | ${(meta.memoryBytes / 1024 ** 2).toFixed(0)} | ${s(median(xs.map((x) => x.loadMs!)))} | ${s(median(xs.map((x) => x.config)))} |`);
}
if (out) writeFileSync(out, lines.join("\n") + "\n");
