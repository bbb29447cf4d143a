// Retention of civm's console and supervisor logs: older than keepDays, then the oldest
// until the total is under maxBytes. Only files named as civm names them
// (<name>-<YYYYMMDD-HHMMSS>-<id>.log, .supervisor.log) are touched, and never the log of a
// VM the registry still lists (it may be running, or about to be reconciled).
import { readdir, stat, unlink } from "node:fs/promises";
import { join } from "node:path";
import { ConfigError } from "../errors/index.js";
import { parseSize } from "../config/sizes.js";
import { Registry } from "../vm/registry.js";

export interface LogRetention {
  /** Logs not written for this many days are deleted; 0 keeps them regardless of age. */
  keepDays: number;
  /** Total bytes of civm's logs kept, oldest deleted first; 0 = no limit. */
  maxBytes: number;
}

export const LOG_RETENTION_DEFAULTS: LogRetention = { keepDays: 14, maxBytes: 1024 ** 3 };

/** civm's console log and a detached VM's supervisor log; group 1 is the VM id. */
export const CIVM_LOG_RE = /^[A-Za-z0-9][A-Za-z0-9._-]*-\d{8}-\d{6}-([0-9a-f]{8})(?:\.supervisor)?\.log$/;

export interface PruneResult {
  deleted: string[];
  freedBytes: number;
  /** Bytes of civm's logs left. */
  keptBytes: number;
}

interface LogFile {
  path: string;
  id: string;
  size: number;
  mtimeMs: number;
}

export async function pruneLogs(o: { logsDir: string; stateDir: string; retention: LogRetention; now?: number }): Promise<PruneResult> {
  const now = o.now ?? Date.now();
  const names = await readdir(o.logsDir).catch(() => [] as string[]);
  const entries = await new Registry(o.stateDir).list();
  const liveIds = new Set(entries.map((e) => e.id));
  const livePaths = new Set(entries.map((e) => e.consoleLog));
  const files: LogFile[] = [];
  for (const name of names) {
    const m = CIVM_LOG_RE.exec(name);
    if (!m) continue;
    const path = join(o.logsDir, name);
    const st = await stat(path).catch(() => undefined);
    if (!st?.isFile()) continue;
    files.push({ path, id: m[1]!, size: st.size, mtimeMs: st.mtimeMs });
  }
  const protectedFile = (f: LogFile) => liveIds.has(f.id) || livePaths.has(f.path);
  files.sort((a, b) => a.mtimeMs - b.mtimeMs);
  let total = files.reduce((n, f) => n + f.size, 0);
  const result: PruneResult = { deleted: [], freedBytes: 0, keptBytes: 0 };
  const cutoff = o.retention.keepDays > 0 ? now - o.retention.keepDays * 86400_000 : -Infinity;
  for (const f of files) {
    if (protectedFile(f)) continue;
    const tooOld = f.mtimeMs < cutoff;
    const overBudget = o.retention.maxBytes > 0 && total > o.retention.maxBytes;
    if (!tooOld && !overBudget) continue;
    try {
      await unlink(f.path);
    } catch {
      continue; // gone already, or not ours to delete
    }
    total -= f.size;
    result.deleted.push(f.path);
    result.freedBytes += f.size;
  }
  result.keptBytes = total;
  return result;
}

/**
 * keepDays and maxBytes as given by the user (flag, env or config field); `name` says where
 * each came from for the error ("--logs-keep-days", "serve.yaml: \"logs.keepDays\"").
 */
export function parseKeepDays(v: unknown, name: string): number {
  const n = typeof v === "string" && /^\s*\d+\s*$/.test(v) ? Number(v) : v;
  if (typeof n !== "number" || !Number.isInteger(n) || n < 0) {
    throw new ConfigError(`${name} must be a whole number of days (0 keeps logs regardless of age), not ${JSON.stringify(v)}; e.g. 14.`);
  }
  return n;
}

export function parseMaxBytes(v: unknown, name: string): number {
  if (v === 0 || (typeof v === "string" && /^\s*0\s*$/.test(v))) return 0;
  try {
    if (typeof v !== "string" && typeof v !== "number") throw new Error("not a size");
    return parseSize(v);
  } catch {
    throw new ConfigError(`${name} must be a size such as 500M or 2G (binary units), or 0 for no limit, not ${JSON.stringify(v)}.`);
  }
}
