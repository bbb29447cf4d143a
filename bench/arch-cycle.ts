// The tiny guest's whole cycle (civm run: boot, read and eject the config disc, power off,
// clean up) on x86_64 and on arm64 under TCG, runs alternating, through the real bin/civm.
// Reported: the median seconds of each and arm64 / x86_64 as a ratio. `--cpus LIST` adds
// arm64 runs with other -cpu models (qemu-args), e.g. --cpus max,max+pauth-impdef=on
// ("+" for ","), to compare them with civm's default (cortex-a57) in the same run.
// Usage: node dist/bench/arch-cycle.js [--runs 5] [--cpus max] [--out FILE]
import { spawn } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest } from "../test/support/tiny-guest.js";
import { civmBin, tempDir } from "../test/support/paths.js";
import { benchArg } from "./args.js";

const runs = Number(benchArg("runs", "5")) || 5;
const cpus = benchArg("cpus", "").split(",").filter(Boolean).map((c) => c.replace(/\+/g, ","));
const out = benchArg("out", "");

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

const [x86, arm] = await Promise.all([buildTinyGuest(), buildTinyGuest({ arch: "arm64" })]);
const root = tempDir("civm-bench-arch-");
const common = { "cpu-cores": 1, ram: "256M", "timeout-seconds": 300, cmdline: "console=ttyS0 panic=-1 quiet", config: { tiny: "poweroff" } };
const instances: Record<string, unknown>[] = [
  { name: "x86_64", image: x86.disk, kernel: x86.kernel, initrd: x86.initrd, ...common },
  { name: "arm64", arch: "arm64", image: arm.disk, kernel: arm.kernel, initrd: arm.initrd, ...common },
  ...cpus.map((c, i) => ({ name: `arm64-cpu${i}`, arch: "arm64", image: arm.disk, kernel: arm.kernel, initrd: arm.initrd, ...common, "qemu-args": ["-cpu", c] })),
];
writeFileSync(join(root, "instances.json"), JSON.stringify(instances));

/** One civm run: whole wall time and QEMU's life (spawn to exit), seconds. */
async function once(name: string, i: number): Promise<{ total: number; qemu: number }> {
  const timings = join(root, `${name}-${i}.json`);
  const t0 = performance.now();
  const child = spawn(process.execPath, [civmBin, "run", name, "--timings-file", timings], {
    cwd: root,
    env: { ...process.env, CIVM_STATE_DIR: join(root, "state"), CIVM_LOGS_DIR: join(root, "logs"), CIVM_ACCEL: "tcg" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  const code = await new Promise<number | null>((r) => child.on("close", r));
  const total = (performance.now() - t0) / 1000;
  if (code !== 0) throw new Error(`${name} run ${i} failed (${code}):\n${stderr}`);
  const t = JSON.parse(readFileSync(timings, "utf8")) as { spawnedAt: number; exitedAt: number };
  return { total, qemu: (t.exitedAt - t.spawnedAt) / 1000 };
}

const names = instances.map((x) => x.name as string);
const results: Record<string, { total: number[]; qemu: number[] }> = Object.fromEntries(names.map((n) => [n, { total: [], qemu: [] }]));
for (let i = 0; i < runs; i++) {
  for (const n of names) {
    const r = await once(n, i);
    results[n]!.total.push(r.total);
    results[n]!.qemu.push(r.qemu);
    process.stderr.write(`run ${i + 1}/${runs} ${n}: ${r.total.toFixed(2)} s (QEMU ${r.qemu.toFixed(2)} s)\n`);
  }
}
rmSync(root, { recursive: true, force: true });

const summary = Object.fromEntries(names.map((n) => [n, { medianSeconds: median(results[n]!.total), medianQemuSeconds: median(results[n]!.qemu), runs: results[n]!.total }]));
const base = summary.x86_64!.medianSeconds;
const report = {
  date: new Date().toISOString(),
  runs,
  cpus: { arm64: "cortex-a57 (civm's default)", ...Object.fromEntries(cpus.map((c, i) => [`arm64-cpu${i}`, c])) },
  summary,
  ratioToX86: Object.fromEntries(names.map((n) => [n, Number((summary[n]!.medianSeconds / base).toFixed(2))])),
};
process.stdout.write(JSON.stringify(report, null, 2) + "\n");
if (out) writeFileSync(out, JSON.stringify(report, null, 2) + "\n");
