// Image builder and ephemeral-cycle figures (issue 3), in one script so that every ratio
// compares runs made on the same machine under the same load:
//   1. cold build of civm-runner into an empty store; 2. warm no-op rebuild;
//   3. child rebuild after one action changed (parent cached);
//   4. the full ephemeral cycle, `civm run` of civm-runner with a command printing one
//      line, against a bare qemu-system-x86_64 BIOS boot of the same image reading the
//      same config ISO, and against a stock Debian systemd image (bench/fixtures/
//      stock-debian.yaml) booted by BIOS the way run.py boots images.
// Usage: npm run build && node dist/bench/image-build.js [--runs 3] [--out FILE]
//          [--cycle-only] [--state DIR] [--keep]
//   --cycle-only  only step 4 (quick iterations on the boot); the images are built first if
//                 the store lacks them or their key changed (a no-op when cached)
//   --state DIR   use DIR as the image store (kept) instead of an empty temp one; with
//                 --cycle-only, a store that already holds both images skips their builds
//   --keep        keep the temp dir (console logs of every boot) and print where it is
import { spawn, execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync, readFileSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import { loadavg } from "node:os";
import { civmBin, repoRoot, tempDir } from "../test/support/paths.js";
import { runPyQemuArgs } from "./runpy-qemu.js";

const arg = (name: string, def: string) => (process.argv.includes(name) ? process.argv[process.argv.indexOf(name) + 1]! : def);
const runs = Number(arg("--runs", "3"));
const out = arg("--out", "");
const cycleOnly = process.argv.includes("--cycle-only");
const keep = process.argv.includes("--keep");
const stateArg = arg("--state", "");
const root = tempDir("civm-bench-img-");
const stateDir = stateArg ? resolve(stateArg) : join(root, "state");
if (stateArg) mkdirSync(stateDir, { recursive: true });
const env = { ...process.env, CIVM_STATE_DIR: stateDir, CIVM_LOGS_DIR: join(root, "logs"), CIVM_ACCEL: process.env.CIVM_ACCEL ?? "tcg" };

function timed(cmd: string, args: string[], opts: { cwd?: string } = {}): Promise<{ seconds: number; code: number | null; output: string }> {
  const t0 = process.hrtime.bigint();
  const child = spawn(cmd, args, { cwd: opts.cwd ?? root, env, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  child.stdout.on("data", (d) => (output += d));
  child.stderr.on("data", (d) => (output += d));
  return new Promise((resolve) => child.on("close", (code) => resolve({ seconds: Number(process.hrtime.bigint() - t0) / 1e9, code, output })));
}

async function civm(args: string[], cwd?: string) {
  const r = await timed(process.execPath, [civmBin, ...args], cwd ? { cwd } : {});
  if (r.code !== 0) throw new Error(`civm ${args.join(" ")} failed (${r.code}):\n${r.output}`);
  return r;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)]!;
}

/** A bare QEMU BIOS boot of `disk` (through an overlay) with the config ISO, until it exits. */
async function bareBoot(disk: string, iso: string, label: string): Promise<number> {
  const ov = join(root, `bare-${Date.now()}.qcow2`);
  const consoleLog = join(root, `bare-console-${label}.log`);
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk, ov]);
  const r = await timed("qemu-system-x86_64", runPyQemuArgs({ overlay: ov, iso, consoleLog, accel: env.CIVM_ACCEL }));
  rmSync(ov, { force: true });
  if (!readFileSync(consoleLog, "utf8").includes("civm-bench-line")) throw new Error("the bare boot did not run the command");
  return r.seconds;
}

const figures: Record<string, unknown> = { date: new Date().toISOString(), accel: env.CIVM_ACCEL, runs, load: loadavg().map((l) => Number(l.toFixed(2))) };
const specDir = join(root, "spec");
mkdirSync(specDir);
if (cycleOnly) {
  process.stderr.write(`cycle only, store ${stateDir}: civm-runner (built if missing or stale)\n`);
  await civm(["image", "build", "civm-runner", "--quiet"]);
} else {
  process.stderr.write("1/4 cold build of civm-runner (empty store)\n");
  figures.coldBuildSeconds = (await civm(["image", "build", "civm-runner", "--quiet"])).seconds;
  process.stderr.write("2/4 warm no-op build\n");
  const warm: number[] = [];
  for (let i = 0; i < 3; i++) warm.push((await civm(["image", "build", "civm-runner", "--quiet"])).seconds);
  figures.warmNoopSeconds = median(warm);

  process.stderr.write("3/4 child rebuild after one action changed\n");
  const childSpec = (v: string) => `- name: bench-child\n  parent: civm-runner\n  actions:\n    - write: {path: /etc/bench-child, content: "${v}\\n"}\n`;
  writeFileSync(join(specDir, "images.yaml"), childSpec("v1"));
  figures.childFirstBuildSeconds = (await civm(["image", "build", "bench-child", "--quiet"], specDir)).seconds;
  writeFileSync(join(specDir, "images.yaml"), childSpec("v2"));
  figures.childRebuildSeconds = (await civm(["image", "build", "bench-child", "--quiet"], specDir)).seconds;
}

process.stderr.write("4/4 ephemeral cycle: civm run vs bare QEMU BIOS boot vs stock Debian\n");
writeFileSync(join(specDir, "images.yaml"), readFileSync(join(repoRoot, "bench", "fixtures", "stock-debian.yaml")));
await civm(["image", "build", "stock-debian", "--quiet"], specDir);
const runDir = join(root, "run");
mkdirSync(runDir);
const command = "echo civm-bench-line";
writeFileSync(join(runDir, "instances.json"), JSON.stringify([
  { name: "cycle", image: "civm-runner", "cpu-cores": 2, ram: "1G", "timeout-seconds": 600, config: { command } },
]));
const isoDir = join(root, "iso");
mkdirSync(isoDir);
writeFileSync(join(isoDir, "instance.json"), JSON.stringify({ name: "bare", config: { command } }));
const iso = join(root, "config.iso");
execFileSync("genisoimage", ["-quiet", "-V", "instance-configuration", "-J", "-R", "-o", iso, isoDir]);
const imagePath = (n: string) => execFileSync(process.execPath, [civmBin, "image", "path", n], { env, encoding: "utf8" }).trim();
const civmCycle: number[] = [];
const bareRunner: number[] = [];
const stock: number[] = [];
for (let i = 0; i < runs; i++) {
  civmCycle.push((await civm(["run", "cycle"], runDir)).seconds);
  bareRunner.push(await bareBoot(imagePath("civm-runner"), iso, `runner-${i + 1}`));
  stock.push(await bareBoot(imagePath("stock-debian"), iso, `stock-${i + 1}`));
  process.stderr.write(`  run ${i + 1}: civm ${civmCycle[i]!.toFixed(1)} s, bare BIOS ${bareRunner[i]!.toFixed(1)} s, stock Debian ${stock[i]!.toFixed(1)} s\n`);
}
figures.cycleCivmSeconds = median(civmCycle);
figures.cycleBareBiosSameImageSeconds = median(bareRunner);
figures.cycleStockDebianSeconds = median(stock);
figures.ratioCivmToStock = median(civmCycle) / median(stock);
figures.ratioCivmToBareSameImage = median(civmCycle) / median(bareRunner);
if (keep) process.stderr.write(`kept ${root} (console logs in ${join(root, "logs")}, bare boots in ${join(root, "bare-console-*.log")})\n`);
else rmSync(root, { recursive: true, force: true });
const text = JSON.stringify(figures, null, 2);
process.stdout.write(text + "\n");
if (out) writeFileSync(out, text + "\n");
