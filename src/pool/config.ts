// Loads and validates the `civm serve` config (YAML or JSON) and its pools (inline or a
// separate pools.json in fireactions' format). Steps, in order: read → resolve
// ${{ fn:arg }} (the "civm run" pre-processor) → validate and fill defaults → check the
// environment (key file, images). Every problem is collected and reported at once, each
// naming the file, the pool and the field. Messages never show the value of a string field
// (it may be a secret); numbers, names and labels are shown.
import { parseNetworkValue } from "../net/policy.js";
import { readFile, stat } from "node:fs/promises";
import { dirname, isAbsolute, resolve } from "node:path";
import { ConfigError, messageOf } from "../errors/index.js";
import { duplicateNameProblems } from "../config/duplicates.js";
import { loadStructuredFile } from "../config/load-file.js";
import { preprocessConfig } from "../config/preprocess.js";
import { parseSize, SIZE_FORMS } from "../config/sizes.js";
import { durationProblem } from "../config/durations.js";
import { closestMatch } from "../config/suggest.js";
import type { JsonValue } from "../config/types.js";
import { parseRunnerTarget, type RunnerTarget } from "../github/registration-token.js";
import { resolvePaths } from "../host/paths.js";
import { classifyImageRef } from "../images/oci-ref.js";
import { LOG_RETENTION_DEFAULTS, parseKeepDays, parseMaxBytes, type LogRetention } from "../host/log-retention.js";
import { labelKey, normalizeLabels } from "./labels.js";
import { kindOf } from "../config/kind.js";
import { isFireactionsConfig, translateFireactions } from "./fireactions.js";
import { BUDGET_RESERVE_SHARE, DEFAULT_GITHUB_DEGRADED_AFTER_MS, DEFAULT_REPO_LIST_TTL_MS } from "./github-poll.js";
import type { GitHubAuthConfig, GitHubLimits, ImagePullPolicy, PoolImage, PoolSpec, RegistrationMode, ServeConfig } from "./types.js";
import { cacheSecrets, parseCaches, summarizeCaches } from "../caches/config.js";

export const SERVE_DEFAULTS = {
  listen: "127.0.0.1:8080",
  apiUrl: "https://api.github.com",
  pollIntervalSeconds: 60,
  shutdownTimeoutSeconds: 3600,
  /** Finished VMs, completed jobs and webhook deliveries are kept this long (7 days). */
  retentionSeconds: 7 * 86400,
  maxWebhookBytes: 1024 * 1024,
  minRunners: 0,
  cpus: 2,
  memSizeMib: 2048,
  /** GitHub ends a job after 6 h; a runner VM gets that plus a margin for boot and teardown. */
  timeoutSeconds: 6 * 3600 + 600,
  idleTimeoutSeconds: 300,
  groupId: 1,
  imagePullPolicy: "IfNotPresent" as ImagePullPolicy,
  registration: "jit" as RegistrationMode,
  workFolder: "_work",
  /** github.requestTimeout: a GitHub call (retries included) fails after this long (github/client.ts DEFAULT_REQUEST_TIMEOUT_MS). */
  githubRequestTimeoutSeconds: 30,
  /** github.degradedAfter: failing or rate-limited this long is "degraded" (github-poll.ts). */
  githubDegradedAfterSeconds: DEFAULT_GITHUB_DEGRADED_AFTER_MS / 1000,
  /** github.repositoryListCache: an organization's repository list is read again after this long. */
  repositoryListCacheSeconds: DEFAULT_REPO_LIST_TTL_MS / 1000,
  /** github.rateLimitReserve: share of the rate limit polling leaves unspent (%). */
  rateLimitReservePercent: BUDGET_RESERVE_SHARE * 100,
} as const;

/** The largest github.rateLimitReserve: polling needs some budget too. */
export const MAX_RATE_LIMIT_RESERVE_PERCENT = 90;

export const SERVE_KEYS = ["listen", "metricsListen", "tls", "stateDir", "store", "fleet", "github", "webhookSecret", "apiToken", "pools", "pollInterval", "shutdownTimeout", "retention", "maxWebhookBytes", "logs", "qemuUser", "caches"] as const;
export const FLEET_KEYS = ["hostId", "address", "cpus", "ram", "heartbeat", "deadAfter", "placementGrace"] as const;
export const FLEET_DEFAULTS = { heartbeatSeconds: 10, deadAfterSeconds: 60, placementGraceSeconds: 15 } as const;
export const TLS_KEYS = ["cert", "key"] as const;
/** GitHub sends at most 25 MB per delivery; the body is buffered before its signature is checked. */
export const MAX_WEBHOOK_BYTES_CAP = 25 * 1024 * 1024;
/** Shorter webhook secrets and API tokens are warned about on a non-loopback listener. */
export const MIN_SECRET_LENGTH = 16;
export const LOGS_KEYS = ["keepDays", "maxBytes"] as const;
export const GITHUB_KEYS = ["apiUrl", "appId", "privateKeyFile", "privateKey", "installationId", "token", "requestTimeout", "degradedAfter", "repositoryListCache", "rateLimitReserve"] as const;
export const POOL_KEYS = ["name", "maxRunners", "minRunners", "runner", "firecracker", "cpus", "ram", "disk", "timeout-seconds", "idleTimeout", "runnerGroup", "cmdline", "network", "start", "firmware-boot"] as const;
export const RUNNER_KEYS = ["name", "image", "imagePullPolicy", "organization", "repository", "labels", "groupId", "registration", "workFolder"] as const;
export const FIRECRACKER_KEYS = ["vcpuCount", "memSizeMib", "kernelArgs"] as const;
const PULL_POLICIES: readonly ImagePullPolicy[] = ["IfNotPresent", "Always", "Never"];
const REGISTRATION_MODES: readonly RegistrationMode[] = ["jit", "token"];
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
const MIN_RAM = 64 * 1024 ** 2;

export interface LoadServeOptions {
  env?: NodeJS.ProcessEnv;
  /** Check that each pool's image exists (a stored image or a disk file); default true. */
  checkImages?: boolean;
  /** State dir whose image store names resolve in; default the config's stateDir, then civm's default. */
  stateDir?: string;
}

type Obj = Record<string, unknown>;

