// `civm serve`: loads the config, opens the state store, starts the HTTP server (webhooks,
// API, metrics) and the reconciler, and drains on SIGTERM/SIGINT. SIGHUP and POST
// /api/reload re-read the config (an invalid one changes nothing); POST /api/drain stops
// taking work (and, if asked, exits once no VM is left). Logs are pino JSON lines on stdout
// with pool/vm/runner/job fields; every line passes through the redaction of the config's
// secrets and the JIT configs / registration tokens of running VMs.
import { pino } from "pino";
import { Registry } from "prom-client";
import { ConfigError, EXIT_CODES, messageOf } from "../errors/index.js";
import { createGitHubAccess, type GitHubAccess } from "../github/app-auth.js";
import { detectAccel } from "../host/kvm.js";
import { resolvePaths } from "../host/paths.js";
import { pruneLogs } from "../host/log-retention.js";
import { createApp, createMetricsApp, listen, type HostHealth, type ReloadOutcome, type ServerOptions, type ServerPool } from "../server/index.js";
import { openStore } from "../store/open.js";
import { hostOptions } from "./fleet.js";
import { lockStateDir } from "../host/serve-lock.js";
import { redactAll } from "../vm/run.js";
import { loadServeConfig } from "./config.js";
import { Daemon, type VmLauncher } from "./daemon.js";
import { githubRequestObserver, registerProcessMetrics } from "./metrics.js";
import { CIVM_VERSION } from "../version.js";
import { findConsoleLog, VmRunLauncher } from "./launcher.js";
import { daemonSettings, effectiveConfig, restartMessage, settingsChanges } from "./reload.js";
import type { PoolSpec, ServeConfig } from "./types.js";
import { JobRouter, routable } from "./routing.js";
import { poolCmdlineWarnings } from "./cmdline.js";
import { CacheManager, launchWithCaches } from "../caches/index.js";

export interface RunServeOptions {
  configFile: string;
  stateDir: string | undefined;
  logsDir: string | undefined;
  accel: "kvm" | "tcg" | undefined;
  graceSeconds: number;
  logLevel: string;
}

function accessFor(config: ServeConfig, warn: (m: string) => void, registry: Registry, signal: AbortSignal): GitHubAccess {
  return createGitHubAccess(
    config.github.auth.kind === "token"
      ? { kind: "token", token: config.github.auth.token }
      : { kind: "app", appId: config.github.auth.appId, privateKey: config.github.auth.privateKey, installationId: config.github.auth.installationId },
    // A rate limit fails the request at once (the daemon reschedules that target) instead of
    // waiting up to an hour; every call has a timeout; shutdown aborts what is in flight.
    { baseUrl: config.github.apiUrl, warn, onRequest: githubRequestObserver(registry), maxRateLimitWaitSeconds: 0, signal, timeoutMs: config.githubLimits.requestTimeoutSeconds * 1000 },
  );
}

/** /healthz's `host` from a doctor report. */
export function doctorHealth(r: import("../host/doctor.js").DoctorReport, now = new Date()): HostHealth {
  return {
    ok: r.ok,
    accel: r.accel?.accel,
    kvm: r.accel?.accel === "kvm",
    checkedAt: now.toISOString(),
    problems: r.checks.filter((c) => c.status !== "pass").map((c) => ({ name: c.name, status: c.status, detail: c.detail, ...(c.fix ? { fix: c.fix } : {}) })),
  };
}

/** After a shutdown, the process exits this long later even if something keeps it alive. */
export const EXIT_AFTER_SHUTDOWN_MS = 2000;

/** Runs until SIGTERM/SIGINT (or a drain that asked to exit); returns the exit code. */
export async function runServe(o: RunServeOptions): Promise<number> {
  // Signals are handled from the first moment, start-up included: SIGTERM/SIGINT during
  // start-up lets the step under way finish (a KVM probe, the clean-up of a previous run),
  // starts nothing more and closes what was opened; once running it drains. A second signal
  // exits at once (the next start reconciles what is left). SIGHUP during start-up reloads
  // once start-up is done.
  const code = await serve(o, new ServeSignals());
  // Nothing should keep the process alive now; if something does, do not hang.
  setTimeout(() => process.exit(code), EXIT_AFTER_SHUTDOWN_MS).unref();
  return code;
}

/** Signal state shared by start-up and the running daemon. */
class ServeSignals {
  /** Aborted by the first SIGTERM/SIGINT. */
  readonly stop = new AbortController();
  count = 0;
  hupPending = false;
  started = false;
  log: ((level: "info" | "warn", fields: Record<string, unknown>, msg: string) => void) | undefined;
  /** Once running: the drain-and-exit path (and SIGHUP's reload). */
  onStop: ((sig: NodeJS.Signals | "drained") => void) | undefined;
  onHup: (() => void) | undefined;

