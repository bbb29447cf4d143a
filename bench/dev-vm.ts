// Dev VM time to first command (issue 5): from `civm run --detach` to `civm exec -- true`
// returning (with `civm wait` between: the agent's ready line, then SSH), against the lvh
// GitHub Action's loop (plain QEMU started in the background, then `ssh` retried once a
// second, then the command over ssh; bench/lvh-loop.sh) on the same civm-runner image, the
// same config ISO (same key, keep-alive command and /host mount) and the same guest devices.
// The two sides alternate within one run of this script (and which goes first alternates
// too), so both see the same machine load.
// Usage: npm run build && node dist/bench/dev-vm.js [--runs 3] [--out FILE]
import { spawn, execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { freePort } from "../test/support/net.js";
import { civmBin, repoRoot, tempDir } from "../test/support/paths.js";
import { ensureRunnerImage, RUNNER_IMAGE } from "../test/support/runner-image.js";
import { renderConfigDrive, writeConfigDrive } from "../src/vm/config-drive.js";
import { KEEPALIVE_COMMAND } from "../src/dev/plan.js";

const arg = (name: string, def: string) => (process.argv.includes(name) ? process.argv[process.argv.indexOf(name) + 1]! : def);
const runs = Number(arg("--runs", "3"));
const out = arg("--out", "");

const runner = await ensureRunnerImage();
const root = tempDir("civm-bench-dev-");
const hostDir = join(root, "src");
mkdirSync(hostDir);
const env = { ...process.env, CIVM_STATE_DIR: runner.stateDir, CIVM_LOGS_DIR: join(root, "logs"), CIVM_ACCEL: process.env.CIVM_ACCEL ?? "tcg" };

function timed(cmd: string, args: string[]): Promise<{ ms: number; code: number | null; stdout: string; stderr: string }> {
  const t0 = process.hrtime.bigint();
  const child = spawn(cmd, args, { cwd: root, env, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d) => (stdout += d));
  child.stderr.on("data", (d) => (stderr += d));
  return new Promise((resolve) => child.on("close", (code) => resolve({ ms: Number(process.hrtime.bigint() - t0) / 1e6, code, stdout, stderr })));
}

async function civm(args: string[]) {
  const r = await timed(process.execPath, [civmBin, ...args]);
  if (r.code !== 0) throw new Error(`civm ${args.join(" ")} failed (${r.code}):\n${r.stderr}`);
  return r;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)]!;
}

/** One civm run: detach, wait, exec true; the phases in ms. */
async function civmOnce(i: number): Promise<{ detach: number; wait: number; exec: number; total: number }> {
  const name = `bench-dev-${process.pid}-${i}`;
  const t0 = process.hrtime.bigint();
  const run = await civm(["run", "--image", RUNNER_IMAGE, "--detach", "--name", name, "--mem", "1G", "--host-mount", hostDir]);
  try {
    const wait = await civm(["wait", name]);
    const exec = await civm(["exec", name, "--", "true"]);
    const total = Number(process.hrtime.bigint() - t0) / 1e6;
    return { detach: run.ms, wait: wait.ms, exec: exec.ms, total };
  } finally {
    await civm(["stop", "--force", name]);
  }
}

/** One run of the lvh-style loop on the same image, with the same instance.json a civm dev VM gets. */
async function lvhOnce(i: number): Promise<number> {
  const work = join(root, `lvh-${i}`);
  mkdirSync(work);
  execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", join(work, "key")]);
  const pub = readFileSync(join(work, "key.pub"), "utf8").trim();
  const config = { command: KEEPALIVE_COMMAND, user: "root", mounts: [{ tag: "host", path: "/host", ro: false }], ssh_authorized_keys: [pub] };
  await writeConfigDrive(renderConfigDrive("lvh-loop", config), join(work, "config.iso"), join(work, "cfg"));
  const img = join(runner.stateDir, "images", RUNNER_IMAGE);
  try {
    const r = await timed(join(repoRoot, "bench", "lvh-loop.sh"), [
      work, join(img, "disk.qcow2"), join(img, "vmlinuz"), join(img, "initrd.img"), join(work, "config.iso"), join(work, "key"), String(await freePort()), hostDir,
    ]);
    if (r.code !== 0) throw new Error(`lvh-loop.sh failed (${r.code}):\n${r.stderr}\n${existsSync(join(work, "console.log")) ? readFileSync(join(work, "console.log"), "utf8").slice(-3000) : ""}`);
    return Number(r.stdout.trim());
  } finally {
    const pidFile = join(work, "qemu.pid");
    if (existsSync(pidFile)) {
      try {
        process.kill(Number(readFileSync(pidFile, "utf8").trim()), "SIGKILL");
      } catch {
        /* gone */
      }
    }
    await new Promise((r) => setTimeout(r, 300));
    rmSync(work, { recursive: true, force: true });
  }
}

const civmRuns: Awaited<ReturnType<typeof civmOnce>>[] = [];
const lvhRuns: number[] = [];
// The order alternates (civm first, then the loop first) so a trend in the machine's load
// does not favour one side.
for (let i = 0; i < runs; i++) {
  const sides = [
    async () => {
      const c = await civmOnce(i);
      civmRuns.push(c);
      process.stderr.write(`run ${i + 1}/${runs}: civm ${(c.total / 1000).toFixed(1)} s (detach ${c.detach.toFixed(0)} ms, wait ${(c.wait / 1000).toFixed(1)} s, exec ${c.exec.toFixed(0)} ms)\n`);
    },
    async () => {
      const l = await lvhOnce(i);
      lvhRuns.push(l);
      process.stderr.write(`run ${i + 1}/${runs}: lvh loop ${(l / 1000).toFixed(1)} s\n`);
    },
  ];
  if (i % 2 === 1) sides.reverse();
  for (const side of sides) await side();
}
rmSync(root, { recursive: true, force: true });

const load = readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ");
const report = {
  date: new Date().toISOString(),
  runs,
  loadavg: load,
  civm: {
    totalSeconds: civmRuns.map((r) => r.total / 1000),
    medianSeconds: median(civmRuns.map((r) => r.total)) / 1000,
    medianDetachMs: median(civmRuns.map((r) => r.detach)),
    medianWaitSeconds: median(civmRuns.map((r) => r.wait)) / 1000,
    medianExecMs: median(civmRuns.map((r) => r.exec)),
  },
  lvhLoop: { totalSeconds: lvhRuns.map((ms) => ms / 1000), medianSeconds: median(lvhRuns) / 1000 },
  /** civm minus the loop, run by run (each pair ran back to back): the figure least moved by the machine's load. */
  pairDifferenceSeconds: civmRuns.map((c, i) => (c.total - lvhRuns[i]!) / 1000),
  medianPairDifferenceSeconds: median(civmRuns.map((c, i) => c.total - lvhRuns[i]!)) / 1000,
};
const text = JSON.stringify(report, null, 2);
process.stdout.write(text + "\n");
if (out) writeFileSync(out, text + "\n");