/** Collects problems for one object; `where` prefixes each, `prefix` qualifies field names. */
class Fields {
  constructor(
    readonly o: Obj,
    readonly where: string,
    readonly problems: string[],
    readonly prefix = "",
  ) {}

  field(key: string): string {
    return `"${this.prefix}${key}"`;
  }

  add(message: string): void {
    this.problems.push(`${this.where}: ${message}`);
  }

  has(key: string): boolean {
    return this.o[key] !== undefined && this.o[key] !== null;
  }

  unknownKeys(known: readonly string[]): void {
    for (const k of Object.keys(this.o)) {
      if (known.includes(k)) continue;
      const hint = closestMatch(k, known);
      const fix = hint ? `did you mean "${this.prefix}${hint}"?` : `the known keys here are ${known.join(", ")}.`;
      this.add(`unknown key "${this.prefix}${k}"; ${fix}`);
    }
  }

  /** A whole number ≥ min; numeric strings (from ${{ env:... }}) are accepted. */
  int(key: string, opts: { min: number; def?: number; hint?: string }): number | undefined {
    const v = this.o[key];
    if (v === undefined || v === null) return opts.def;
    const n = typeof v === "string" && /^-?\d+$/.test(v.trim()) ? Number(v) : v;
    if (typeof n !== "number" || !Number.isInteger(n)) {
      this.add(`${this.field(key)} must be a whole number${opts.hint ? `, ${opts.hint}` : ""} (got ${kindOf(v)}).`);
      return undefined;
    }
    if (n < 0 && opts.min >= 0) {
      this.add(`${this.field(key)} must not be negative (got ${n}).`);
      return undefined;
    }
    if (n < opts.min) {
      this.add(`${this.field(key)} must be at least ${opts.min} (got ${n}).`);
      return undefined;
    }
    return n;
  }

  str(key: string, opts: { required?: string; quote?: boolean } = {}): string | undefined {
    const v = this.o[key];
    if (v === undefined || v === null) {
      if (opts.required) this.add(`missing ${this.field(key)}: ${opts.required}.`);
      return undefined;
    }
    if (typeof v !== "string" || v.trim() === "") {
      this.add(`${this.field(key)} must be a non-empty string (got ${typeof v === "string" ? "an empty string" : kindOf(v)}).`);
      return undefined;
    }
    return v;
  }

  oneOf<T extends string>(key: string, allowed: readonly T[], def: T): T {
    const v = this.o[key];
    if (v === undefined || v === null) return def;
    if (typeof v === "string" && (allowed as readonly string[]).includes(v)) return v as T;
    const shown = typeof v === "string" ? JSON.stringify(v) : kindOf(v);
    this.add(`${this.field(key)} must be one of ${allowed.map((a) => JSON.stringify(a)).join(", ")} (got ${shown}).`);
    return def;
  }

  /**
   * Whole seconds or a duration string; timerLimit: false for ages that never reach a timer
   * (retention); zeroMeans: what 0 does, for the message, when min is 0.
   */
  seconds(key: string, def: number, min = 1, timerLimit = true, zeroMeans?: string): number {
    const v = this.o[key];
    if (v === undefined || v === null) return def;
    const s = parseDuration(v);
    if (s === undefined) {
      if (typeof v === "number" && v < 0) this.add(`${this.field(key)} must not be negative (got ${v}).`);
      else this.add(`${this.field(key)} must be a number of seconds or a duration such as "90s", "5m", "1h30m", "7d" (got ${typeof v === "string" ? JSON.stringify(v) : kindOf(v)}).`);
      return def;
    }
    if (s < min) {
      this.add(`${this.field(key)} must be at least ${min} s (got ${s}).`);
      return def;
    }
    const problem = timerLimit ? durationProblem(s, { min, ...(zeroMeans ? { zeroMeans } : {}) }) : undefined;
    if (problem) {
      this.add(`${this.field(key)} ${problem} (got ${typeof v === "string" ? JSON.stringify(v) : v}).`);
      return def;
    }
    return s;
  }

  /** "10%": a whole percentage from 0 to max. */
  percent(key: string, def: number, max: number, what: string): number {
    const v = this.o[key];
    if (v === undefined || v === null) return def;
    const m = typeof v === "string" ? /^\s*(\d+)\s*%\s*$/.exec(v) : null;
    const n = m ? Number(m[1]) : undefined;
    if (n === undefined || n > max) {
      this.add(`${this.field(key)} must be a percentage from 0% to ${max}% (${what}), such as "${def}%" (got ${typeof v === "string" ? JSON.stringify(v) : typeof v === "number" ? `${v}, a number without "%"` : kindOf(v)}).`);
      return def;
    }
    return n;
  }

  size(key: string): number | undefined {
    const v = this.o[key];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== "string" && typeof v !== "number") {
      this.add(`${this.field(key)} must be a size: ${SIZE_FORMS} (got ${kindOf(v)}).`);
      return undefined;
    }
    try {
      return parseSize(v);
    } catch (e) {
      this.add(`${this.field(key)}: ${messageOf(e)}.`);
      return undefined;
    }
  }

  object(key: string, required?: string): Obj | undefined {
    const v = this.o[key];
    if (v === undefined || v === null) {
      if (required) this.add(`missing ${this.field(key)}: ${required}.`);
      return undefined;
    }
    if (!isObj(v)) {
      this.add(`${this.field(key)} must be an object (got ${kindOf(v)}).`);
      return undefined;
    }
    return v;
  }
}

/** Seconds in 90, "90", "90s", "5m", "1h30m", "7d"; undefined when it is none of those. */
export function parseDuration(v: unknown): number | undefined {
  if (typeof v === "number") return Number.isInteger(v) && v >= 0 ? v : undefined;
  if (typeof v !== "string") return undefined;
  const t = v.trim();
  if (/^\d+$/.test(t)) return Number(t);
  const m = /^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$/.exec(t);
  if (!m || t === "") return undefined;
  return Number(m[1] ?? 0) * 86400 + Number(m[2] ?? 0) * 3600 + Number(m[3] ?? 0) * 60 + Number(m[4] ?? 0);
}

