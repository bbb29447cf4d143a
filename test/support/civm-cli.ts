// Runs the real civm CLI (bin/civm) as a child process with its own state and logs dirs.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, existsSync, writeFileSync, chmodSync } from "node:fs";
import { join } from "node:path";
import { civmBin, tempDir } from "./paths.js";

export interface CivmEnv {
  root: string;
  stateDir: string;
  logsDir: string;
  /** A PATH entry holding qemu-system-x86_64 (and -aarch64) wrappers that record each start. */
  shimDir: string;
  qemuStartsFile: string;
  env: NodeJS.ProcessEnv;
}

export function civmEnv(extra: NodeJS.ProcessEnv = {}): CivmEnv {
  const root = tempDir("civm-e2e-");
  const stateDir = join(root, "state");
  const logsDir = join(root, "logs");
  const shimDir = join(root, "shim");
  const qemuStartsFile = join(root, "qemu-starts");
  mkdirSync(shimDir);
  // The shim runs as QEMU's unprivileged user: it must be able to append here.
  writeFileSync(qemuStartsFile, "", { mode: 0o666 });
  chmodSync(qemuStartsFile, 0o666);
  // Records that QEMU was started, then becomes the real QEMU (same pid).
  // arm64 guests' QEMU too, when installed (a shim for a missing one would hide its absence).
  for (const qemu of ["qemu-system-x86_64", "qemu-system-aarch64"]) {
    if (qemu !== "qemu-system-x86_64" && !existsSync(`/usr/bin/${qemu}`)) continue;
    writeFileSync(join(shimDir, qemu), `#!/bin/sh\necho "$*" >> ${qemuStartsFile}\nexec /usr/bin/${qemu} "$@"\n`);
    chmodSync(join(shimDir, qemu), 0o755);
  }
  return {
    root, stateDir, logsDir, shimDir, qemuStartsFile,
    env: { ...process.env, CIVM_STATE_DIR: stateDir, CIVM_LOGS_DIR: logsDir, CIVM_ACCEL: "tcg", PATH: `${shimDir}:${process.env.PATH}`, ...extra },
  };
}

export interface CivmResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** opts.wrap: a command civm runs under (e.g. ["ip", "netns", "exec", NS]); opts.detached: civm leads a process group of its own. */
export function startCivm(args: string[], e: CivmEnv, opts: { cwd?: string; wrap?: string[]; detached?: boolean } = {}): { child: ChildProcess; done: Promise<CivmResult>; stderrSoFar: () => string } {
  const argv = [...(opts.wrap ?? []), process.execPath, civmBin, ...args];
  const child = spawn(argv[0]!, argv.slice(1), { cwd: opts.cwd ?? e.root, env: e.env, stdio: ["ignore", "pipe", "pipe"], detached: opts.detached ?? false });
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (d) => (stdout += d));
  child.stderr!.on("data", (d) => (stderr += d));
  const cwd = opts.cwd ?? e.root;
  const done = new Promise<CivmResult>((resolve, reject) => {
    // A failed spawn (e.g. ENOENT when the cwd is gone) is a test failure that says why, not a crash.
    child.on("error", (err) => reject(new Error(`could not start civm ${args.join(" ")} in ${cwd} (exists: ${existsSync(cwd)}): ${err.message}`)));
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
  return { child, done, stderrSoFar: () => stderr };
}

export function runCivm(args: string[], e: CivmEnv, opts: { cwd?: string; wrap?: string[] } = {}): Promise<CivmResult> {
  return startCivm(args, e, opts).done;
}

export async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** VMs QEMU was started for: `--version` (civm doctor, run by serve at start) and the KVM probe's boot sector are not VMs. */
export function qemuStarts(e: CivmEnv): number {
  if (!existsSync(e.qemuStartsFile)) return 0;
  const lines = readFileSync(e.qemuStartsFile, "utf8").trim().split("\n").filter(Boolean);
  return lines.filter((l) => l.trim() !== "--version" && !/\/civm-kvm-probe-[^/]*\/probe\.img/.test(l)).length;
}

/** Work dirs and registry entries left in the state dir. */
export function leftovers(e: CivmEnv): string[] {
  const out: string[] = [];
  for (const sub of ["vms", "registry"]) {
    const d = join(e.stateDir, sub);
    if (existsSync(d)) out.push(...readdirSync(d).map((n) => `${sub}/${n}`));
  }
  return out;
}

/** QEMU processes whose command line mentions this test's state dir. */
export function qemuProcessesOf(e: CivmEnv): number[] {
  const pids: number[] = [];
  for (const p of readdirSync("/proc")) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const cmd = readFileSync(`/proc/${p}/cmdline`, "utf8");
      if (cmd.includes("qemu-system") && cmd.includes(e.stateDir)) pids.push(Number(p));
    } catch {
      /* gone */
    }
  }
  return pids;
}

export function consoleLogOf(stderr: string): string {
  const m = /console(?: log)?: (\S+\.log)/.exec(stderr);
  if (!m) throw new Error(`no console log path in civm's output:\n${stderr}`);
  return readFileSync(m[1]!, "utf8");
}

/** civmEnv() on a shared store (a suite-wide image store under the test cache) as CIVM_STATE_DIR, with its own temp logs dir. */
export function storeEnv(storeDir: string, extra: NodeJS.ProcessEnv = {}): CivmEnv {
  const e = civmEnv(extra);
  mkdirSync(e.logsDir, { recursive: true });
  return { ...e, stateDir: storeDir, env: { ...e.env, CIVM_STATE_DIR: storeDir } };
}
