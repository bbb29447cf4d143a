// Supervises one running QEMU through QMP: removes the config disc when the guest opens
// the tray, asks for an ACPI power-down at the timeout or on request, escalates to
// SIGTERM/SIGKILL after a grace period, and decides why the VM ended.
import { spawn, type ChildProcess } from "node:child_process";
import { EventEmitter } from "node:events";
import { QmpClient, type QmpEvent } from "./qmp.js";
import { DEVICE_IDS } from "./argv.js";
import { trace } from "../errors/trace.js";
import { inheritNiceInAutogroup } from "../host/autogroup.js";

export type ExitReason = "poweroff" | "timeout" | "signal" | "reboot" | "qemu-failed" | "stopped" | "no-boot";

/** Exit status of `civm run` for each reason (see docs/exit-codes.md). */
export const EXIT_CODE_OF_REASON: Record<ExitReason, number> = {
  poweroff: 0,
  timeout: 3,
  "qemu-failed": 4,
  signal: 5,
  reboot: 6,
  stopped: 5,
  "no-boot": 9,
};

/** no-boot: the firmware found nothing to boot (seen on the console); QEMU is ended at once. */
export type StopReason = "timeout" | "signal" | "stopped" | "no-boot";

export interface SupervisorOptions {
  binary: string;
  args: string[];
  timeoutSeconds: number;
  graceSeconds: number;
  /** Called for progress and warnings (one line each). */
  log: (line: string) => void;
  /** Awaited after QMP connects and before `cont` (the guest has not run yet). */
  beforeCont?: (sup: Supervisor) => Promise<void>;
  /** An open file QEMU inherits as fd 3 (a snapshot's memory file for `-incoming fd:3`). */
  fd3?: number;
}

export interface SupervisorResult {
  reason: ExitReason;
  qemuExitCode: number | null;
  qemuSignal: NodeJS.Signals | null;
  shutdownReason: string | undefined;
  mediumRemoved: boolean;
  stderrTail: string;
  /** performance.now() when QEMU was spawned and when it exited. */
  spawnedAt: number;
  exitedAt: number;
}

const STDERR_KEEP = 16 * 1024;
/** After SIGTERM, how long QEMU gets before SIGKILL. */
export const TERM_TO_KILL_MS = 5_000;
/** During the grace period, the ACPI power button is pressed again this often. */
const POWERDOWN_REPEAT_MS = 5_000;

/** Events: "tray" (open: boolean), "medium-removed" (), "qmp-event" (QmpEvent), "running" (). */
export class Supervisor extends EventEmitter {
  private child: ChildProcess | undefined;
  private qmp: QmpClient | undefined;
  private stderr = "";
  private stopReason: StopReason | undefined;
  private shutdownReason: string | undefined;
  private mediumRemoved = false;
  private timers: NodeJS.Timeout[] = [];
  private exited: Promise<SupervisorResult> | undefined;
  private spawnedAt = 0;
  private killStage = 0;
  /** Set once `cont` is done: tray events before it are civm's own (a disc inserted over QMP). */
  private started = false;