/** "host:port", ":port", "[v6]:port" or a port number. */
export function parseListen(v: unknown): { host: string; port: number } | undefined {
  const text = typeof v === "number" ? `:${v}` : typeof v === "string" ? v.trim() : undefined;
  if (text === undefined) return undefined;
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s[\]]*)):(\d{1,5})$/.exec(text);
  if (!m) return undefined;
  const port = Number(m[3]);
  if (port > 65535) return undefined;
  return { host: m[1] ?? (m[2] || "127.0.0.1"), port };
}

/** Reads, resolves and validates `file`; throws one ConfigError listing every problem. */
export async function loadServeConfig(file: string, opts: LoadServeOptions = {}): Promise<ServeConfig> {
  const env = opts.env ?? process.env;
  const baseDir = dirname(resolve(file));
  let raw = await loadStructuredFile(file);
  let fireactionsNote: string | undefined;
  if (isFireactionsConfig(raw)) {
    const t = translateFireactions(raw);
    raw = t.config;
    if (t.ignored.length) fireactionsNote = `${file}: read as a fireactions config.yaml; civm does not use ${t.ignored.join(", ")}; remove these keys to silence this warning.`;
  }
  if (!isObj(raw)) {
    throw new ConfigError(`${file}: the file must contain an object with "github", "pools" and other keys, but it contains ${raw == null ? "nothing" : kindOf(raw)}.`);
  }
  const problems: string[] = [];
  const secrets: string[] = [];
  const top = await resolveSecrets(raw, file, baseDir, env, problems, secrets);
  const f = new Fields(top, file, problems);
  f.unknownKeys(SERVE_KEYS);

  const listen = parseListen(top.listen ?? SERVE_DEFAULTS.listen);
  if (!listen) f.add(`"listen" must be HOST:PORT (e.g. "127.0.0.1:8080") or a port number from 0 to 65535.`);
  const stateDirRaw = f.str("stateDir");
  const stateDir = stateDirRaw === undefined ? undefined : resolve(baseDir, stateDirRaw);
  const github = await loadGitHub(f, baseDir, secrets);
  const githubLimits = loadGitHubLimits(f);
  const webhookSecret = f.str("webhookSecret");
  const apiToken = f.str("apiToken");
  if (webhookSecret === undefined && !f.has("webhookSecret")) {
    // Allowed (poll-only operation), but POST /webhook then answers 401 to everything.
  }
  const pollIntervalSeconds = f.seconds("pollInterval", SERVE_DEFAULTS.pollIntervalSeconds, 5);
  const shutdownTimeoutSeconds = f.seconds("shutdownTimeout", SERVE_DEFAULTS.shutdownTimeoutSeconds, 0);
  // At least an hour: pruning runs hourly, and a shorter window would forget delivery ids
  // GitHub may still redeliver.
  const retentionSeconds = f.seconds("retention", SERVE_DEFAULTS.retentionSeconds, 3600, false);
  const maxWebhookBytes = f.size("maxWebhookBytes") ?? SERVE_DEFAULTS.maxWebhookBytes;
  if (maxWebhookBytes > MAX_WEBHOOK_BYTES_CAP) {
    f.add(`"maxWebhookBytes" (${maxWebhookBytes} bytes) is above ${MAX_WEBHOOK_BYTES_CAP} (25 MiB): GitHub never sends more, and every body is held in memory before its signature is checked; remove it (default 1 MiB) or lower it.`);
  }
  let metricsListen: { host: string; port: number } | undefined;
  if (f.has("metricsListen")) {
    metricsListen = parseListen(top.metricsListen);
    if (!metricsListen) f.add(`"metricsListen" must be HOST:PORT (e.g. "127.0.0.1:9464") or a port number.`);
  }
  const tls = await loadTls(f, baseDir);
  const store = loadStore(f, stateDir);
  const fleet = loadFleet(f);
  const logs = loadLogs(f);
  const qemuUserName = f.str("qemuUser");
  if (qemuUserName !== undefined && !/^[a-z_][a-z0-9_-]*\$?$/.test(qemuUserName)) f.add(`"qemuUser" must be a user name such as "civm-qemu" (the unprivileged user QEMU runs as), not ${JSON.stringify(qemuUserName)}.`);

  const caches = parseCaches(top.caches, file, baseDir);
  problems.push(...caches.problems);
  secrets.push(...cacheSecrets(caches.value));

  const { poolsFile, poolsBaseDir, entries } = await loadPoolEntries(top, file, baseDir, env, problems, secrets);
  const pools: PoolSpec[] = [];
  entries.forEach((entry, index) => {
    const p = validatePool(entry, index, poolsFile, poolsBaseDir, problems);
    if (p) pools.push(p);
  });
  problems.push(...crossPoolProblems(entries, pools, poolsFile));
  if (opts.checkImages !== false) {
    const store = opts.stateDir ?? stateDir ?? resolvePaths({}, env).stateDir;
    for (const p of pools) {
      const problem = await checkImage(p.runner.image, store, p.runner.imagePullPolicy);
      if (problem) problems.push(`${poolsFile}: ${poolLabel(p.name, p.index)}: "runner.image" ${problem}`);
    }
  }
  if (problems.length > 0) throw new ConfigError(problems.join("\n"));
  const warnings = fireactionsNote ? [fireactionsNote] : [];
  warnings.push(...unsafeSettings({ file, listen: listen!, metricsListen, tls: tls !== undefined, webhookSecret, apiToken, apiUrl: github?.apiUrl ?? SERVE_DEFAULTS.apiUrl, maxWebhookBytes }));
  return {
    metricsListen,
    tls,
    warnings,
    file,
    baseDir,
    listen: listen ?? { host: "127.0.0.1", port: 8080 },
    stateDir,
    store,
    fleet,
    github: github ?? { apiUrl: SERVE_DEFAULTS.apiUrl, auth: { kind: "token", token: "" } },
    githubLimits,
    webhookSecret,
    apiToken,
    pollIntervalSeconds,
    shutdownTimeoutSeconds,
    retentionSeconds,
    maxWebhookBytes,
    logs,
    qemuUser: qemuUserName,
    ...(caches.value ? { caches: caches.value } : {}),
    poolsFile,
    pools,
    secrets: [...new Set(secrets)],
  };
}

