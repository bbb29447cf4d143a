// The small kernel of test/fixtures/kernels/kernels.json, built with `civm kernel build` once
// for the whole suite into its own store (<testCacheDir>/store-kernels) under a lock, like
// runner-image.ts does for civm-runner: the stored kernel keeps its build key, so a later run
// with the same inputs (source tarball, options, compiler) is "up to date" in about a second.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { civmBin, repoRoot, testCacheDir } from "./paths.js";
import { oncePerProcess, runNode, withLock } from "./stored-build.js";
import { storeEnv, type CivmEnv } from "./civm-cli.js";

export const kernelStoreDir = join(testCacheDir, "store-kernels");
export const TEST_KERNELS_JSON = join(repoRoot, "test", "fixtures", "kernels", "kernels.json");
export const TINY_KERNEL = "civm-tiny";
const lockDir = join(testCacheDir, "store-kernels.lock");

export interface BuiltKernel {
  name: string;
  release: string;
  status: "built" | "up-to-date";
  key: string;
  /** Wall time of this `civm kernel build` (lock wait excluded). */
  seconds: number;
  /** Wall time of the build that made the stored kernel (cold). */
  buildSeconds: number;
  dir: string;
}

export const ensureTinyKernel: () => Promise<BuiltKernel> = oncePerProcess(build);

async function build(): Promise<BuiltKernel> {
  mkdirSync(kernelStoreDir, { recursive: true });
  return withLock(lockDir, TINY_KERNEL, async () => {
    const r = await runNode([civmBin, "kernel", "build", TINY_KERNEL, "--kernels-file", TEST_KERNELS_JSON, "--json"], {
      ...process.env, CIVM_STATE_DIR: kernelStoreDir, CIVM_LOGS_DIR: join(kernelStoreDir, "logs"),
    });
    if (r.code !== 0) throw new Error(`civm kernel build ${TINY_KERNEL} failed (exit ${r.code}):\n${r.stderr}\n${r.stdout}`);
    return JSON.parse(r.stdout) as BuiltKernel; // one JSON document (pretty-printed: many lines)
  });
}

/** civmEnv() with the kernels store as CIVM_STATE_DIR (own temp logs dir). */
export function kernelEnv(extra: NodeJS.ProcessEnv = {}): CivmEnv {
  return storeEnv(kernelStoreDir, extra);
}
