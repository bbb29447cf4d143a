// The built-in image civm-runner, built once for the whole suite into a shared store
// (<testCacheDir>/store, the suite's cache: `civm image build` keys it by the image's key, so a
// warm store makes this a no-op of well under a second). Test files run in parallel
// (node --test runs each file in its own process), so the build runs under an exclusive
// lock: a directory made with mkdir (atomic) holding the owner's pid and start time. A lock
// whose owner is gone (or whose pid now belongs to another process) is stale and removed.
//
// Tests that boot the image use runnerEnv(): the shared store as CIVM_STATE_DIR, but their
// own temp logs dir, so each test sees only its own console logs. Other test files' VMs run
// in the same store at the same time: check leftovers with leftoversNamed() and
// qemuProcessesNamed(), which look only at VMs whose instance name starts with a prefix the
// test owns (give every instance a unique name per run, see uniqueName()).
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { civmBin, testCacheDir } from "./paths.js";
import { civmEnv, type CivmEnv } from "./civm-cli.js";

/** The shared store (a civm state dir) holding civm-runner. */
export const runnerStoreDir = join(testCacheDir, "store");
export const RUNNER_IMAGE = "civm-runner";
const lockDir = join(testCacheDir, "store.lock");
const LOCK_POLL_MS = 1000;
const LOCK_TIMEOUT_MS = 60 * 60 * 1000;
/** A lock dir without its pid file yet (its owner is between mkdir and write) counts as held this long. */
const LOCK_NO_PID_GRACE_MS = 30_000;

export interface RunnerImage {
  stateDir: string;
  diskPath: string;
  /** Whether the build was a cache hit (false: this call built it). */
  cached: boolean;
  /** Wall time of `civm image build civm-runner`, lock wait excluded. */
  seconds: number;
}

let pending: Promise<RunnerImage> | undefined;

/**
 * Builds civm-runner into the shared store (once per suite: cached by key across runs and
 * serialized across test processes) and returns where it is.
 */
export function ensureRunnerImage(): Promise<RunnerImage> {
  // One build per process: a second concurrent call must not wait on our own lock.
  pending ??= buildUnderLock().catch((e: unknown) => {
    pending = undefined;
    throw e;
  });
  return pending;
}

async function buildUnderLock(): Promise<RunnerImage> {
  mkdirSync(runnerStoreDir, { recursive: true });
  const release = await acquireLock(lockDir, RUNNER_IMAGE);
  try {
    const started = Date.now();
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      CIVM_STATE_DIR: runnerStoreDir,
      CIVM_LOGS_DIR: join(runnerStoreDir, "logs"),
      CIVM_ACCEL: process.env.CIVM_ACCEL ?? "tcg",
    };
    const r = await runNode([civmBin, "image", "build", RUNNER_IMAGE, "--json"], env);
    const seconds = (Date.now() - started) / 1000;
    if (r.code !== 0) {
      throw new Error(`civm image build ${RUNNER_IMAGE} failed (exit ${r.code}) in ${runnerStoreDir}:\n${r.stderr}\n${r.stdout}`);
    }
    const results = r.stdout
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { type: string; image?: string; status?: string; disk?: string })
      .filter((o) => o.type === "result" && o.image === RUNNER_IMAGE);
    const result = results.at(-1);
    if (!result?.disk || !existsSync(result.disk)) {
      throw new Error(`civm image build ${RUNNER_IMAGE} printed no result with an existing disk:\n${r.stdout}\n${r.stderr}`);
    }
    return { stateDir: runnerStoreDir, diskPath: result.disk, cached: result.status === "cached", seconds };
  } finally {
    release();
  }
}

export function runNode(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

// ---- the lock ------------------------------------------------------------------------------

interface LockOwner {
  pid: number;
  /** Field 22 of /proc/<pid>/stat: tells a reused pid from the owner. */
  start?: string;
}

function processStart(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
  } catch {
    return undefined;
  }
}