/**
 * `store`: "sqlite" (the default: `<state>/serve.db`, one host) or a postgres:// URL that a
 * fleet of hosts shares. The URL may carry a password (through the pre-processor, e.g.
 * postgres://civm:${{ file:/etc/civm/pg-password }}@db/civm): messages never show it.
 */
function loadStore(top: Fields, stateDir: string | undefined): ServeConfig["store"] {
  const sqlite = { kind: "sqlite" as const, where: `sqlite (${stateDir ?? "the state dir"}/serve.db)` };
  const v = top.str("store");
  if (v === undefined || v.trim() === "sqlite") return sqlite;
  const text = v.trim();
  let u: URL | undefined;
  try {
    u = new URL(text);
  } catch {
    // reported below
  }
  if (!u || (u.protocol !== "postgres:" && u.protocol !== "postgresql:")) {
    top.add(`"store" must be "sqlite" (the default, one host) or a PostgreSQL URL such as "postgres://civm@db.example:5432/civm" (a fleet of hosts sharing one database); put a password through \${{ file:... }} or PGPASSWORD.`);
    return sqlite;
  }
  if (!u.hostname && !u.searchParams.has("host")) {
    top.add(`"store" names no database host; write postgres://USER@HOST:PORT/DATABASE.`);
    return sqlite;
  }
  const shown = new URL(text);
  if (shown.password) shown.password = "***";
  return { kind: "postgres", url: text, where: shown.toString() };
}

/** `fleet:` this host's id, address and capacity, and the heartbeat timing (see docs/fleet.md). */
function loadFleet(top: Fields): ServeConfig["fleet"] {
  const o = top.object("fleet");
  const f = new Fields(o ?? {}, top.where, top.problems, "fleet.");
  if (o) f.unknownKeys(FLEET_KEYS);
  const hostId = f.str("hostId");
  if (hostId !== undefined && !NAME_RE.test(hostId)) f.add(`"fleet.hostId" must be made of letters, digits, ".", "_" and "-" (got ${JSON.stringify(hostId)}).`);
  const address = f.str("address");
  const cpus = f.int("cpus", { min: 1, hint: "the cpus runner VMs may take on this host together" });
  const ramBytes = f.size("ram");
  const heartbeatSeconds = f.seconds("heartbeat", FLEET_DEFAULTS.heartbeatSeconds, 1);
  const deadAfterSeconds = f.seconds("deadAfter", FLEET_DEFAULTS.deadAfterSeconds, 2);
  const placementGraceSeconds = f.seconds("placementGrace", FLEET_DEFAULTS.placementGraceSeconds, 0);
  if (deadAfterSeconds < 2 * heartbeatSeconds) f.add(`"fleet.deadAfter" (${deadAfterSeconds} s) must be at least twice "fleet.heartbeat" (${heartbeatSeconds} s), or a host that misses one heartbeat is declared dead.`);
  return { hostId, address, cpus, ramBytes, heartbeatSeconds, deadAfterSeconds, placementGraceSeconds };
}

/** `tls: {cert, key}`: PEM files (relative to the config), read now so a bad path is a config error. */
async function loadTls(top: Fields, baseDir: string): Promise<ServeConfig["tls"]> {
  const o = top.object("tls");
  if (!o) return undefined;
  const f = new Fields(o, top.where, top.problems, "tls.");
  f.unknownKeys(TLS_KEYS);
  const out: Record<"cert" | "key", { file: string; text: string } | undefined> = { cert: undefined, key: undefined };
  for (const k of TLS_KEYS) {
    const rel = f.str(k, { required: k === "cert" ? "the PEM certificate (chain) file" : "the PEM private key file" });
    if (rel === undefined) continue;
    const file = resolve(baseDir, rel);
    try {
      const text = await readFile(file, "utf8");
      const want = k === "cert" ? /-----BEGIN CERTIFICATE-----/ : /-----BEGIN [A-Z ]*PRIVATE KEY-----/;
      if (!want.test(text)) f.add(`"tls.${k}" (${file}) is not a PEM ${k === "cert" ? "certificate" : "private key"}.`);
      else out[k] = { file, text };
    } catch (e) {
      f.add(`"tls.${k}": cannot read ${file} (${osReason(e)}); relative paths start from the config file's folder.`);
    }
  }
  if (!out.cert || !out.key) return undefined;
  return { certFile: out.cert.file, keyFile: out.key.file, cert: out.cert.text, key: out.key.text };
}

/** 127.0.0.0/8, ::1 and localhost: only this host can connect. */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, "").toLowerCase();
  return h === "localhost" || h === "::1" || /^127\.\d+\.\d+\.\d+$/.test(h) || h === "::ffff:127.0.0.1";
}

/** Settings that work but expose something; each line names the field and the fix. */
export function unsafeSettings(c: {
  file: string;
  listen: { host: string; port: number };
  metricsListen: { host: string; port: number } | undefined;
  tls: boolean;
  webhookSecret: string | undefined;
  apiToken: string | undefined;
  apiUrl: string;
  maxWebhookBytes: number;
}): string[] {
  const out: string[] = [];
  const at = (l: { host: string; port: number }) => `${l.host.includes(":") ? `[${l.host}]` : l.host}:${l.port}`;
  if (!isLoopbackHost(c.listen.host)) {
    for (const [field, value] of [["webhookSecret", c.webhookSecret], ["apiToken", c.apiToken]] as const) {
      if (value !== undefined && value.length < MIN_SECRET_LENGTH) {
        out.push(`${c.file}: "${field}" is ${value.length} characters long on a listener other hosts can reach ("listen": ${at(c.listen)}); use ${MIN_SECRET_LENGTH} or more random characters (openssl rand -hex 32).`);
      }
    }
    if (!c.metricsListen) {
      out.push(`${c.file}: GET /metrics (no auth) answers anyone who reaches "listen" (${at(c.listen)}); set "metricsListen": "127.0.0.1:9464" to serve it on a listener of its own.`);
    }
    if (!c.tls) {
      out.push(`${c.file}: "listen" (${at(c.listen)}) is reachable from other hosts over plain HTTP: the API token travels in clear; put a TLS reverse proxy in front or set "tls": {"cert": ..., "key": ...}.`);
    }
  }
  try {
    const u = new URL(c.apiUrl);
    if (u.protocol === "http:" && !isLoopbackHost(u.hostname)) {
      out.push(`${c.file}: "github.apiUrl" (${c.apiUrl}) is plain HTTP to another host: the App's tokens and runner registration secrets travel in clear; use https://.`);
    }
  } catch {
    // reported as a problem already
  }
  return out;
}

