import type { Command } from "commander";
import { pathsFrom } from "../global.js";
import { formatAge, table } from "../output.js";
import { Registry, reconcile, liveness } from "../../vm/index.js";

export function registerLs(program: Command): void {
  program
    .command("ls")
    .description("List the VMs civm is running on this host (name, pid, ssh port, age). Entries whose civm or QEMU is gone are cleaned up when seen.")
    .option("--json", "print JSON")
    .action(async (flags: { json?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const registry = new Registry(paths.stateDir);
      await reconcile(registry, undefined, { sweep: true });
      const live = (await registry.list()).filter((e) => liveness(e) === "running");
      const now = Date.now();
      if (flags.json) {
        process.stdout.write(
          JSON.stringify(
            live.map((e) => ({ id: e.id, name: e.name, pid: e.qemuPid ?? null, sshPort: e.sshPort ?? null, sshBind: e.sshBind ?? null, startedAt: e.startedAt, consoleLog: e.consoleLog })),
            null,
            2,
          ) + "\n",
        );
        return;
      }
      const rows = [["NAME", "ID", "PID", "SSH", "AGE"]];
      for (const e of live) {
        rows.push([e.name, e.id, String(e.qemuPid ?? "-"), e.sshPort ? `${e.sshBind}:${e.sshPort}` : "-", formatAge(now - Date.parse(e.startedAt))]);
      }
      process.stdout.write(table(rows));
    });
}
