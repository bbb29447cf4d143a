// The suite's slow artifacts (civm-runner, civm-gha, civm-host, lvh's base, the test kernel)
// are built once per suite into a store of their own under the test cache, keyed like any
// build so a warm store costs a second. Test files run in parallel processes: a build runs
// under an exclusive lock (acquireLock), and once per process (memo).
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { civmBin } from "./paths.js";

const LOCK_POLL_MS = 1000;
const LOCK_TIMEOUT_MS = 60 * 60 * 1000;
/** A lock dir without its pid file yet (its owner is between mkdir and write) counts as held this long. */
const LOCK_NO_PID_GRACE_MS = 30_000;

/** `fn` once per process; a failure is not remembered (the next call tries again). */
export function oncePerProcess<T>(fn: () => Promise<T>): () => Promise<T> {
  let pending: Promise<T> | undefined;
  return () => {
    pending ??= fn().catch((e: unknown) => {
      pending = undefined;
      throw e;
    });
    return pending;
  };
}

export interface StoredBuild {
  stateDir: string;
  diskPath: string;
  cached: boolean;
  /** Wall time of `civm image build`, lock wait excluded. */
  seconds: number;
  /** What the build printed (stdout, then stderr). */
  output: string;
}

/** Runs `f` holding `lockDir`'s lock (taken for `what`), released however `f` ends. */
export async function withLock<T>(lockDir: string, what: string, f: () => Promise<T>): Promise<T> {
  const release = await acquireLock(lockDir, what);
  try {
    return await f();
  } finally {
    release();
  }
}

/** `civm image build IMAGE --json [-f specFile]` into `storeDir` under `lockDir`'s lock. */
export async function buildStoredImage(o: { image: string; storeDir: string; lockDir: string; specFile?: string }): Promise<StoredBuild> {
  mkdirSync(o.storeDir, { recursive: true });
  return withLock(o.lockDir, o.image, () => runImageBuild(o));
}

/**
 * `civm image build IMAGE --json [-f specFile]` into `storeDir`, the caller holding the lock;
 * rejects with the build's output when it fails or names no existing disk.
 */
export async function runImageBuild(o: { image: string; storeDir: string; specFile?: string }): Promise<StoredBuild> {
  mkdirSync(o.storeDir, { recursive: true });
  const started = Date.now();
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    CIVM_STATE_DIR: o.storeDir,
    CIVM_LOGS_DIR: join(o.storeDir, "logs"),
    CIVM_ACCEL: process.env.CIVM_ACCEL ?? "tcg",
  };
  const what = `civm image build ${o.image}${o.specFile ? ` -f ${o.specFile}` : ""}`;
  const r = await runNode([civmBin, "image", "build", o.image, ...(o.specFile ? ["-f", o.specFile] : []), "--json"], env);
  const seconds = (Date.now() - started) / 1000;
  if (r.code !== 0) throw new Error(`${what} failed (exit ${r.code}) in ${o.storeDir}:\n${r.stderr.slice(-6000)}\n${r.stdout.slice(-6000)}`);
  const result = r.stdout
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as { type: string; image?: string; status?: string; disk?: string })
    .filter((x) => x.type === "result" && x.image === o.image)
    .at(-1);
  if (!result?.disk || !existsSync(result.disk)) throw new Error(`${what} printed no result with an existing disk:\n${r.stdout}\n${r.stderr}`);
  return { stateDir: o.storeDir, diskPath: result.disk, cached: result.status === "cached", seconds, output: r.stdout + r.stderr };
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

