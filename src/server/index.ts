// The `civm serve` HTTP side (hono on node:http): POST /webhook (GitHub workflow_job
// deliveries, verified on the raw body), /healthz, /metrics (prom-client, the registry is
// injected), and the bearer-token JSON API over the state store: pools, VMs, a VM's console
// log, and reload/drain through the injected control. No decisions here: it records what
// GitHub says and what the operator asks; the reconciler acts on it.
import { createHash, timingSafeEqual } from "node:crypto";
import { open } from "node:fs/promises";
import { createServer as createHttpsServer } from "node:https";
import type { AddressInfo } from "node:net";
import { Hono, type Context } from "hono";
import { serve, type ServerType } from "@hono/node-server";
import { Webhooks } from "@octokit/webhooks";
import { Counter, Registry } from "prom-client";
import type { Awaitable, HostRecord, Store, VmRecord } from "../store/types.js";
import { backoffState, desiredRunners } from "../pool/plan.js";
import { JobRouter } from "../pool/routing.js";
import type { RunnerTarget } from "../github/registration-token.js";
import { pickupSeconds, serveMetrics } from "../pool/metrics.js";
import { HostError } from "../errors/index.js";

/**
 * What /healthz says about the host: `civm doctor`'s checks, run once at start (the KVM probe
 * included). Informational: `status` stays about serving; a host without KVM still serves
 * (under TCG), and `kvm` says so.
 */
export interface HostHealth {
  /** No required check failed. */
  ok: boolean;
  /** The accelerator runner VMs use, and whether KVM is usable. */
  accel: "kvm" | "tcg" | undefined;
  kvm: boolean;
  checkedAt: string;
  /** Checks that did not pass: name, status (warn|fail), detail, fix. */
  problems: { name: string; status: string; detail: string; fix?: string }[];
}

/** One pool as the API reports it (GET /api/pools, /api/pools/NAME, scale, pause, resume). */
export interface ApiPool {
  name: string;
  state: "active" | "paused" | "degraded" | "draining" | "removing";
  minRunners: number;
  maxRunners: number;
  desired: number;
  queued: number;
  starting: number;
  idle: number;
  busy: number;
  failures: number;
  /** GitHub for the pool's target: ok, failing or rate-limited (degraded once that lasted longer than the threshold). */
  github?: ServerPool["github"];
  /** A fleet (PostgreSQL store): the counts above are the fleet's; these are each host's live VMs. */
  hosts?: Record<string, { starting: number; idle: number; busy: number }>;
}

/** One host as GET /api/hosts reports it. */
export interface ApiHost {
  id: string;
  address: string;
  state: HostRecord["state"];
  /** No heartbeat for longer than the dead-host time: about to be declared dead. */
  stale: boolean;
  heartbeatAgeSeconds: number;
  cpus: number | null;
  ramBytes: number | null;
  usedCpus: number;
  usedRamBytes: number;
  vms: { starting: number; idle: number; busy: number };
  pools: string[];
  polls: string[];
  version: string;
  startedAt: string;
  deadAt: string | null;
  deadBy: string | null;
  /** The host answering the request. */
  self: boolean;
}

export interface ServerPool {
  name: string;
  labels: readonly string[];
  /** Where its runners are registered: jobs of repositories it does not cover are not its. */
  target: RunnerTarget;
  /** Runner group id (1: the organization's default group, every repository). */
  groupId: number;
  minRunners: number;
  maxRunners: number;
  /** A reload removed the pool; it is listed until its last runner has finished. */
  removing?: boolean;
  /** GitHub's state for the pool's target (the daemon's schedule). */
  github?: { state: string; degraded: boolean; since: string | null; reason: string | null };
}

/** The daemon's answer to a reload: what changed, or why nothing did. */
export type ReloadOutcome = ({ ok: true } & Record<string, unknown>) | { ok: false; error: string; status?: 400 | 409 };

/** Reload and drain, backed by the daemon (serve.ts). */
export interface ServerControl {
  reload(): Promise<ReloadOutcome>;
  drain(o: { exitWhenDrained: boolean }): Awaitable<DaemonStatusJson>;
  undrain(): Awaitable<DaemonStatusJson>;
  status(): Awaitable<DaemonStatusJson>;
}

