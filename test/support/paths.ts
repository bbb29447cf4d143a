// Locations the tests share. Compiled tests live in dist/test/..., so the repo root is
// three levels above this file's compiled location (dist/test/support).
import { fileURLToPath } from "node:url";
import { dirname, join, resolve } from "node:path";
import { chmodSync, mkdtempSync, statSync } from "node:fs";
import { tmpdir } from "node:os";

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const civmBin = join(repoRoot, "bin", "civm");
/** Cache for slow test artifacts (kernel, tiny guest), keyed by inputs inside. */
export const testCacheDir = process.env.CIVM_TEST_CACHE || (enterableByAll(repoRoot) ? join(repoRoot, ".cache", "test") : "/var/cache/civm-test");

/**
 * QEMU runs as an unprivileged user (civm-qemu) and must read the tiny guest and images the
 * tests build: a checkout under a 0700 folder (e.g. /root) keeps the cache elsewhere.
 */
function enterableByAll(dir: string): boolean {
  for (let d = dir; ; d = dirname(d)) {
    if ((statSync(d).mode & 0o001) === 0) return false;
    if (d === dirname(d)) return true;
  }
}

/** A temp folder others may enter (QEMU's user reads images and kernels tests put there). */
export function tempDir(prefix = "civm-test-"): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  chmodSync(d, 0o755);
  return d;
}
