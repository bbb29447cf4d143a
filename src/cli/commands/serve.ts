// `civm config check FILE`: validates a `civm serve` config (and its pools) without
// starting anything. Register with registerServe(program) in main.ts.
import type { Command } from "commander";
import { say } from "../output.js";

export function registerServe(program: Command): void {
  const config = program.command("config").description("Work with `civm serve` configuration files.");
  config
    .command("check")
    .argument("<file>", "the serve config (YAML or JSON)")
    .description("Validate a civm serve config and its pools (every problem at once, by pool and field) without starting anything. Exit 0 when valid, 2 otherwise.")
    .option("--no-images", "skip checking that each pool's image exists (stored image or disk file)")
    .option("--json", "print the effective pools as JSON (no secrets)")
    .action(async (file: string, flags: { images?: boolean; json?: boolean }, cmd: Command) => {
      const { loadServeConfig, summarizeServeConfig } = await import("../../pool/index.js");
      const root = cmd.optsWithGlobals() as { stateDir?: string };
      const c = await loadServeConfig(file, { checkImages: flags.images !== false, ...(root.stateDir ? { stateDir: root.stateDir } : {}) });
      if (flags.json) {
        process.stdout.write(JSON.stringify({ file: c.file, listen: c.listen, pools: c.pools }, null, 2) + "\n");
        return;
      }
      for (const line of summarizeServeConfig(c)) process.stdout.write(`${line}\n`);
      say(`${file}: valid (${c.pools.length} pool${c.pools.length === 1 ? "" : "s"}).`);
    });
}
