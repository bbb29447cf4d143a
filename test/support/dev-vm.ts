// Helpers for the dev-VM end-to-end tests (civm run --image ... --detach, wait, exec, stop):
// what a VM's registry entry says, whether its supervisor still runs, and what it left behind.
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { CivmEnv } from "./civm-cli.js";
import { leftoversNamed, qemuProcessesNamed } from "./runner-image.js";

export interface DevEntry {
  id: string;
  name: string;
  ownerPid: number;
  qemuPid?: number;
  workDir: string;
  consoleLog: string;
  state?: string;
  meta?: { dev?: { ssh: { host: string; port: number; key: string; user: string }; supervisorLog?: string } };
}

/** The registry entry of the running VM called `name` in e's state dir. */
export function entryOf(e: CivmEnv, name: string): DevEntry | undefined {
  const dir = join(e.stateDir, "registry");
  if (!existsSync(dir)) return undefined;
  for (const f of readdirSync(dir)) {
    if (!f.endsWith(".json")) continue;
    try {
      const entry = JSON.parse(readFileSync(join(dir, f), "utf8")) as DevEntry;
      if (entry.name === name) return entry;
    } catch {
      /* being written */
    }
  }
  return undefined;
}

/** Whether pid is alive and still a civm supervisor (pid reuse safe enough for tests). */
export function isSupervisor(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("__dev-supervisor");
  } catch {
    return false;
  }
}

/** Every trace a VM named `name` can leave: work dirs, registry entries, QEMU, its supervisor. */
export function tracesOf(e: CivmEnv, name: string, supervisorPid: number | undefined): string[] {
  const out = [...leftoversNamed(e, name), ...qemuProcessesNamed(e, name).map((p) => `qemu pid ${p}`)];
  if (supervisorPid !== undefined && isSupervisor(supervisorPid)) out.push(`supervisor pid ${supervisorPid}`);
  return out;
}

/** Files in e's logs dir. */
export function logFiles(e: CivmEnv): string[] {
  return existsSync(e.logsDir) ? readdirSync(e.logsDir) : [];
}