  constructor(private readonly o: SupervisorOptions) {
    super();
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Whether the guest was let run (`cont` done). */
  get hasStarted(): boolean {
    return this.started;
  }

  get alive(): boolean {
    return !!this.child && this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Spawns QEMU paused, connects QMP, then lets the guest run. Resolves once running. */
  async start(qmpSocket: string): Promise<void> {
    this.spawnedAt = performance.now();
    // A session of its own: a Ctrl-C in the terminal (or a signal to civm's process group)
    // reaches civm only, which then stops the VM the documented way.
    const stdio: ("ignore" | "pipe" | number)[] = ["ignore", "ignore", "pipe"];
    if (this.o.fd3 !== undefined) stdio.push(this.o.fd3);
    const child = spawn(this.o.binary, this.o.args, { stdio, detached: true });
    inheritNiceInAutogroup(child.pid);
    trace("vm: QEMU spawned");
    this.child = child;
    child.stderr!.setEncoding("utf8").on("data", (d: string) => {
      this.stderr = (this.stderr + d).slice(-STDERR_KEEP);
    });
    this.exited = new Promise((resolve) => {
      let spawnError: Error | undefined;
      child.once("error", (e) => (spawnError = e));
      child.once("close", (code, signal) => {
        for (const t of this.timers) clearTimeout(t);
        this.qmp?.close();
        if (spawnError) this.stderr += `\n${spawnError.message}`;
        resolve(this.result(code, signal));
      });
    });
    const qmp = await QmpClient.connect(qmpSocket, { timeoutMs: 30_000, isAlive: () => this.alive });
    this.qmp = qmp;
    qmp.on("event", (ev: QmpEvent) => this.onEvent(ev));
    await this.o.beforeCont?.(this);
    await qmp.execute("cont");
    this.started = true;
    if (this.o.timeoutSeconds > 0) {
      this.timers.push(setTimeout(() => this.stop("timeout"), this.o.timeoutSeconds * 1000));
    }
    this.emit("running");
  }

  private onEvent(ev: QmpEvent): void {
    this.emit("qmp-event", ev);
    if (ev.event === "SHUTDOWN") {
      this.shutdownReason = String(ev.data?.reason ?? "unknown");
    } else if (ev.event === "DEVICE_TRAY_MOVED" && this.started) {
      const open = ev.data?.["tray-open"] === true;
      const id = String(ev.data?.id ?? "");
      this.emit("tray", open);
      if (open && (id === DEVICE_IDS.configCd || id.includes(`/${DEVICE_IDS.configCd}/`))) void this.removeMedium();
    }
  }

  /** The guest opened the tray: take the disc out so nothing later in the guest can read it. */
  private async removeMedium(): Promise<void> {
    const qmp = this.qmp;
    if (!qmp || this.mediumRemoved) return;
    try {
      await qmp.execute("blockdev-remove-medium", { id: DEVICE_IDS.configCd });
      const blocks = await qmp.execute<{ qdev?: string; inserted?: unknown }[]>("query-block");
      const dev = blocks.find((b) => b.qdev === DEVICE_IDS.configCd || b.qdev?.includes(`/${DEVICE_IDS.configCd}/`));
      if (dev && dev.inserted === undefined) {
        this.mediumRemoved = true;
        this.o.log("guest ejected the config disc; medium removed (confirmed by query-block)");
        this.emit("medium-removed");
      } else {
        this.o.log("warning: the config disc is still inserted after blockdev-remove-medium");
      }
    } catch (e) {
      if (this.alive) this.o.log(`warning: could not remove the config disc: ${(e as Error).message}`);
    }
  }

  /**
   * Asks the guest to power down (ACPI) and ends QEMU after the grace period. A second
   * call (e.g. a second Ctrl-C) with force ends QEMU at once.
   */
  stop(reason: StopReason, opts: { force?: boolean } = {}): void {
    if (!this.alive) return;
    if (this.stopReason === undefined) this.stopReason = reason;
    if (opts.force) {
      this.escalate();
      return;
    }
    if (this.killStage > 0) return;
    this.killStage = 1;
    this.o.log(`${reason === "timeout" ? `timeout (${this.o.timeoutSeconds} s)` : "stop requested"}: asking the guest to power off (ACPI), ${this.o.graceSeconds} s grace`);
    this.powerdown();
    // A press the guest is not yet listening for (still booting) is lost: press again.
    const repeat = setInterval(() => this.powerdown(), POWERDOWN_REPEAT_MS);
    this.timers.push(repeat as unknown as NodeJS.Timeout);
    this.timers.push(setTimeout(() => this.escalate(), this.o.graceSeconds * 1000));
  }

  private powerdown(): void {
    if (this.alive && this.killStage === 1) this.qmp?.execute("system_powerdown").catch(() => this.escalate());
  }

  /** SIGTERM (QEMU exits cleanly), then SIGKILL if it does not. */
  private escalate(): void {
    if (!this.alive || this.killStage >= 2) {
      if (this.alive && this.killStage >= 2) this.child?.kill("SIGKILL");
      return;
    }
    this.killStage = 2;
    this.child?.kill("SIGTERM");
    this.timers.push(setTimeout(() => this.child?.kill("SIGKILL"), TERM_TO_KILL_MS));
  }

  /** A QMP command (the connection must be up: after start() connected). */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (!this.qmp) return Promise.reject(new Error(`QMP is not connected (${command})`));
    return this.qmp.execute<T>(command, args);
  }

  /** Ends QEMU through QMP `quit` (a saved snapshot's VM): the result's reason is `reason`. */
  async quit(reason: StopReason): Promise<void> {
    if (this.stopReason === undefined) this.stopReason = reason;
    await this.execute("quit").catch(() => this.escalate());
  }

  /** Ends QEMU now (used on errors inside civm). */
  kill(): void {
    if (this.alive) this.child?.kill("SIGKILL");
  }

  wait(): Promise<SupervisorResult> {
    if (!this.exited) return Promise.reject(new Error("QEMU was not started"));
    return this.exited;
  }

  private result(code: number | null, signal: NodeJS.Signals | null): SupervisorResult {
    let reason: ExitReason;
    if (this.stopReason) reason = this.stopReason;
    else if (this.shutdownReason === "guest-shutdown") reason = "poweroff";
    else if (this.shutdownReason === "guest-reset" || this.shutdownReason === "guest-panic") reason = "reboot";
    else reason = "qemu-failed";
    return {
      reason,
      qemuExitCode: code,
      qemuSignal: signal,
      shutdownReason: this.shutdownReason,
      mediumRemoved: this.mediumRemoved,
      stderrTail: this.stderr,
      spawnedAt: this.spawnedAt,
      exitedAt: performance.now(),
    };
  }
}
