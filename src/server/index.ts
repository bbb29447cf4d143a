// The `civm serve` HTTP side (hono on node:http): POST /webhook (GitHub workflow_job
// deliveries, verified on the raw body), /healthz, /metrics (prom-client, the registry is
// injected), and the bearer-token JSON API over the state store. No decisions here: it
// records what GitHub says and what the operator asks; the reconciler acts on it.
import { timingSafeEqual } from "node:crypto";
import type { AddressInfo } from "node:net";
import { Hono, type Context } from "hono";
import { serve, type ServerType } from "@hono/node-server";
import { Webhooks } from "@octokit/webhooks";
import { Counter, Registry } from "prom-client";
import type { StateStore } from "../store/index.js";
import { matchPool } from "../pool/plan.js";

export interface ServerPool {
  name: string;
  labels: readonly string[];
  minRunners: number;
  maxRunners: number;
}

export interface ServerOptions {
  store: StateStore;
  pools: readonly ServerPool[];
  webhookSecret: string | undefined;
  apiToken: string | undefined;
  maxWebhookBytes: number;
  registry: Registry;
  now?: () => number;
  /** Called after a delivery changed what the pools must do (the reconciler wakes up). */
  onDemand?: () => void;
}

export type WebhookResult = "accepted" | "duplicate" | "ignored" | "bad-signature" | "malformed" | "too-large";

