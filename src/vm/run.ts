// One ephemeral VM, start to finish: work dir → overlay → config drive → QEMU under the
// supervisor → cleanup on every exit path. The caller (CLI, pool daemon) decides what to
// do with the result; nothing here exits the process.
import { randomBytes, randomUUID } from "node:crypto";
import { chmod, chown, lchown, lstat, mkdir, readdir, rm, readFile, writeFile } from "node:fs/promises";
import { closeSync, openSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import type { InstanceSpec, JsonValue } from "../config/types.js";
import type { Paths } from "../host/paths.js";
import { STATE_LAYOUT, ensureDir, ensureLogsDir } from "../host/paths.js";
import { redact } from "../config/preprocess.js";
import { CivmError, ConfigError, HostError } from "../errors/index.js";
import { trace } from "../errors/trace.js";
import { buildQemuArgs, DEFAULT_CMDLINE, DEVICE_IDS, SERCON_PORT_BYTES, type HostMount, type PortForward, type QemuPlan } from "./argv.js";
import { createOverlay } from "./disk.js";
import { ARCH_INFO, cmdlineFor } from "./arch.js";
import { renderConfigDrive, writeConfigDrive, type ConfigDriveEntry } from "./config-drive.js";
import { checkPortFree } from "./ports.js";
import { Registry, procIdentity, type ProcIdentity, type RegistryEntry } from "./registry.js";
import { CleanupStack } from "./cleanup.js";
import { Supervisor, EXIT_CODE_OF_REASON, type ExitReason, type StopReason } from "./supervisor.js";
import { ConsoleStream, NoBootWatch, tailLines } from "./console.js";
import { formatSeconds } from "./format.js";
import { DEFAULT_NETWORK, describeNetwork, type NetworkSpec } from "../net/policy.js";
import { hostResolvers, installTable, deleteTable, policyUnavailable, resolveAllow, sweepTables, reserveVmGid } from "../net/nft.js";
import { accessProblem, qemuUser, setprivArgs, type QemuUser } from "../net/identity.js";
import { processIdentity } from "../host/proc.js";
import { SNAPSHOT_FLAG, SNAPSHOT_POINT, unsettledBoot } from "./snapshot-point.js";

/** Names inside a VM's work dir. */
export const WORKDIR_LAYOUT = {
  overlay: "disk.qcow2",
  configIso: "config.iso",
  configStaging: "config",
  qmpSocket: "qmp.sock",
  /** QEMU listens here for the serial console; civm reads it and writes the log. */
  consoleSocket: "console.sock",
  /** SeaBIOS's serial console port, for firmware boots (see argv.ts). */
  serconPort: "sercon-port",
  /** QEMU sends a snapshot's migration stream here (civm listens and writes the memory file). */
  migrateSocket: "migrate.sock",
} as const;

/** What a run does with a snapshot (vm/snapshot.ts decides which, and owns the files). */
export type SnapshotRequest =
  | {
      /** Boot with civm.snapshot, save at the agent's snapshot point, quit. */
      mode: "make";
      /** Where the migration stream goes (civm writes it, 0600). */
      memoryPath: string;
      /**
       * Called after QEMU quit, before cleanup, with the VM's overlay (the snapshot's disk):
       * move it away. rtcLagMicros: how far QEMU's RTC lags the host's clock (measured).
       */
      onSaved: (overlayPath: string, info: { rtcLagMicros?: number }) => Promise<void>;
    }
  | {
      /** Restore instead of booting; a restore that fails boots cold (the reason is logged and given to onFailed). */
      mode: "restore";
      memoryPath: string;
      diskPath: string;
      /** E.g. "snapshot 1a2b3c4d (made 2026-12-07 00:10)" for log lines. */
      describe: string;
      /** The snapshot's RTC lag, passed to the guest in instance.json's `restore`. */
      rtcLagMicros?: number;
      onFailed?: (reason: string) => Promise<void> | void;
    };

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
   * A command QEMU is started under, outermost (after the switch to QEMU's user), which must
   * exec it in place (same pid): `["ip", "netns", "exec", NS]` puts QEMU, and so the guest's
   * user-mode network, in a network namespace (the tests' fake cloud services live in one).
   */
  qemuWrapper?: string[];
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
  /** Receives the serial console as it is written to the log (redacted). */
  onConsole?: (text: string) => void;
  /** Given a writer to the guest's serial console once civm is connected to it. */
  onConsoleInput?: (write: (data: Buffer) => void) => void;
  /** Called once the guest runs (QMP cont done): work that must not delay the boot starts here. */
  onRunning?: () => void;
  /** Extra registry fields. */
  meta?: Record<string, unknown>;
  /** The unprivileged user QEMU runs as when civm is root (default CIVM_QEMU_USER, else civm-qemu). */
  qemuUser?: string | undefined;
  /** What the guest may reach (default: spec.network, else restricted). */
  network?: NetworkSpec;
  /**
   * Files and folders of civm's own (inside the state dir) that QEMU must write during this
   * run (a disk being built, a results share): owned by QEMU's user while it runs, by root after.
   */
  qemuWritable?: string[];
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
  /** Start from a snapshot or make one (needs spec.kernel: a stored image booted directly). */
  snapshot?: SnapshotRequest;
  /**
   * Decides `snapshot` when run() starts (it may make the snapshot first: a cold boot of its
   * own VM). A stop() before the VM runs aborts `signal`: the make ends at once (its VM ended,
   * its files removed) and run() returns with start "none".
   */
  prepareSnapshot?: (signal: AbortSignal) => Promise<SnapshotRequest | undefined>;
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
  timings: { spawnedAt: number; exitedAt: number; doneAt: number; restoredAt?: number };
  /**
   * How the VM started: booted, restored from a snapshot, booted cold after a failed restore,
   * or not at all ("none": stopped while its snapshot was being made; nothing else was made,
   * consoleLog does not exist).
   */
  start: "boot" | "restore" | "boot-after-failed-restore" | "none";
  /** A "make" run: the snapshot was saved (memory file written, QEMU quit, disk handed to onSaved). */
  snapshotSaved?: boolean;
}

/** The one line civm prints when a VM has ended: "NAME: REASON after 12.3 s (exit N); console log: FILE". */
export function resultSummary(r: VmResult): string {
  return `${r.name}: ${r.reason} after ${formatSeconds(r.durationMs)} (exit ${r.exitCode})${r.start === "none" ? ", before it started" : `; console log: ${r.consoleLog}`}`;
}

function timestamp(d = new Date()): string {
  return d.toISOString().replace(/[-:]/g, "").replace(/\..*/, "").replace("T", "-");
}

export function newVmId(): string {
  return randomBytes(4).toString("hex");
}

/** Every secret (4+ characters; a multi-line one also line by line) becomes "***". */
export function redactAll(text: string, secrets: readonly string[]): string {
  return secrets.length ? redact(text, secrets) : text;
}

/** Gives QEMU's per-VM group write access to a file or folder tree of civm's own (a disk being built, a results share). */
async function grantTree(path: string, gid: number): Promise<void> {
  const st = await lstat(path);
  await chown(path, 0, gid);
  await chmod(path, (st.mode & 0o7777) | (st.isDirectory() ? 0o070 : 0o060));
  if (st.isDirectory()) for (const n of await readdir(path)) await grantTree(join(path, n), gid);
}

/** Takes a tree back after QEMU ran: root's again (files the guest wrote through 9p included), without group write. */
async function reclaimTree(path: string): Promise<void> {
  const st = await lstat(path);
  if (st.isSymbolicLink()) return void (await lchown(path, 0, 0));
  await chown(path, 0, 0);
  await chmod(path, st.mode & 0o7757 & ~0o020);
  if (st.isDirectory()) for (const n of await readdir(path)) await reclaimTree(join(path, n));
}

/**
 * How far QEMU's RTC lags the host's clock, in µs: its seconds tick at the sub-second point
 * QEMU started at (it takes the host's time in whole seconds), and a restore keeps that
 * phase. Read over QMP (the pc machines' `rtc-time`) until the second changes: the host's
 * time at the change minus the RTC's value. Undefined when it cannot be told (no rtc-time).
 */
async function measureRtcLag(sup: Supervisor): Promise<number | undefined> {
  const read = async (): Promise<{ rtc: number; at: number }> => {
    const before = performance.timeOrigin + performance.now();
    const t = await sup.execute<{ tm_year: number; tm_mon: number; tm_mday: number; tm_hour: number; tm_min: number; tm_sec: number }>("qom-get", { path: "/machine", property: "rtc-time" });
    const after = performance.timeOrigin + performance.now();
    return { rtc: Date.UTC(t.tm_year + 1900, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec), at: (before + after) / 2 };
  };
  const first = await read();
  let prev = first;
  const deadline = performance.now() + 1500;
  while (performance.now() < deadline) {
    await new Promise((r) => setTimeout(r, 1));
    const cur = await read();
    if (cur.rtc !== first.rtc) {
      const lagMs = (prev.at + cur.at) / 2 - cur.rtc;
      return lagMs > -50 && lagMs < 1050 ? Math.round(Math.min(999.999, Math.max(0, lagMs)) * 1000) : undefined;
    }
    prev = cur;
  }
  return undefined;
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
  /** Aborted by a stop() before QEMU exists: ends prepareSnapshot's work (a snapshot being made). */
  private readonly beforeStart = new AbortController();

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
    else {
      this.pendingStop = { reason, force };
      this.beforeStart.abort(new CivmError(reason === "signal" ? "signal" : "internal", `${this.req.spec.name} was stopped (${reason}) before it started`));
    }
  }

  forwards(): PortForward[] {
    const { spec } = this.req;
    const fw: PortForward[] = [];
    if (spec.sshPort !== undefined) fw.push({ proto: "tcp", hostAddr: this.req.sshBind ?? "127.0.0.1", hostPort: spec.sshPort, guestPort: 22 });
    return fw.concat(this.req.extraForwards ?? []);
  }

  plan(): QemuPlan {
    const { spec } = this.req;
    const arch = spec.arch ?? "x86_64";
    // Disks that boot themselves: SeaBIOS on x86_64 (its screen mirrored to the serial
    // port), UEFI on arm64 (virt has no BIOS).
    const firmware = spec.kernel ? undefined : ARCH_INFO[arch].firmware?.path;
    return {
      binary: this.req.qemuBinary ?? ARCH_INFO[arch].qemuBinary,
      name: spec.name,
      ...(arch !== "x86_64" ? { arch } : {}),
      ...(firmware ? { firmware } : {}),
      accel: this.req.accel,
      machine: spec.machine,
      cpus: spec.cpus,
      ...(spec.cpuModel !== undefined ? { cpuModel: spec.cpuModel } : {}),
      ramBytes: spec.ramBytes,
      overlay: this.req.directDisk?.path ?? join(this.workDir, WORKDIR_LAYOUT.overlay),
      overlayFormat: this.req.directDisk?.format ?? "qcow2",
      configIso: join(this.workDir, WORKDIR_LAYOUT.configIso),
      qmpSocket: join(this.workDir, WORKDIR_LAYOUT.qmpSocket),
      consoleSocket: join(this.workDir, WORKDIR_LAYOUT.consoleSocket),
      ...(spec.kernel || arch !== "x86_64" ? {} : { serconPortFile: join(this.workDir, WORKDIR_LAYOUT.serconPort) }),
      forwards: this.forwards(),
      mounts: this.req.mounts ?? [],
      kernel: spec.kernel ? { path: spec.kernel, initrd: spec.initrd, cmdline: cmdlineFor(arch, spec.cmdline ?? DEFAULT_CMDLINE) } : undefined,
      extraArgs: spec.qemuArgs,
      network: this.network().mode === "none" ? "none" : "user",
    };
  }

  /** The plan of a snapshot's VM (making or restoring): civm.snapshot, an empty CD drive, a vmgenid device. */
  snapshotPlan(restore: boolean): QemuPlan {
    const p = this.plan();
    if (!p.kernel) throw new CivmError("internal", "a snapshot needs direct kernel boot");
    return {
      ...p,
      kernel: { ...p.kernel, cmdline: `${p.kernel.cmdline} ${SNAPSHOT_FLAG}` },
      configIso: undefined,
      emptyCd: true,
      vmgenid: randomUUID(),
      ...(restore ? { incoming: "fd:3" } : {}),
    };
  }

  network(): NetworkSpec {
    return this.req.network ?? this.req.spec.network ?? DEFAULT_NETWORK;
  }

  /**
   * Refuses paths QEMU's user could not open (by mode bits), after making civm's own folders
   * on the way enterable (the state dir may be a 0700 temp dir).
   */
  private async checkQemuAccess(user: QemuUser, gid: number, plan: QemuPlan): Promise<void> {
    const { spec, paths } = this.req;
    const state = resolve(paths.stateDir);
    for (const dir of [state, join(state, STATE_LAYOUT.vms)]) {
      const st = statSync(dir);
      if ((st.mode & 0o001) === 0) await chmod(dir, (st.mode & 0o777) | 0o711);
    }
    const wants: { path: string; want: "r" | "rw" | "rx" | "rwx"; what: string }[] = [];
    if (!this.req.directDisk) wants.push({ path: spec.image, want: "r", what: "image" });
    if (spec.kernel) wants.push({ path: spec.kernel, want: "r", what: "kernel" });
    if (spec.initrd) wants.push({ path: spec.initrd, want: "r", what: "initrd" });
    for (const m of plan.mounts) wants.push({ path: m.path, want: m.readOnly ? "rx" : "rwx", what: `host mount ${m.tag}` });
    const gids = [gid, ...user.groups];
    const owned = new Set((this.req.qemuWritable ?? []).map((p) => resolve(p)));
    for (const w of wants) {
      if (owned.has(resolve(w.path))) continue;
      const why = accessProblem(resolve(w.path), user.uid, gids, w.want, statSync);
      if (!why) continue;
      throw new HostError(
        `${spec.source.file}: instance "${spec.name}": QEMU runs as the unprivileged user ${user.name} (uid ${user.uid}) and cannot use the ${w.what} ${w.path}: ${why}. ` +
          (w.want.includes("w")
            ? `Make the folder writable by ${user.name} (chown ${user.name} or setfacl -m u:${user.name}:rwx), mount it read-only, or run QEMU as the folder's owner with CIVM_QEMU_USER.`
            : `Make it readable by ${user.name} (chmod o+r on the file and o+x on the folders above it, or keep images under ${state}), or run QEMU as another user with CIVM_QEMU_USER.`),
      );
    }
  }

  /**
   * Saves a snapshot: pause, QEMU's migration stream over a unix socket civm listens on
   * (QEMU's sandbox forbids exec: URIs) into `memoryPath` (0600), then `quit`.
   */
  private async saveSnapshot(sup: Supervisor, memoryPath: string, gid: number | undefined, log: (l: string) => void, info: { rtcLagMicros?: number }): Promise<void> {
    const t0 = performance.now();
    const { createServer } = await import("node:net");
    const { createWriteStream } = await import("node:fs");
    const { pipeline } = await import("node:stream/promises");
    await sup.execute("stop");
    const lag = await measureRtcLag(sup).catch(() => undefined);
    if (lag !== undefined) info.rtcLagMicros = lag;
    const sockPath = join(this.workDir, WORKDIR_LAYOUT.migrateSocket);
    const server = createServer();
    const received = new Promise<void>((resolveP, rejectP) => {
      server.once("connection", (conn) => {
        server.close();
        pipeline(conn, createWriteStream(memoryPath, { mode: 0o600 })).then(resolveP, rejectP);
      });
      server.once("error", rejectP);
    });
    received.catch(() => undefined);
    await new Promise<void>((resolveP, rejectP) => {
      server.once("error", rejectP);
      server.listen(sockPath, () => resolveP());
    });
    try {
      if (gid !== undefined) {
        await chown(sockPath, 0, gid);
        await chmod(sockPath, 0o660);
      }
      // The VM is paused: no need to throttle (QEMU's default is 128 MiB/s).
      await sup.execute("migrate-set-parameters", { "max-bandwidth": 64 * 1024 ** 3 });
      await sup.execute("migrate", { uri: `unix:${sockPath}` });
      for (;;) {
        const m = await sup.execute<{ status?: string; "error-desc"?: string }>("query-migrate");
        if (m.status === "completed") break;
        if (m.status === "failed" || m.status === "cancelled") throw new Error(`QEMU's migration ${m.status}${m["error-desc"] ? `: ${m["error-desc"]}` : ""}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      await received;
    } finally {
      server.close();
      await rm(sockPath, { force: true });
    }
    log(`${this.req.spec.name}: snapshot saved in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    await sup.quit("stopped");
  }

  /** After `-incoming`: waits for the stream to be loaded, then inserts the config disc (the guest is still paused). */
  private async finishRestore(sup: Supervisor, isoPath: string): Promise<void> {
    const deadline = Date.now() + 120_000;
    for (;;) {
      const st = await sup.execute<{ status?: string }>("query-status");
      if (st.status !== "inmigrate") {
        if (st.status !== "paused" && st.status !== "prelaunch") throw new Error(`QEMU is ${st.status ?? "in an unknown state"} after loading the snapshot`);
        break;
      }
      if (Date.now() > deadline) throw new Error("loading the snapshot took more than 120 s");
      await new Promise((r) => setTimeout(r, 10));
    }
    await sup.execute("blockdev-change-medium", { id: DEVICE_IDS.configCd, filename: isoPath, format: "raw", "read-only-mode": "read-only" });
  }

  async run(): Promise<VmResult> {
    const started = performance.now();
    const { req } = this;
    const { spec } = req;
    const log = (l: string) => req.log(redactAll(l, req.secrets ?? []));
    const cleanup = new CleanupStack();
    const registry = new Registry(req.paths.stateDir);
    let keep = req.keep ?? false;
    const secrets = req.secrets ?? [];
    let consoleStream: ConsoleStream | undefined;
    let sweep: Promise<unknown> | undefined;
    try {
      trace("vm: start");
      for (const f of this.forwards()) await checkPortFree(f.hostAddr, f.hostPort, f.proto, `port forward for ${spec.name}`);
      let snap = req.snapshot;
      if (!snap && req.prepareSnapshot) {
        try {
          snap = await req.prepareSnapshot(this.beforeStart.signal);
        } catch (e) {
          if (!this.beforeStart.signal.aborted) throw e;
        }
        // Stopped while the snapshot was prepared (made): nothing of this VM exists yet.
        if (this.beforeStart.signal.aborted) {
          const reason = this.pendingStop?.reason ?? "stopped";
          const now = performance.now();
          return {
            id: this.id, name: spec.name, reason, exitCode: EXIT_CODE_OF_REASON[reason], durationMs: now - started, mediumRemoved: false,
            consoleLog: this.consoleLog, workDir: this.workDir, workDirKept: false, start: "none",
            detail: `${spec.name} was stopped while its image's snapshot was being made, before it started: the snapshot's VM was ended and its unfinished files removed; nothing else was started.`,
            timings: { spawnedAt: now, exitedAt: now, doneAt: now },
          };
        }
      }
      const restoring = snap?.mode === "restore";
      let plan = snap ? this.snapshotPlan(restoring) : this.plan();
      const isoPath = join(this.workDir, WORKDIR_LAYOUT.configIso);
      for (const sock of [plan.qmpSocket, plan.consoleSocket]) {
        if (Buffer.byteLength(sock) > 107) throw new HostError(`the socket path ${sock} is longer than a unix socket allows (107 bytes); use a shorter --state-dir`);
      }
      ensureDir(join(req.paths.stateDir, STATE_LAYOUT.vms), 0o700);
      const tightened = ensureLogsDir(req.paths.logsDir);
      if (tightened) log(`logs dir ${req.paths.logsDir}: ${tightened}`);

      // Recorded before it is taken: a crash from here on is reconciled by the next start.
      const entry = {
        id: this.id, name: spec.name, ownerPid: process.pid, qemuPid: undefined as number | undefined,
        sshPort: spec.sshPort, sshBind: spec.sshPort !== undefined ? (req.sshBind ?? "127.0.0.1") : undefined,
        startedAt: new Date().toISOString(), workDir: this.workDir, consoleLog: this.consoleLog, keep, meta: req.meta,
        state: "starting" as "starting" | "running",
        net: undefined as RegistryEntry["net"],
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

      // The network policy: refused rather than skipped when it cannot be applied.
      const network = this.network();
      const where = `${spec.source.file}: instance "${spec.name}"`;
      if (network.mode === "restricted") {
        const why = policyUnavailable();
        if (why) {
          throw new HostError(`${where}: ${why}. civm does not start a VM it cannot fence: run civm as root, or set network: unrestricted (instances, pools; --network unrestricted for dev VMs) to accept a guest that reaches this host and its networks.`);
        }
      } else if (network.mode === "none" && this.forwards().length) {
        throw new ConfigError(`${where}: network is "none" but the VM has port forwards (${this.forwards().map((f) => `${f.hostAddr}:${f.hostPort}`).join(", ")}); a forward needs the network device: remove ssh-port/-p or use the restricted network`);
      } else if (network.mode === "unrestricted") {
        log(`warning: ${spec.name}: network: unrestricted: the guest can reach this host's own services (through 10.0.2.2), its private networks and a cloud's metadata service (169.254.169.254)`);
      }
      const user = process.getuid?.() === 0 ? await qemuUser(req.qemuUser) : undefined;
      // QEMU's own group: reserved now, its nftables table made while QEMU starts (paused).
      const reserved = user ? await reserveVmGid() : undefined;
      if (reserved) cleanup.push("group id reservation", () => reserved.release());
      const allowP = network.mode === "restricted" ? resolveAllow(network.allow, where) : Promise.resolve([]);
      // Before "QEMU" on the stack, so it runs after QEMU is gone.
      let fence: { table: string; gid: number } | undefined;
      cleanup.push("network policy", async () => {
        if (fence) await deleteTable(fence.table);
      });
      // Civm writes the console log itself, redacted (QEMU only sees a socket in the work dir).
      let noBoot: string | undefined;
      const noBootWatch = plan.kernel ? undefined : new NoBootWatch();
      // A snapshot being made is saved when the agent says it waits for its disc.
      let snapshotSeen = "";
      let saving: Promise<void> | undefined;
      let saved = false;
      const savedInfo: { rtcLagMicros?: number } = {};
      consoleStream = new ConsoleStream({
        logPath: this.consoleLog,
        redact: (t) => redactAll(t, secrets),
        longestSecret: Math.max(0, ...secrets.map((x) => x.length)),
        onText: (t) => {
          req.onConsole?.(t);
          if (snap?.mode === "make" && !saving) {
            snapshotSeen = (snapshotSeen + t).slice(-4096);
            if (snapshotSeen.includes(SNAPSHOT_POINT) && this.supervisor) {
              const sup = this.supervisor;
              // The agent says when the boot had not settled (a loaded host): every restore redoes that work.
              const unsettled = unsettledBoot(snapshotSeen);
              if (unsettled) log(`${spec.name}: warning: ${unsettled}; to make it again when the host is quieter, delete the image's snapshots/ folder (docs/images.md, Snapshots)`);
              saving = this.saveSnapshot(sup, snap.memoryPath, reserved?.gid, log, savedInfo).then(
                () => {
                  saved = true;
                },
                (e: Error) => {
                  log(`${spec.name}: saving the snapshot failed: ${e.message}`);
                  sup.stop("stopped", { force: true });
                },
              );
            }
          }
          const m = noBootWatch?.push(t);
          if (m === undefined || noBoot !== undefined) return;
          noBoot = m;
          log(`${spec.name}: the firmware found nothing to boot ("${m}"); ending QEMU`);
          this.supervisor?.stop("no-boot", { force: true });
        },
      });

      // Independent: overlay, config drive, console log and the nftables table are made at the same time.
      await allSettledOrThrow([
        consoleStream.openLog(),
        plan.serconPortFile ? writeFile(plan.serconPortFile, SERCON_PORT_BYTES, { mode: 0o644 }) : Promise.resolve(),
        req.directDisk
          ? Promise.resolve()
          : snap?.mode === "restore"
            ? createOverlay({ base: snap.diskPath, overlay: plan.overlay, sizeBytes: undefined, where })
            : createOverlay({ base: spec.image, overlay: plan.overlay, sizeBytes: spec.rootDiskBytes, where }),
        // A snapshot being made never gets a disc (the configuration is never in a snapshot).
        snap?.mode === "make" ? Promise.resolve() : writeConfigDrive(req.configDrive ?? renderConfigDrive(spec.name, config, snap?.mode === "restore" ? { ...(snap.rtcLagMicros !== undefined ? { rtcLagMicros: snap.rtcLagMicros } : {}) } : undefined), isoPath, join(this.workDir, WORKDIR_LAYOUT.configStaging)),
        allowP,
      ]);
      trace("vm: overlay and config drive ready");

      const gid = reserved?.gid;
      if (user) {
        // Every VM's QEMU has a group of its own (the fence's key when restricted); QEMU's
        // files are root's and that group's, so one QEMU cannot open another VM's files even
        // though all run as the same user.
        await this.checkQemuAccess(user, gid!, plan);
        const grants: [string, number][] = [[this.workDir, 0o770], ...(req.directDisk ? [] : [[plan.overlay, 0o660] as [string, number]])];
        if (snap?.mode !== "make") grants.push([isoPath, 0o640]);
        if (plan.serconPortFile) grants.push([plan.serconPortFile, 0o640]);
        await Promise.all(grants.map(async ([p, mode]) => {
          await chown(p, 0, gid!);
          await chmod(p, mode);
        }));
        for (const p of req.qemuWritable ?? []) {
          await grantTree(p, gid!);
          cleanup.push(`ownership of ${p}`, () => reclaimTree(p));
        }
      }
      const stream = consoleStream;
      let fenceP: Promise<unknown> | undefined;
      let restoredAt: number | undefined;
      // Spawns QEMU for `plan` (paused), connects QMP and the console, fences the network, lets
      // the guest run. A restore (memFd) that fails before the guest runs returns a dead or
      // killed supervisor that has not started.
      const launch = async (qplan: QemuPlan, memFd: number | undefined): Promise<{ sup: Supervisor; error?: Error }> => {
        let binary = qplan.binary;
        let args = buildQemuArgs(qplan);
        if (user) {
          args = [...setprivArgs(user, gid!), binary, ...args];
          binary = "setpriv";
        }
        if (req.qemuWrapper?.length) {
          args = [...req.qemuWrapper.slice(1), binary, ...args];
          binary = req.qemuWrapper[0]!;
        }
        let consoleP: Promise<void> | undefined;
        const sup = new Supervisor({
          binary, args, timeoutSeconds: spec.timeoutSeconds, graceSeconds: req.graceSeconds, log,
          ...(memFd !== undefined ? { fd3: memFd } : {}),
          // The console is connected, and the network fenced, before the guest runs; a
          // restored guest gets its disc before it runs too.
          beforeCont: async (s) => {
            await Promise.all([consoleP, fenceP]);
            if (memFd !== undefined) {
              await this.finishRestore(s, isoPath);
              restoredAt = performance.now();
            }
          },
        });
        this.supervisor = sup;
        cleanup.push("QEMU", () => sup.kill());
        try {
          const startP = sup.start(qplan.qmpSocket);
          // In parallel with the QMP connect (QEMU is spawned synchronously by start()).
          consoleP = stream.connect(qplan.consoleSocket, () => sup.alive);
          consoleP.then(() => req.onConsoleInput?.((d) => stream.write(d)), () => undefined);
          if (network.mode === "restricted" && !fenceP) {
            fenceP = allowP
              .then((allow) => installTable({ gid: gid!, allow, resolvers: hostResolvers(), comment: `civm vm=${this.id} owner=${processIdentity(process.pid) ?? process.pid}` }))
              .then((f) => {
                // Recorded with the entry's next write (once QMP answers); a crash before
                // that leaves a table the next civm sweeps by its owner comment.
                fence = f;
                entry.net = { mode: network.mode, table: f.table, gid: f.gid };
              });
            fenceP.catch(() => undefined);
          }
          entry.qemuPid = sup.pid;
          // Start time now (kept across exec); the command line once QMP answers (QEMU has exec'd).
          entry.qemu = sup.pid ? procIdentity(sup.pid, { cmdline: false }) : undefined;
          await registry.put(entry);
          await startP;
          entry.qemu = sup.pid ? (procIdentity(sup.pid) ?? entry.qemu) : undefined;
          entry.state = "running";
          await registry.put(entry);
          log(`${spec.name}: running (pid ${sup.pid}, ${req.accel}, network ${describeNetwork(network)}${spec.sshPort !== undefined ? `, ssh ${entry.sshBind}:${spec.sshPort}` : ""}${memFd !== undefined && snap?.mode === "restore" ? `, restored from ${snap.describe}` : ""}); console: ${this.consoleLog}`);
          return { sup };
        } catch (e) {
          if (memFd !== undefined && !sup.hasStarted) {
            sup.kill();
            return { sup, error: e as Error };
          }
          if (sup.alive) throw e; // QMP trouble with a live QEMU is civm's failure
          // QEMU died while starting: fall through to its result.
          return { sup };
        }
      };
      let start: VmResult["start"] = "boot";
      let sup: Supervisor;
      if (snap?.mode === "restore") {
        const memFd = openSync(snap.memoryPath, "r");
        let attempt: { sup: Supervisor; error?: Error };
        try {
          attempt = await launch(plan, memFd);
        } finally {
          closeSync(memFd); // QEMU holds its own copy
        }
        sup = attempt.sup;
        if (sup.hasStarted) start = "restore";
        else {
          const failed = await sup.wait();
          const stderr = failed.stderrTail.trim().split("\n").filter((l) => l.trim()).slice(-3).join("; ");
          const why = redactAll(stderr || attempt.error?.message || "QEMU ended during the restore", secrets);
          log(`${spec.name}: restoring ${snap.describe} failed (${why}); booting cold instead`);
          await snap.onFailed?.(why);
          plan = this.plan();
          await rm(plan.overlay, { force: true });
          await createOverlay({ base: spec.image, overlay: plan.overlay, sizeBytes: spec.rootDiskBytes, where });
          if (user) {
            await chown(plan.overlay, 0, gid!);
            await chmod(plan.overlay, 0o660);
          }
          start = "boot-after-failed-restore";
          sup = (await launch(plan, undefined)).sup;
        }
      } else {
        sup = (await launch(plan, undefined)).sup;
      }
      // Tables of VMs whose civm died: swept off the start path.
      if (sup.hasStarted) {
        sweep = sweepTables(log).catch((e: Error) => log(`warning: sweeping stale network policy tables: ${e.message}`));
        if (this.pendingStop) sup.stop(this.pendingStop.reason, { force: this.pendingStop.force });
        req.onRunning?.();
      }
      const r = await sup.wait();
      await sweep;
      await saving;
      // The saved VM's overlay is the snapshot's disk: handed over before cleanup removes the work dir.
      if (snap?.mode === "make" && saved) await snap.onSaved(plan.overlay, savedInfo);
      // Everything QEMU wrote is in the log before the result is returned.
      const writeErr = await stream.finish();
      if (writeErr) log(`warning: the console log ${this.consoleLog} is incomplete: ${writeErr.message}`);
      // QEMU may have ended by itself (e.g. a firmware reboot) before civm's stop.
      if (noBoot !== undefined && (r.reason === "reboot" || r.reason === "qemu-failed")) r.reason = "no-boot";
      let detail: string | undefined;
      if (r.reason === "no-boot") {
        detail =
          `The firmware found nothing to boot ("${noBoot ?? "no bootable device"}"): ${req.directDisk?.path ?? spec.image} has no bootloader. ` +
          `Check that the image is bootable, or boot a kernel directly ("kernel"/"initrd", or a stored image with a kernel and no "firmware-boot").`;
      } else if (r.reason === "qemu-failed") {
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
        timings: { spawnedAt: r.spawnedAt, exitedAt: r.exitedAt, doneAt: performance.now(), ...(restoredAt !== undefined ? { restoredAt } : {}) },
        start,
        ...(snap?.mode === "make" ? { snapshotSaved: saved } : {}),
      };
    } catch (e) {
      if (this.supervisor?.alive) {
        this.supervisor.kill();
        await this.supervisor.wait().catch(() => undefined);
      }
      await consoleStream?.finish(500).catch(() => undefined);
      const err = await cleanup.run();
      if (err) log(`warning: ${err.message}`);
      if (e instanceof CivmError) throw e;
      throw new CivmError("internal", `civm failed while running ${spec.name}: ${redactAll((e as Error).message, req.secrets ?? [])}`, { cause: e });
    }
  }
}
