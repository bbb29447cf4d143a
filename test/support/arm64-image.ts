// The built-in arm64 runner image (images/civm-runner.yaml: civm-runner-arm64), built once per
// suite into its own store (<testCacheDir>/store-arm64) under a lock, as lvh-image.ts does for
// lvh's base: cached by the image's key across runs.
import { join } from "node:path";
import { testCacheDir } from "./paths.js";
import { buildStoredImage, oncePerProcess, type StoredBuild } from "./stored-build.js";
import { storeEnv, type CivmEnv } from "./civm-cli.js";

export const arm64StoreDir = join(testCacheDir, "store-arm64");
export const ARM64_IMAGE = "civm-runner-arm64";
const lockDir = join(testCacheDir, "store-arm64.lock");

/** Builds civm-runner-arm64 (once per suite, cached by key) and returns where it is. */
export const ensureArm64Image: () => Promise<StoredBuild> = oncePerProcess(() =>
  buildStoredImage({ image: ARM64_IMAGE, storeDir: arm64StoreDir, lockDir }),
);

/** civmEnv() with the arm64 store as CIVM_STATE_DIR (own temp logs dir). */
export function arm64Env(extra: NodeJS.ProcessEnv = {}): CivmEnv {
  return storeEnv(arm64StoreDir, extra);
}
