import { Command, Option } from "commander";
import { existsSync } from "node:fs";
import { writeFileSync } from "node:fs";
import { pathsFrom } from "../global.js";
import { abortOnSignals, clearProgress, printJson, progressLine, say, warn } from "../output.js";
import { loadInstances, selectInstance, preprocessConfig, checkInstanceFiles } from "../../config/index.js";
import { detectAccel } from "../../host/kvm.js";
import { VmRun, Registry, reconcile } from "../../vm/index.js";
import { resultSummary, type VmResult } from "../../vm/run.js";
import type { InstanceSpec } from "../../config/types.js";
import type { Paths } from "../../host/paths.js";
import type { DevFlags } from "../../dev/plan.js";
import { ConfigError, EXIT_CODES } from "../../errors/index.js";
import { parseSecondsFlag } from "../../config/durations.js";
import { formatBytes, formatSeconds } from "../../vm/format.js";
import { trace } from "../../errors/trace.js";
import { isOciImageRef, looksLikeImageName, resolveStoredImage } from "../../images/resolve.js";
import { buildQemuArgs } from "../../vm/argv.js";
import { ARCH_INFO, parseArch, requireArch, withArch, type GuestArch } from "../../vm/arch.js";
import { sniffImage } from "../../vm/disk.js";
import { describeCommand } from "../../exec/index.js";
import { ensureLogsDir } from "../../host/paths.js";
import { LOG_RETENTION_DEFAULTS, parseKeepDays, parseMaxBytes, pruneLogs, type LogRetention } from "../../host/log-retention.js";
import { join } from "node:path";

interface RunFlags {
  file?: string;
  logsKeepDays?: string;
  logsMaxBytes?: string;
  console?: boolean;
  keep?: boolean;
  grace: string;
  sshBind: string;
  accel?: "kvm" | "tcg";
  timingsFile?: string;
  json?: boolean;
  snapshot?: boolean;
  firmwareBoot?: boolean;
  arch?: string;
}

/**
 * All of civm run's flags: an ad-hoc VM's (civm run --image ...; the dev VM's DevFlags, see
 * src/dev/plan.ts) and the instance run's. image is absent for an instance run.
 */
interface AdHocFlags extends RunFlags, Omit<DevFlags, "image" | "hostMount" | "port" | "allow" | keyof RunFlags> {
  image?: string;
  /** Repeatable flags: commander starts them as []. */
  hostMount: string[];
  port: string[];
  allow: string[];
  detach?: boolean;
  wait?: boolean;
  waitTimeout: string;
  printCmd?: boolean;
  verbose?: boolean;
  /** lvh's names (see LVH_ALIASES). */
  cpu?: string;
  daemonize?: boolean;
  qemuCmdPrint?: boolean;
  hwAccel?: boolean;
  qemuDisableKvm?: boolean;
}

const AD_HOC_ONLY: [keyof AdHocFlags, string][] = [
  ["kernel", "--kernel"], ["initrd", "--initrd"], ["append", "--append"], ["cpus", "--cpus"], ["mem", "--mem"], ["disk", "--disk"],
  ["name", "--name"], ["network", "--network"], ["detach", "--detach"], ["wait", "--wait"], ["timeout", "--timeout"], ["printCmd", "--print-cmd"],
  ["cpuKind", "--cpu-kind"], ["consoleLogFile", "--console-log-file"], ["serialPort", "--serial-port"], ["verbose", "-v/--verbose"],
  ["sshKey", "--ssh-key"], ["sshUser", "--ssh-user"],
];

/**
 * little-vm-helper's `lvh run` flags that mean what a civm flag means: folded into civm's
 * before anything else looks at them (both given: refused unless they agree).
 */
