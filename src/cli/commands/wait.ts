import type { Command } from "commander";
import { pathsFrom } from "../global.js";
import { printJson, say } from "../output.js";
import { ConfigError } from "../../errors/index.js";
import { parseSecondsFlag } from "../../config/durations.js";
import { formatSeconds } from "../../vm/format.js";

export function registerWait(program: Command): void {
  program
    .command("wait")
    .description("Wait until a VM started with civm run --image is usable: its guest agent is ready (key installed, folders mounted) and SSH answers. On timeout, print the console's tail and exit 3.")
    .argument("<name>", "VM name (or id)")
    .option("--ssh", "only wait for SSH to answer (ignore the console)")
    .option("--console", `only wait for the agent's "civm-agent: ready" on the console`)
    .option("--timeout <seconds>", "give up after this long", "600")
    .option("--json", "print {name, id, waitedMs} as JSON")
    .action(async (name: string, flags: { ssh?: boolean; console?: boolean; timeout: string; json?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      if (flags.ssh && flags.console) throw new ConfigError("--ssh and --console exclude each other (without either, civm wait checks both)");
      const seconds = parseSecondsFlag(flags.timeout, "--timeout", { min: 1 });
      const { findVm, devMetaOf, waitUntilReady } = await import("../../dev/index.js");
      const e = await findVm(paths.stateDir, name);
      const ms = await waitUntilReady(e, devMetaOf(e), { mode: flags.ssh ? "ssh" : flags.console ? "console" : "both", timeoutMs: seconds * 1000, stateDir: paths.stateDir });
      say(`${e.name}: ready (waited ${formatSeconds(ms)})`);
      if (flags.json) printJson({ name: e.name, id: e.id, state: "ready", waitedMs: Math.round(ms) });
    });
}