/** `logs:` (console and supervisor log retention); defaults for what is missing. */
function loadLogs(top: Fields): LogRetention {
  const o = top.object("logs");
  if (!o) return { ...LOG_RETENTION_DEFAULTS };
  const f = new Fields(o, top.where, top.problems, "logs.");
  f.unknownKeys(LOGS_KEYS);
  const out = { ...LOG_RETENTION_DEFAULTS };
  try {
    if (f.has("keepDays")) out.keepDays = parseKeepDays(o.keepDays, `"logs.keepDays"`);
  } catch (e) {
    f.add(messageOf(e));
  }
  try {
    if (f.has("maxBytes")) out.maxBytes = parseMaxBytes(o.maxBytes, `"logs.maxBytes"`);
  } catch (e) {
    f.add(messageOf(e));
  }
  return out;
}

/** Runs the pre-processor; its problems join the list (the raw data is validated anyway). */
async function resolveSecrets(data: Obj, where: string, baseDir: string, env: NodeJS.ProcessEnv, problems: string[], secrets: string[]): Promise<Obj> {
  try {
    const r = await preprocessConfig(data as JsonValue, { env, where, baseDir });
    secrets.push(...r.secrets);
    return r.value as Obj;
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    // The pre-processor names paths from a root called "config"; here the root is the file.
    problems.push(...e.message.split("\n").map((l) => l.replace(`${where}: config.`, `${where}: `).replace(`${where}: config[`, `${where}: [`)));
    return data;
  }
}

/** `github.requestTimeout`, `degradedAfter`, `repositoryListCache`, `rateLimitReserve`; defaults for what is missing. */
function loadGitHubLimits(top: Fields): GitHubLimits {
  const o = isObj(top.o.github) ? top.o.github : {};
  const f = new Fields(o, top.where, top.problems, "github.");
  return {
    requestTimeoutSeconds: f.seconds("requestTimeout", SERVE_DEFAULTS.githubRequestTimeoutSeconds, 1),
    degradedAfterSeconds: f.seconds("degradedAfter", SERVE_DEFAULTS.githubDegradedAfterSeconds, 0, true, "= degraded at the first failure"),
    repositoryListCacheSeconds: f.seconds("repositoryListCache", SERVE_DEFAULTS.repositoryListCacheSeconds, 0, true, "= read the list on every poll"),
    rateLimitReservePercent: f.percent("rateLimitReserve", SERVE_DEFAULTS.rateLimitReservePercent, MAX_RATE_LIMIT_RESERVE_PERCENT, "of the rate limit kept for JIT configs and deregistration"),
  };
}

async function loadGitHub(top: Fields, baseDir: string, secrets: string[]): Promise<ServeConfig["github"] | undefined> {
  const o = top.object("github", 'add "github" with "appId" and "privateKeyFile" (a GitHub App) or "token"');
  if (!o) return undefined;
  const f = new Fields(o, top.where, top.problems, "github.");
  f.unknownKeys(GITHUB_KEYS);
  let apiUrl: string = SERVE_DEFAULTS.apiUrl;
  const urlText = f.str("apiUrl");
  if (urlText !== undefined) {
    try {
      const u = new URL(urlText);
      if (u.protocol !== "http:" && u.protocol !== "https:") throw new Error("not http");
      apiUrl = urlText.replace(/\/+$/, "");
    } catch {
      f.add(`"github.apiUrl" must be an http(s) URL such as https://api.github.com or https://HOST/api/v3 for GitHub Enterprise Server.`);
    }
  }
  const hasApp = f.has("appId") || f.has("privateKeyFile") || f.has("privateKey");
  if (f.has("token") && hasApp) {
    f.add(`"github" sets both "token" and a GitHub App ("appId", "privateKeyFile"); keep one of them.`);
    return undefined;
  }
  if (f.has("token")) {
    const token = f.str("token");
    if (token === undefined) return undefined;
    secrets.push(token);
    return { apiUrl, auth: { kind: "token", token: token.trim() } };
  }
  if (!hasApp) {
    f.add(`"github" needs credentials: "appId" and "privateKeyFile" of a GitHub App, or "token" (e.g. token: \${{ env:GITHUB_TOKEN }}).`);
    return undefined;
  }
  const appId = f.int("appId", { min: 1, hint: "the GitHub App's id" });
  if (!f.has("appId")) f.add(`missing "github.appId": the GitHub App's id (its settings page shows it).`);
  const installationId = f.int("installationId", { min: 1 });
  let privateKey: string | undefined;
  let privateKeyFile: string | undefined;
  if (f.has("privateKeyFile") && f.has("privateKey")) {
    f.add(`"github" sets both "privateKeyFile" and "privateKey"; keep one of them.`);
  } else if (f.has("privateKey")) {
    privateKey = f.str("privateKey");
  } else if (f.has("privateKeyFile")) {
    const rel = f.str("privateKeyFile");
    if (rel !== undefined) {
      privateKeyFile = resolve(baseDir, rel);
      privateKey = await readKeyFile(privateKeyFile, f);
    }
  } else {
    f.add(`missing "github.privateKeyFile": the path of the GitHub App's private key (.pem).`);
  }
  if (privateKey !== undefined) {
    secrets.push(privateKey);
    if (!/-----BEGIN [A-Z ]*PRIVATE KEY-----/.test(privateKey)) {
      f.add(`${privateKeyFile ? `"github.privateKeyFile" (${privateKeyFile})` : `"github.privateKey"`} is not a PEM private key (no "-----BEGIN ... PRIVATE KEY-----" line); use the .pem file GitHub generated for the App.`);
      privateKey = undefined;
    }
  }
  if (appId === undefined || privateKey === undefined) return undefined;
  const auth: GitHubAuthConfig = { kind: "app", appId, privateKey, privateKeyFile, installationId };
  return { apiUrl, auth };
}

async function readKeyFile(path: string, f: Fields): Promise<string | undefined> {
  try {
    return await readFile(path, "utf8");
  } catch (e) {
    f.add(`"github.privateKeyFile": cannot read ${path} (${osReason(e)}); relative paths start from the config file's folder.`);
    return undefined;
  }
}