export interface DaemonStatusJson {
  /** serving, draining, drained or stopping. */
  state: string;
  [k: string]: unknown;
}

/**
 * Fields are read on every request, so a config reload can change them (serve.ts assigns
 * new pools, secrets and limits to the same object).
 */
export interface ServerOptions {
  store: Store;
  /** This host's id (GET /api/hosts marks it), and the dead-host time (ms) past which a heartbeat is stale. */
  hostId?: string;
  deadAfterMs?: number;
  pools: readonly ServerPool[] | (() => readonly ServerPool[]);
  webhookSecret: string | undefined;
  apiToken: string | undefined;
  maxWebhookBytes: number;
  registry: Registry;
  now?: () => number;
  /** GitHub's state per target for /healthz (status "degraded" when one has failed too long). */
  health?: () => { status: "ok" | "degraded"; [k: string]: unknown };
  /** The host's `civm doctor` verdict for /healthz (`host`); undefined until it has run. */
  hostHealth?: () => HostHealth | undefined;
  /** Called after a delivery changed what the pools must do (the reconciler wakes up). */
  onDemand?: () => void;
  /** POST /api/reload, /api/drain, /api/undrain, GET /api/status; without it they answer 501. */
  control?: ServerControl;
  /** Path of a runner VM's serial console log (undefined: none yet). */
  consoleLog?: (vm: VmRecord) => Promise<string | undefined>;
  /** Applied to console text before it is served (secrets of running VMs). */
  redact?: (text: string) => string;
  /** Job → pool (runner groups through GitHub); default: one without GitHub access, on `registry`. */
  router?: JobRouter;
  /** false: GET /metrics is served on a listener of its own (metricsListen), not here. */
  metrics?: boolean;
  /** The registry and HTTP caches: GET /api/caches, and /healthz's status (degraded while one has failed). */
  caches?: ServerCaches;
}

export interface ServerCaches {
  status(): Promise<readonly object[]>;
  health(): { status: "ok" | "degraded"; caches: readonly object[] };
}

/** Most console bytes one GET /api/vms/ID/log answers (the client asks again from the offset). */
export const LOG_CHUNK_BYTES = 1024 * 1024;

export type WebhookResult = "accepted" | "duplicate" | "ignored" | "bad-signature" | "malformed" | "too-large" | "failed";

