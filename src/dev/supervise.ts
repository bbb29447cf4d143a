// civm run --detach: civm starts itself again as a background supervisor (a new session,
// stdio to a log file) that owns the VM (vm/ VmRun) and does every cleanup: the guest powers
// off, --timeout, civm stop (SIGTERM to the supervisor: ACPI, grace, kill), or its own
// SIGTERM/SIGINT. The foreground returns once the registry entry says QEMU runs the guest, or
// fails with the supervisor's error and exit code. If the supervisor itself is killed
// (SIGKILL), the next civm command reconciles: its QEMU is ended and its work dir removed.
import { spawn } from "node:child_process";
import { closeSync, openSync, readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { CivmError, EXIT_CODES, type ErrorCode } from "../errors/index.js";
import type { Paths } from "../host/paths.js";
import { STATE_LAYOUT } from "../host/paths.js";
import { inheritNiceInAutogroup } from "../host/autogroup.js";
import type { RegistryEntry } from "../vm/registry.js";
import { resultSummary, VmRun } from "../vm/run.js";
import { formatSeconds } from "../vm/format.js";
import { tailLines } from "../vm/console.js";
import { devRunRequest, planConsoleSinks, type DevPlan } from "./plan.js";

/** The hidden subcommand the supervisor runs as. */
export const SUPERVISOR_COMMAND = "__dev-supervisor";
/** Environment variable that carries the plan (JSON) to the supervisor. */
export const PLAN_ENV = "CIVM_DEV_PLAN";
/** How long the foreground waits for QEMU to run before giving up. */
const START_TIMEOUT_MS = 180_000;
/** --snapshot: on first use the image's snapshot is made before the VM starts (a cold boot of the image, under TCG minutes). */
const SNAPSHOT_START_TIMEOUT_MS = 20 * 60_000;

/** How long `civm run --detach` waits for the VM to run. */
export function startTimeoutFor(plan: Pick<DevPlan, "snapshot">, asked?: number): number {
  return asked ?? (plan.snapshot ? SNAPSHOT_START_TIMEOUT_MS : START_TIMEOUT_MS);
}

interface SupervisorInput {
  plan: DevPlan;
  paths: Paths;
}

function codeOfExit(status: number): ErrorCode {
  const hit = (Object.entries(EXIT_CODES) as [ErrorCode, number][]).find(([, v]) => v === status);
  return hit?.[0] ?? "internal";
}

export interface DetachOptions {
  /** The civm entry script to run (process.argv[1]). */
  entry: string;
  log: (line: string) => void;
  startTimeoutMs?: number;
}

/**
 * Starts the supervisor and waits until the VM runs; returns its registry entry. On
 * failure, throws a CivmError with the supervisor's exit code and the tail of its log.
 */
export async function startDetached(plan: DevPlan, paths: Paths, o: DetachOptions): Promise<RegistryEntry> {
  const logPath = plan.dev.supervisorLog;
  if (!logPath) throw new CivmError("internal", "detached plan without a supervisor log");
  const fd = openSync(logPath, "a", 0o600);
  const input: SupervisorInput = { plan, paths };
  let child;
  try {
    child = spawn(process.execPath, [o.entry, SUPERVISOR_COMMAND], {
      detached: true,
      stdio: ["ignore", fd, fd],
      cwd: "/",
      env: { ...process.env, [PLAN_ENV]: JSON.stringify(input), CIVM_STATE_DIR: paths.stateDir, CIVM_LOGS_DIR: paths.logsDir },
    });
  } finally {
    closeSync(fd);
  }
  inheritNiceInAutogroup(child.pid);
  let exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  child.on("exit", (code, signal) => (exited = { code, signal }));
  child.on("error", (e) => (exited = { code: 1, signal: null, ...{ error: e } }));
  child.unref();

  // Ctrl-C while starting: the supervisor stops the VM and cleans up; we report it.
  let interrupted = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    interrupted++;
    o.log(`${sig}: stopping ${plan.spec.name} (again to force)`);
    try {
      child.kill("SIGTERM");
    } catch {
      /* already gone */
    }
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  const entryFile = join(paths.stateDir, STATE_LAYOUT.registry, `${plan.id}.json`);
  const limitMs = startTimeoutFor(plan, o.startTimeoutMs);
  const deadline = Date.now() + limitMs;
  try {
    for (;;) {
      if (!interrupted) {
        try {
          const e = JSON.parse(readFileSync(entryFile, "utf8")) as RegistryEntry;
          if (e.state === "running") return e;
        } catch {
          /* not written yet */
        }
      }
      if (exited) {
        const text = await readFile(logPath, "utf8").catch(() => "");
        const status = exited.code ?? 1;
        const errLines = text.split("\n").filter((l) => /civm: error: /.test(l)).map((l) => l.replace(/^.*?civm: error: /, ""));
        if (interrupted) throw new CivmError("signal", `${plan.spec.name}: interrupted while starting; the VM was stopped and removed`);
        throw new CivmError(
          status === 0 ? "internal" : codeOfExit(status),
          errLines.length ? errLines.join("\n") : `the supervisor of ${plan.spec.name} exited ${exited.signal ? `on ${exited.signal}` : `with status ${status}`} before the VM ran`,
          { details: `--- supervisor log ${logPath} (tail) ---\n${tailLines(text, 30)}` },
        );
      }
      if (Date.now() > deadline) {
        child.kill("SIGTERM");
        throw new CivmError("qemu", `${plan.spec.name}: QEMU was not running after ${formatSeconds(limitMs)}; the supervisor was asked to stop. Its log: ${logPath}`);
      }
      await sleep(50);
    }
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

/** The supervisor's main: runs the VM of the plan in $CIVM_DEV_PLAN to its end; returns the exit code. */
export async function runSupervisor(): Promise<number> {
  const raw = process.env[PLAN_ENV];
  delete process.env[PLAN_ENV];
  if (!raw) throw new CivmError("internal", `${SUPERVISOR_COMMAND} is started by civm run --detach, not by hand`);
  const { plan, paths } = JSON.parse(raw) as SupervisorInput;
  const log = (line: string) => process.stderr.write(`${new Date().toISOString()} civm: ${line}\n`);
  log(`supervisor (pid ${process.pid}) for ${plan.spec.name} (id ${plan.id})`);
  for (const w of plan.warnings ?? []) log(`warning: ${w}`);
  const sinks = await planConsoleSinks(plan, log);
  const vm = new VmRun(devRunRequest(plan, { paths, log, ...(sinks ? { sinks } : {}) }));
  let signals = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    signals++;
    log(`${sig}: stopping ${plan.spec.name}${signals > 1 ? " now" : ""}`);
    vm.stop("stopped", signals > 1);
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
  process.on("SIGHUP", () => log("SIGHUP ignored"));
  const r = await vm.run().finally(() => sinks?.close());
  if (r.detail) log(r.detail);
  log(resultSummary(r));
  return r.exitCode;
}
