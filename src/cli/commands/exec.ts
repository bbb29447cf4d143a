import type { Command } from "commander";
import { spawn } from "node:child_process";
import { pathsFrom } from "../global.js";
import { ConfigError } from "../../errors/index.js";
import { missingProgram } from "../../exec/index.js";

/** Runs ssh with our stdio; resolves with its exit status (128+n on a signal, like a shell). */
export function runSsh(argv: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn("ssh", argv, { stdio: "inherit" });
    // Our own Ctrl-C reaches ssh through the terminal; don't die before it does.
    const ignore = () => {};
    process.on("SIGINT", ignore);
    child.on("error", (e: NodeJS.ErrnoException) => reject(e.code === "ENOENT" ? missingProgram("ssh") : e));
    child.on("close", (code, signal) => {
      process.off("SIGINT", ignore);
      const n = signal ? 128 + ({ SIGINT: 2, SIGKILL: 9, SIGTERM: 15, SIGHUP: 1 }[signal as string] ?? 1) : (code ?? 1);
      resolve(n);
    });
  });
}

export function registerExec(program: Command): void {
  program
    .command("exec")
    .description("Run a command in a VM started with civm run --image, over SSH with the VM's own key, as root; stdout/stderr stream through and civm exits with the command's status (255: SSH itself failed).")
    .argument("<name>", "VM name (or id)")
    .argument("<command...>", "after --: one argument is a shell command line ('cd /host && make'); several are an argv, each quoted")
    .option("-w, --workdir <dir>", "cd to this folder in the guest first")
    .option("-u, --user <user>", "run as this user (default root, or the VM's --ssh-user; root and runner get the VM's key)")
    .option("--ssh-key <file>", "use this private key instead of the VM's own (an image without civm's agent)")
    .option("--ssh-user <user>", "same as -u")
    .option("-t, --tty", "allocate a terminal (interactive commands)")
    .action(async (name: string, command: string[], flags: { workdir?: string; user?: string; sshKey?: string; sshUser?: string; tty?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      if (command.length === 0) throw new ConfigError("civm exec NAME -- COMMAND...: no command");
      const { findVm, requireDevMeta, sshArgv, remoteCommand, sshOverride } = await import("../../dev/index.js");
      const e = await findVm(paths.stateDir, name);
      const dev = requireDevMeta(e);
      const target = { ...dev.ssh, ...sshOverride({ ...flags, sshUser: flags.user ?? flags.sshUser }, process.cwd()) };
      const code = await runSsh(sshArgv(target, remoteCommand(command, flags.workdir), { tty: !!flags.tty }));
      process.exit(code);
    });
}
