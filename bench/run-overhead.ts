// civm's own overhead around one ephemeral VM, over N runs of the tiny guest:
//   start → exec: from civm's process start to QEMU's exec (internal: performance.now()
//                 at spawn; external: this script's spawn() to a timestamp the QEMU
//                 wrapper writes just before it execs QEMU, so Node's own start-up counts);
//   exit → exit:  from QEMU's exit to civm's exit (internal: performance.now() stamps;
//                 external: this script sees civm's close event).
// Runs alternate between the default network policy (restricted: an nftables table per VM)
// and `network: unrestricted` (no table), so the policy's cost is a difference measured in
// the same run.
// Usage: npm run bench [-- --runs 20 --out docs/benchmarks-overhead.json]
import { spawn } from "node:child_process";
import { writeFileSync, readFileSync, mkdirSync, chmodSync, rmSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest } from "../test/support/tiny-guest.js";
import { civmBin, tempDir } from "../test/support/paths.js";

const runs = Number(process.argv[process.argv.indexOf("--runs") + 1] || 20) || 20;
const outIdx = process.argv.indexOf("--out");
const out = outIdx > 0 ? process.argv[outIdx + 1] : undefined;

function stats(xs: number[]): { median: number; p95: number; min: number; max: number } {
  const s = [...xs].sort((a, b) => a - b);
  const at = (q: number) => s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
  return { median: at(0.5), p95: at(0.95), min: s[0]!, max: s[s.length - 1]! };
}

const guest = await buildTinyGuest();
const root = tempDir("civm-bench-");
const shim = join(root, "shim");
mkdirSync(shim);
const stampFile = join(root, "exec-stamp");
// Writes the wall clock (ns) and then becomes QEMU: same pid, so civm supervises it as usual.
writeFileSync(join(shim, "qemu-system-x86_64"), `#!/bin/sh\ndate +%s%N > ${stampFile}\nexec /usr/bin/qemu-system-x86_64 "$@"\n`);
chmodSync(join(shim, "qemu-system-x86_64"), 0o755);
// The shim runs as QEMU's unprivileged user.
writeFileSync(stampFile, "");
chmodSync(stampFile, 0o666);
const vm = { image: guest.disk, "cpu-cores": 1, ram: "256M", "timeout-seconds": 120, kernel: guest.kernel, initrd: guest.initrd, cmdline: "console=ttyS0 panic=-1 quiet", config: { tiny: "poweroff" } };
writeFileSync(join(root, "instances.json"), JSON.stringify([{ name: "bench", ...vm }, { name: "bench-unrestricted", ...vm, network: "unrestricted" }]));

type Row = { intStart: number; extStart: number; intExit: number; extExit: number; total: number };
const rows: Row[] = [];
const unrestricted: Row[] = [];
for (let i = 0; i < 2 * runs; i++) {
  const open = i % 2 === 1;
  const timings = join(root, `t${i}.json`);
  const t0 = process.hrtime.bigint();
  const wall0 = BigInt(Date.now()) * 1_000_000n;
  const mono0 = process.hrtime.bigint();
  const child = spawn(process.execPath, [civmBin, "run", open ? "bench-unrestricted" : "bench", "--timings-file", timings], {
    cwd: root,
    env: { ...process.env, CIVM_STATE_DIR: join(root, "state"), CIVM_LOGS_DIR: join(root, "logs"), CIVM_ACCEL: "tcg", PATH: `${shim}:${process.env.PATH}` },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  const code = await new Promise<number | null>((r) => child.on("close", r));
  const t1 = process.hrtime.bigint();
  if (code !== 0) throw new Error(`run ${i} failed (${code}):\n${stderr}`);
  const t = JSON.parse(readFileSync(timings, "utf8")) as { spawnedAt: number; exitedAt: number; exitAt: number };
  // Wall-clock stamp of the exec, mapped onto this process's monotonic clock.
  const execNs = BigInt(readFileSync(stampFile, "utf8").trim()) - wall0 + mono0;
  const extStart = Number(execNs - t0) / 1e6;
  const total = Number(t1 - t0) / 1e6;
  // External exit overhead: total wall time minus civm's own start-to-spawn minus QEMU's life.
  const qemuLife = t.exitedAt - t.spawnedAt;
  (open ? unrestricted : rows).push({ intStart: t.spawnedAt, extStart, intExit: t.exitAt - t.exitedAt, extExit: total - extStart - qemuLife, total });
  process.stderr.write(`run ${i + 1}/${2 * runs} (${open ? "unrestricted" : "restricted"}): start→exec ${t.spawnedAt.toFixed(1)} ms (ext ${extStart.toFixed(1)}), exit→exit ${(t.exitAt - t.exitedAt).toFixed(1)} ms, total ${(total / 1000).toFixed(2)} s\n`);
}
rmSync(root, { recursive: true, force: true });

const report = {
  date: new Date().toISOString(),
  runs,
  startToExecInternalMs: stats(rows.map((r) => r.intStart)),
  startToExecExternalMs: stats(rows.map((r) => r.extStart)),
  exitToExitInternalMs: stats(rows.map((r) => r.intExit)),
  exitToExitExternalMs: stats(rows.map((r) => r.extExit)),
  wholeRunSeconds: stats(rows.map((r) => r.total / 1000)),
  unrestricted: {
    startToExecInternalMs: stats(unrestricted.map((r) => r.intStart)),
    startToExecExternalMs: stats(unrestricted.map((r) => r.extStart)),
  },
  /** Median start → exec with the policy minus without (ms); the budget is 10. */
  networkPolicyCostMs: {
    internal: stats(rows.map((r) => r.intStart)).median - stats(unrestricted.map((r) => r.intStart)).median,
    external: stats(rows.map((r) => r.extStart)).median - stats(unrestricted.map((r) => r.extStart)).median,
  },
};
const text = JSON.stringify(report, null, 2);
process.stdout.write(text + "\n");
if (out) writeFileSync(out, text + "\n");
