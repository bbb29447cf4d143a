import type { Command } from "commander";
import { pathsFrom } from "../global.js";
import { formatAge, printNames, table } from "../output.js";
import { Registry, reconcile } from "../../vm/index.js";

export function registerLs(program: Command): void {
  program
    .command("ls")
    .alias("list")
    .description("List the VMs civm is running on this host (name, pid, ssh port, age). Entries whose civm or QEMU is gone are cleaned up when seen; entries civm refuses to act on (a work dir outside its state dir, a pid that is not the recorded process) are listed with the reason and left alone.")
    .option("--json", "print a JSON array")
    .option("-q, --quiet", "print names only, one a line")
    .action(async (flags: { json?: boolean; quiet?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const registry = new Registry(paths.stateDir);
      const { refused } = await reconcile(registry, undefined, { sweep: true });
      const live = (await registry.list()).filter((e) => registry.verdict(e).state === "running");
      const now = Date.now();
      if (flags.json) {
        process.stdout.write(
          JSON.stringify(
            [
              ...live.map((e) => ({ id: e.id, name: e.name, state: "running", pid: e.qemuPid ?? null, sshPort: e.sshPort ?? null, sshBind: e.sshBind ?? null, startedAt: e.startedAt, consoleLog: e.consoleLog })),
              ...refused.map((r) => ({ id: r.id, state: "refused", reason: r.reason, file: r.file })),
            ],
            null,
            2,
          ) + "\n",
        );
        return;
      }
      if (flags.quiet) {
        printNames(live.map((e) => e.name));
        return;
      }
      const rows = [["NAME", "ID", "PID", "SSH", "AGE"]];
      for (const e of live) {
        rows.push([e.name, e.id, String(e.qemuPid ?? "-"), e.sshPort ? `${e.sshBind}:${e.sshPort}` : "-", formatAge(now - Date.parse(e.startedAt))]);
      }
      process.stdout.write(table(rows));
      if (refused.length) {
        process.stdout.write(`\nREFUSED (left untouched: nothing signalled or deleted; check each and delete its file by hand)\n`);
        for (const r of refused) process.stdout.write(`  ${r.file}: ${r.reason}\n`);
      }
    });
}