async function loadPoolEntries(
  top: Obj,
  file: string,
  baseDir: string,
  env: NodeJS.ProcessEnv,
  problems: string[],
  secrets: string[],
): Promise<{ poolsFile: string; poolsBaseDir: string; entries: unknown[] }> {
  const v = top.pools;
  if (v === undefined || v === null) {
    problems.push(`${file}: missing "pools": the path of a pools.json file, or the list of pools inline.`);
    return { poolsFile: file, poolsBaseDir: baseDir, entries: [] };
  }
  if (Array.isArray(v)) return { poolsFile: file, poolsBaseDir: baseDir, entries: v };
  if (typeof v !== "string" || v.trim() === "") {
    problems.push(`${file}: "pools" must be the path of a pools file or a list of pools (got ${kindOf(v)}).`);
    return { poolsFile: file, poolsBaseDir: baseDir, entries: [] };
  }
  const path = isAbsolute(v) ? v : resolve(baseDir, v);
  let data: unknown;
  try {
    data = await loadStructuredFile(path);
  } catch (e) {
    problems.push(`${file}: "pools": ${messageOf(e)}`);
    return { poolsFile: path, poolsBaseDir: dirname(path), entries: [] };
  }
  if (!Array.isArray(data)) {
    problems.push(`${path}: the pools file must contain a list of pools ([{"name": ..., "maxRunners": ..., "runner": {...}}, ...]), but it contains ${data == null ? "nothing" : kindOf(data)}.`);
    return { poolsFile: path, poolsBaseDir: dirname(path), entries: [] };
  }
  const resolved = await resolveSecrets({ pools: data }, path, dirname(path), env, problems, secrets);
  const entries = Array.isArray(resolved.pools) ? resolved.pools : data;
  return { poolsFile: path, poolsBaseDir: dirname(path), entries };
}

export function poolLabel(name: unknown, index: number): string {
  return typeof name === "string" && name !== "" ? `pool ${JSON.stringify(name)} (#${index + 1})` : `pool #${index + 1}`;
}

function validatePool(entry: unknown, index: number, file: string, baseDir: string, problems: string[]): PoolSpec | undefined {
  const start = problems.length;
  const where = `${file}: ${poolLabel(isObj(entry) ? entry.name : undefined, index)}`;
  if (!isObj(entry)) {
    problems.push(`${where}: must be an object with "name", "maxRunners", "runner" and other keys, but it is ${kindOf(entry)}.`);
    return undefined;
  }
  const f = new Fields(entry, where, problems);
  f.unknownKeys(POOL_KEYS);
  const name = f.str("name", { required: 'a unique pool name, e.g. "default"' });
  if (name !== undefined && !NAME_RE.test(name)) f.add(`"name" must be made of letters, digits, ".", "_" and "-", starting with a letter or digit (got ${JSON.stringify(name)}).`);
  const maxRunners = f.int("maxRunners", { min: 0 });
  if (!f.has("maxRunners")) f.add(`missing "maxRunners": the most runner VMs this pool may run at once.`);
  const minRunners = f.int("minRunners", { min: 0, def: SERVE_DEFAULTS.minRunners });
  if (maxRunners !== undefined && minRunners !== undefined && minRunners > maxRunners) {
    f.add(`"minRunners" (${minRunners}) is greater than "maxRunners" (${maxRunners}); raise maxRunners or lower minRunners.`);
  }
  const runner = validateRunner(f, name, baseDir);
  const vm = validateVm(f);
  const idleTimeoutSeconds = f.seconds("idleTimeout", SERVE_DEFAULTS.idleTimeoutSeconds, 0);
  if (problems.length > start || !name || maxRunners === undefined || minRunners === undefined || !runner || !vm) return undefined;
  const cmdlineFrom = vm.cmdline === undefined ? undefined : f.has("cmdline") ? "cmdline" : "firecracker.kernelArgs";
  return { name, index, maxRunners, minRunners, runner, vm, idleTimeoutSeconds, ...(cmdlineFrom ? { cmdlineFrom } : {}) };
}

function validateRunner(pool: Fields, poolName: string | undefined, baseDir: string): PoolSpec["runner"] | undefined {
  const o = pool.object("runner", 'add "runner" with "image", "labels" and "organization" (or "repository")');
  if (!o) return undefined;
  const f = new Fields(o, pool.where, pool.problems, "runner.");
  f.unknownKeys(RUNNER_KEYS);
  const namePrefix = f.str("name") ?? poolName;
  if (f.has("name") && namePrefix !== undefined && !NAME_RE.test(namePrefix)) {
    f.add(`"runner.name" must be made of letters, digits, ".", "_" and "-" (got ${JSON.stringify(namePrefix)}).`);
  }
  const imageRef = f.str("image", { required: "a stored civm image name (civm image ls), the path of a disk image, or an OCI reference REGISTRY/REPO:TAG" });
  const imagePullPolicy = f.oneOf("imagePullPolicy", PULL_POLICIES, SERVE_DEFAULTS.imagePullPolicy);
  const target = runnerTarget(f);
  const labels = runnerLabels(f);
  let groupId = f.int("groupId", { min: 1, hint: "a runner group id" });
  const alias = pool.int("runnerGroup", { min: 1, hint: "a runner group id" });
  if (groupId !== undefined && alias !== undefined && groupId !== alias) {
    pool.add(`"runnerGroup" (${alias}) and "runner.groupId" (${groupId}) disagree; set one of them.`);
  }
  groupId = groupId ?? alias ?? SERVE_DEFAULTS.groupId;
  const registration = f.oneOf("registration", REGISTRATION_MODES, SERVE_DEFAULTS.registration);
  const workFolder = f.str("workFolder") ?? SERVE_DEFAULTS.workFolder;
  if (registration === "token" && workFolder !== SERVE_DEFAULTS.workFolder) {
    f.add(`"runner.workFolder" (${JSON.stringify(workFolder)}) applies to JIT registration only; with "runner.registration": "token" the guest's config.sh uses "${SERVE_DEFAULTS.workFolder}", so remove "runner.workFolder" or use "jit".`);
  }
  if (!namePrefix || !imageRef || !target || !labels) return undefined;
  const kind = classifyImageRef(imageRef).kind;
  const image: PoolImage = kind === "path" ? { ref: imageRef, kind, path: resolve(baseDir, imageRef) } : { ref: imageRef, kind };
  return { namePrefix, image, imagePullPolicy, target, labels, groupId, registration, workFolder };
}

