// `civm caches`: the registry and HTTP caches of a running civm serve (over its API): state,
// size, hit ratio, where VMs reach them. docs/caches.md.
import type { Command } from "commander";
import type { CacheStatus } from "../../caches/types.js";
import { formatSize } from "../../config/sizes.js";
import { formatAge, printNames, say, table } from "../output.js";
import { apiOptions, call, type ApiFlags } from "./pools.js";

function size(n: number | null): string {
  return n === null ? "-" : n === 0 ? "0" : formatSize(n).replace(/ \(.*\)$/, "");
}

export function registerCaches(program: Command): void {
  const caches = program.command("caches").description("Caches of a running civm serve (over its API).");
  apiOptions(
    caches
      .command("list", { isDefault: true })
      .alias("ls")
      .description("List the registry and HTTP caches: state (starting, up, restarting, failed), size and limit, requests and hit ratio since civm serve started, restarts, and the address runner VMs use."),
  )
    .option("-q, --quiet", "print names only, one a line")
    .action(async (flags: ApiFlags) => {
      const rows = (await call(flags, "GET", "/api/caches")) as CacheStatus[];
      if (flags.json) {
        process.stdout.write(JSON.stringify(rows, null, 2) + "\n");
        return;
      }
      if (flags.quiet) return printNames(rows.map((c) => c.name));
      if (rows.length === 0) {
        say("civm serve runs no caches (no caches: section in its config; docs/caches.md)");
        return;
      }
      const head = ["CACHE", "STATE", "SIZE", "MAX", "REQUESTS", "HIT RATIO", "RESTARTS", "VMS USE", "UPSTREAM"];
      const now = Date.now();
      process.stdout.write(
        table([
          head,
          ...rows.map((c) => [
            c.name,
            `${c.state} ${formatAge(now - Date.parse(c.since))}`,
            size(c.sizeBytes),
            size(c.maxSizeBytes),
            c.managed ? String(c.requests) : "-",
            c.hitRatio === null ? "-" : `${(c.hitRatio * 100).toFixed(1)}%`,
            String(c.restarts),
            c.guestUrl,
            c.managed ? (c.upstream ?? "-") : `existing ${c.url}`,
          ]),
        ]),
      );
      for (const c of rows) if (c.message) say(`cache ${c.name} ${c.state}: ${c.message}`);
    });
}
