// What a config reload (SIGHUP, POST /api/reload) may change besides the pools. Settings
// the running process can take are applied; the listen address, the state dir and the
// GitHub API URL need a restart (the socket is bound, the store open, runners registered
// there), so the running values are kept and the answer says so. Never shows a secret.
import { createHash } from "node:crypto";
import type { ServeConfig } from "./types.js";

export interface RestartNeeded {
  field: "listen" | "metricsListen" | "tls" | "stateDir" | "github.apiUrl" | "qemuUser" | "store" | "fleet" | "caches";
  running: string;
  configured: string;
}

export interface SettingsChanges {
  /** Settings that changed and were applied (names only). */
  applied: string[];
  /** Settings that changed but keep their running value until a restart. */
  restartNeeded: RestartNeeded[];
}

const listenText = (l: ServeConfig["listen"]) => `${l.host.includes(":") ? `[${l.host}]` : l.host}:${l.port}`;

export function settingsChanges(running: ServeConfig, next: ServeConfig, defaultStateDir: string): SettingsChanges {
  const applied: string[] = [];
  const restartNeeded: RestartNeeded[] = [];
  if (listenText(running.listen) !== listenText(next.listen)) restartNeeded.push({ field: "listen", running: listenText(running.listen), configured: listenText(next.listen) });
  const sd = (c: ServeConfig) => c.stateDir ?? defaultStateDir;
  if (sd(running) !== sd(next)) restartNeeded.push({ field: "stateDir", running: sd(running), configured: sd(next) });
  if (running.github.apiUrl !== next.github.apiUrl) restartNeeded.push({ field: "github.apiUrl", running: running.github.apiUrl, configured: next.github.apiUrl });
  const ml = (c: ServeConfig) => (c.metricsListen ? listenText(c.metricsListen) : "on listen");
  if (ml(running) !== ml(next)) restartNeeded.push({ field: "metricsListen", running: ml(running), configured: ml(next) });
  // A renewed certificate in the same file needs a restart too: the digest tells them apart.
  const tl = (c: ServeConfig) => (c.tls ? `${c.tls.certFile} (sha256 ${createHash("sha256").update(c.tls.cert).update(c.tls.key).digest("hex").slice(0, 12)})` : "off");
  if (tl(running) !== tl(next)) restartNeeded.push({ field: "tls", running: tl(running), configured: tl(next) });
  const qu = (c: ServeConfig) => c.qemuUser ?? "civm-qemu";
  if (qu(running) !== qu(next)) restartNeeded.push({ field: "qemuUser", running: qu(running), configured: qu(next) });
  // The store is open and this host registered with these: a restart applies them (the URL is
  // shown without its password).
  const st = (c: ServeConfig) => c.store.where;
  if (st(running) !== st(next) || (running.store.kind === "postgres" && next.store.kind === "postgres" && running.store.url !== next.store.url)) restartNeeded.push({ field: "store", running: st(running), configured: st(next) });
  const fl = (c: ServeConfig) => JSON.stringify(c.fleet);
  if (fl(running) !== fl(next)) restartNeeded.push({ field: "fleet", running: fl(running), configured: fl(next) });
  // The caches run as children with their ports handed to VMs: changed on restart only. Shown by name, not values (credentials).
  const ca = (c: ServeConfig) => (c.caches ? [...(c.caches.registry?.mirrors ?? []).map((m) => `registry/${m.registry}`), ...(c.caches.http ? ["http"] : [])].join(",") : "none");
  const caKey = (c: ServeConfig) => createHash("sha256").update(JSON.stringify(c.caches ?? null)).digest("hex");
  if (caKey(running) !== caKey(next)) restartNeeded.push({ field: "caches", running: ca(running), configured: ca(next) === ca(running) ? `${ca(next)} (settings changed)` : ca(next) });
  if (JSON.stringify(running.github.auth) !== JSON.stringify(next.github.auth)) applied.push("github credentials");
  if (running.webhookSecret !== next.webhookSecret) applied.push("webhookSecret");
  if (running.apiToken !== next.apiToken) applied.push("apiToken");
  if (running.pollIntervalSeconds !== next.pollIntervalSeconds) applied.push("pollInterval");
  if (running.shutdownTimeoutSeconds !== next.shutdownTimeoutSeconds) applied.push("shutdownTimeout");
  if (running.retentionSeconds !== next.retentionSeconds) applied.push("retention");
  if (running.maxWebhookBytes !== next.maxWebhookBytes) applied.push("maxWebhookBytes");
  if (JSON.stringify(running.logs) !== JSON.stringify(next.logs)) applied.push("logs");
  const limits: [keyof ServeConfig["githubLimits"], string][] = [
    ["requestTimeoutSeconds", "github.requestTimeout"],
    ["degradedAfterSeconds", "github.degradedAfter"],
    ["repositoryListCacheSeconds", "github.repositoryListCache"],
    ["rateLimitReservePercent", "github.rateLimitReserve"],
  ];
  for (const [k, field] of limits) if (running.githubLimits[k] !== next.githubLimits[k]) applied.push(field);
  return { applied, restartNeeded };
}

/** The daemon's timings from a config (at start and on every reload). */
export interface DaemonSettings {
  pollIntervalMs: number;
  shutdownTimeoutMs: number;
  retentionMs: number;
  githubDegradedAfterMs: number;
  repoListTtlMs: number;
  budgetReserveShare: number;
}

export function daemonSettings(c: ServeConfig): DaemonSettings {
  return {
    pollIntervalMs: c.pollIntervalSeconds * 1000,
    shutdownTimeoutMs: c.shutdownTimeoutSeconds * 1000,
    retentionMs: c.retentionSeconds * 1000,
    githubDegradedAfterMs: c.githubLimits.degradedAfterSeconds * 1000,
    repoListTtlMs: c.githubLimits.repositoryListCacheSeconds * 1000,
    budgetReserveShare: c.githubLimits.rateLimitReservePercent / 100,
  };
}

/** The config the process runs after applying `next`: restart-only settings keep their running values. */
export function effectiveConfig(running: ServeConfig, next: ServeConfig): ServeConfig {
  return { ...next, listen: running.listen, metricsListen: running.metricsListen, tls: running.tls, stateDir: running.stateDir, store: running.store, fleet: running.fleet, caches: running.caches, github: { apiUrl: running.github.apiUrl, auth: next.github.auth } };
}

/** One line for the log and the CLI: "restart civm serve to apply listen (running 127.0.0.1:8080, configured :9090)". */
export function restartMessage(r: readonly RestartNeeded[]): string | undefined {
  if (r.length === 0) return undefined;
  return `restart civm serve to apply ${r.map((x) => `${x.field} (running ${x.running}, configured ${x.configured})`).join(", ")}; until then the running values stay.`;
}
