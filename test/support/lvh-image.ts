// lvh's `base` image, built by civm from cilium/little-vm-helper-images' own images.json
// (test/fixtures/lvh-images/_data, unchanged), once for the whole suite into its own store
// (<testCacheDir>/store-lvh) under a lock, like runner-image.ts does for civm-runner: cached
// by the image's key across runs, so a warm store costs well under a second.
import { join } from "node:path";
import { repoRoot, testCacheDir } from "./paths.js";
import { buildStoredImage, oncePerProcess, type StoredBuild } from "./stored-build.js";
import { storeEnv, type CivmEnv } from "./civm-cli.js";

export const lvhStoreDir = join(testCacheDir, "store-lvh");
export const LVH_IMAGES_JSON = join(repoRoot, "test", "fixtures", "lvh-images", "_data", "images.json");
export const LVH_BASE = "base";
const lockDir = join(testCacheDir, "store-lvh.lock");

/** Where lvh's base is in its store, and whether this run built it. */
export type LvhBaseImage = StoredBuild;

/** Builds lvh's base (once per suite, cached by key) and returns where it is. */
export const ensureLvhBaseImage: () => Promise<LvhBaseImage> = oncePerProcess(() =>
  buildStoredImage({ image: LVH_BASE, storeDir: lvhStoreDir, lockDir, specFile: LVH_IMAGES_JSON }),
);

/** civmEnv() with the lvh store as CIVM_STATE_DIR (own temp logs dir). */
export function lvhEnv(extra: NodeJS.ProcessEnv = {}): CivmEnv {
  return storeEnv(lvhStoreDir, extra);
}
