// Locations the tests share. Compiled tests live in dist/test/..., so the repo root is
// three levels above this file's compiled location (dist/test/support).
import { fileURLToPath } from "node:url";
import { dirname, join, resolve } from "node:path";
import { chmodSync, mkdtempSync, readFileSync, statSync } from "node:fs";
import { execFileSync } from "node:child_process";
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

/**
 * A system user made for this test process (`<prefix><pid>`), removed when it exits; users
 * of test processes that died without cleaning up are removed first. Root only.
 */
function processUser(prefix: string): string {
  const passwd = () => readFileSync("/etc/passwd", "utf8");
  const exists = (n: string) => passwd().split("\n").some((l) => l.startsWith(`${n}:`));
  for (const m of passwd().matchAll(new RegExp(`^${prefix}(\\d+):`, "gm"))) {
    const pid = Number(m[1]);
    let alive = true;
    try {
      process.kill(pid, 0);
    } catch {
      alive = false;
    }
    if (!alive) removeUser(`${prefix}${pid}`);
  }
  const name = `${prefix}${process.pid}`;
  for (let attempt = 0; !exists(name); attempt++) {
    try {
      execFileSync("useradd", ["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name], { stdio: "ignore" });
    } catch (e) {
      // /etc/passwd locked by another test process: wait and try again.
      if (attempt > 20) throw e;
      execFileSync("sleep", ["0.2"]);
    }
  }
  process.on("exit", () => removeUser(name));
  return name;
}

/**
 * The user QEMU runs as in tests: one made for this test process (civmt<pid>), passed to
 * every civm the tests start through CIVM_QEMU_USER, so the suite leaves no system user
 * behind (civm itself creates civm-qemu on demand; that path has a test of its own).
 */
export const testQemuUser: string | undefined = (() => {
  if (process.getuid?.() !== 0) return undefined;
  if (process.env.CIVM_QEMU_USER) return process.env.CIVM_QEMU_USER;
  const name = processUser("civmt");
  process.env.CIVM_QEMU_USER = name;
  return name;
})();

/**
 * The user civm serve's caches run as in tests (civmc<pid>, through CIVM_CACHE_USER), made
 * on first use for tests that start caches; undefined when not root.
 */
export function testCacheUser(): string | undefined {
  if (process.getuid?.() !== 0) return undefined;
  process.env.CIVM_CACHE_USER ||= processUser("civmc");
  return process.env.CIVM_CACHE_USER;
}

function removeUser(name: string): void {
  for (let attempt = 0; attempt < 20; attempt++) {
    try {
      execFileSync("userdel", ["-f", name], { stdio: "ignore" });
      return;
    } catch (e) {
      if ((e as { status?: number }).status === 6) return; // no such user
      execFileSync("sleep", ["0.1"]);
    }
  }
}
