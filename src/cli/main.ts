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
import { registerCaches } from "./commands/caches.js";
import { registerCompletion } from "./commands/completion.js";

// `civm ... | head`: once the reader is gone, output is dropped instead of an unhandled EPIPE
// ending civm with a stack trace (and, for `civm run`, before it cleaned its VM up).
for (const stream of [process.stdout, process.stderr]) {
  stream.on("error", (e: NodeJS.ErrnoException) => {
    if (e.code !== "EPIPE" && e.code !== "ERR_STREAM_DESTROYED") throw e;
  });
}

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
registerCaches(program);
registerWait(program);
registerExec(program);
registerSsh(program);
registerStop(program);
registerLogs(program);
registerKernel(program);
registerSupervisor(program);
registerCompletion(program);

// `civm --help` lists each command in one line; `civm CMD --help` has the whole description.
const SUMMARIES: Record<string, string> = {
  run: "Boot an ephemeral VM (an instance, or ad-hoc with --image) and delete it afterwards",
  ls: "List the VMs running on this host",
  doctor: "Check this host: tools, KVM, disk",
  image: "Build, list, pull and remove VM images",
  demo: "Build the runner image and boot one VM from it, end to end",
  config: "Check a civm serve config",
  serve: "Keep pools of single-use GitHub Actions runner VMs",
  pools: "List, scale, pause and resume the pools of a running civm serve",
  reload: "Make a running civm serve re-read its config",
  drain: "Make a running civm serve stop taking work (and exit)",
  vms: "List the runner VMs of a running civm serve",
  caches: "List the registry and HTTP caches of a running civm serve",
  hosts: "List the hosts of a civm serve fleet",
  wait: "Wait until an ad-hoc VM answers",
  exec: "Run a command in an ad-hoc VM",
  ssh: "Open a shell in an ad-hoc VM",
  stop: "Stop VMs",
  logs: "Print a VM's console log",
  kernel: "Add, list and remove kernels for ad-hoc VMs",
  completion: "Print a shell completion script (bash, zsh, fish)",
};
for (const c of program.commands) {
  const s = SUMMARIES[c.name()];
  if (s) c.summary(s);
  // Subcommands: the first sentence of their description.
  for (const sub of c.commands) if (!sub.summary()) sub.summary(firstSentence(sub.description()));
}

function firstSentence(text: string): string {
  const m = /^(.+?[.!?])(\s|$)/.exec(text);
  const first = (m?.[1] ?? text).replace(/\.$/, "");
  return first.length > 90 ? first.replace(/^(.{0,90}?)[:;,(].*$/, "$1").trim() : first;
}

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
