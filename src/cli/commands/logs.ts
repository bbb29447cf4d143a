import type { Command } from "commander";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { pathsFrom } from "../global.js";
import { say } from "../output.js";
import { ConfigError } from "../../errors/index.js";
import { STATE_LAYOUT } from "../../host/paths.js";
import { FileFollower } from "../../vm/console.js";
import { liveness } from "../../vm/registry.js";

export function registerLogs(program: Command): void {
  program
    .command("logs")
    .description("Print a VM's serial console log (a running VM by name or id; for a VM that is gone, its newest log). -f follows it until the VM ends.")
    .argument("<name>", "VM name (or id)")
    .option("-f, --follow", "keep printing what the guest writes until the VM ends (or Ctrl-C)")
    .option("--supervisor", "print the background supervisor's log instead (civm run --detach)")
    .action(async (name: string, flags: { follow?: boolean; supervisor?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const { findVm, devMetaOf, lastConsoleLog } = await import("../../dev/index.js");
      let entry;
      try {
        entry = await findVm(paths.stateDir, name);
      } catch (e) {
        const last = flags.supervisor ? undefined : await lastConsoleLog(paths.logsDir, name);
        if (!last) throw e;
        if (flags.follow) say(`${name} is not running; printing its last console log ${last}`);
        process.stdout.write(await readFile(last));
        return;
      }
      let path = entry.consoleLog;
      if (flags.supervisor) {
        const s = devMetaOf(entry)?.supervisorLog;
        if (!s) throw new ConfigError(`${entry.name} has no supervisor (it was not started with civm run --detach)`);
        path = s;
      }
      if (!flags.follow) {
        if (existsSync(path)) process.stdout.write(await readFile(path));
        return;
      }
      const follower = new FileFollower(path, (t) => process.stdout.write(t));
      follower.start();
      const entryFile = join(paths.stateDir, STATE_LAYOUT.registry, `${entry.id}.json`);
      let interrupted = false;
      process.once("SIGINT", () => (interrupted = true));
      while (!interrupted && existsSync(entryFile) && liveness(entry) === "running") await sleep(200);
      await follower.stop();
    });
}