export function foldLvhAliases(flags: AdHocFlags): void {
  const fold = <K extends keyof AdHocFlags>(alias: string, aliasValue: AdHocFlags[K] | undefined, key: K, civm: string) => {
    if (aliasValue === undefined) return;
    if (flags[key] !== undefined && flags[key] !== aliasValue) throw new ConfigError(`${alias} and ${civm} are the same setting (${alias} is lvh's name); give one`);
    flags[key] = aliasValue;
  };
  fold("--cpu", flags.cpu, "cpus", "--cpus");
  fold("--daemonize", flags.daemonize, "detach", "--detach");
  fold("--qemu-cmd-print", flags.qemuCmdPrint, "printCmd", "--print-cmd");
  const tcg = flags.hwAccel === false || flags.qemuDisableKvm ? ("tcg" as const) : undefined;
  if (tcg && flags.accel === "kvm") throw new ConfigError(`${flags.hwAccel === false ? "--no-hw-accel" : "--qemu-disable-kvm"} and --accel kvm contradict each other; give one`);
  fold(flags.hwAccel === false ? "--no-hw-accel" : "--qemu-disable-kvm", tcg, "accel", "--accel tcg");
}

const collect = (v: string, all: string[]): string[] => [...all, v];

/** ./instances.json, else ./instances.yaml or .yml. */
export function defaultInstancesFile(): string {
  for (const f of ["instances.json", "instances.yaml", "instances.yml"]) if (existsSync(f)) return f;
  return "instances.json";
}