function runnerTarget(f: Fields): RunnerTarget | undefined {
  const org = f.str("organization");
  const repo = f.str("repository");
  if (f.has("organization") && f.has("repository")) {
    f.add(`"runner" sets both "organization" and "repository"; runners register with one of them, keep one.`);
    return undefined;
  }
  if (!f.has("organization") && !f.has("repository")) {
    f.add(`"runner" needs "organization" (org-level runners) or "repository" (OWNER/REPO) to register with.`);
    return undefined;
  }
  try {
    if (org !== undefined) {
      const t = parseRunnerTarget(org);
      if (t.kind !== "org") throw new Error(`write the organization alone; for a repository use "runner.repository"`);
      return t;
    }
    if (repo !== undefined) {
      const t = parseRunnerTarget(repo);
      if (t.kind !== "repo") throw new Error("write OWNER/REPO");
      return t;
    }
  } catch (e) {
    f.add(`${f.field(org !== undefined ? "organization" : "repository")}: ${messageOf(e)}`);
  }
  return undefined;
}

function runnerLabels(f: Fields): string[] | undefined {
  const v = f.o.labels;
  if (v === undefined || v === null) {
    f.add(`missing "runner.labels": the labels jobs ask for in runs-on, e.g. ["self-hosted", "linux"].`);
    return undefined;
  }
  if (!Array.isArray(v) || v.length === 0 || v.some((l) => typeof l !== "string" || l.trim() === "" || l.includes(","))) {
    f.add(`"runner.labels" must be a non-empty list of label strings without commas, e.g. ["self-hosted", "linux"].`);
    return undefined;
  }
  return v.map((l: string) => l.trim());
}

function validateVm(pool: Fields): PoolSpec["vm"] | undefined {
  const start = pool.problems.length;
  const fc = pool.object("firecracker");
  const f = fc ? new Fields(fc, pool.where, pool.problems, "firecracker.") : undefined;
  f?.unknownKeys(FIRECRACKER_KEYS);
  const vcpu = f?.int("vcpuCount", { min: 1 });
  const mem = f?.int("memSizeMib", { min: 1 });
  const kernelArgs = f?.str("kernelArgs");
  const cpus = pool.int("cpus", { min: 1 });
  const ram = pool.size("ram");
  const cmdline = pool.str("cmdline");
  for (const [a, b] of [["cpus", "vcpuCount"], ["ram", "memSizeMib"], ["cmdline", "kernelArgs"]] as const) {
    if (pool.has(a) && f?.has(b)) pool.add(`both "${a}" and "firecracker.${b}" are set; they mean the same, keep one.`);
  }
  const ramBytes = ram ?? (mem ?? SERVE_DEFAULTS.memSizeMib) * 1024 ** 2;
  if (ramBytes < MIN_RAM) pool.add(`the VM's memory (${Math.round(ramBytes / 1024 ** 2)} MiB) is too little for a runner; give it at least ${MIN_RAM / 1024 ** 2} MiB.`);
  const rootDiskBytes = pool.size("disk");
  let timeoutSeconds = pool.int("timeout-seconds", { min: 1, def: SERVE_DEFAULTS.timeoutSeconds }) ?? SERVE_DEFAULTS.timeoutSeconds;
  const tooLong = durationProblem(timeoutSeconds, { min: 1 });
  if (tooLong) {
    pool.add(`${pool.field("timeout-seconds")} ${tooLong} (got ${timeoutSeconds}).`);
    timeoutSeconds = SERVE_DEFAULTS.timeoutSeconds;
  }
  const net = parseNetworkValue(pool.o.network ?? undefined);
  if (net.problems) pool.add(`"network" ${net.problems.join("; ")}.`);
  const startMode = pool.str("start");
  if (startMode !== undefined && startMode !== "snapshot" && startMode !== "boot") {
    pool.add(`"start" must be "snapshot" (restore runner VMs from the image's memory snapshot, made on first use) or "boot" (always boot); left out, a VM is restored when the image has a matching snapshot (got ${JSON.stringify(startMode)}).`);
  }
  const firmwareBoot = pool.o["firmware-boot"] ?? undefined;
  if (firmwareBoot !== undefined && typeof firmwareBoot !== "boolean") {
    pool.add(`"firmware-boot" must be true or false (got ${kindOf(firmwareBoot)}): true boots the image through its firmware and bootloader (SeaBIOS, GRUB) instead of its own kernel directly.`);
  }
  if (pool.problems.length > start) return undefined;
  return {
    cpus: cpus ?? vcpu ?? SERVE_DEFAULTS.cpus, ramBytes, rootDiskBytes, timeoutSeconds, cmdline: cmdline ?? kernelArgs, network: net.value!,
    ...(startMode === "snapshot" || startMode === "boot" ? { start: startMode } : {}),
    ...(firmwareBoot === true ? { firmwareBoot: true } : {}),
  };
}

/**
 * Duplicate names, and label sets two pools share where their targets overlap (a job of a
 * repository both serve could go to either). Pools of different organizations or
 * repositories may share labels: a job goes only to a pool that covers its repository.
 */
function crossPoolProblems(entries: unknown[], pools: PoolSpec[], file: string): string[] {
  const names = entries.map((e) => (isObj(e) && typeof e.name === "string" && e.name !== "" ? e.name : undefined));
  const out = duplicateNameProblems(file, names, "pools", "the API, the metrics and the logs pick a pool by name");
  const byLabels = new Map<string, PoolSpec[]>();
  for (const p of pools) {
    const key = labelKey(normalizeLabels(p.runner.labels));
    byLabels.set(key, [...(byLabels.get(key) ?? []), p]);
  }
  for (const [key, ps] of byLabels) {
    const reported = new Set<PoolSpec>();
    for (const p of ps) {
      if (reported.has(p)) continue;
      const clash = ps.filter((q) => q === p || targetsOverlap(p.runner.target, q.runner.target));
      if (clash.length < 2) continue;
      clash.forEach((q) => reported.add(q));
      const names = clash.map((q) => poolLabel(q.name, q.index)).join(" and ");
      out.push(`${file}: ${names} have the same "runner.labels" (${key.split(",").join(", ")}, ignoring case, "self-hosted" implied) and serve the same repositories, so a job asking for them could go to either; give each pool a label of its own.`);
    }
  }
  return out;
}

