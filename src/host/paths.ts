// Where civm keeps its state and logs. Root: /var/lib/civm and /var/log/civm; others: XDG
// state. Both can be overridden by flag (--state-dir/--logs-dir) or env (CIVM_STATE_DIR/CIVM_LOGS_DIR).
import { homedir } from "node:os";
import { join } from "node:path";
import { chmodSync, mkdirSync, statSync } from "node:fs";

export interface Paths {
  stateDir: string;
  logsDir: string;
}

export interface PathOverrides {
  stateDir?: string | undefined;
  logsDir?: string | undefined;
}

export function resolvePaths(over: PathOverrides = {}, env: NodeJS.ProcessEnv = process.env): Paths {
  const isRoot = typeof process.getuid === "function" && process.getuid() === 0;
  const xdgState = env.XDG_STATE_HOME || join(homedir(), ".local", "state");
  const defaultState = isRoot ? "/var/lib/civm" : join(xdgState, "civm");
  const stateDir = over.stateDir || env.CIVM_STATE_DIR || defaultState;
  const defaultLogs = isRoot && !over.stateDir && !env.CIVM_STATE_DIR ? "/var/log/civm" : join(stateDir, "logs");
  const logsDir = over.logsDir || env.CIVM_LOGS_DIR || defaultLogs;
  return { stateDir, logsDir };
}

/** Layout of the state dir; every on-disk name is here. */
export const STATE_LAYOUT = {
  /** Per-VM work dirs (0700): overlay, config ISO, QMP socket. */
  vms: "vms",
  /** Registry of running VMs, one JSON file per VM. */
  registry: "registry",
  /** Host probe results (KVM usability). */
  hostCache: "host-cache.json",
  /** Stored images (image builder). */
  images: "images",
  /** OCI pulls: refs.json maps a tag reference to the manifest digest and stored image it was pulled as. */
  oci: "oci",
} as const;

export function ensureDir(path: string, mode = 0o755): string {
  mkdirSync(path, { recursive: true, mode });
  return path;
}

/** The most a logs dir may allow: console logs can hold what a guest printed. */
export const LOGS_DIR_MODE = 0o750;

/**
 * Creates the logs dir (0750) or takes group write and every "other" bit off an existing
 * one civm owns. A shared dir (sticky, e.g. /tmp) or someone else's is left alone. Returns
 * what was changed, for a log line.
 */
export function ensureLogsDir(path: string): string | undefined {
  mkdirSync(path, { recursive: true, mode: LOGS_DIR_MODE });
  const st = statSync(path);
  const mode = st.mode & 0o7777;
  if ((mode & ~LOGS_DIR_MODE & 0o777) === 0 || mode & 0o1000) return undefined;
  if (typeof process.getuid === "function" && st.uid !== process.getuid()) return undefined;
  chmodSync(path, mode & LOGS_DIR_MODE);
  return `mode ${mode.toString(8)} tightened to ${(mode & LOGS_DIR_MODE).toString(8)}`;
}