export function createApp(opts: ServerOptions): Hono {
  const now = opts.now ?? Date.now;
  const app = new Hono();
  const pools = () => (typeof opts.pools === "function" ? opts.pools() : opts.pools);
  let verifier: { secret: string; webhooks: Webhooks } | undefined;
  const webhooksFor = (secret: string | undefined) => {
    if (!secret) return undefined;
    if (verifier?.secret !== secret) verifier = { secret, webhooks: new Webhooks({ secret }) };
    return verifier.webhooks;
  };
  const metrics = serveMetrics(opts.registry);
  const deliveries = new Counter({ name: "civm_webhook_deliveries_total", help: "Webhook deliveries by result", labelNames: ["result"], registers: [opts.registry] });
  const router = opts.router ?? new JobRouter({ registry: opts.registry, access: () => undefined });
  const count = (c: Context, result: WebhookResult, status: 200 | 202 | 400 | 401 | 413 | 500, extra: Record<string, unknown> = {}) => {
    deliveries.inc({ result });
    return c.json({ result, ...extra }, status);
  };

  app.post("/webhook", async (c) => {
    const declared = Number(c.req.header("content-length") ?? "0");
    if (declared > opts.maxWebhookBytes) return count(c, "too-large", 413);
    const raw = await readLimited(c.req.raw, opts.maxWebhookBytes);
    if (raw === undefined) return count(c, "too-large", 413);
    const signature = c.req.header("x-hub-signature-256");
    const webhooks = webhooksFor(opts.webhookSecret);
    if (!webhooks || !signature || !(await webhooks.verify(raw, signature).catch(() => false))) return count(c, "bad-signature", 401);
    let payload: Record<string, unknown>;
    try {
      payload = JSON.parse(raw) as Record<string, unknown>;
      if (typeof payload !== "object" || payload === null) throw new Error("not an object");
    } catch {
      return count(c, "malformed", 400);
    }
    const event = c.req.header("x-github-event") ?? "";
    const delivery = c.req.header("x-github-delivery") ?? "";
    const action = typeof payload.action === "string" ? payload.action : undefined;
    if (delivery === "") return count(c, "malformed", 400, { error: "missing X-GitHub-Delivery" });
    const job = event === "workflow_job" ? (payload.workflow_job as { id?: unknown; labels?: unknown; runner_name?: unknown; conclusion?: unknown; created_at?: unknown; started_at?: unknown } | undefined) : undefined;
    const repoInfo = payload.repository as { full_name?: unknown; private?: unknown } | undefined;
    const repo = typeof repoInfo?.full_name === "string" ? repoInfo.full_name : undefined;
    const jobId = typeof job?.id === "number" ? job.id : undefined;
    // A replay of the same signed body under a new delivery id is a duplicate too.
    const key = { id: delivery, event, ...(action ? { action } : {}), ...(jobId !== undefined ? { jobId } : {}), digest: createHash("sha256").update(raw).digest("hex") };
    try {
      if (await opts.store.knowsDelivery(key)) return count(c, "duplicate", 200);
    } catch {
      return count(c, "failed", 500, { error: "the delivery could not be recorded; GitHub may redeliver it" });
    }
    if (event === "workflow_job" && (!job || jobId === undefined || !Array.isArray(job.labels))) return count(c, "malformed", 400, { error: "workflow_job without id or labels" });
    const status = event !== "workflow_job" ? undefined : action === "queued" ? "queued" : action === "in_progress" ? "in_progress" : action === "completed" ? "completed" : undefined;
    const labels = Array.isArray(job?.labels) ? job.labels.filter((l): l is string => typeof l === "string") : [];
    // Routing may ask GitHub (runner groups): before the transaction, which must not wait.
    const route = status ? await router.route(pools().filter((p) => !p.removing), { repository: repo, labels, private: typeof repoInfo?.private === "boolean" ? repoInfo.private : undefined }) : undefined;
    const pool = route?.pool?.name;
    const runnerName = typeof job?.runner_name === "string" ? job.runner_name : undefined;
    let outcome: "duplicate" | "ignored" | "accepted";
    try {
      // The delivery and what it says are recorded together: a failure in between records
      // neither, so GitHub's redelivery is processed instead of answered "duplicate". Not a
      // job for any pool, not one already followed, not on a civm runner: not ours.
      const at = now();
      const r = await opts.store.recordWebhook({
        delivery: key,
        at,
        ...(status && jobId !== undefined
          ? {
              job: {
                id: jobId,
                labels,
                status,
                ...(pool ? { pool } : {}),
                ...(repo !== undefined ? { repository: repo } : {}),
                ...(runnerName ? { runnerName } : {}),
                ...(typeof job?.conclusion === "string" ? { conclusion: job.conclusion } : {}),
              },
            }
          : {}),
      });
      outcome = r.outcome;
      // First time in progress, on a civm runner: how long it waited.
      if (r.outcome === "accepted" && r.vm && status === "in_progress" && r.before?.startedAt === undefined) {
        const s = pickupSeconds(job ?? {}, r.before?.queuedAt, at);
        if (s !== undefined) metrics.pickup.observe({ pool: r.vm.pool }, s);
      }
    } catch {
      return count(c, "failed", 500, { error: "the delivery could not be recorded; GitHub may redeliver it" });
    }
    if (outcome === "duplicate") return count(c, "duplicate", 200);
    if (outcome === "ignored") {
      if (route?.ignored && jobId !== undefined) router.ignored(jobId, route.ignored);
      return count(c, "ignored", 202, route?.ignored ? { reason: route.ignored } : {});
    }
    opts.onDemand?.();
    return count(c, "accepted", 202, { pool: pool ?? null });
  });

  // Still 200 when degraded: the process is fine, GitHub is not; restarting would not help.
  app.get("/healthz", (c) => {
    const h = opts.health?.();
    const host = opts.hostHealth?.();
    const caches = opts.caches?.health();
    const status = h?.status === "degraded" || caches?.status === "degraded" ? "degraded" : "ok";
    return c.json({ ok: true, status, ...(h ? { github: h } : {}), ...(host ? { host } : {}), ...(caches ? { caches: caches.caches } : {}) });
  });
  if (opts.metrics !== false) app.get("/metrics", metricsHandler(opts.registry));

  app.use("/api/*", async (c, next) => {
    const got = /^Bearer\s+(.+)$/i.exec(c.req.header("authorization") ?? "")?.[1];
    if (!opts.apiToken || !got || !sameSecret(got, opts.apiToken)) return c.json({ error: "missing or wrong bearer token" }, 401);
    await next();
  });

  const poolJson = async (p: ServerPool): Promise<ApiPool> => {
    const st = await opts.store.pool(p.name);
    const live = await opts.store.vms({ pool: p.name, live: true });
    const n = (s: string) => live.filter((v) => v.state === s).length;
    const minRunners = st.minRunnersOverride ?? p.minRunners;
    const queued = (await opts.store.jobs({ status: "queued", pool: p.name })).length;
    const daemon = (await opts.control?.status())?.state;
    const draining = daemon === "draining" || daemon === "drained" || daemon === "stopping";
    // The same rules the reconciler plans with (busy runners count as demand).
    const desired = st.paused || draining || p.removing ? 0 : desiredRunners({ minRunners, maxRunners: p.maxRunners }, queued + n("busy"));
    const health = backoffState(st).health;
    const state = p.removing ? "removing" : draining ? "draining" : health === "active" && p.github?.degraded ? "degraded" : health;
    const out: ApiPool = { name: p.name, state, minRunners, maxRunners: p.maxRunners, desired, queued, starting: n("starting"), idle: n("idle"), busy: n("busy"), failures: st.failures, ...(p.github ? { github: p.github } : {}) };
    if (opts.store.kind === "postgres") {
      const hosts: NonNullable<ApiPool["hosts"]> = {};
      for (const v of live) {
        const h = (hosts[v.host ?? "?"] ??= { starting: 0, idle: 0, busy: 0 });
        if (v.state !== "finished") h[v.state]++;
      }
      out.hosts = hosts;
    }
    return out;
  };
  const findPool = (name: string) => pools().find((p) => p.name === name && !p.removing);

  app.get("/api/pools", async (c) => c.json(await Promise.all(pools().map(poolJson))));
  app.get("/api/pools/:name", async (c) => {
    const p = pools().find((x) => x.name === c.req.param("name"));
    return p ? c.json(await poolJson(p)) : c.json({ error: `no pool named ${JSON.stringify(c.req.param("name"))}` }, 404);
  });
  app.post("/api/pools/:name/scale", async (c) => {
    const p = findPool(c.req.param("name"));
    if (!p) return c.json({ error: `no pool named ${JSON.stringify(c.req.param("name"))}` }, 404);
    const body = (await c.req.json().catch(() => undefined)) as { minRunners?: unknown } | undefined;
    const n = body?.minRunners;
    if (n !== null && (typeof n !== "number" || !Number.isInteger(n) || n < 0 || n > p.maxRunners)) {
      return c.json({ error: `minRunners must be a whole number from 0 to maxRunners (${p.maxRunners}), or null to go back to the config's value` }, 400);
    }
    await opts.store.setMinRunners(p.name, n === null ? undefined : n);
    opts.onDemand?.();
    return c.json(await poolJson(p));
  });
  for (const [verb, paused] of [["pause", true], ["resume", false]] as const) {
    app.post(`/api/pools/:name/${verb}`, async (c) => {
      const p = findPool(c.req.param("name"));
      if (!p) return c.json({ error: `no pool named ${JSON.stringify(c.req.param("name"))}` }, 404);
      await opts.store.setPaused(p.name, paused);
      opts.onDemand?.();
      return c.json(await poolJson(p));
    });
  }
  app.get("/api/vms", async (c) => {
    const pool = c.req.query("pool");
    const host = c.req.query("host");
    const t = now();
    const vms = await opts.store.vms({ live: c.req.query("all") !== "1", ...(pool ? { pool } : {}), ...(host ? { host } : {}) });
    return c.json(vms.map((v) => ({ id: v.id, pool: v.pool, name: v.name, state: v.state, runnerId: v.githubRunnerId ?? null, job: v.jobId ?? null, ageSeconds: Math.floor((t - v.createdAt) / 1000), exitReason: v.exitReason ?? null, host: v.host ?? null })));
  });
  app.get("/api/hosts", async (c) => {
    const unlimited = (n: number, limit: number) => (n >= limit ? null : n);
    const hosts = await opts.store.hosts();
    return c.json(
      hosts.map(
        (h): ApiHost => ({
          id: h.id,
          address: h.address,
          state: h.state,
          stale: (h.state === "active" || h.state === "draining") && opts.deadAfterMs !== undefined && h.heartbeatAgeMs > opts.deadAfterMs,
          heartbeatAgeSeconds: Math.floor(h.heartbeatAgeMs / 1000),
          cpus: unlimited(h.cpus, 2 ** 31 - 1),
          ramBytes: unlimited(h.ramBytes, Number.MAX_SAFE_INTEGER),
          usedCpus: h.usedCpus,
          usedRamBytes: h.usedRamBytes,
          vms: h.vms,
          pools: h.pools,
          polls: h.polls,
          version: h.version,
          startedAt: new Date(h.startedAt).toISOString(),
          deadAt: h.deadAt !== undefined ? new Date(h.deadAt).toISOString() : null,
          deadBy: h.deadBy ?? null,
          self: h.id === opts.hostId,
        }),
      ),
    );
  });
  app.get("/api/vms/:id/log", async (c) => {
    const key = c.req.param("id");
    const vm = (await opts.store.vm(key)) ?? (await opts.store.vmByName(key));
    if (!vm) return c.json({ error: `no runner VM with the id or runner name ${JSON.stringify(key)} (civm vms --all lists them)` }, 404);
    const offsetText = c.req.query("offset") ?? "0";
    if (!/^\d+$/.test(offsetText)) return c.json({ error: `offset must be a whole number of bytes (got ${JSON.stringify(offsetText)})` }, 400);
    const path = opts.consoleLog ? await opts.consoleLog(vm) : undefined;
    const chunk = path ? await readLogChunk(path, Number(offsetText), vm.state === "finished") : { text: "", next: Number(offsetText), more: false };
    const text = opts.redact ? opts.redact(chunk.text) : chunk.text;
    return c.body(text, 200, {
      "content-type": "text/plain; charset=utf-8",
      "x-civm-log-offset": String(chunk.next),
      "x-civm-log-more": chunk.more ? "1" : "0",
      "x-civm-vm-state": vm.state,
    });
  });

  app.get("/api/caches", async (c) => c.json(opts.caches ? await opts.caches.status() : []));

  const noControl = (c: Context) => c.json({ error: "this server has no daemon to control" }, 501);
  app.get("/api/status", async (c) => (opts.control ? c.json(await opts.control.status()) : noControl(c)));
  app.post("/api/reload", async (c) => {
    if (!opts.control) return noControl(c);
    const r = await opts.control.reload();
    return r.ok ? c.json(r) : c.json({ error: r.error }, r.status ?? 400);
  });
  app.post("/api/drain", async (c) => {
    if (!opts.control) return noControl(c);
    const text = await c.req.text();
    let body: { exit?: unknown } = {};
    try {
      body = text.trim() ? (JSON.parse(text) as { exit?: unknown }) : {};
    } catch {
      return c.json({ error: 'the body must be JSON such as {"exit": true}, or empty' }, 400);
    }
    if (body.exit !== undefined && typeof body.exit !== "boolean") return c.json({ error: '"exit" must be true or false' }, 400);
    return c.json(await opts.control.drain({ exitWhenDrained: body.exit === true }), 202);
  });
  app.post("/api/undrain", async (c) => (opts.control ? c.json(await opts.control.undrain()) : noControl(c)));
  app.notFound((c) => c.json({ error: "not found" }, 404));
  // The store (PostgreSQL) may be unreachable for a while: say so instead of a bare 500.
  app.onError((e, c) => c.json({ error: `the state store could not answer (${e.message}); try again shortly` }, 503));
  return app;
}

