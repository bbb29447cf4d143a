import type { Command } from "commander";
import { pathsFrom } from "../global.js";
import { runSsh } from "./exec.js";

export function registerSsh(program: Command): void {
  program
    .command("ssh")
    .description("Open a shell in a VM started with civm run --image (ssh with the VM's own key, as root); --print shows the ssh command instead.")
    .argument("<name>", "VM name (or id)")
    .argument("[args...]", "after --: a command to run instead of a login shell")
    .option("-u, --user <user>", "log in as this user (default root, or the VM's --ssh-user)")
    .option("--ssh-key <file>", "use this private key instead of the VM's own (an image without civm's agent)")
    .option("--ssh-user <user>", "same as -u")
    .option("--print", "print the ssh command line and exit")
    .action(async (name: string, args: string[], flags: { user?: string; sshKey?: string; sshUser?: string; print?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const { findVm, requireDevMeta, sshArgv, remoteCommand, shellQuote, sshOverride } = await import("../../dev/index.js");
      const e = await findVm(paths.stateDir, name);
      const dev = requireDevMeta(e);
      const target = { ...dev.ssh, ...sshOverride({ ...flags, sshUser: flags.user ?? flags.sshUser }, process.cwd()) };
      const argv = sshArgv(target, args.length ? remoteCommand(args) : undefined, { tty: process.stdin.isTTY === true });
      if (flags.print) {
        process.stdout.write(["ssh", ...argv].map(shellQuote).join(" ") + "\n");
        return;
      }
      process.exit(await runSsh(argv));
    });
}
