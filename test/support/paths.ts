// Locations the tests share. Compiled tests live in dist/test/..., so the repo root is
// three levels above this file's compiled location (dist/test/support).
import { fileURLToPath } from "node:url";
import { dirname, join, resolve } from "node:path";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const civmBin = join(repoRoot, "bin", "civm");
/** Cache for slow test artifacts (kernel, tiny guest), keyed by inputs inside. */
export const testCacheDir = process.env.CIVM_TEST_CACHE || join(repoRoot, ".cache", "test");

export function tempDir(prefix = "civm-test-"): string {
  return mkdtempSync(join(tmpdir(), prefix));
}
