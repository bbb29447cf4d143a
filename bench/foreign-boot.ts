// Foreign images booting their own kernel directly (issue 15): the ephemeral cycle of one
// GRUB-on-BIOS image (by default the stock Debian 12 image of bench/fixtures/stock-debian.yaml:
// GRUB's 5 s menu, Debian's initrd, the job after sshd; referenced by its disk path, so civm
// treats it as foreign), three ways, alternating in each round so all see the same load:
//   direct    `civm run` of the disk path: civm reads GRUB's default entry from the image
//             (cached: the first read is timed apart, before the rounds) and boots it by -kernel
//   firmware  the same instance with --firmware-boot: SeaBIOS, then the image's GRUB
//   run.py    plain qemu-system-x86_64 booting the disk by BIOS with the same config ISO, the
//             way Rust CI's run.py starts its images (seed 001)
// Usage: npm run build && node dist/bench/foreign-boot.js [--runs 3] [--image DISK]
//          [--state DIR] [--keep] [--out FILE]
//   --image DISK  a GRUB disk to use instead of stock-debian (its guest must run config.command
//                 from instance.json and power off, as civm's guest agent does)
//   --state DIR   the image store stock-debian is built into (default .cache/bench/store)
import { spawn, execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { loadavg } from "node:os";
import { join, resolve } from "node:path";
import { civmBin, repoRoot, tempDir } from "../test/support/paths.js";
import { runPyQemuArgs } from "./runpy-qemu.js";
import { benchArg } from "./args.js";

const runs = Number(benchArg("runs", "3"));
const out = benchArg("out", "");
const keep = process.argv.includes("--keep");
const root = tempDir("civm-bench-foreign-");
const stateDir = resolve(benchArg("state", join(repoRoot, ".cache", "bench", "store")));
mkdirSync(stateDir, { recursive: true });
const env = { ...process.env, CIVM_STATE_DIR: stateDir, CIVM_LOGS_DIR: join(root, "logs"), CIVM_ACCEL: process.env.CIVM_ACCEL ?? "tcg" };
const MARK = "civm-bench-line";

/**
 * Runs a command through bash, whose `times` then prints the CPU time of everything the
 * command waited for (civm waits for QEMU): user+sys of the whole cycle. Under TCG an idle
 * vCPU costs nothing, so CPU counts the guest's and the firmware's work, and is less moved
 * by other people's load than wall time.
 */
function timed(cmd: string, args: string[], cwd = root): Promise<{ seconds: number; cpuSeconds: number; code: number | null; output: string }> {
  const t0 = process.hrtime.bigint();
  const child = spawn("bash", ["-c", '"$@"; rc=$?; times >&2; exit $rc', "_", cmd, ...args], { cwd, env, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  child.stdout.on("data", (d) => (output += d));
  child.stderr.on("data", (d) => (output += d));
  return new Promise((res) =>
    child.on("close", (code) => {
      const t = [...output.matchAll(/^(\d+)m([\d.]+)s (\d+)m([\d.]+)s$/gm)].pop();
      const cpuSeconds = t ? Number(t[1]) * 60 + Number(t[2]) + Number(t[3]) * 60 + Number(t[4]) : NaN;
      res({ seconds: Number(process.hrtime.bigint() - t0) / 1e9, cpuSeconds, code, output });
    }),
  );
}

async function civm(args: string[], cwd = root): Promise<{ seconds: number; cpuSeconds: number; output: string }> {
  const r = await timed(process.execPath, [civmBin, ...args], cwd);
  if (r.code !== 0) throw new Error(`civm ${args.join(" ")} failed (${r.code}):\n${r.output}`);
  return r;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]!;

let disk = benchArg("image", "");
if (!disk) {
  const specDir = join(root, "spec");
  mkdirSync(specDir);
  writeFileSync(join(specDir, "images.yaml"), readFileSync(join(repoRoot, "bench", "fixtures", "stock-debian.yaml")));
  process.stderr.write(`stock-debian in ${stateDir} (built if missing or stale)\n`);
  await civm(["image", "build", "stock-debian", "--quiet"], specDir);
  disk = execFileSync(process.execPath, [civmBin, "image", "path", "stock-debian"], { env, encoding: "utf8" }).trim();
}
disk = resolve(disk);

const runDir = join(root, "run");
mkdirSync(runDir);
const command = `echo ${MARK}`;
writeFileSync(join(runDir, "instances.json"), JSON.stringify([{ name: "foreign", image: disk, "cpu-cores": 2, ram: "1G", "timeout-seconds": 600, config: { command } }]));
const isoDir = join(root, "iso");
mkdirSync(isoDir);
writeFileSync(join(isoDir, "instance.json"), JSON.stringify({ name: "runpy", config: { command } }));
const iso = join(root, "config.iso");
execFileSync("genisoimage", ["-quiet", "-V", "instance-configuration", "-J", "-R", "-o", iso, isoDir]);

/** QEMU as run.py starts it: BIOS boot of an overlay on the image, the config ISO, user networking. */
async function runPy(label: string): Promise<{ seconds: number; cpuSeconds: number }> {
  const ov = join(root, `runpy-${label}.qcow2`);
  const consoleLog = join(root, `runpy-console-${label}.log`);
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-F", execFileSync("qemu-img", ["info", "-U", "--output=json", disk], { encoding: "utf8" }).includes('"format": "raw"') ? "raw" : "qcow2", "-b", disk, ov]);
  const r = await timed("qemu-system-x86_64", runPyQemuArgs({ overlay: ov, iso, consoleLog, accel: env.CIVM_ACCEL }));
  rmSync(ov, { force: true });
  if (!readFileSync(consoleLog, "utf8").includes(MARK)) throw new Error(`the run.py-style boot did not run the command (console: ${consoleLog})`);
  return r;
}

async function civmCycle(extra: string[]): Promise<{ seconds: number; cpuSeconds: number }> {
  const r = await civm(["run", "foreign", ...extra], runDir);
  const log = /console log: (\S+\.log)/.exec(r.output)?.[1];
  if (!log || !readFileSync(log, "utf8").includes(MARK)) throw new Error(`civm run ${extra.join(" ")} did not run the command:\n${r.output}`);
  return r;
}

const figures: Record<string, unknown> = { date: new Date().toISOString(), accel: env.CIVM_ACCEL, runs, image: disk, loadAtStart: loadavg().map((l) => Number(l.toFixed(2))) };
// The first direct run reads the kernel out of the image (once per image): timed on its own.
rmSync(join(stateDir, "boot-cache"), { recursive: true, force: true });
const first = await civm(["run", "foreign"], runDir);
const firstLog = /console log: (\S+\.log)/.exec(first.output)?.[1];
const powerOff = firstLog ? /\[\s*([\d.]+)\] reboot: Power down/.exec(readFileSync(firstLog, "utf8"))?.[1] : undefined;
const line = /booting the image's own kernel[^\n]*/.exec(first.output)?.[0];
if (!line) throw new Error(`civm did not boot the image's kernel directly:\n${first.output}`);
// The read itself: the run's wall time minus the guest's kernel clock at power-off (and ~3 s of civm and QEMU around it).
process.stderr.write(`first direct run (reads the kernel from the image): ${first.seconds.toFixed(1)} s, guest powered off at ${powerOff ?? "?"} s of kernel time\n  ${line}\n`);
figures.firstRunGuestPowerOffSeconds = powerOff ? Number(powerOff) : null;
figures.firstDirectRunSeconds = first.seconds;
figures.firstDirectRunCpuSeconds = first.cpuSeconds;
type Run = { seconds: number; cpuSeconds: number };
const direct: Run[] = [];
const firmware: Run[] = [];
const runpy: Run[] = [];
for (let i = 0; i < runs; i++) {
  // Rotate the order so no side always follows the same one.
  const order = [0, 1, 2].map((k) => (k + i) % 3);
  for (const k of order) {
    if (k === 0) direct.push(await civmCycle([]));
    else if (k === 1) firmware.push(await civmCycle(["--firmware-boot"]));
    else runpy.push(await runPy(String(i + 1)));
  }
  const f = (r: Run) => `${r.seconds.toFixed(1)} s (CPU ${r.cpuSeconds.toFixed(1)} s)`;
  process.stderr.write(`  round ${i + 1}: civm direct ${f(direct[i]!)}, civm --firmware-boot ${f(firmware[i]!)}, run.py-style ${f(runpy[i]!)}\n`);
}
const wall = (rs: Run[]) => median(rs.map((r) => r.seconds));
const cpu = (rs: Run[]) => median(rs.map((r) => r.cpuSeconds));
Object.assign(figures, {
  direct, firmware, runPy: runpy,
  medianDirect: wall(direct), medianFirmware: wall(firmware), medianRunPy: wall(runpy),
  ratioDirectToRunPy: wall(direct) / wall(runpy),
  ratioDirectToFirmware: wall(direct) / wall(firmware),
  ratioFirmwareToRunPy: wall(firmware) / wall(runpy),
  medianCpuDirect: cpu(direct), medianCpuFirmware: cpu(firmware), medianCpuRunPy: cpu(runpy),
  cpuRatioDirectToRunPy: cpu(direct) / cpu(runpy),
  loadAtEnd: loadavg().map((l) => Number(l.toFixed(2))),
});
if (keep) process.stderr.write(`kept ${root} (civm's console logs in ${join(root, "logs")}, run.py-style ones in ${join(root, "runpy-console-*.log")})\n`);
else rmSync(root, { recursive: true, force: true });
const text = JSON.stringify(figures, null, 2);
process.stdout.write(text + "\n");
if (out) writeFileSync(out, text + "\n");
