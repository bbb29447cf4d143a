import { Command, Option } from "commander";
import { existsSync } from "node:fs";
import { writeFileSync } from "node:fs";
import { pathsFrom } from "../global.js";
import { say, warn } from "../output.js";
import { loadInstances, selectInstance, preprocessConfig, checkInstanceFiles } from "../../config/index.js";
import { detectAccel } from "../../host/kvm.js";
import { VmRun, Registry, reconcile } from "../../vm/index.js";
import type { InstanceSpec } from "../../config/types.js";
import type { Paths } from "../../host/paths.js";
import { ConfigError, EXIT_CODES } from "../../errors/index.js";
import { formatSeconds } from "../../vm/format.js";
import { trace } from "../../errors/trace.js";
import { looksLikeImageName, resolveStoredImage } from "../../images/resolve.js";

interface RunFlags {
  file?: string;
  console?: boolean;
  keep?: boolean;
  grace: string;
  sshBind: string;
  accel?: "kvm" | "tcg";
  timingsFile?: string;
}

/** ./instances.json, else ./instances.yaml or .yml. */
export function defaultInstancesFile(): string {
  for (const f of ["instances.json", "instances.yaml", "instances.yml"]) if (existsSync(f)) return f;
  return "instances.json";
}

function positiveInt(v: string, flag: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new ConfigError(`${flag} must be a whole number of seconds (0 or more), not "${v}".`);
  return n;
}

export function registerRun(program: Command): void {
  program
    .command("run")
    .description("Boot one ephemeral VM for an instance of instances.json and delete it when the guest powers off, times out or civm is stopped.")
    .argument("<name>", "instance name in the instances file")
    .option("-f, --file <file>", "instances file, JSON or YAML (default: ./instances.json)")
    .option("--console", "also stream the serial console to stdout")
    .option("--keep", "keep the VM's work dir (overlay, config ISO) after it ends, for debugging")
    .option("--grace <seconds>", "after asking the guest to power off (timeout, Ctrl-C), wait this long before ending QEMU", "30")
    .option("--ssh-bind <addr>", "address the ssh-port forward listens on", "127.0.0.1")
    .addOption(new Option("--accel <accel>", "force the accelerator instead of probing KVM").choices(["kvm", "tcg"]))
    .addOption(new Option("--timings-file <file>").hideHelp())
    .addHelpText(
      "after",
      `
The instances file is a list of objects with the keys of Rust CI's run.py: name, image,
cpu-cores, ram, root-disk, timeout-seconds, ssh-port, config; and optionally kernel, initrd,
cmdline, machine (pc, q35, microvm), qemu-args. Values in config may use
\${{ env:NAME }}, \${{ file:PATH }} and \${{ gha-install-token:OWNER/REPO }} (GITHUB_TOKEN,
GITHUB_API_URL). The guest reads {name, config} from instance.json on a CD-ROM labelled
instance-configuration; when it ejects the disc civm removes the medium.

Exit code 0 only when the guest powered itself off; see "civm --help" for the others.`,
    )
    .action(async (name: string, flags: RunFlags, cmd: Command) => {
      trace("cli: modules loaded");
      const paths = pathsFrom(cmd);
      const graceSeconds = positiveInt(flags.grace, "--grace");
      const stop = trapSignals(name);
      const file = flags.file ?? defaultInstancesFile();
      // Only the chosen instance's files must exist: others may be for another host.
      const loaded = await loadInstances(file, { checkFiles: false });
      let spec = selectInstance(loaded, name);
      if (looksLikeImageName(spec.imageRef)) spec = await resolveStoredImage(spec, paths.stateDir);
      const missing = await checkInstanceFiles(spec);
      if (missing.length) {
        const hint = looksLikeImageName(spec.imageRef) && missing.some((m) => m.includes('"image"'))
          ? `\n"${spec.imageRef}" is not a stored image either (civm image ls lists them; civm image build ${spec.imageRef} builds one).`
          : "";
        throw new ConfigError(missing.join("\n") + hint);
      }
      const code = await bootInstance({ spec, file, baseDir: loaded.baseDir, paths, graceSeconds, stop, flags });
      process.exit(code);
    });
}

export interface StopControl {
  /** Number of SIGINT/SIGTERM received so far. */
  count(): number;
  /** From now on, signals stop this VM (ACPI, then forced on the second). */
  attach(vm: VmRun): void;
}

/** SIGINT/SIGTERM: the first asks the VM to power off, the second forces it. */
export function trapSignals(name: string): StopControl {
  let n = 0;
  let vm: VmRun | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    n++;
    if (!vm) return;
    if (n === 1) say(`${sig}: stopping ${name} (again to force)`);
    vm.stop("signal", n > 1);
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  return {
    count: () => n,
    attach: (v) => {
      vm = v;
      if (n > 0) v.stop("signal", n > 1);
    },
  };
}

export interface BootRequest {
  spec: InstanceSpec;
  file: string;
  baseDir: string;
  paths: Paths;
  graceSeconds: number;
  stop: StopControl;
  flags: Partial<Pick<RunFlags, "console" | "keep" | "sshBind" | "accel" | "timingsFile">>;
}

/** Pre-processes the config, boots the VM, waits for it; returns civm's exit code. */
export async function bootInstance(b: BootRequest): Promise<number> {
  const { spec, paths, flags } = b;
  trace("cli: instance loaded");
  await reconcile(new Registry(paths.stateDir), say);
  trace("cli: registry reconciled");
  const { value: config, secrets } = await preprocessConfig(spec.config, {
    env: process.env,
    where: `${b.file}: instance "${spec.name}"`,
    baseDir: b.baseDir,
  });
  trace("cli: config pre-processed");
  if (b.stop.count()) {
    say(`${spec.name}: interrupted before boot; nothing was started`);
    return EXIT_CODES.signal;
  }
  const accel = await detectAccel({ stateDir: paths.stateDir, ...(flags.accel ? { env: { ...process.env, CIVM_ACCEL: flags.accel } } : {}) });
  if (accel.accel === "tcg" && !flags.accel && !process.env.CIVM_ACCEL) warn(`KVM is not usable (${accel.reason}); using TCG software emulation, guests run several times slower.`);

  trace("cli: accelerator chosen");
  const vm = new VmRun({
    spec: { ...spec, config },
    paths,
    accel: accel.accel,
    sshBind: flags.sshBind ?? "127.0.0.1",
    graceSeconds: b.graceSeconds,
    keep: !!flags.keep,
    secrets,
    log: say,
    ...(flags.console ? { onConsole: (t: string) => process.stdout.write(t) } : {}),
  });
  b.stop.attach(vm);
  const r = await vm.run();
  if (r.detail) process.stderr.write(r.detail.replace(/^/gm, "  ") + "\n");
  if (r.workDirKept) say(`work dir kept: ${r.workDir}`);
  say(`${r.name}: ${r.reason} after ${formatSeconds(r.durationMs)} (exit ${r.exitCode}); console log: ${r.consoleLog}`);
  if (flags.timingsFile) {
    writeFileSync(flags.timingsFile, JSON.stringify({ ...r.timings, exitAt: performance.now(), reason: r.reason }));
  }
  return r.exitCode;
}
