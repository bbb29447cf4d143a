// lvh's `base` image, built by civm from cilium/little-vm-helper-images' own images.json
// (test/fixtures/lvh-images/_data, unchanged), once for the whole suite into its own store
// (<testCacheDir>/store-lvh) under a lock, like runner-image.ts does for civm-runner: cached
// by the image's key across runs, so a warm store costs well under a second.
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { civmBin, repoRoot, testCacheDir } from "./paths.js";
import { acquireLock, runNode } from "./runner-image.js";
import { civmEnv, type CivmEnv } from "./civm-cli.js";

export const lvhStoreDir = join(testCacheDir, "store-lvh");
export const LVH_IMAGES_JSON = join(repoRoot, "test", "fixtures", "lvh-images", "_data", "images.json");
export const LVH_BASE = "base";
const lockDir = join(testCacheDir, "store-lvh.lock");

export interface LvhBaseImage {
  stateDir: string;
  diskPath: string;
  cached: boolean;
  /** Wall time of `civm image build base`, lock wait excluded. */
  seconds: number;
}

let pending: Promise<LvhBaseImage> | undefined;

/** Builds lvh's base (once per suite, cached by key) and returns where it is. */
export function ensureLvhBaseImage(): Promise<LvhBaseImage> {
  pending ??= build().catch((e: unknown) => {
    pending = undefined;
    throw e;
  });
  return pending;
}

async function build(): Promise<LvhBaseImage> {
  mkdirSync(lvhStoreDir, { recursive: true });
  const release = await acquireLock(lockDir, LVH_BASE);
  try {
    const started = Date.now();
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      CIVM_STATE_DIR: lvhStoreDir,
      CIVM_LOGS_DIR: join(lvhStoreDir, "logs"),
      CIVM_ACCEL: process.env.CIVM_ACCEL ?? "tcg",
    };
    const r = await runNode([civmBin, "image", "build", LVH_BASE, "-f", LVH_IMAGES_JSON, "--json"], env);
    const seconds = (Date.now() - started) / 1000;
    if (r.code !== 0) throw new Error(`civm image build ${LVH_BASE} -f ${LVH_IMAGES_JSON} failed (exit ${r.code}):\n${r.stderr}\n${r.stdout}`);
    const result = r.stdout
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { type: string; image?: string; status?: string; disk?: string })
      .filter((o) => o.type === "result" && o.image === LVH_BASE)
      .at(-1);
    if (!result?.disk || !existsSync(result.disk)) throw new Error(`civm image build ${LVH_BASE} printed no result with an existing disk:\n${r.stdout}\n${r.stderr}`);
    return { stateDir: lvhStoreDir, diskPath: result.disk, cached: result.status === "cached", seconds };
  } finally {
    release();
  }
}

/** civmEnv() with the lvh store as CIVM_STATE_DIR (own temp logs dir). */
export function lvhEnv(extra: NodeJS.ProcessEnv = {}): CivmEnv {
  const e = civmEnv(extra);
  mkdirSync(e.logsDir, { recursive: true });
  return { ...e, stateDir: lvhStoreDir, env: { ...e.env, CIVM_STATE_DIR: lvhStoreDir } };
}
