// `civm serve --config FILE`: the webhook/API server and the pool reconciler in one
// process, JSON logs (pino) on stdout. `civm config check FILE` validates a config without
// starting anything. Register with registerServe(program) in main.ts.
import { Option, type Command } from "commander";
import { say, warn } from "../output.js";

export function registerServe(program: Command): void {
  const config = program.command("config").description("Work with `civm serve` configuration files.");
  config
    .command("check")
    .argument("<file>", "the serve config (YAML or JSON)")
    .description("Validate a civm serve config and its pools (every problem at once, by pool and field) without starting anything. Exit 0 when valid, 2 otherwise.")
    .option("--no-images", "skip checking that each pool's image exists (stored image or disk file)")
    .option("--json", "print the effective pools as JSON (no secrets)")
    .action(async (file: string, flags: { images?: boolean; json?: boolean }, cmd: Command) => {
      const { loadServeConfig, summarizeServeConfig, poolCmdlineWarnings } = await import("../../pool/index.js");
      const root = cmd.optsWithGlobals() as { stateDir?: string };
      const c = await loadServeConfig(file, { checkImages: flags.images !== false, ...(root.stateDir ? { stateDir: root.stateDir } : {}) });
      for (const w of poolCmdlineWarnings(c.pools, c.poolsFile)) warn(w);
      if (flags.json) {
        process.stdout.write(JSON.stringify({ file: c.file, listen: c.listen, metricsListen: c.metricsListen ?? null, tls: c.tls ? { cert: c.tls.certFile, key: c.tls.keyFile } : null, warnings: c.warnings ?? [], pools: c.pools }, null, 2) + "\n");
        return;
      }
      for (const line of summarizeServeConfig(c)) process.stdout.write(`${line}\n`);
      for (const w of c.warnings ?? []) warn(w);
      say(`${file}: valid (${c.pools.length} pool${c.pools.length === 1 ? "" : "s"}).`);
    });

  program
    .command("serve")
    .description("Keep pools of single-use GitHub Actions runner VMs: webhook and API server plus the reconciler (see docs/serve.md). SIGTERM/SIGINT drains: idle runners stop, busy ones finish (up to shutdownTimeout), then it exits. SIGHUP (or civm reload) re-reads the config; civm drain stops taking work. With \"store: postgres://...\" several hosts share one fleet: fleet-wide limits, one poller per target, dead hosts' runners taken over (docs/fleet.md).")
    .requiredOption("--config <file>", "the serve config (YAML or JSON)")
    .addOption(new Option("--accel <accel>", "force the accelerator instead of probing KVM").choices(["kvm", "tcg"]))
    .option("--grace <seconds>", "ACPI grace period before a stopping VM is killed", "30")
    .option("--log-level <level>", "pino level (trace, debug, info, warn, error)", "info")
    .action(async (flags: { config: string; accel?: "kvm" | "tcg"; grace: string; logLevel: string }, cmd: Command) => {
      const { parseSecondsFlag } = await import("../../config/durations.js");
      const graceSeconds = parseSecondsFlag(flags.grace, "--grace");
      const { runServe } = await import("../../pool/serve.js");
      const root = cmd.optsWithGlobals() as { stateDir?: string; logsDir?: string };
      process.exitCode = await runServe({ configFile: flags.config, stateDir: root.stateDir, logsDir: root.logsDir, accel: flags.accel, graceSeconds, logLevel: flags.logLevel });
    });
}