function ownerAlive(o: LockOwner): boolean {
  try {
    process.kill(o.pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  if (!o.start) return true;
  const start = processStart(o.pid);
  return start === undefined || start === o.start;
}

function readLockOwner(lockDir: string): { owner?: LockOwner; raw?: string } {
  try {
    const raw = readFileSync(join(lockDir, "pid"), "utf8");
    const [pid, start] = raw.trim().split(/\s+/);
    if (!pid || !/^\d+$/.test(pid)) return { raw };
    return { owner: { pid: Number(pid), ...(start ? { start } : {}) }, raw };
  } catch {
    return {};
  }
}

/** Milliseconds since the lock dir last changed (its pid file is written right after mkdir). */
function lockAge(lockDir: string): number {
  try {
    return Date.now() - statSync(lockDir).mtimeMs;
  } catch {
    return 0;
  }
}

/** Takes the lock `lockDir` (waiting, polling every second, removing a stale one); returns its release. */
export async function acquireLock(lockDir: string, what: string): Promise<() => void> {
  const deadline = Date.now() + LOCK_TIMEOUT_MS;
  let waitedFor: string | undefined;
  for (;;) {
    try {
      mkdirSync(lockDir);
      const start = processStart(process.pid);
      writeFileSync(join(lockDir, "pid"), `${process.pid}${start ? ` ${start}` : ""}\n`);
      return () => rmSync(lockDir, { recursive: true, force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
    }
    const { owner, raw } = readLockOwner(lockDir);
    const stale = owner ? !ownerAlive(owner) : lockAge(lockDir) > LOCK_NO_PID_GRACE_MS;
    if (stale) {
      // Re-read just before removing: only remove the lock we judged stale, not one a
      // waiter took in the meantime.
      if (readLockOwner(lockDir).raw === raw) rmSync(lockDir, { recursive: true, force: true });
      continue;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${LOCK_TIMEOUT_MS / 1000} s waiting for ${lockDir} (held by pid ${owner?.pid ?? "?"})`);
    const who = String(owner?.pid ?? "?");
    if (waitedFor !== who) {
      process.stderr.write(`# waiting for ${lockDir} (pid ${who} is building ${what})\n`);
      waitedFor = who;
    }
    await new Promise((r) => setTimeout(r, LOCK_POLL_MS));
  }
}

// ---- environments for tests that boot images from the shared store --------------------------

/** A name no other test run uses: `<prefix>-<8 hex>` (lowercase, valid as instance and image name). */
export function uniqueName(prefix: string): string {
  return `${prefix}-${randomBytes(4).toString("hex")}`;
}

/**
 * Like civmEnv() (own temp root, logs dir and QEMU shim; CIVM_ACCEL=tcg) but with the shared
 * store as CIVM_STATE_DIR.
 */
export function runnerEnv(extra: NodeJS.ProcessEnv = {}): CivmEnv {
  const e = civmEnv(extra);
  mkdirSync(e.logsDir, { recursive: true });
  return { ...e, stateDir: runnerStoreDir, env: { ...e.env, CIVM_STATE_DIR: runnerStoreDir } };
}

/** Work dirs and registry entries in e's state dir that belong to VMs named `prefix…`. */
export function leftoversNamed(e: CivmEnv, prefix: string): string[] {
  const out: string[] = [];
  const vms = join(e.stateDir, "vms");
  if (existsSync(vms)) out.push(...readdirSync(vms).filter((n) => n.startsWith(prefix)).map((n) => `vms/${n}`));
  const reg = join(e.stateDir, "registry");
  if (existsSync(reg)) {
    for (const f of readdirSync(reg)) {
      try {
        const entry = JSON.parse(readFileSync(join(reg, f), "utf8")) as { name?: string };
        if (entry.name?.startsWith(prefix)) out.push(`registry/${f} (${entry.name})`);
      } catch {
        /* removed meanwhile, or being written: not ours to judge */
      }
    }
  }
  return out;
}

/** QEMU processes whose command line names a work dir of a VM named `prefix…` in e's state dir. */
export function qemuProcessesNamed(e: CivmEnv, prefix: string): number[] {
  const needle = join(e.stateDir, "vms", prefix);
  const pids: number[] = [];
  for (const p of readdirSync("/proc")) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const cmd = readFileSync(`/proc/${p}/cmdline`, "utf8");
      if (cmd.includes("qemu-system") && cmd.includes(needle)) pids.push(Number(p));
    } catch {
      /* gone */
    }
  }
  return pids;
}