export function registerRun(program: Command): void {
  program
    .command("run")
    .description("Boot one ephemeral VM (an instance of instances.json, or an ad-hoc VM with --image) and delete it when the guest powers off, times out or civm is stopped.")
    .argument("[name]", "instance name in the instances file (not with --image)")
    .option("-f, --file <file>", "instances file, JSON or YAML (default: ./instances.json)")
    .option("--console", "also stream the serial console to stdout")
    .option("--keep", "keep the VM's work dir (overlay, config ISO) after it ends, for debugging")
    .option("--grace <seconds>", "after asking the guest to power off (timeout, Ctrl-C), wait this long before ending QEMU", "30")
    .option("--ssh-bind <addr>", "address the ssh-port forward listens on", "127.0.0.1")
    .addOption(new Option("--accel <accel>", "force the accelerator instead of probing KVM").choices(["kvm", "tcg"]))
    .addOption(new Option("--timings-file <file>").hideHelp())
    .option("--snapshot", "instances and ad-hoc VMs: start a stored image's VM from its memory snapshot instead of booting (made first when there is none; any problem boots cold, with the reason); see docs/images.md \"Snapshots\"")
    .addOption(new Option("--logs-keep-days <days>", `delete civm's console and supervisor logs in the logs dir not written for this many days; 0 = keep (default ${LOG_RETENTION_DEFAULTS.keepDays})`).env("CIVM_LOGS_KEEP_DAYS"))
    .addOption(new Option("--logs-max-bytes <size>", `then delete the oldest of them until they total at most this, e.g. 500M; 0 = no limit (default ${LOG_RETENTION_DEFAULTS.maxBytes / 1024 ** 3}G)`).env("CIVM_LOGS_MAX_BYTES"))
    .option("--arch <arch>", "the guest's architecture: x86_64 (default) or arm64 (aarch64: qemu-system-aarch64's virt machine, TCG on an x86_64 host); instances: overrides \"arch\"; ad-hoc: default a stored image's own")
    .option("--firmware-boot", "boot through the firmware and the image's own bootloader (SeaBIOS, GRUB), not its kernel directly: the instance's \"firmware-boot\": true")
    .option("--image <image>", "ad-hoc VM: a stored image (civm image ls), a disk image path, or an OCI reference REGISTRY/REPO:TAG (pulled on first use); no instances file")
    .option("--kernel <kernel>", "ad-hoc: boot a stored kernel (civm kernel ls; its modules are mounted in the guest) or a bzImage file")
    .option("--initrd <file>", "ad-hoc: initrd for a --kernel file")
    .option("--append <args>", "ad-hoc: extra kernel command line arguments")
    .option("--cpus <n>", "ad-hoc: vCPUs (default 2)")
    .option("--mem <size>", "ad-hoc: memory, e.g. 1G or 512M; a bare number is MiB (4096 = 4 GiB); at least 64M (default 2G)")
    .option("--disk <size>", "ad-hoc: virtual disk size, at least the image's (default the image's)")
    .option("--host-mount <dir[:tag][:guest-path][:ro|:rw|:passthrough]>", "ad-hoc: share a host folder over 9p (first at /host, others at /host-TAG; mapped-xattr: no setuid or device files reach the host; :passthrough only for a trusted guest); repeatable", collect, [])
    .option("-p, --port <[addr:]host[:guest][/udp]>", "ad-hoc: forward a host port to the guest (HOST:22 sets the SSH port, else one is picked); repeatable", collect, [])
    .option("--allow <entry>", "ad-hoc: let the guest reach this despite the network policy: host:PORT (this host), CIDR, CIDR:PORT or NAME:PORT; repeatable (docs/security.md)", collect, [])
    .addOption(new Option("--network <mode>", "ad-hoc: restricted (default: the internet, never this host, link-local or private networks) or unrestricted (no policy; warned)").choices(["restricted", "unrestricted"]))
    .option("--name <name>", "ad-hoc: the VM's name for wait/exec/ssh/stop/logs (default dev-<id>)")
    .option("--detach", "ad-hoc: run in the background (a supervisor owns the VM); print the name and return once QEMU runs")
    .option("--wait", "with --detach: also wait until the VM answers SSH (as civm wait)")
    .option("--wait-timeout <seconds>", "with --wait: give up after this long", "600")
    .option("--timeout <seconds>", "ad-hoc: power the VM off after this long; 0 = never (default 3600)")
    .option("--print-cmd", "ad-hoc: print the QEMU command line and exit; nothing is started")
    .option("-v, --verbose", "ad-hoc: print the QEMU command line on stderr, then start the VM")
    .option("--cpu-kind <model>", "ad-hoc: QEMU CPU model (-cpu), e.g. qemu64 or max,-vmx (default host with KVM, max with TCG)")
    .option("--console-log-file <file>", "ad-hoc: also append the serial console (redacted, as civm's own log) to this file")
    .option("--ssh-key <file>", "ad-hoc, an image without civm's agent (an lvh image): the private key it trusts; wait, exec and ssh use it and wait checks SSH alone")
    .option("--ssh-user <user>", "ad-hoc: the user wait, exec and ssh log in as (default root)")
    .option("--serial-port <port>", "ad-hoc: serve the serial console over TCP on the --ssh-bind address, both ways (telnet or nc)")
    .addOption(new Option("--cpu <n>", "lvh's name for --cpus").hideHelp())
    .addOption(new Option("--daemonize", "lvh's name for --detach").hideHelp())
    .addOption(new Option("--qemu-cmd-print", "lvh's name for --print-cmd").hideHelp())
    .addOption(new Option("--no-hw-accel", "lvh's name for --accel tcg").hideHelp())
    .addOption(new Option("--qemu-disable-kvm", "lvh's older name for --accel tcg").hideHelp())
    .option("--json", "print the result as one JSON object on stdout (name, id, reason, exitCode, ...); messages stay on stderr")
    .addHelpText(
      "after",
      `
The instances file is a list of objects with the keys of Rust CI's run.py: name, image,
cpu-cores, ram, root-disk, timeout-seconds, ssh-port, config; and optionally kernel, initrd,
cmdline, machine (pc, q35, microvm), qemu-args. An image (here and in --image) is a disk
path, a stored image name, or an OCI reference REGISTRY/REPO:TAG pulled on first use
(docs/images.md says how civm tells them apart). A disk civm did not build (GRUB on a BIOS
disk, as run.py boots it) boots its own kernel directly: GRUB's default entry, read from the
disk once without mounting it and cached; --firmware-boot (or "firmware-boot": true) keeps
SeaBIOS and GRUB, and a disk civm cannot read boots that way with the reason logged.
Values in config may use
\${{ env:NAME }}, \${{ file:PATH }} and \${{ gha-install-token:OWNER/REPO }} (GITHUB_TOKEN,
GITHUB_API_URL). The guest reads {name, config} from instance.json on a CD-ROM labelled
instance-configuration; when it ejects the disc civm removes the medium.

Ad-hoc VMs (--image) need no instances file: the guest agent installs a key civm makes
for this VM, mounts the --host-mount folders and keeps the VM up until civm stop, the
--timeout or a power-off in the guest. Use civm wait, exec, ssh, logs and stop with its
name. See docs/dev-vms.md.

Logs: civm writes each VM's serial console (redacted, 0600) to the logs dir. Once the VM
runs, civm run deletes its own logs (by name; never a VM's that is still running) older
than --logs-keep-days, then the oldest until --logs-max-bytes is met.

lvh users: --mem without a unit is MiB (as in QEMU and lvh); -p HOST:GUEST:tcp|udp works;
the first --host-mount is tagged host_mount (lvh images mount it at /host); --cpu,
--daemonize, --qemu-cmd-print and --no-hw-accel are lvh's names for --cpus, --detach,
--print-cmd and --accel tcg. See docs/dev-vms.md ("Coming from little-vm-helper").

Exit code 0 only when the guest powered itself off; see "civm --help" for the others.`,
    )
    .action(async (name: string | undefined, flags: AdHocFlags, cmd: Command) => {
      trace("cli: modules loaded");
      foldLvhAliases(flags);
      // Checked before anything starts: a typo must not surface after the VM ran.
      logRetentionOf(flags);
      if (flags.json && flags.console) throw new ConfigError("--json and --console both write to stdout; use one (civm logs NAME shows the console)");
      if (flags.image !== undefined) {
        if (name !== undefined) throw new ConfigError(`give either an instance NAME or --image, not both (the ad-hoc VM's name is --name ${name})`);
        if (flags.file !== undefined) throw new ConfigError("-f/--file is for instances; an ad-hoc VM (--image) takes no instances file");
        process.exit(await runAdHoc(flags, cmd));
      }
      const adHoc = AD_HOC_ONLY.filter(([k]) => flags[k] !== undefined).map(([, f]) => f);
      if (flags.hostMount.length) adHoc.push("--host-mount");
      if (flags.port.length) adHoc.push("-p");
      if (flags.allow.length) adHoc.push("--allow (instances take network.allow)");
      if (adHoc.length) throw new ConfigError(`${adHoc.join(", ")} ${adHoc.length > 1 ? "are" : "is"} for ad-hoc VMs: add --image IMAGE${name !== undefined ? ` (and drop the instance name ${name})` : ""}`);
      if (name === undefined) throw new ConfigError("civm run needs an instance NAME (from instances.json) or --image IMAGE for an ad-hoc VM");
      const paths = pathsFrom(cmd);
      const graceSeconds = parseSecondsFlag(flags.grace, "--grace");
      const stop = trapSignals(name);
      const file = flags.file ?? defaultInstancesFile();
      // Only the chosen instance's files must exist: others may be for another host.
      const loaded = await loadInstances(file, { checkFiles: false });
      let spec = selectInstance(loaded, name);
      if (flags.firmwareBoot) spec = { ...spec, firmwareBoot: true };
      if (flags.arch !== undefined) spec = withArch(spec, archFlag(flags.arch));
      if (looksLikeImageName(spec.imageRef) || isOciImageRef(spec.imageRef)) {
        // A pull (OCI reference not stored yet) ends at the first Ctrl-C, leaving nothing stored.
        const interrupt = abortOnSignals(`the pull of ${spec.imageRef} was interrupted; nothing was stored`);
        try {
          spec = await resolveStoredImage(spec, paths.stateDir, { log: say, onProgress: progressLine(formatBytes), signal: interrupt.signal });
        } finally {
          interrupt.release();
          clearProgress();
        }
      }
      const missing = await checkInstanceFiles(spec);
      if (missing.length) {
        const hint = looksLikeImageName(spec.imageRef) && missing.some((m) => m.includes('"image"'))
          ? `\n"${spec.imageRef}" is not a stored image either (civm image ls lists them; civm image build ${spec.imageRef} builds one).`
          : "";
        throw new ConfigError(missing.join("\n") + hint);
      }
      const code = await bootInstance({ spec, file, baseDir: loaded.baseDir, paths, graceSeconds, stop, flags, logRetention: logRetentionOf(flags) });
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
  flags: Partial<Pick<RunFlags, "console" | "keep" | "sshBind" | "accel" | "timingsFile" | "json" | "snapshot">>;
  /** Log retention applied once the VM runs; default LOG_RETENTION_DEFAULTS. */
  logRetention?: LogRetention;
}

/** --logs-keep-days / --logs-max-bytes (or their env), validated. */
export function logRetentionOf(flags: Pick<RunFlags, "logsKeepDays" | "logsMaxBytes">): LogRetention {
  return {
    keepDays: flags.logsKeepDays === undefined ? LOG_RETENTION_DEFAULTS.keepDays : parseKeepDays(flags.logsKeepDays, "--logs-keep-days (or CIVM_LOGS_KEEP_DAYS)"),
    maxBytes: flags.logsMaxBytes === undefined ? LOG_RETENTION_DEFAULTS.maxBytes : parseMaxBytes(flags.logsMaxBytes, "--logs-max-bytes (or CIVM_LOGS_MAX_BYTES)"),
  };
}

/**
 * Log retention in the background, started once the VM runs (off the boot's critical path);
 * await the returned promise before exiting. A failure is a warning, never the run's result.
 */
function logPruner(paths: Paths, retention: LogRetention): { start: () => void; done: () => Promise<void> } {
  let p: Promise<void> | undefined;
  return {
    start: () => {
      p ??= pruneLogs({ logsDir: paths.logsDir, stateDir: paths.stateDir, retention })
        .then((r) => {
          if (r.deleted.length) say(`logs: deleted ${r.deleted.length} old log${r.deleted.length > 1 ? "s" : ""} (${(r.freedBytes / 1024 ** 2).toFixed(1)} MiB) from ${paths.logsDir}`);
        })
        .catch((e: Error) => warn(`could not prune old logs in ${paths.logsDir}: ${e.message}`));
    },
    done: () => p ?? Promise.resolve(),
  };
}

/** Pre-processes the config, boots the VM, waits for it; returns civm's exit code. */
export async function bootInstance(b: BootRequest): Promise<number> {
  const { paths, flags } = b;
  let { spec } = b;
  trace("cli: instance loaded");
  await reconcile(new Registry(paths.stateDir), say);
  trace("cli: registry reconciled");
  const { value: config, secrets } = await preprocessConfig(spec.config, {
    env: process.env,
    where: `${b.file}: instance "${spec.name}"`,
    baseDir: b.baseDir,
  });
  trace("cli: config pre-processed");
  // Before the KVM probe and the registry: a text file as "image" starts nothing.
  const sniffed = await sniffImage(spec.image, `${b.file}: instance "${spec.name}": "image"`);
  // A foreign disk with GRUB: its own kernel, read from the image once (docs/images.md).
  if (!spec.kernel && !spec.firmwareBoot && sniffed && sniffed.evidence !== "blank") {
    const { withForeignKernel } = await import("../../images/foreign-boot.js");
    spec = await withForeignKernel(spec, { stateDir: paths.stateDir, log: say });
    trace("cli: foreign image's kernel looked up");
  }
  if (spec.arch && spec.arch !== "x86_64") {
    await requireArch(spec.arch, { firmware: !spec.kernel, where: `${b.file}: instance "${spec.name}" (#${spec.source.index + 1})`, field: '"arch":', dropHint: 'remove "arch" to run an x86_64 guest' });
  }
  if (b.stop.count()) {
    say(`${spec.name}: interrupted before boot; nothing was started`);
    return EXIT_CODES.signal;
  }
  const accel = await detectAccel({ stateDir: paths.stateDir, ...(spec.arch ? { arch: spec.arch } : {}), ...(flags.accel ? { env: { ...process.env, CIVM_ACCEL: flags.accel } } : {}) });
  if (accel.accel === "tcg" && !flags.accel && !process.env.CIVM_ACCEL) warn(`KVM is not usable (${accel.reason}); using TCG software emulation, guests run several times slower.`);

  trace("cli: accelerator chosen");
  const pruner = logPruner(paths, b.logRetention ?? LOG_RETENTION_DEFAULTS);
  const vm = new VmRun({
    // Inside run(): a signal while the snapshot is being made ends that make at once.
    ...(flags.snapshot
      ? {
          prepareSnapshot: async (signal: AbortSignal) => {
            const { planSnapshotStart, storedImageOf } = await import("../../images/snapshot.js");
            return planSnapshotStart({ mode: "snapshot", img: await storedImageOf(spec, paths.stateDir), spec, paths, accel: accel.accel, log: say, signal });
          },
        }
      : {}),
    spec: { ...spec, config },
    paths,
    accel: accel.accel,
    sshBind: flags.sshBind ?? "127.0.0.1",
    graceSeconds: b.graceSeconds,
    keep: !!flags.keep,
    secrets,
    log: say,
    ...(flags.console ? { onConsole: (t: string) => process.stdout.write(t) } : {}),
    onRunning: pruner.start,
  });
  b.stop.attach(vm);
  const r = await vm.run();
  await pruner.done();
  if (r.detail) process.stderr.write(r.detail.replace(/^/gm, "  ") + "\n");
  if (r.workDirKept) say(`work dir kept: ${r.workDir}`);
  say(resultSummary(r));
  if (flags.json) printResult(r);
  if (flags.timingsFile) {
    writeFileSync(flags.timingsFile, JSON.stringify({ ...r.timings, exitAt: performance.now(), reason: r.reason, start: r.start }));
  }
  return r.exitCode;
}

/** civm run --image: an ad-hoc (dev) VM, in the foreground or detached. Returns the exit code. */
async function runAdHoc(flags: AdHocFlags, cmd: Command): Promise<number> {
  const paths = pathsFrom(cmd);
  const dev = await import("../../dev/index.js");
  if (flags.wait && !flags.detach) throw new ConfigError("--wait is for --detach (a foreground VM is waited on by civm wait from another shell)");
  if (flags.detach && flags.console) throw new ConfigError("--console streams a foreground VM's console; with --detach use civm logs -f NAME");
  // Checked before anything starts (it is used once the VM runs).
  const waitTimeoutMs = parseSecondsFlag(flags.waitTimeout, "--wait-timeout", { min: 1 }) * 1000;
  if (!flags.printCmd) await reconcile(new Registry(paths.stateDir), say);
  const stamp = new Date().toISOString().replace(/[-:]/g, "").replace(/\..*/, "").replace("T", "-");
  // Every check first (nothing started, no KVM probe for bad input), then the accelerator.
  const interrupt = abortOnSignals(`the pull of ${flags.image} was interrupted; nothing was stored`);
  const plan = await dev
    .planDevVm(
      { ...flags, image: flags.image!, ...(flags.grace !== undefined ? { grace: flags.grace } : {}), sshBind: flags.sshBind },
      { paths, cwd: process.cwd(), pullLog: say, onPullProgress: progressLine(formatBytes), pullSignal: interrupt.signal, ...(flags.detach ? { supervisorLog: (n: string, id: string) => join(paths.logsDir, `${n}-${stamp}-${id}.supervisor.log`) } : {}) },
    )
    .finally(() => {
      interrupt.release();
      clearProgress();
    });
  const accel = await detectAccel({ stateDir: paths.stateDir, ...(plan.spec.arch ? { arch: plan.spec.arch } : {}), ...(flags.accel ? { env: { ...process.env, CIVM_ACCEL: flags.accel } } : {}) });
  if (accel.accel === "tcg" && !flags.accel && !process.env.CIVM_ACCEL && !flags.printCmd) warn(`KVM is not usable (${accel.reason}); using TCG software emulation, guests run several times slower.`);
  plan.accel = accel.accel;
  const name = plan.spec.name;
  if (!flags.printCmd) for (const w of plan.warnings) warn(w);
  if (flags.printCmd || flags.verbose) {
    const vm = new VmRun(dev.devRunRequest(plan, { paths, log: say }));
    const p = vm.plan();
    if (flags.printCmd && flags.json) printJson({ name, binary: p.binary, args: buildQemuArgs(p) });
    else if (flags.printCmd) process.stdout.write(describeCommand(p.binary, buildQemuArgs(p)) + "\n");
    // -v (lvh's --verbose): the command on stderr, then the VM runs.
    else say(`QEMU command: ${describeCommand(p.binary, buildQemuArgs(p))}`);
    if (flags.printCmd) return 0;
  }
  const ssh = `ssh ${plan.dev.ssh.host}:${plan.dev.ssh.port}`;
  const pruner = logPruner(paths, logRetentionOf(flags));
  if (flags.detach) {
    ensureLogsDir(paths.logsDir);
    const entry = await dev.startDetached(plan, paths, { entry: process.argv[1] ?? "civm", log: say });
    if (!flags.json) process.stdout.write(`${name}\n`);
    say(`${name}: running in the background (supervisor pid ${entry.ownerPid}, QEMU pid ${entry.qemuPid}, ${accel.accel}, ${ssh}); console: ${entry.consoleLog}`);
    pruner.start();
    let readyMs: number | undefined;
    if (flags.wait) {
      readyMs = await dev.waitUntilReady(entry, plan.dev, { mode: "both", timeoutMs: waitTimeoutMs, stateDir: paths.stateDir });
      say(`${name}: ready (${formatSeconds(readyMs)} after QEMU started)`);
    } else {
      say(`next: civm wait ${name} && civm exec ${name} -- CMD; civm stop ${name}`);
    }
    await pruner.done();
    if (flags.json) {
      const o = { name, id: entry.id, state: "running", supervisorPid: entry.ownerPid, qemuPid: entry.qemuPid ?? null, accel: accel.accel, ssh: { host: plan.dev.ssh.host, port: plan.dev.ssh.port }, consoleLog: entry.consoleLog, ...(readyMs !== undefined ? { readyMs } : {}) };
      printJson(o);
    }
    return 0;
  }
  const stop = trapSignals(name);
  const sinks = await dev.planConsoleSinks(plan, say);
  const vm = new VmRun({
    ...dev.devRunRequest(plan, { paths, log: say, ...(flags.console ? { onConsole: (t: string) => process.stdout.write(t) } : {}), ...(sinks ? { sinks } : {}) }),
    onRunning: pruner.start,
  });
  stop.attach(vm);
  say(`${name}: starting (${ssh}); from another shell: civm wait ${name}, civm exec ${name} -- CMD, civm stop ${name}`);
  const r = await vm.run().finally(() => sinks?.close());
  await pruner.done();
  if (r.detail) process.stderr.write(r.detail.replace(/^/gm, "  ") + "\n");
  if (r.workDirKept) say(`work dir kept: ${r.workDir}`);
  say(resultSummary(r));
  if (flags.json) printResult(r);
  return r.exitCode;
}

/** --json: how the VM ended, one object on stdout. */
function printResult(r: VmResult): void {
  const o = { name: r.name, id: r.id, reason: r.reason, exitCode: r.exitCode, start: r.start, durationMs: Math.round(r.durationMs), ...(r.start !== "none" ? { consoleLog: r.consoleLog } : {}), ...(r.workDirKept ? { workDir: r.workDir } : {}) };
  printJson(o);
}

/** --arch: a guest architecture, or a ConfigError naming the flag and the choices. */
export function archFlag(v: string): GuestArch {
  const a = parseArch(v);
  if (!a) throw new ConfigError(`--arch ${JSON.stringify(v)} is not an architecture civm runs; give x86_64 (also amd64) or arm64 (also aarch64)`);
  return a;
}

/** The hidden command a detached VM's supervisor runs as (see src/dev/supervise.ts). */
export function registerSupervisor(program: Command): void {
  program
    .command("__dev-supervisor", { hidden: true })
    .description("internal: the background supervisor of civm run --detach")
    .action(async () => {
      const { runSupervisor } = await import("../../dev/supervise.js");
      process.exit(await runSupervisor());
    });
}
