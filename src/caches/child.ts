// A cache program (docker-registry, squid) as a supervised child of civm serve: started
// through setpriv (as the caches' unprivileged user when civm is root, with a parent-death
// signal so it ends with civm), health-checked, restarted with backoff when it exits or
// stops answering, stopped with the daemon. Its pid, start time and command line are
// recorded in the state dir, so the next civm ends a copy a killed civm left behind
// (sweepChildren) before starting its own.
import { spawn, type ChildProcess } from "node:child_process";
import { readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { processIdentity, processStartTime } from "../host/proc.js";
import type { CacheState } from "./types.js";

export interface ChildUser {
  uid: number;
  gid: number;
}

export interface ChildSpec {
  /** The cache's name, for messages ("registry/docker.io"). */
  name: string;
  /** Absolute path of the program. */
  program: string;
  args: string[];
  /** Added to a minimal environment (PATH, LANG); secrets travel here, never in argv or files. */
  env?: Record<string, string>;
  /** Runs as this user (civm as root); undefined: as civm's own user. */
  user: ChildUser | undefined;
  /** Where the running copy is recorded (pid, start time, command line). */
  recordFile: string;
  /** undefined when the program answers as it should; otherwise why not. */
  check: () => Promise<string | undefined>;
  /** Each line the program prints (stdout and stderr). */
  onLine?: (line: string) => void;
  /** Runs before every start (e.g. squid -z on a new cache folder); a throw is a failed start. */
  prepare?: () => Promise<void>;
}

export interface SupervisorTiming {
  /** A start that does not answer its check within this long has failed (ms). */
  startTimeoutMs: number;
  /** Between health checks of a running copy (ms). */
  checkIntervalMs: number;
  /** Failed checks in a row after which a running copy is killed and restarted. */
  failedChecks: number;
  /** Backoff before the n-th restart in a row: min(base * 2^(n-1), max) (ms). */
  backoffBaseMs: number;
  backoffMaxMs: number;
  /** Up this long resets the backoff (ms). */
  stableMs: number;
  /** SIGTERM → SIGKILL on stop (ms). */
  stopGraceMs: number;
}

export const DEFAULT_TIMING: SupervisorTiming = {
  startTimeoutMs: 30_000,
  checkIntervalMs: 10_000,
  failedChecks: 3,
  backoffBaseMs: 1000,
  backoffMaxMs: 120_000,
  stableMs: 60_000,
  stopGraceMs: 10_000,
};

/** Backoff before restart number `n` (1-based) in a row. */
export function restartDelay(n: number, t: Pick<SupervisorTiming, "backoffBaseMs" | "backoffMaxMs">): number {
  return Math.min(t.backoffMaxMs, t.backoffBaseMs * 2 ** Math.max(0, Math.min(n - 1, 30)));
}

/** What the record file holds. */
export interface ChildRecord {
  pid: number;
  /** /proc/<pid>/stat field 22. */
  start: number;
  /** The program's command line once setpriv has exec'd it. */
  argv: string[];
  /** The civm that started it ("pid:start"). */
  owner: string | undefined;
}

const NOTABLE = /fatal|error|panic|cannot|unable|denied|address already in use|no such/i;

/** Programs a record may name; a record naming anything else is not acted on. */
export const CACHE_PROGRAMS = ["docker-registry", "registry", "squid"];

export interface ChildEvents {
  /** State changes, with the reason (the program's last words, the failed check). */
  onState?: (state: CacheState, message: string | undefined) => void;
  log?: (level: "info" | "warn" | "error", fields: Record<string, unknown>, msg: string) => void;
}

/** setpriv's arguments: the user (when given), no capabilities, no_new_privs, ended with civm. */
export function childArgv(spec: Pick<ChildSpec, "program" | "args" | "user">): string[] {
  const who = spec.user ? [`--reuid=${spec.user.uid}`, `--regid=${spec.user.gid}`, `--groups=${spec.user.gid}`, "--inh-caps=-all", "--bounding-set=-all"] : [];
  return [...who, "--no-new-privs", "--pdeathsig", "TERM", "--", spec.program, ...spec.args];
}

export class SupervisedChild {
  private proc: ChildProcess | undefined;
  private stopping = false;
  private restartTimer: NodeJS.Timeout | undefined;
  private checkTimer: NodeJS.Timeout | undefined;
  private inARow = 0;
  private upSince: number | undefined;
  private failedChecksNow = 0;
  private readonly lastLines: string[] = [];
  /** Lines that look like the reason it failed (a panic's first line, FATAL, ...). */
  private readonly notable: string[] = [];
  private exited: Promise<void> = Promise.resolve();
  state: CacheState = "starting";
  message: string | undefined;
  since = Date.now();
  restarts = 0;
  starts = 0;

  constructor(
    readonly spec: ChildSpec,
    private readonly events: ChildEvents = {},
    private readonly timing: SupervisorTiming = DEFAULT_TIMING,
  ) {}

  get pid(): number | undefined {
    return this.proc?.pid;
  }

  private setState(state: CacheState, message?: string): void {
    if (state !== this.state || message !== this.message) {
      this.state = state;
      this.message = message;
      this.since = Date.now();
      this.events.onState?.(state, message);
    }
  }

  /** Starts the program; resolves once it answers or its first start has failed (it keeps retrying). */
  async start(): Promise<void> {
    this.stopping = false;
    await this.launch();
  }

  private async launch(): Promise<void> {
    if (this.stopping) return;
    this.starts++;
    if (this.starts > 1) this.restarts++;
    // A cache that has not come up again stays "failed" (with why) while it is retried.
    if (this.state !== "failed") this.setState(this.starts > 1 ? "restarting" : "starting", this.message);
    try {
      await this.spec.prepare?.();
    } catch (e) {
      return this.failed(`could not prepare: ${(e as Error).message}`);
    }
    if (this.stopping) return;
    const argv = childArgv(this.spec);
    const proc = spawn("setpriv", argv, {
      cwd: "/",
      env: { PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", LANG: "C.UTF-8", ...this.spec.env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.proc = proc;
    this.lastLines.length = 0;
    this.notable.length = 0;
    const spawnError = new Promise<Error>((resolve) => proc.once("error", resolve));
    let onExit: (code: number | null, signal: NodeJS.Signals | null) => void = () => {};
    this.exited = new Promise<void>((resolve) => {
      proc.once("exit", (code, signal) => {
        onExit(code, signal);
        resolve();
      });
    });
    for (const stream of [proc.stdout!, proc.stderr!]) {
      let buf = "";
      stream.setEncoding("utf8");
      stream.on("data", (d: string) => {
        buf += d;
        let nl: number;
        while ((nl = buf.indexOf("\n")) >= 0) {
          this.line(buf.slice(0, nl));
          buf = buf.slice(nl + 1);
        }
        if (buf.length > 65536) {
          this.line(buf);
          buf = "";
        }
      });
    }
    if (proc.pid !== undefined) this.record(proc.pid);
    let exitedEarly: string | undefined;
    onExit = (code, signal) => {
      const how = signal ? `was killed by ${signal}` : `exited with status ${code}`;
      if (this.proc === proc) this.proc = undefined;
      this.clearRecord(proc.pid);
      this.stopChecks();
      if (this.stopping) return;
      exitedEarly = how;
      // After it was up: a restart; during the start: handled below.
      if (this.state === "up") this.failed(`${basename(this.spec.program)} ${how}${this.lastWords()}`, true);
    };
    // Wait until it answers, exits, or the start times out.
    const deadline = Date.now() + this.timing.startTimeoutMs;
    let reason: string | undefined = "did not answer yet";
    while (!this.stopping) {
      const err = await Promise.race([spawnError, new Promise<undefined>((r) => setTimeout(() => r(undefined), 200))]);
      if (err) return this.failed(`cannot start setpriv ${basename(this.spec.program)}: ${err.message}`);
      if (exitedEarly) return this.failed(`${basename(this.spec.program)} ${exitedEarly}${this.lastWords()}`);
      reason = await this.spec.check().catch((e: Error) => e.message);
      if (reason === undefined) break;
      if (Date.now() > deadline) {
        proc.kill("SIGKILL");
        return this.failed(`${basename(this.spec.program)} did not answer within ${Math.round(this.timing.startTimeoutMs / 1000)} s (${reason})${this.lastWords()}`);
      }
    }
    if (this.stopping) return;
    this.upSince = Date.now();
    this.failedChecksNow = 0;
    this.setState("up", undefined);
    this.events.log?.("info", { cache: this.spec.name, pid: proc.pid }, "cache up");
    this.scheduleCheck(proc);
  }

  private line(l: string): void {
    const line = l.replace(/\r$/, "");
    if (!line.trim()) return;
    this.lastLines.push(line);
    if (this.lastLines.length > 8) this.lastLines.shift();
    if (NOTABLE.test(line)) {
      this.notable.push(line);
      if (this.notable.length > 3) this.notable.shift();
    }
    this.spec.onLine?.(line);
  }

  /** The program's last lines, for a message. */
  private lastWords(): string {
    const shown = (this.notable.length ? this.notable : this.lastLines.slice(-2)).map((x) => x.slice(0, 300));
    return shown.length ? `: ${shown.join(" | ")}` : "";
  }

  private scheduleCheck(proc: ChildProcess): void {
    this.stopChecks();
    this.checkTimer = setTimeout(() => void this.healthCheck(proc), this.timing.checkIntervalMs);
    this.checkTimer.unref();
  }

  private stopChecks(): void {
    if (this.checkTimer) clearTimeout(this.checkTimer);
    this.checkTimer = undefined;
  }

  private async healthCheck(proc: ChildProcess): Promise<void> {
    if (this.stopping || this.proc !== proc) return;
    const reason = await this.spec.check().catch((e: Error) => e.message);
    if (this.stopping || this.proc !== proc) return;
    if (reason === undefined) {
      this.failedChecksNow = 0;
      if (this.upSince !== undefined && Date.now() - this.upSince >= this.timing.stableMs) this.inARow = 0;
    } else if (++this.failedChecksNow >= this.timing.failedChecks) {
      this.events.log?.("warn", { cache: this.spec.name, pid: proc.pid, reason }, `cache stopped answering (${this.failedChecksNow} checks in a row); restarting it`);
      // Not "up" any more, so the exit handler leaves the restart to us.
      this.setState("restarting", `stopped answering: ${reason}`);
      const exited = this.exited;
      proc.kill("SIGKILL");
      void exited.then(() => this.scheduleRestart());
      return;
    }
    this.scheduleCheck(proc);
  }

  /** A start or run that ended; `wasUp`: it had been answering. */
  private failed(message: string, wasUp = false): void {
    if (this.stopping) return;
    this.proc = undefined;
    if (this.upSince !== undefined && Date.now() - this.upSince >= this.timing.stableMs) this.inARow = 0;
    this.upSince = undefined;
    this.setState(wasUp ? "restarting" : "failed", message);
    this.events.log?.(wasUp ? "warn" : "error", { cache: this.spec.name, err: message }, wasUp ? "cache ended; restarting it" : "cache could not start; retrying");
    this.scheduleRestart();
  }

  private scheduleRestart(): void {
    if (this.stopping || this.restartTimer) return;
    const delay = restartDelay(++this.inARow, this.timing);
    this.restartTimer = setTimeout(() => {
      this.restartTimer = undefined;
      void this.launch();
    }, delay);
    this.restartTimer.unref();
  }

  private record(pid: number): void {
    const start = processStartTime(pid);
    if (start === undefined) return;
    const rec: ChildRecord = { pid, start, argv: [this.spec.program, ...this.spec.args], owner: processIdentity(process.pid) };
    try {
      writeFileSync(this.spec.recordFile, JSON.stringify(rec) + "\n", { mode: 0o644 });
    } catch (e) {
      this.events.log?.("warn", { cache: this.spec.name, err: (e as Error).message }, "cannot record the cache's pid; a crash of civm may leave it running until the next start");
    }
  }

  /** Removes the record (only `pid`'s, when given: a new copy may have written its own). */
  private clearRecord(pid?: number): void {
    if (pid !== undefined) {
      try {
        if ((JSON.parse(readFileSync(this.spec.recordFile, "utf8")) as ChildRecord).pid !== pid) return;
      } catch {
        return;
      }
    }
    rmSync(this.spec.recordFile, { force: true });
  }

  /** Stops it (SIGTERM, then SIGKILL after the grace) and starts nothing more. */
  async stop(): Promise<void> {
    this.stopping = true;
    if (this.restartTimer) clearTimeout(this.restartTimer);
    this.restartTimer = undefined;
    this.stopChecks();
    const proc = this.proc;
    if (proc && proc.exitCode === null && proc.signalCode === null) {
      proc.kill("SIGTERM");
      const timer = setTimeout(() => proc.kill("SIGKILL"), this.timing.stopGraceMs);
      await this.exited;
      clearTimeout(timer);
    }
    this.clearRecord();
    this.setState("stopped", undefined);
  }
}

/** The command line of a live process, split at NULs. */
function cmdlineOf(pid: number): string[] | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter((x, i, a) => i < a.length - 1 || x !== "");
  } catch {
    return undefined;
  }
}

/**
 * Ends cache programs a previous civm left running in `runDir` (one subfolder per cache with
 * its record). A record is untrusted input: a process is signalled only when its start time
 * and whole command line are the recorded ones and the program is a cache program. Returns
 * what was ended, for the log.
 */
export async function sweepChildren(runDir: string, log: (line: string) => void = () => {}, graceMs = 5000): Promise<string[]> {
  let dirs: string[];
  try {
    dirs = readdirSync(runDir);
  } catch {
    return [];
  }
  const ended: string[] = [];
  for (const d of dirs) {
    const file = join(runDir, d, "child.json");
    let rec: ChildRecord;
    try {
      rec = JSON.parse(readFileSync(file, "utf8")) as ChildRecord;
    } catch {
      continue;
    }
    const ok = Number.isInteger(rec.pid) && rec.pid > 1 && Array.isArray(rec.argv) && typeof rec.argv[0] === "string" && CACHE_PROGRAMS.includes(basename(rec.argv[0]));
    const live = ok && processStartTime(rec.pid) === rec.start && JSON.stringify(cmdlineOf(rec.pid)) === JSON.stringify(rec.argv);
    if (live) {
      try {
        process.kill(rec.pid, "SIGTERM");
      } catch {
        /* gone meanwhile */
      }
      const until = Date.now() + graceMs;
      while (processStartTime(rec.pid) === rec.start && Date.now() < until) await new Promise((r) => setTimeout(r, 100));
      if (processStartTime(rec.pid) === rec.start) {
        try {
          process.kill(rec.pid, "SIGKILL");
        } catch {
          /* gone */
        }
      }
      ended.push(`${d} (pid ${rec.pid})`);
      log(`reconcile: ended the cache ${d} (pid ${rec.pid}) a previous civm left running`);
    } else if (ok && processStartTime(rec.pid) === rec.start) {
      log(`reconcile: ${file} names pid ${rec.pid}, which is running something else; not signalled`);
    }
    rmSync(file, { force: true });
  }
  return ended;
}
