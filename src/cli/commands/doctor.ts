import type { Command } from "commander";
import { pathsFrom } from "../global.js";
import { EXIT_CODES } from "../../errors/index.js";

export function registerDoctor(program: Command): void {
  program
    .command("doctor")
    .description("Check this host: the tools civm calls and their versions, whether KVM is present and really usable (a short probe boot, cached), free disk in the state dir.")
    .option("--json", "print JSON")
    .action(async (flags: { json?: boolean }, cmd: Command) => {
      const { runDoctor, formatDoctorReport } = await import("../../host/doctor.js");
      const report = await runDoctor({ paths: pathsFrom(cmd), env: process.env });
      process.stdout.write(flags.json ? JSON.stringify(report, null, 2) + "\n" : formatDoctorReport(report));
      if (!report.ok) process.exitCode = EXIT_CODES.host;
    });
}