  constructor() {
    const stop = (sig: NodeJS.Signals) => this.signal(sig);
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
    process.on("SIGHUP", () => {
      if (this.onHup) this.onHup();
      else this.hupPending = true;
    });
  }

  signal(sig: NodeJS.Signals | "drained"): void {
    this.count++;
    if (this.count > 1 && sig !== "drained") {
      this.log?.("warn", { signal: sig }, this.started ? "second signal: exiting without waiting for busy runners" : "second signal during start-up: exiting at once");
      // Running QEMU processes are ended by the next start's reconciliation.
      setImmediate(() => process.exit(EXIT_CODES.signal));
      return;
    }
    if (this.onStop) return this.onStop(sig);
    if (sig === "drained") return;
    this.log?.("info", { signal: sig }, "signal during start-up: finishing the step under way, then exiting");
    this.stop.abort(sig);
  }

  get aborted(): boolean {
    return this.stop.signal.aborted;
  }
}

/** What start-up opened, closed in reverse order on every way out (a failure is logged, the rest still closed). */
class Closers {
  private readonly list: (() => Promise<void> | void)[] = [];

  push(close: () => Promise<void> | void): void {
    this.list.push(close);
  }

  async closeAll(log: (e: unknown) => void): Promise<void> {
    for (const c of this.list.splice(0).reverse()) {
      try {
        await c();
      } catch (e) {
        log(e);
      }
    }
  }
}

async function serve(o: RunServeOptions, signals: ServeSignals): Promise<number> {
  const config = await loadServeConfig(o.configFile, { checkImages: true, ...(o.stateDir ? { stateDir: o.stateDir } : {}) });
  const secrets = new Set<string>(config.secrets);
  const logger = pino(
    { level: o.logLevel, base: { pid: process.pid }, timestamp: pino.stdTimeFunctions.isoTime, formatters: { level: (label) => ({ level: label }) } },
    { write: (line: string) => void process.stdout.write(redactAll(line, [...secrets])) },
  );
  signals.log = (level, fields, msg) => logger[level](fields, msg);
  const closers = new Closers();
  const closeAll = () => closers.closeAll((e) => logger.error({ err: messageOf(e) }, "clean-up step failed"));
  let running: { done: Promise<number> } | undefined;
  try {
    if (!signals.aborted) running = await startUp(o, config, secrets, logger, signals, closers);
  } catch (e) {
    // A start-up failure (a port in use, ...): what was opened is closed before the error is shown.
    await closeAll();
    throw e;
  }
  if (running) return running.done;
  await closeAll();
  logger.info({}, "stopped during start-up");
  return 0;
}

/**
 * Opens the lock, the store, the listeners and starts the daemon, checking for a stop signal
 * after each step; once running, `done` resolves to the exit code. Undefined: a signal
 * came during start-up (`closers` undo what was done).
 */
