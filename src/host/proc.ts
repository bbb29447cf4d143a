// Small readers of /proc: a process's start time (to tell a pid from a reused one) and which
// processes run with a given group id.
import { readFileSync, readdirSync } from "node:fs";

/** Field 22 of /proc/<pid>/stat (clock ticks since boot); undefined when the process is gone. */
export function processStartTime(pid: number): number | undefined {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch {
    return undefined;
  }
  // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const v = Number(rest[19]);
  return Number.isFinite(v) ? v : undefined;
}

/** "pid:starttime" of a live process, or undefined. */
export function processIdentity(pid: number): string | undefined {
  const t = processStartTime(pid);
  return t === undefined ? undefined : `${pid}:${t}`;
}

/** True when the process named by "pid:starttime" still runs (same pid, same start time). */
export function identityAlive(identity: string): boolean {
  const m = /^(\d+):(\d+)$/.exec(identity);
  if (!m) return false;
  return processStartTime(Number(m[1])) === Number(m[2]);
}

/** Whether any live (not zombie) process has `gid` as its real, effective, saved or filesystem group. */
export function anyProcessWithGid(gid: number): boolean {
  let pids: string[];
  try {
    pids = readdirSync("/proc").filter((n) => /^\d+$/.test(n));
  } catch {
    return false;
  }
  for (const p of pids) {
    let status: string;
    try {
      status = readFileSync(`/proc/${p}/status`, "utf8");
    } catch {
      continue;
    }
    // A zombie (an orphan its new parent has not reaped yet) holds nothing any more.
    if (/^State:\s+Z/m.test(status)) continue;
    const m = /^Gid:\s+(.*)$/m.exec(status);
    if (m && m[1]!.split(/\s+/).map(Number).includes(gid)) return true;
  }
  return false;
}