/**
 * Console bytes from `offset`, at most LOG_CHUNK_BYTES. While the VM runs only whole lines
 * are served (a secret is never cut in two for redaction, and the client asks again).
 */
async function readLogChunk(path: string, offset: number, finished: boolean): Promise<{ text: string; next: number; more: boolean }> {
  let fh;
  try {
    fh = await open(path, "r");
  } catch {
    return { text: "", next: offset, more: false };
  }
  try {
    const size = (await fh.stat()).size;
    const from = Math.min(offset, size);
    const want = Math.min(size - from, LOG_CHUNK_BYTES);
    const buf = Buffer.alloc(want);
    const { bytesRead } = await fh.read(buf, 0, want, from);
    let data = buf.subarray(0, bytesRead);
    const more = from + bytesRead < size;
    if (!finished || more) {
      const nl = data.lastIndexOf(0x0a);
      if (nl >= 0) data = data.subarray(0, nl + 1);
      else if (!more && bytesRead < LOG_CHUNK_BYTES) data = data.subarray(0, 0);
    }
    // more: the chunk stopped before the end of the file (not a line still being written).
    return { text: data.toString("utf8"), next: from + data.length, more };
  } finally {
    await fh.close();
  }
}

function sameSecret(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

/** The body as text, or undefined once it passes `limit` bytes (reading stops there). */
async function readLimited(req: Request, limit: number): Promise<string | undefined> {
  if (!req.body) return "";
  const reader = req.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel().catch(() => {});
      return undefined;
    }
    chunks.push(value);
  }
  return Buffer.concat(chunks).toString("utf8");
}