async function startUp(o: RunServeOptions, initial: ServeConfig, secrets: Set<string>, logger: pino.Logger, signals: ServeSignals, closers: Closers): Promise<{ done: Promise<number> } | undefined> {
  let config = initial;
  for (const w of poolCmdlineWarnings(config.pools, config.poolsFile)) logger.warn({}, w);
  const paths = resolvePaths({ stateDir: config.stateDir ?? o.stateDir, logsDir: o.logsDir });
  // Before anything reads the store: a second daemon would take the first's VMs for leftovers.
  const lock = lockStateDir(paths.stateDir);
  closers.push(() => lock.release());
  const host = hostOptions(config);
  const store = await openStore({ url: config.store.kind === "postgres" ? config.store.url : undefined, stateDir: paths.stateDir, hostId: host.id });
  closers.push(() => store.close());
  if (config.store.kind === "postgres") logger.info({ store: store.where, host: host.id, migrationsApplied: store.applied ?? 0 }, "fleet store open");
  const registry = new Registry();
  registerProcessMetrics(registry, CIVM_VERSION);
  const warn = (m: string) => logger.warn({}, m);
  const githubAbort = new AbortController();
  // Whatever GitHub has not answered by the time the daemon has shut down is abandoned.
  closers.push(() => githubAbort.abort());
  const access = accessFor(config, warn, registry, githubAbort.signal);
  if (signals.aborted) return undefined;
  const accel = await detectAccel({ stateDir: paths.stateDir, ...(o.accel ? { env: { ...process.env, CIVM_ACCEL: o.accel } } : {}) });
  if (accel.accel === "tcg") logger.warn({ reason: accel.reason }, "KVM is not usable; runner VMs use TCG software emulation");
  if (signals.aborted) return undefined;
  // Registry and HTTP caches for the runner VMs (docs/caches.md): started once listening.
  const caches = config.caches ? new CacheManager({ spec: config.caches, stateDir: paths.stateDir, registry, logger }) : undefined;
  const vmRun = new VmRunLauncher({ paths, accel: accel.accel, graceSeconds: o.graceSeconds, qemuUser: config.qemuUser, log: (line, fields) => logger.info({ ...fields, component: "vm" }, line) });
  // JIT configs and registration tokens are secrets while their VM lives (and a minute after).
  const launcher: VmLauncher = {
    imageKey: (p) => vmRun.imageKey(p),
    reconcileLeftovers: () => vmRun.reconcileLeftovers(),
    start: (req) => {
      for (const s of req.secrets) secrets.add(s);
      const h = vmRun.start(caches ? launchWithCaches(req, (n) => caches.forVm(n)) : req);
      void h.result.finally(() => setTimeout(() => req.secrets.forEach((s) => secrets.delete(s)), 60_000).unref()).catch(() => {});
      return h;
    },
  };
  // One router for the webhook and the poll: one runner-group cache, each ignored job counted once.
  let daemonRef: Daemon | undefined;
  const router = new JobRouter({ registry, access: () => daemonRef?.githubAccess, warn: (f, m) => logger.warn(f, m) });
  const daemon = new Daemon({
    router,
    pools: config.pools,
    store,
    host: { ...host, address: host.address || `${config.tls ? "https" : "http"}://${config.listen.host}:${config.listen.port}` },
    version: CIVM_VERSION,
    access,
    launcher,
    logger,
    registry,
    ...daemonSettings(config),
    // Reads `config` when it runs: a reload's logs settings apply at the next pruning.
    pruneLogs: async () => {
      const r = await pruneLogs({ logsDir: paths.logsDir, stateDir: paths.stateDir, retention: config.logs });
      if (r.deleted.length) logger.info({ deleted: r.deleted.length, freedBytes: r.freedBytes, keptBytes: r.keptBytes, logsDir: paths.logsDir }, "pruned old console logs");
    },
    apiUrl: config.github.apiUrl,
    onDrained: () => signals.signal("drained"),
  });
  daemonRef = daemon;
  const github = (p: PoolSpec) => {
    const h = daemon.poolGitHubHealth(p);
    return { github: { state: h.state, degraded: h.degraded, since: h.since, reason: h.reason } };
  };
  const serverPools = (): ServerPool[] => [
    ...daemon.currentPools().map((p) => ({ ...routable(p), minRunners: p.minRunners, maxRunners: p.maxRunners, ...github(p) })),
    ...daemon.removingPools().map((p) => ({ ...routable(p), minRunners: p.minRunners, maxRunners: p.maxRunners, removing: true })),
  ];
  let stopping = false;
  let reloads: Promise<unknown> = Promise.resolve();
  /** Re-reads the config file; an invalid one leaves everything as it is. One at a time. */
  const reload = (trigger: string): Promise<ReloadOutcome> => {
    const run = async (): Promise<ReloadOutcome> => {
      if (stopping) return { ok: false, status: 409, error: "civm serve is shutting down; the config was not reloaded." };
      let next: ServeConfig;
      try {
        next = await loadServeConfig(o.configFile, { checkImages: true, stateDir: paths.stateDir });
      } catch (e) {
        const error = e instanceof ConfigError ? e.message : `cannot reload ${o.configFile}: ${messageOf(e)}`;
        logger.error({ trigger, file: o.configFile, err: error }, "config reload failed; still running the previous config");
        return { ok: false, error };
      }
      for (const s of next.secrets) secrets.add(s);
      for (const w of poolCmdlineWarnings(next.pools, next.poolsFile)) logger.warn({ trigger }, w);
      const settings = settingsChanges(config, next, paths.stateDir);
      const newAccess = settings.applied.includes("github credentials") || settings.applied.includes("github.requestTimeout");
      const pools = await daemon.reload(next.pools, { ...(newAccess ? { access: accessFor(next, warn, registry, githubAbort.signal) } : {}), ...daemonSettings(next) });
      config = effectiveConfig(config, next);
      serverOpts.webhookSecret = config.webhookSecret;
      serverOpts.apiToken = config.apiToken;
      serverOpts.maxWebhookBytes = config.maxWebhookBytes;
      const restart = restartMessage(settings.restartNeeded);
      if (restart) logger.warn({ trigger, restartNeeded: settings.restartNeeded.map((r) => r.field) }, restart);
      logger.info({ trigger, file: o.configFile, applied: settings.applied }, "config reloaded");
      return { ok: true, file: o.configFile, pools, applied: settings.applied, restartNeeded: settings.restartNeeded, ...(restart ? { message: restart } : {}) };
    };
    const p = reloads.then(run, run);
    reloads = p.catch(() => {});
    return p;
  };
  const consoleLogs = new Map<string, string>();
  let hostHealth: HostHealth | undefined;
  const serverOpts: ServerOptions = {
    store,
    hostId: host.id,
    deadAfterMs: daemon.fleet.deadAfterMs,
    pools: serverPools,
    webhookSecret: config.webhookSecret,
    apiToken: config.apiToken,
    maxWebhookBytes: config.maxWebhookBytes,
    registry,
    onDemand: () => daemon.wake(),
    health: () => daemon.githubHealth(),
    hostHealth: () => hostHealth,
    control: {
      reload: () => reload("api"),
      drain: async (d) => ({ ...(await daemon.drain(d)) }),
      undrain: async () => ({ ...(await daemon.undrain()) }),
      status: async () => ({ ...(await daemon.status()) }),
    },
    consoleLog: async (vm) => {
      const known = consoleLogs.get(vm.id);
      if (known) return known;
      const found = await findConsoleLog(paths.logsDir, vm.id);
      if (found) consoleLogs.set(vm.id, found);
      return found;
    },
    redact: (text) => redactAll(text, [...secrets]),
    router,
    metrics: config.metricsListen === undefined,
    ...(caches ? { caches: { status: async () => (await caches.refresh(), caches.status()), health: () => caches.health() } } : {}),
  };
  for (const w of config.warnings ?? []) logger.warn({ file: config.file }, w);
  const app = createApp(serverOpts);
  const server = await listen(app, config.listen.host, config.listen.port, config.tls ? { tls: config.tls } : {});
  closers.push(() => server.close());
  const metricsServer = config.metricsListen ? await listen(createMetricsApp(registry), config.metricsListen.host, config.metricsListen.port, { field: "metricsListen" }) : undefined;
  if (metricsServer) closers.push(() => metricsServer.close());
  if (caches) {
    // Stopped after the runner VMs (closers run in reverse); one that cannot start is a state, not a failure.
    closers.push(() => caches.stop());
    await caches.start().catch((e: unknown) => logger.error({ component: "cache", err: messageOf(e) }, "the caches could not be set up; runner VMs start without them"));
    if (signals.aborted) return undefined;
  }
  // First on the way out: idle and starting runners stop, busy ones finish (bounded by
  // shutdownTimeout) while the listeners still answer (/healthz, the API, webhooks).
  closers.push(async () => {
    try {
      await daemon.shutdown();
    } catch (e) {
      logger.error({ err: messageOf(e) }, "shutdown failed");
    }
  });
  logger.info({ url: server.url, ...(metricsServer ? { metricsUrl: metricsServer.url } : {}), pools: config.pools.map((p) => p.name), stateDir: paths.stateDir, accel: accel.accel }, "civm serve listening");
  if (signals.aborted) return undefined;
  // Start-up reconciliation (a previous run's VMs, network tables, work dirs) runs to its end
  // even when a signal comes meanwhile; the loop then starts only without one.
  if (!(await daemon.start(signals.stop.signal))) return undefined;
  // civm doctor's checks for /healthz and the log, off the start path (the KVM probe boots).
  void (async () => {
    try {
      const { runDoctor } = await import("../host/doctor.js");
      hostHealth = doctorHealth(await runDoctor({ paths }));
      const fields = { component: "doctor", ok: hostHealth.ok, accel: hostHealth.accel, kvm: hostHealth.kvm, problems: hostHealth.problems.map((p) => `${p.name}: ${p.detail}`) };
      if (hostHealth.ok && hostHealth.problems.length === 0) logger.info(fields, "civm doctor: host ready");
      else logger.warn(fields, "civm doctor found problems (also on /healthz)");
    } catch (e) {
      logger.warn({ component: "doctor", err: messageOf(e) }, "civm doctor could not run");
    }
  })();

  const done = new Promise<number>((resolve) => {
    signals.onStop = (sig) => {
      if (stopping) return;
      stopping = true;
      logger.info(sig === "drained" ? {} : { signal: sig }, sig === "drained" ? "drained; exiting" : "draining");
      // daemon.shutdown(), listeners closed, GitHub calls abandoned, store and lock closed.
      void closers.closeAll((e) => logger.error({ err: messageOf(e) }, "shutdown step failed")).then(() => {
        logger.info({}, "stopped");
        resolve(0);
      });
    };
    signals.onHup = () => void reload("SIGHUP");
  });
  signals.started = true;
  if (signals.hupPending) void reload("SIGHUP");
  return { done };
}
