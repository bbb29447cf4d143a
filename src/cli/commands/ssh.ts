import type { Command } from "commander";
import { pathsFrom } from "../global.js";
import { runSsh } from "./exec.js";

export function registerSsh(program: Command): void {
  program
    .command("ssh")
    .description("Open a shell in a VM started with civm run --image (ssh with the VM's own key, as root); --print shows the ssh command instead.")
    .argument("<name>", "VM name (or id)")
    .argument("[args...]", "after --: a command to run instead of a login shell")
    .option("-u, --user <user>", "log in as this user", "root")
    .option("--print", "print the ssh command line and exit")
    .action(async (name: string, args: string[], flags: { user: string; print?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const { findVm, requireDevMeta, sshArgv, remoteCommand, shellQuote } = await import("../../dev/index.js");
      const e = await findVm(paths.stateDir, name);
      const dev = requireDevMeta(e);
      const argv = sshArgv({ ...dev.ssh, user: flags.user }, args.length ? remoteCommand(args) : undefined, { tty: process.stdin.isTTY === true });
      if (flags.print) {
        process.stdout.write(["ssh", ...argv].map(shellQuote).join(" ") + "\n");
        return;
      }
      process.exit(await runSsh(argv));
    });
}