export interface RunningServer {
  url: string;
  close(): Promise<void>;
}

const metricsHandler = (registry: Registry) => async (c: Context) => c.text(await registry.metrics(), 200, { "content-type": registry.contentType });

/** GET /metrics (and /healthz) alone, for "metricsListen". */
export function createMetricsApp(registry: Registry): Hono {
  const app = new Hono();
  app.get("/metrics", metricsHandler(registry));
  app.get("/healthz", (c) => c.json({ ok: true }));
  app.notFound((c) => c.json({ error: "not found" }, 404));
  return app;
}

/** Why a listener could not be opened, as an error naming the address and what to do (exit 8). */
export function listenError(e: NodeJS.ErrnoException, host: string, port: number, field = "listen"): HostError {
  const at = `${host.includes(":") ? `[${host}]` : host}:${port}`;
  const why: Record<string, string> = {
    EADDRINUSE: `the port is already in use (another civm serve, or another program: ss -ltnp 'sport = :${port}' shows which); stop it or set "${field}" to a free port`,
    EACCES: `permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE); use a port from 1024 up`,
    EADDRNOTAVAIL: `no network interface of this host has that address; use one it has, 127.0.0.1 or 0.0.0.0`,
  };
  return new HostError(`cannot listen on ${at} ("${field}"): ${(e.code && why[e.code]) ?? e.message}.`, { cause: e });
}