/** Whether two targets can serve a common repository (same org or repository, or an org and one of its repositories). */
function targetsOverlap(a: RunnerTarget, b: RunnerTarget): boolean {
  const owner = (t: RunnerTarget) => (t.kind === "org" ? t.org : t.owner).toLowerCase();
  if (owner(a) !== owner(b)) return false;
  if (a.kind === "org" || b.kind === "org") return true;
  return a.repo.toLowerCase() === b.repo.toLowerCase();
}

async function checkImage(image: PoolImage, stateDir: string, policy: ImagePullPolicy): Promise<string | undefined> {
  if (image.kind === "oci") {
    // Pulled when the pool first needs it (no network here), unless the policy forbids pulls.
    if (policy !== "Never") return undefined;
    const { parseOciReference } = await import("../images/oci-ref.js");
    const { findStoredOci } = await import("../images/oci.js");
    const { ImageStore } = await import("../images/store.js");
    if (await findStoredOci(new ImageStore(stateDir), stateDir, parseOciReference(image.ref)!)) return undefined;
    return `${JSON.stringify(image.ref)} has not been pulled and "runner.imagePullPolicy" is "Never"; pull it first (civm image pull ${image.ref}) or use "IfNotPresent".`;
  }
  if (image.kind === "stored") {
    const { ImageStore } = await import("../images/store.js");
    const store = new ImageStore(stateDir);
    if (await store.get(image.ref)) return undefined;
    const names = (await store.list()).map((i) => i.name);
    const have = names.length ? `stored images: ${names.join(", ")}` : "the store is empty";
    const hint = closestMatch(image.ref, names);
    return `names no stored image ${JSON.stringify(image.ref)} in ${store.dir} (${have})${hint ? `; did you mean ${JSON.stringify(hint)}?` : ""}; build one with "civm image build" or "civm image pull", or give the path of a disk image.`;
  }
  const path = image.path ?? image.ref;
  try {
    const s = await stat(path);
    if (!s.isFile() && !s.isBlockDevice()) return `${path} is not a file; give a disk image or a stored image name.`;
    return undefined;
  } catch (e) {
    if (looksLikeContainerRef(image.ref)) {
      return `${JSON.stringify(image.ref)} looks like a container image, but not like a reference civm pulls: those start with the registry (a host with a "." or ":PORT", e.g. docker.io/${image.ref}) and have a lowercase repository and a :TAG or @sha256: digest; or give a stored image name or the path of a disk image.`;
    }
    return `${path} cannot be used (${osReason(e)}); give a stored image name (civm image ls) or the path of a disk image (relative paths start from the pools file's folder).`;
  }
}

export function looksLikeContainerRef(ref: string): boolean {
  return !ref.startsWith(".") && !ref.startsWith("/") && /^[a-z0-9.-]+(:\d+)?\/[^\s]+?(:[\w.-]+|@sha256:[0-9a-f]{64})$/.test(ref);
}

function osReason(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  const reasons: Record<string, string> = { ENOENT: "no such file", EACCES: "permission denied", EISDIR: "it is a directory", ENOTDIR: "a parent is not a directory" };
  return (code && reasons[code]) ?? messageOf(e);
}

function isObj(v: unknown): v is Obj {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** What `civm config check` prints: the effective settings, secrets shown as set/unset only. */
export function summarizeServeConfig(c: ServeConfig): string[] {
  const auth = c.github.auth.kind === "app" ? `GitHub App ${c.github.auth.appId}` : "token";
  const lines = [
    `listen ${c.tls ? "https" : "http"} ${c.listen.host}:${c.listen.port}${c.metricsListen ? `, metrics on ${c.metricsListen.host}:${c.metricsListen.port}` : ""}; GitHub ${c.github.apiUrl} (${auth}); webhook secret ${c.webhookSecret ? "set" : "not set (POST /webhook answers 401)"}; API token ${c.apiToken ? "set" : "not set (API answers 401)"}`,
    `poll every ${c.pollIntervalSeconds}s; shutdown waits up to ${c.shutdownTimeoutSeconds}s for busy runners; state kept ${c.retentionSeconds}s; webhook bodies up to ${c.maxWebhookBytes} bytes`,
    `store ${c.store.where}${c.store.kind === "postgres" ? `; host ${c.fleet.hostId ?? "(host name)"}, heartbeat ${c.fleet.heartbeatSeconds}s, dead after ${c.fleet.deadAfterSeconds}s` : ""}${c.fleet.cpus !== undefined || c.fleet.ramBytes !== undefined ? `; capacity ${c.fleet.cpus ?? "all"} cpus, ${c.fleet.ramBytes !== undefined ? `${Math.round(c.fleet.ramBytes / 1024 ** 2)} MiB` : "all memory"}` : ""}`,
    `GitHub calls time out after ${c.githubLimits.requestTimeoutSeconds}s; a target failing or rate-limited for ${c.githubLimits.degradedAfterSeconds}s is degraded; organization repository lists kept ${c.githubLimits.repositoryListCacheSeconds}s; ${c.githubLimits.rateLimitReservePercent}% of the rate limit kept for JIT configs and deregistration`,
  ];
  lines.push(...summarizeCaches(c.caches));
  for (const p of c.pools) {
    const t = p.runner.target.kind === "org" ? `org ${p.runner.target.org}` : `repo ${p.runner.target.owner}/${p.runner.target.repo}`;
    lines.push(
      `pool ${p.name}: ${p.minRunners}..${p.maxRunners} runners, image ${p.runner.image.ref} (${p.runner.image.kind}), ${p.vm.cpus} cpus, ${Math.round(p.vm.ramBytes / 1024 ** 2)} MiB, ${t}, labels ${normalizeLabels(p.runner.labels).join(",")}, group ${p.runner.groupId}, idle timeout ${p.idleTimeoutSeconds}s`,
    );
  }
  return lines;
}
