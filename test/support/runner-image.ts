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
import { randomBytes } from "node:crypto";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { testCacheDir } from "./paths.js";
import { storeEnv, type CivmEnv } from "./civm-cli.js";
import { buildStoredImage, oncePerProcess, type StoredBuild } from "./stored-build.js";

// Where the lock and runNode used to live: test files import them from here too.
export { acquireLock, runNode } from "./stored-build.js";

/** The shared store (a civm state dir) holding civm-runner. */
export const runnerStoreDir = join(testCacheDir, "store");
export const RUNNER_IMAGE = "civm-runner";
const lockDir = join(testCacheDir, "store.lock");

/** Where civm-runner is in its store, and whether this run built it. */
export type RunnerImage = StoredBuild;

/**
 * Builds civm-runner into the shared store (once per suite: cached by key across runs and
 * serialized across test processes) and returns where it is.
 */
export const ensureRunnerImage: () => Promise<RunnerImage> = oncePerProcess(() => buildStoredImage({ image: RUNNER_IMAGE, storeDir: runnerStoreDir, lockDir }));

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
  return storeEnv(runnerStoreDir, extra);
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
