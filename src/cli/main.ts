// civm's command line: thin commands over the modules; no logic of their own.
import { Command, CommanderError, Option } from "commander";
import { reportError } from "./output.js";
import { EXIT_CODES } from "../errors/index.js";
import { CIVM_VERSION } from "../version.js";
import { registerRun, registerSupervisor } from "./commands/run.js";
import { registerWait } from "./commands/wait.js";
import { registerExec } from "./commands/exec.js";
import { registerSsh } from "./commands/ssh.js";
import { registerStop } from "./commands/stop.js";
import { registerLogs } from "./commands/logs.js";
import { registerKernel } from "./commands/kernel.js";
import { registerLs } from "./commands/ls.js";
import { registerDoctor } from "./commands/doctor.js";
import { registerImage } from "./commands/image.js";
import { registerDemo } from "./commands/demo.js";
import { registerServe } from "./commands/serve.js";
import { registerPools } from "./commands/pools.js";

const program = new Command();
program
  .name("civm")
  .description("Throw-away QEMU virtual machines for CI: one ephemeral VM per job, built from a base image and deleted afterwards.")
  .version(CIVM_VERSION)
  .addOption(new Option("--state-dir <dir>", "where civm keeps VM work dirs, images and its registry").env("CIVM_STATE_DIR"))
  .addOption(new Option("--logs-dir <dir>", "where console logs are written").env("CIVM_LOGS_DIR"))
  .showHelpAfterError("(run with --help for usage)")
  .exitOverride()
  .addHelpText(
    "after",
    `
Exit codes: 0 guest powered off, 1 internal error, 2 configuration error, 3 timeout,
4 QEMU failed, 5 stopped by a signal, 6 guest rebooted, 7 GitHub (or another service) failed,
8 host problem (missing tool, port in use), 9 the firmware found nothing to boot.
See docs/exit-codes.md.`,
  );

registerRun(program);
registerLs(program);
registerDoctor(program);
registerImage(program);
registerDemo(program);
registerServe(program);
registerPools(program);
registerWait(program);
registerExec(program);
registerSsh(program);
registerStop(program);
registerLogs(program);
registerKernel(program);
registerSupervisor(program);

try {
  await program.parseAsync(process.argv);
} catch (e) {
  if (e instanceof CommanderError) {
    // Commander already printed the message (or help/version).
    process.exitCode = e.exitCode === 0 ? 0 : EXIT_CODES.config;
  } else {
    process.exitCode = reportError(e);
  }
}