/** Listens on host:port (port 0: a free one) and resolves once it accepts connections. */
export function listen(app: Hono, host: string, port: number, o: { field?: string; tls?: { cert: string; key: string } } = {}): Promise<RunningServer> {
  return new Promise((resolve, reject) => {
    const tls = o.tls ? { createServer: createHttpsServer, serverOptions: { cert: o.tls.cert, key: o.tls.key } } : {};
    const server: ServerType = serve({ fetch: app.fetch, hostname: host, port, ...tls }, (info: AddressInfo) => {
      const h = info.address.includes(":") ? `[${info.address}]` : info.address;
      resolve({
        url: `${o.tls ? "https" : "http"}://${h}:${info.port}`,
        // Requests in flight (e.g. the answer to the drain that ends the process) are
        // finished; connections still open after 2 s are cut.
        close: () =>
          new Promise<void>((done) => {
            const s = server as unknown as { closeIdleConnections?: () => void; closeAllConnections?: () => void };
            server.close(() => done());
            s.closeIdleConnections?.();
            setTimeout(() => s.closeAllConnections?.(), 2000).unref();
          }),
      });
    });
    // Before it listens, an error (port in use) is the caller's to report, not a crash.
    server.once("error", (e: NodeJS.ErrnoException) => reject(listenError(e, host, port, o.field)));
  });
}

export { Registry };
