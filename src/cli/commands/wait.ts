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
    .option("--ssh-key <file>", "an image without civm's agent: wait for SSH alone, with this private key")
    .option("--ssh-user <user>", "with --ssh-key: the user to log in as (default root, or the VM's --ssh-user)")
    .action(async (name: string, flags: { ssh?: boolean; console?: boolean; timeout: string; json?: boolean; sshKey?: string; sshUser?: string }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      if (flags.ssh && flags.console) throw new ConfigError("--ssh and --console exclude each other (without either, civm wait checks both)");
      if (flags.console && (flags.sshKey || flags.sshUser)) throw new ConfigError("--ssh-key/--ssh-user are for SSH; --console waits for the agent's line alone");
      const seconds = parseSecondsFlag(flags.timeout, "--timeout", { min: 1 });
      const { findVm, devMetaOf, waitUntilReady, sshOverride } = await import("../../dev/index.js");
      const e = await findVm(paths.stateDir, name);
      const meta = devMetaOf(e);
      const override = sshOverride(flags, process.cwd());
      const dev = meta ? { ...meta, ssh: { ...meta.ssh, ...override }, ...(override.key ? { agent: false } : {}) } : undefined;
      const ms = await waitUntilReady(e, dev, { mode: flags.ssh ? "ssh" : flags.console ? "console" : "both", timeoutMs: seconds * 1000, stateDir: paths.stateDir, log: say });
      say(`${e.name}: ready (waited ${formatSeconds(ms)})`);
      if (flags.json) printJson({ name: e.name, id: e.id, state: "ready", waitedMs: Math.round(ms) });
    });
}
