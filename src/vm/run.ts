// One ephemeral VM, start to finish: work dir → overlay → config drive → QEMU under the
// supervisor → cleanup on every exit path. The caller (CLI, pool daemon) decides what to
// do with the result; nothing here exits the process.
import { randomBytes } from "node:crypto";
import { mkdir, rm, readFile } from "node:fs/promises";
import { join } from "node:path";
import type { InstanceSpec, JsonValue } from "../config/types.js";
import type { Paths } from "../host/paths.js";
import { STATE_LAYOUT, ensureDir } from "../host/paths.js";
import { CivmError, HostError } from "../errors/index.js";
import { trace } from "../errors/trace.js";
import { buildQemuArgs, DEFAULT_CMDLINE, type HostMount, type PortForward, type QemuPlan } from "./argv.js";
import { createOverlay } from "./disk.js";
import { renderConfigDrive, writeConfigDrive, type ConfigDriveEntry } from "./config-drive.js";
import { checkPortFree } from "./ports.js";
import { Registry, procIdentity, type ProcIdentity } from "./registry.js";
import { CleanupStack } from "./cleanup.js";
import { Supervisor, EXIT_CODE_OF_REASON, type ExitReason, type StopReason } from "./supervisor.js";
import { FileFollower, tailLines } from "./console.js";

/** Names inside a VM's work dir. */
export const WORKDIR_LAYOUT = {
  overlay: "disk.qcow2",
  configIso: "config.iso",
  configStaging: "config",
  qmpSocket: "qmp.sock",
} as const;

export interface RunVmRequest {
  /** The instance, with its config already pre-processed. */
  spec: InstanceSpec;
  paths: Paths;
  accel: "kvm" | "tcg";
  /** Address the SSH forward listens on (default 127.0.0.1, never every interface by default). */
  sshBind?: string;
  extraForwards?: PortForward[];
  mounts?: HostMount[];
  graceSeconds: number;
  keep?: boolean;
  qemuBinary?: string;
  /**
   * Boot this disk itself, writable, instead of a throw-away overlay on spec.image (image
   * builds: what the guest writes is the product).
   */
  directDisk?: { path: string; format: "qcow2" | "raw" };
  /** Replaces the default config drive content ({name, config}). */
  configDrive?: ConfigDriveEntry[];
  /** Resolved secrets: redacted from anything civm prints. */
  secrets?: string[];
  log: (line: string) => void;
  /** Receives the serial console as it is written. */
  onConsole?: (text: string) => void;
  /** Extra registry fields. */
  meta?: Record<string, unknown>;
  /** Builds the plan only and returns it (for --print-cmd). */
  dryRun?: boolean;
  /**
   * The VM's id (8 hex); default a random one. A launcher that must find the VM's registry
   * entry before run() starts (civm run --detach) picks it.
   */
  id?: string;
  /**
   * Called once the work dir exists (0700) and before the config drive is written: may put
   * files there (a per-VM SSH key, deleted with the work dir) and return the config to write
   * instead of spec.config and extra registry meta.
   */
  prepareWorkDir?: (workDir: string) => Promise<{ config?: JsonValue; meta?: Record<string, unknown> } | void>;
}

export interface VmResult {
  id: string;
  name: string;
  reason: ExitReason;
  exitCode: number;
  /** From the call to run() to the end of cleanup. */
  durationMs: number;
  mediumRemoved: boolean;
  consoleLog: string;
  workDir: string;
  workDirKept: boolean;
  /** A one-paragraph explanation for failures (QEMU stderr tail, console tail). */
  detail: string | undefined;
  /** performance.now() stamps: QEMU spawned, QEMU exited, cleanup done. */
  timings: { spawnedAt: number; exitedAt: number; doneAt: number };
}

function timestamp(d = new Date()): string {
  return d.toISOString().replace(/[-:]/g, "").replace(/\..*/, "").replace("T", "-");
}

export function newVmId(): string {
  return randomBytes(4).toString("hex");
}

export function redactAll(text: string, secrets: readonly string[]): string {
  let out = text;
  for (const s of secrets) if (s.length >= 4) out = out.split(s).join("***");
  return out;
}

/** Waits for every promise (so none still writes into a dir being cleaned up), then throws the first failure. */
async function allSettledOrThrow(ps: Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(ps);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (failed) throw failed.reason;
}