export function createApp(opts: ServerOptions): Hono {
  const now = opts.now ?? Date.now;
  const app = new Hono();
  const webhooks = opts.webhookSecret ? new Webhooks({ secret: opts.webhookSecret }) : undefined;
  const deliveries = new Counter({ name: "civm_webhook_deliveries_total", help: "Webhook deliveries by result", labelNames: ["result"], registers: [opts.registry] });
  const count = (c: Context, result: WebhookResult, status: 200 | 202 | 400 | 401 | 413, extra: Record<string, unknown> = {}) => {
    deliveries.inc({ result });
    return c.json({ result, ...extra }, status);
  };

  app.post("/webhook", async (c) => {
    const declared = Number(c.req.header("content-length") ?? "0");
    if (declared > opts.maxWebhookBytes) return count(c, "too-large", 413);
    const raw = await readLimited(c.req.raw, opts.maxWebhookBytes);
    if (raw === undefined) return count(c, "too-large", 413);
    const signature = c.req.header("x-hub-signature-256");
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
    if (!opts.store.recordDelivery({ id: delivery, event, ...(action ? { action } : {}), at: now() })) return count(c, "duplicate", 200);
    if (event !== "workflow_job") return count(c, "ignored", 202);
    const job = payload.workflow_job as { id?: unknown; labels?: unknown; runner_name?: unknown; conclusion?: unknown } | undefined;
    const repo = (payload.repository as { full_name?: unknown } | undefined)?.full_name;
    if (!job || typeof job.id !== "number" || !Array.isArray(job.labels)) return count(c, "malformed", 400, { error: "workflow_job without id or labels" });
    const status = action === "queued" ? "queued" : action === "in_progress" ? "in_progress" : action === "completed" ? "completed" : undefined;
    if (!status) return count(c, "ignored", 202);
    const labels = job.labels.filter((l): l is string => typeof l === "string");
    const pool = matchPool(opts.pools, labels)?.name;
    const runnerName = typeof job.runner_name === "string" ? job.runner_name : undefined;
    opts.store.transaction(() => {
      opts.store.upsertJob({
        id: job.id as number,
        labels,
        status,
        at: now(),
        ...(pool ? { pool } : {}),
        ...(typeof repo === "string" ? { repository: repo } : {}),
        ...(runnerName ? { runnerName } : {}),
        ...(typeof job.conclusion === "string" ? { conclusion: job.conclusion } : {}),
      });
      const vm = runnerName ? opts.store.vmByName(runnerName) : undefined;
      if (vm && status === "in_progress") opts.store.markBusy(vm.id, job.id as number, now());
    });
    opts.onDemand?.();
    return count(c, "accepted", 202, { pool: pool ?? null });
  });

  app.get("/healthz", (c) => c.json({ ok: true }));
  app.get("/metrics", async (c) => c.text(await opts.registry.metrics(), 200, { "content-type": opts.registry.contentType }));

  app.use("/api/*", async (c, next) => {
    const got = /^Bearer\s+(.+)$/i.exec(c.req.header("authorization") ?? "")?.[1];
    if (!opts.apiToken || !got || !sameSecret(got, opts.apiToken)) return c.json({ error: "missing or wrong bearer token" }, 401);
    await next();
  });

  const poolJson = (p: ServerPool) => {
    const st = opts.store.pool(p.name);
    const live = opts.store.vms({ pool: p.name, live: true });
    const n = (s: string) => live.filter((v) => v.state === s).length;
    const minRunners = st.minRunnersOverride ?? p.minRunners;
    const queued = opts.store.jobs({ status: "queued", pool: p.name }).length;
    const desired = st.paused ? 0 : Math.min(p.maxRunners, minRunners + queued + n("busy"));
    const state = st.paused ? "paused" : st.failures >= 3 ? "degraded" : "active";
    return { name: p.name, state, minRunners, maxRunners: p.maxRunners, desired, queued, starting: n("starting"), idle: n("idle"), busy: n("busy"), failures: st.failures };
  };
  const findPool = (name: string) => opts.pools.find((p) => p.name === name);

  app.get("/api/pools", (c) => c.json(opts.pools.map(poolJson)));
  app.get("/api/pools/:name", (c) => {
    const p = findPool(c.req.param("name"));
    return p ? c.json(poolJson(p)) : c.json({ error: `no pool named ${JSON.stringify(c.req.param("name"))}` }, 404);
  });
  app.post("/api/pools/:name/scale", async (c) => {
    const p = findPool(c.req.param("name"));
    if (!p) return c.json({ error: `no pool named ${JSON.stringify(c.req.param("name"))}` }, 404);
    const body = (await c.req.json().catch(() => undefined)) as { minRunners?: unknown } | undefined;
    const n = body?.minRunners;
    if (n !== null && (typeof n !== "number" || !Number.isInteger(n) || n < 0 || n > p.maxRunners)) {
      return c.json({ error: `minRunners must be a whole number from 0 to maxRunners (${p.maxRunners}), or null to go back to the config's value` }, 400);
    }
    opts.store.setMinRunners(p.name, n === null ? undefined : n);
    opts.onDemand?.();
    return c.json(poolJson(p));
  });
  for (const [verb, paused] of [["pause", true], ["resume", false]] as const) {
    app.post(`/api/pools/:name/${verb}`, (c) => {
      const p = findPool(c.req.param("name"));
      if (!p) return c.json({ error: `no pool named ${JSON.stringify(c.req.param("name"))}` }, 404);
      opts.store.setPaused(p.name, paused);
      opts.onDemand?.();
      return c.json(poolJson(p));
    });
  }
  app.get("/api/vms", (c) => {
    const pool = c.req.query("pool");
    const t = now();
    const vms = opts.store.vms({ live: c.req.query("all") !== "1", ...(pool ? { pool } : {}) });
    return c.json(vms.map((v) => ({ id: v.id, pool: v.pool, name: v.name, state: v.state, runnerId: v.githubRunnerId ?? null, job: v.jobId ?? null, ageSeconds: Math.floor((t - v.createdAt) / 1000), exitReason: v.exitReason ?? null })));
  });
  app.notFound((c) => c.json({ error: "not found" }, 404));
  return app;
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

/** Listens on host:port (port 0: a free one) and resolves once it accepts connections. */
export function listen(app: Hono, host: string, port: number): Promise<RunningServer> {
  return new Promise((resolve) => {
    const server: ServerType = serve({ fetch: app.fetch, hostname: host, port }, (info: AddressInfo) => {
      const h = info.address.includes(":") ? `[${info.address}]` : info.address;
      resolve({
        url: `http://${h}:${info.port}`,
        close: () =>
          new Promise<void>((done) => {
            (server as unknown as { closeAllConnections?: () => void }).closeAllConnections?.();
            server.close(() => done());
          }),
      });
    });
  });
}

export { Registry };
