// One `civm serve` per state dir. Two daemons on one store would each take the other's live
// VMs for leftovers of a crash (and mark them finished) and each start up to maxRunners. The
// lock is an SQLite EXCLUSIVE transaction on <stateDir>/serve.lock held for the daemon's
// life: a POSIX record lock, so the kernel drops it when the process dies (even kill -9), it
// works across network namespaces, and only who can write the state dir can take it.
import { createRequire } from "node:module";
import { mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type Sqlite from "better-sqlite3";
import { HostError } from "../errors/index.js";

export const SERVE_LOCK_FILE = "serve.lock";
/** Who holds the lock (informative only: the lock itself is the SQLite lock). */
export const SERVE_PID_FILE = "serve.pid";

/** Creates the state dir (0700) or says clearly why it cannot be one (exit 8). */
export function ensureStateDir(stateDir: string): void {
  try {
    mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  } catch (e) {
    throw stateDirError(stateDir, e);
  }
  let isDir = false;
  try {
    isDir = statSync(stateDir).isDirectory();
  } catch (e) {
    throw stateDirError(stateDir, e);
  }
  if (!isDir) throw stateDirError(stateDir, Object.assign(new Error("not a directory"), { code: "ENOTDIR" }));
}

function stateDirError(stateDir: string, e: unknown): HostError {
  const code = (e as NodeJS.ErrnoException).code;
  const why =
    code === "EEXIST" || code === "ENOTDIR"
      ? "it (or a folder above it) is a file, not a directory"
      : code === "EACCES" || code === "EPERM"
        ? "permission denied"
        : code === "EROFS"
          ? "the file system is read-only"
          : (e as Error).message;
  return new HostError(`cannot use the state dir ${stateDir}: ${why}. Point --state-dir, CIVM_STATE_DIR or the config's "stateDir" at a directory civm may create and write.`, { cause: e });
}

export interface ServeLock {
  release(): void;
}

/** Takes the state dir's serve lock or throws a HostError naming the holder (exit 8). */
export function lockStateDir(stateDir: string): ServeLock {
  ensureStateDir(stateDir);
  const file = join(stateDir, SERVE_LOCK_FILE);
  const Driver = createRequire(import.meta.url)("better-sqlite3") as new (file: string, o?: { timeout?: number }) => Sqlite.Database;
  let db: Sqlite.Database;
  try {
    db = new Driver(file, { timeout: 0 });
    db.pragma("locking_mode = EXCLUSIVE");
    // A write inside the transaction takes the EXCLUSIVE lock now; it is never committed.
    db.exec("BEGIN EXCLUSIVE");
  } catch (e) {
    const code = (e as { code?: string }).code;
    if (code === "SQLITE_BUSY" || code === "SQLITE_LOCKED") {
      let holder = "";
      try {
        const pid = readFileSync(join(stateDir, SERVE_PID_FILE), "utf8").trim();
        if (/^\d+$/.test(pid)) holder = ` (pid ${pid})`;
      } catch {
        // no pid file: the message goes without it
      }
      throw new HostError(
        `another civm serve${holder} is using the state dir ${stateDir}; two daemons on one state dir would take each other's runner VMs. Stop it first (civm drain --exit --wait), or give this one a state dir of its own (--state-dir, CIVM_STATE_DIR or "stateDir").`,
      );
    }
    throw new HostError(`cannot take the serve lock ${file}: ${(e as Error).message}`, { cause: e });
  }
  try {
    writeFileSync(join(stateDir, SERVE_PID_FILE), `${process.pid}\n`, { mode: 0o600 });
  } catch {
    // informative only
  }
  return {
    release: () => {
      try {
        db.exec("ROLLBACK");
        db.close();
      } catch {
        // already closed
      }
    },
  };
}