export class VmRun {
  readonly id: string;
  readonly workDir: string;
  readonly consoleLog: string;
  private supervisor: Supervisor | undefined;
  private pendingStop: { reason: StopReason; force: boolean } | undefined;

  constructor(private readonly req: RunVmRequest) {
    if (req.id !== undefined && !/^[0-9a-f]{8}$/.test(req.id)) throw new CivmError("internal", `VM id ${JSON.stringify(req.id)} is not 8 hex digits`);
    this.id = req.id ?? newVmId();
    this.workDir = join(req.paths.stateDir, STATE_LAYOUT.vms, `${req.spec.name}-${this.id}`);
    this.consoleLog = join(req.paths.logsDir, `${req.spec.name}-${timestamp()}-${this.id}.log`);
  }

  get qemuPid(): number | undefined {
    return this.supervisor?.pid;
  }

  /** Stops the VM (ACPI, then grace, then kill); force ends it now. Safe before start. */
  stop(reason: StopReason, force = false): void {
    if (this.supervisor) this.supervisor.stop(reason, { force });
    else this.pendingStop = { reason, force };
  }

  forwards(): PortForward[] {
    const { spec } = this.req;
    const fw: PortForward[] = [];
    if (spec.sshPort !== undefined) fw.push({ proto: "tcp", hostAddr: this.req.sshBind ?? "127.0.0.1", hostPort: spec.sshPort, guestPort: 22 });
    return fw.concat(this.req.extraForwards ?? []);
  }

  plan(): QemuPlan {
    const { spec } = this.req;
    return {
      binary: this.req.qemuBinary ?? "qemu-system-x86_64",
      name: spec.name,
      accel: this.req.accel,
      machine: spec.machine,
      cpus: spec.cpus,
      ramBytes: spec.ramBytes,
      overlay: this.req.directDisk?.path ?? join(this.workDir, WORKDIR_LAYOUT.overlay),
      overlayFormat: this.req.directDisk?.format ?? "qcow2",
      configIso: join(this.workDir, WORKDIR_LAYOUT.configIso),
      qmpSocket: join(this.workDir, WORKDIR_LAYOUT.qmpSocket),
      consoleLog: this.consoleLog,
      forwards: this.forwards(),
      mounts: this.req.mounts ?? [],
      kernel: spec.kernel ? { path: spec.kernel, initrd: spec.initrd, cmdline: spec.cmdline ?? DEFAULT_CMDLINE } : undefined,
      extraArgs: spec.qemuArgs,
    };
  }

