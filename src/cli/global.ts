import type { Command } from "commander";
import { resolvePaths, type Paths } from "../host/paths.js";

/** State and logs dirs from the global flags (env is read by resolvePaths too). */
export function pathsFrom(cmd: Command): Paths {
  const root = cmd.optsWithGlobals() as { stateDir?: string; logsDir?: string };
  return resolvePaths({ stateDir: root.stateDir, logsDir: root.logsDir });
}
