// A "container-less" sandbox for shell-script tests: a temp dir with CIVM_ROOT, and a PATH of
// stub commands (each logs its argv, tab-separated, to $STUB_CALLS, then runs its body) plus
// symlinks to a short list of harmless real tools, so a command without a stub fails instead
// of touching the host. Used by guest-agent.test.ts and guest-scripts.test.ts.
import { execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { tempDir } from "./paths.js";

export interface StubSandbox {
  dir: string;
  /** CIVM_ROOT: the scripts' fixed paths point in here. */
  root: string;
  /** The PATH: stubs first, then the safe tools. */
  path: string;
  /** Where the stubs log their calls (STUB_CALLS). */
  calls: string;
  /** PATH, CIVM_ROOT and STUB_CALLS for the script under test. */
  env: Record<string, string>;
}

export function writeExecutable(path: string, body: string): void {
  writeFileSync(path, body);
  chmodSync(path, 0o755);
}

/** Absolute path of a host tool (for the safe-tools symlinks). */
export function realTool(name: string): string {
  return execFileSync("sh", ["-c", `command -v ${name}`], { encoding: "utf8" }).trim();
}

/** Creates the sandbox; the caller removes `dir` when done. */
export function stubSandbox(opts: { prefix: string; safeTools: readonly string[]; stubs: Record<string, string>; rootDirs?: readonly string[] }): StubSandbox {
  const dir = tempDir(opts.prefix);
  const root = join(dir, "root");
  const safe = join(dir, "safe-bin");
  const stubDir = join(dir, "stubs");
  for (const d of [root, safe, stubDir]) mkdirSync(d, { recursive: true });
  for (const d of opts.rootDirs ?? []) mkdirSync(join(root, d), { recursive: true });
  for (const tool of opts.safeTools) symlinkSync(realTool(tool), join(safe, tool));
  const calls = join(dir, "calls.log");
  for (const [name, body] of Object.entries(opts.stubs)) {
    writeExecutable(
      join(stubDir, name),
      `#!/bin/sh\n{ printf '%s' "\${0##*/}"; for a in "$@"; do printf '\\t%s' "$a"; done; printf '\\n'; } >>"$STUB_CALLS"\n${body}\n`,
    );
  }
  const path = `${stubDir}:${safe}`;
  return { dir, root, path, calls, env: { PATH: path, CIVM_ROOT: root, STUB_CALLS: calls } };
}

/** The calls a stub log holds: one argv (name first) per line. */
export function parseCalls(file: string): string[][] {
  if (!existsSync(file)) return [];
  return readFileSync(file, "utf8").split("\n").filter(Boolean).map((l) => l.split("\t"));
}