  async run(): Promise<VmResult> {
    const started = performance.now();
    const { req } = this;
    const { spec } = req;
    const log = (l: string) => req.log(redactAll(l, req.secrets ?? []));
    const cleanup = new CleanupStack();
    const registry = new Registry(req.paths.stateDir);
    let keep = req.keep ?? false;
    let follower: FileFollower | undefined;
    try {
      trace("vm: start");
      for (const f of this.forwards()) await checkPortFree(f.hostAddr, f.hostPort, f.proto, `port forward for ${spec.name}`);
      const plan = this.plan();
      if (Buffer.byteLength(plan.qmpSocket) > 107) {
        throw new HostError(`the QMP socket path ${plan.qmpSocket} is longer than a unix socket allows (107 bytes); use a shorter --state-dir`);
      }
      ensureDir(join(req.paths.stateDir, STATE_LAYOUT.vms), 0o700);
      ensureDir(req.paths.logsDir);

      // Recorded before it is taken: a crash from here on is reconciled by the next start.
      const entry = {
        id: this.id, name: spec.name, ownerPid: process.pid, qemuPid: undefined as number | undefined,
        sshPort: spec.sshPort, sshBind: spec.sshPort !== undefined ? (req.sshBind ?? "127.0.0.1") : undefined,
        startedAt: new Date().toISOString(), workDir: this.workDir, consoleLog: this.consoleLog, keep, meta: req.meta,
        state: "starting" as "starting" | "running",
        owner: procIdentity(process.pid), qemu: undefined as ProcIdentity | undefined,
      };
      await registry.put(entry);
      trace("vm: registry entry written");
      cleanup.push("registry entry", () => registry.remove(this.id));
      await mkdir(this.workDir, { mode: 0o700 });
      cleanup.push("work dir", async () => {
        if (!keep) await rm(this.workDir, { recursive: true, force: true });
      });

      let config = spec.config;
      if (req.prepareWorkDir) {
        const prepared = await req.prepareWorkDir(this.workDir);
        if (prepared?.config !== undefined) config = prepared.config;
        if (prepared?.meta) {
          entry.meta = { ...entry.meta, ...prepared.meta };
          await registry.put(entry);
        }
      }

      // Independent: overlay and config drive are made at the same time.
      await allSettledOrThrow([
        req.directDisk
          ? Promise.resolve()
          : createOverlay({ base: spec.image, overlay: plan.overlay, sizeBytes: spec.rootDiskBytes, where: `${spec.source.file}: instance "${spec.name}"` }),
        writeConfigDrive(req.configDrive ?? renderConfigDrive(spec.name, config), plan.configIso!, join(this.workDir, WORKDIR_LAYOUT.configStaging)),
      ]);

      trace("vm: overlay and config drive ready");
      const sup = new Supervisor({ binary: plan.binary, args: buildQemuArgs(plan), timeoutSeconds: spec.timeoutSeconds, graceSeconds: req.graceSeconds, log });
      this.supervisor = sup;
      cleanup.push("QEMU", () => sup.kill());
      if (req.onConsole) {
        const onConsole = req.onConsole;
        follower = new FileFollower(this.consoleLog, (t) => onConsole(redactAll(t, req.secrets ?? [])));
        follower.start();
      }
      try {
        const startP = sup.start(plan.qmpSocket);
        entry.qemuPid = sup.pid;
        // Start time now (kept across exec); the command line once QMP answers (QEMU has exec'd).
        entry.qemu = sup.pid ? procIdentity(sup.pid, { cmdline: false }) : undefined;
        await registry.put(entry);
        await startP;
        entry.qemu = sup.pid ? (procIdentity(sup.pid) ?? entry.qemu) : undefined;
        entry.state = "running";
        await registry.put(entry);
        log(`${spec.name}: running (pid ${sup.pid}, ${req.accel}${spec.sshPort !== undefined ? `, ssh ${entry.sshBind}:${spec.sshPort}` : ""}); console: ${this.consoleLog}`);
        if (this.pendingStop) sup.stop(this.pendingStop.reason, { force: this.pendingStop.force });
      } catch (e) {
        if (sup.alive) throw e; // QMP trouble with a live QEMU is civm's failure
        // QEMU died while starting: fall through to its result.
      }
      const r = await sup.wait();
      await follower?.stop();
      follower = undefined;
      let detail: string | undefined;
      if (r.reason === "qemu-failed") {
        const consoleText = await readFile(this.consoleLog, "utf8").catch(() => "");
        detail = redactAll(
          `QEMU exited ${r.qemuSignal ? `on ${r.qemuSignal}` : `with status ${r.qemuExitCode}`} without a guest power-off.` +
            (r.stderrTail.trim() ? `\n--- QEMU stderr (tail) ---\n${tailLines(r.stderrTail)}` : "") +
            (consoleText.trim() ? `\n--- console (tail) ---\n${tailLines(consoleText)}` : ""),
          req.secrets ?? [],
        );
      }
      const err = await cleanup.run();
      if (err) log(`warning: ${err.message}`);
      return {
        id: this.id, name: spec.name, reason: r.reason, exitCode: EXIT_CODE_OF_REASON[r.reason],
        durationMs: performance.now() - started, mediumRemoved: r.mediumRemoved, consoleLog: this.consoleLog,
        workDir: this.workDir, workDirKept: keep, detail,
        timings: { spawnedAt: r.spawnedAt, exitedAt: r.exitedAt, doneAt: performance.now() },
      };
    } catch (e) {
      await follower?.stop();
      if (this.supervisor?.alive) {
        this.supervisor.kill();
        await this.supervisor.wait().catch(() => undefined);
      }
      const err = await cleanup.run();
      if (err) log(`warning: ${err.message}`);
      if (e instanceof CivmError) throw e;
      throw new CivmError("internal", `civm failed while running ${spec.name}: ${redactAll((e as Error).message, req.secrets ?? [])}`, { cause: e });
    }
  }
}
