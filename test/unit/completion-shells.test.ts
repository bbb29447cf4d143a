// `civm completion zsh|fish` loaded into the real shells (scripts/install-deps.sh installs
// them): syntax checks, then completions asked of each shell's own completion system (zsh
// through zsh/zpty as a user at a prompt would, fish through `complete -C`).
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { civmEnv, runCivm, type CivmEnv } from "../support/civm-cli.js";
import { realTool } from "../support/stub-path.js";
import { repoRoot } from "../support/paths.js";

function shell(name: string): string {
  try {
    return realTool(name);
  } catch {
    assert.fail(`${name} is not installed: run scripts/install-deps.sh (as root)`);
  }
}

/** `civm completion SHELL` written to DIR/FILE (in a fresh env's root), after the shell's own syntax check (-n). */
async function script(name: "zsh" | "fish", path: string[]): Promise<{ sh: string; e: CivmEnv; dir: string; file: string }> {
  const sh = shell(name);
  const e = civmEnv();
  const r = await runCivm(["completion", name], e);
  assert.equal(r.code, 0, r.stderr);
  const dir = join(e.root, ...path.slice(0, -1));
  mkdirSync(dir, { recursive: true });
  const file = join(dir, path.at(-1)!);
  writeFileSync(file, r.stdout);
  execFileSync(sh, ["-n", file]);
  return { sh, e, dir, file };
}

/** Without escape sequences and carriage returns: what a user would read. */
const plain = (s: string) => s.replace(/\x1b\[[0-9;?]*[a-zA-Z]/g, "").replace(/\r/g, "");

test("zsh: the completion script passes zsh -n and completes in an interactive zsh, from the first TAB, installed in $fpath or sourced", { timeout: 60_000 }, async () => {
  const { sh: zsh, e, dir, file } = await script("zsh", ["zfunc", "_civm"]);
  const env = { ...e.env, HOME: e.root, ZDOTDIR: e.root, TERM: "dumb" };
  for (const mode of ["fpath", "source"] as const) {
    const out = plain(
      execFileSync(zsh, ["-f", join(repoRoot, "test", "support", "zsh-complete.zsh"), mode, mode === "fpath" ? dir : file, "civm ima\t", "civm image \t\t", "civm --state-dir /x image l\t\t", "civm kernel add --f\t"], { env, encoding: "utf8", timeout: 30_000 }),
    );
    const cases = out.split(/^=== case \d+$/m).slice(1);
    assert.equal(cases.length, 4, out);
    // The first TAB of the session completes the command (the script is loaded by it).
    assert.match(cases[0]!, /civm image /, `${mode}: ${cases[0]}`);
    assert.match(cases[1]!, /build\s+export\s+list\s+ls\s+path\s+pull\s+push\s+rm/, `${mode}: ${cases[1]}`);
    assert.doesNotMatch(cases[1]!, /\bserve\b/, "top-level commands offered after civm image");
    assert.match(cases[2]!, /^list\s+ls/m, `${mode}: a flag's value is skipped: ${cases[2]}`);
    assert.match(cases[3]!, /civm kernel add --force/, `${mode}: ${cases[3]}`);
  }
});

test("fish: the completion script passes fish -n and fish's own completion offers commands, subcommands and flags", { timeout: 60_000 }, async () => {
  const { sh: fish, e, file } = await script("fish", ["civm.fish"]);
  const env = { ...e.env, HOME: e.root, XDG_CONFIG_HOME: join(e.root, "config"), XDG_DATA_HOME: join(e.root, "data") };
  const complete = (line: string) =>
    execFileSync(fish, ["--no-config", "-c", `source ${file}; complete -C ${JSON.stringify(line)}`], { env, encoding: "utf8", timeout: 30_000 })
      .trim()
      .split("\n")
      .map((l) => l.split("\t")[0]);
  assert.deepEqual(complete("civm ima"), ["image"]);
  assert.deepEqual(complete("civm image ").sort(), ["build", "export", "list", "ls", "path", "pull", "push", "rm"]);
  assert.ok(complete("civm kernel add --").includes("--force"));
  assert.ok(complete("civm --").includes("--state-dir"));
});
