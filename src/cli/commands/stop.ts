import type { Command } from "commander";
import { pathsFrom } from "../global.js";
import { printJson, say } from "../output.js";
import { parseSecondsFlag } from "../../config/durations.js";
import { Registry, reconcile } from "../../vm/index.js";
import { formatSeconds } from "../../vm/format.js";

export function registerStop(program: Command): void {
  program
    .command("stop")
    .description("Stop VMs: the owner (a detached supervisor or a foreground civm run) asks the guest to power off (ACPI), waits its grace period, then ends QEMU; civm stop returns once the VM, its work dir and its registry entry are gone.")
    .argument("<names...>", "VM names (or ids)")
    .option("--force", "end QEMU now instead of asking the guest to power off")
    .option("--timeout <seconds>", "give up waiting after this long (default: the VM's grace period + 30 s)")
    .option("--json", "print the stopped VMs as a JSON array (name, id, ms)")
    .action(async (names: string[], flags: { force?: boolean; timeout?: string; json?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const timeout = flags.timeout !== undefined ? parseSecondsFlag(flags.timeout, "--timeout") : undefined;
      const { findVm, devMetaOf, stopVm } = await import("../../dev/index.js");
      await reconcile(new Registry(paths.stateDir), say);
      const entries = [];
      for (const n of names) entries.push(await findVm(paths.stateDir, n)); // all found before any is stopped
      const stopped = await Promise.all(
        entries.map(async (e) => {
          const grace = devMetaOf(e)?.graceSeconds ?? 30;
          const timeoutMs = (timeout ?? grace + 30) * 1000;
          const ms = await stopVm(e, { stateDir: paths.stateDir, force: !!flags.force, timeoutMs, log: say });
          say(`${e.name}: stopped and removed (${formatSeconds(ms)})`);
          return { name: e.name, id: e.id, ms: Math.round(ms) };
        }),
      );
      if (flags.json) printJson(stopped);
    });
}
