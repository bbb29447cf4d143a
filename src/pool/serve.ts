// `civm serve`: loads the config, opens the state store, starts the HTTP server (webhooks,
// API, metrics) and the reconciler, and drains on SIGTERM/SIGINT. Logs are pino JSON lines
// on stdout with pool/vm/runner/job fields; every line passes through the redaction of the
// config's secrets and the JIT configs of running VMs.
import { pino } from "pino";
import { Registry } from "prom-client";
import { EXIT_CODES, messageOf } from "../errors/index.js";
import { createGitHubAccess } from "../github/app-auth.js";
import { detectAccel } from "../host/kvm.js";
import { resolvePaths } from "../host/paths.js";
import { createApp, listen } from "../server/index.js";
import { StateStore } from "../store/index.js";
import { redactAll } from "../vm/run.js";
import { loadServeConfig } from "./config.js";
import { Daemon, type VmLauncher } from "./daemon.js";
import { VmRunLauncher } from "./launcher.js";

export interface RunServeOptions {
  configFile: string;
  stateDir: string | undefined;
  logsDir: string | undefined;
  accel: "kvm" | "tcg" | undefined;
  graceSeconds: number;
  logLevel: string;
}

/** Runs until SIGTERM/SIGINT; returns the exit code. */
export async function runServe(o: RunServeOptions): Promise<number> {
  const config = await loadServeConfig(o.configFile, { checkImages: true, ...(o.stateDir ? { stateDir: o.stateDir } : {}) });
  const secrets = new Set<string>(config.secrets);
  const logger = pino(
    { level: o.logLevel, base: { pid: process.pid }, timestamp: pino.stdTimeFunctions.isoTime, formatters: { level: (label) => ({ level: label }) } },
    { write: (line: string) => void process.stdout.write(redactAll(line, [...secrets])) },
  );
  const paths = resolvePaths({ stateDir: config.stateDir ?? o.stateDir, logsDir: o.logsDir });
  const store = new StateStore(paths.stateDir);
  const registry = new Registry();
  const access = createGitHubAccess(
    config.github.auth.kind === "token"
      ? { kind: "token", token: config.github.auth.token }
      : { kind: "app", appId: config.github.auth.appId, privateKey: config.github.auth.privateKey, installationId: config.github.auth.installationId },
    { baseUrl: config.github.apiUrl, warn: (m) => logger.warn({}, m) },
  );
  const accel = await detectAccel({ stateDir: paths.stateDir, ...(o.accel ? { env: { ...process.env, CIVM_ACCEL: o.accel } } : {}) });
  if (accel.accel === "tcg") logger.warn({ reason: accel.reason }, "KVM is not usable; runner VMs use TCG software emulation");
  const vmRun = new VmRunLauncher({ paths, accel: accel.accel, graceSeconds: o.graceSeconds, log: (line, fields) => logger.info({ ...fields, component: "vm" }, line) });
  // JIT configs are secrets while their VM lives.
  const launcher: VmLauncher = {
    imageKey: (p) => vmRun.imageKey(p),
    reconcileLeftovers: () => vmRun.reconcileLeftovers(),
    start: (req) => {
      for (const s of req.secrets) secrets.add(s);
      const h = vmRun.start(req);
      void h.result.finally(() => setTimeout(() => req.secrets.forEach((s) => secrets.delete(s)), 60_000).unref()).catch(() => {});
      return h;
    },
  };
  const daemon = new Daemon({
    pools: config.pools,
    store,
    access,
    launcher,
    logger,
    registry,
    pollIntervalMs: config.pollIntervalSeconds * 1000,
    shutdownTimeoutMs: config.shutdownTimeoutSeconds * 1000,
  });
  const app = createApp({
    store,
    pools: config.pools.map((p) => ({ name: p.name, labels: p.runner.labels, minRunners: p.minRunners, maxRunners: p.maxRunners })),
    webhookSecret: config.webhookSecret,
    apiToken: config.apiToken,
    maxWebhookBytes: config.maxWebhookBytes,
    registry,
    onDemand: () => daemon.wake(),
  });
  const server = await listen(app, config.listen.host, config.listen.port);
  logger.info({ url: server.url, pools: config.pools.map((p) => p.name), stateDir: paths.stateDir, accel: accel.accel }, "civm serve listening");
  await daemon.start();

  return new Promise<number>((resolve) => {
    let signals = 0;
    const onSignal = (sig: NodeJS.Signals) => {
      signals++;
      if (signals > 1) {
        logger.warn({ signal: sig }, "second signal: exiting without waiting for busy runners");
        resolve(EXIT_CODES.signal);
        // Running QEMU processes are ended by the next start's reconciliation.
        setImmediate(() => process.exit(EXIT_CODES.signal));
        return;
      }
      logger.info({ signal: sig }, "draining");
      void (async () => {
        try {
          await daemon.shutdown();
        } catch (e) {
          logger.error({ err: messageOf(e) }, "shutdown failed");
        }
        await server.close();
        store.close();
        logger.info({}, "stopped");
        resolve(0);
        // Nothing should keep the process alive now; if something does, do not hang.
        setTimeout(() => process.exit(0), 2000).unref();
      })();
    };
    process.on("SIGTERM", onSignal);
    process.on("SIGINT", onSignal);
  });
}
