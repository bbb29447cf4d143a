// Shared setup for `civm serve` end-to-end tests and benchmarks on real QEMU: the fake GitHub,
// a "hub" that plays GitHub's side for the tiny guest's pretend runner, a config writer and a
// running daemon with helpers for its API.
//
// The tiny guest in runner mode (test/support/tiny-guest-init.sh) POSTs its JIT config to
// http://HUB/register, then polls /job every second and, on "run", POSTs /done and powers off.
// The hub maps the JIT config back to the fake's runner and updates the fake as GitHub would
// (online, busy, offline) and sends civm the signed in_progress / completed webhooks.
import type { ChildProcess } from "node:child_process";
import { createServer as createHttpServer, type IncomingMessage } from "node:http";
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { civmEnv, startCivm, type CivmEnv, type CivmResult } from "./civm-cli.js";
import { sendWebhook, workflowJobPayload, type FakeGitHub, type FakeRunner } from "./fake-github.js";
import type { ApiPool } from "../../src/server/index.js";

export const SECRET = "serve-e2e-webhook-secret";
export const TOKEN = "serve-e2e-api-token";
export const REPO = "rust-lang-ci/rust";

function body(req: IncomingMessage): Promise<string> {
  return new Promise((resolve) => {
    let b = "";
    req.on("data", (c) => (b += c));
    req.on("end", () => resolve(b));
  });
}

export interface Hub {
  port: number;
  /** "register NAME", "job ID NAME", "done NAME", "finish NAME" in order. */
  events: string[];
  /** When each runner registered / took a job (ms epoch), by runner name. */
  registeredAt: Map<string, number>;
  tookJobAt: Map<string, number>;
  /** Makes that runner's next /job poll answer "run" without a job (its VM then powers off). */
  finish(name: string): void;
  close(): Promise<void>;
}

export interface HubOptions {
  /**
   * Like GitHub's heartbeat: a runner whose guest has not polled for this long is set offline
   * in the fake (default: never; a dead VM's runner then stays "online").
   */
  offlineAfterMs?: number;
  /** The job script /script hands the fake actions runner (test/support/fake-runner.ts). */
  script?: string;
  /** Files anyone may GET at /files/NAME (what a job downloads). */
  files?: Record<string, Buffer>;
}

/** The guest's side of GitHub: registration, job assignment, completion (with webhooks to civm). */
export async function startHub(gh: FakeGitHub, webhookUrl: () => string, opts: HubOptions = {}): Promise<Hub> {
  const events: string[] = [];
  const registeredAt = new Map<string, number>();
  const tookJobAt = new Map<string, number>();
  const finishing = new Set<string>();
  const lastSeen = new Map<number, number>();
  const runnerOf = (jit: string): FakeRunner | undefined => [...gh.state.runners.values()].find((r) => r.encodedJitConfig === jit.trim());
  const srv = createHttpServer((req, res) => {
    void (async () => {
      const file = req.url?.startsWith("/files/") ? opts.files?.[req.url.slice("/files/".length)] : undefined;
      if (file) return res.writeHead(200, { "content-type": "application/octet-stream", "content-length": file.length }).end(file);
      const r = runnerOf(await body(req));
      if (!r) return res.writeHead(404).end("unknown runner");
      lastSeen.set(r.id, Date.now());
      if (req.url === "/register") {
        gh.setRunner(r.id, { status: "online" });
        if (!registeredAt.has(r.name)) registeredAt.set(r.name, Date.now());
        events.push(`register ${r.name}`);
        return res.end("ok");
      }
      if (req.url === "/job") {
        if (r.status === "offline") gh.setRunner(r.id, { status: "online" });
        if (finishing.delete(r.name)) {
          events.push(`finish ${r.name}`);
          return res.end("run");
        }
        const job = gh.state.jobs.find((j) => j.status === "queued");
        if (!job || r.busy) return res.end("wait");
        job.status = "in_progress";
        job.runnerName = r.name;
        gh.setRunner(r.id, { busy: true });
        tookJobAt.set(r.name, Date.now());
        events.push(`job ${job.id} ${r.name}`);
        res.end("run");
        await sendWebhook(webhookUrl(), { secret: SECRET, payload: await workflowJobPayload("in_progress", { id: job.id, runId: job.runId, labels: job.labels, repository: job.repository, runnerName: r.name }) }).catch(() => {});
        return;
      }
      if (req.url === "/script") return res.end(opts.script ?? "echo no job script\nexit 1\n");
      if (req.url === "/done") {
        const job = gh.state.jobs.find((j) => j.runnerName === r.name && j.status === "in_progress");
        if (job) job.status = "completed";
        gh.setRunner(r.id, { busy: false, status: "offline" });
        lastSeen.delete(r.id);
        events.push(`done ${r.name}`);
        res.end("ok");
        if (job) await sendWebhook(webhookUrl(), { secret: SECRET, payload: await workflowJobPayload("completed", { id: job.id, runId: job.runId, labels: job.labels, repository: job.repository, runnerName: r.name }) }).catch(() => {});
        return;
      }
      res.writeHead(404).end();
    })();
  });
  const heartbeat =
    opts.offlineAfterMs === undefined
      ? undefined
      : setInterval(() => {
          const limit = Date.now() - opts.offlineAfterMs!;
          for (const [id, at] of lastSeen) {
            const r = gh.state.runners.get(id);
            if (!r) lastSeen.delete(id);
            else if (at < limit && r.status === "online") gh.setRunner(id, { status: "offline" });
          }
        }, 500);
  await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
  return {
    port: (srv.address() as { port: number }).port,
    events,
    registeredAt,
    tookJobAt,
    finish: (name) => void finishing.add(name),
    close: () =>
      new Promise<void>((r) => {
        if (heartbeat) clearInterval(heartbeat);
        srv.closeAllConnections();
        srv.close(() => r());
      }),
  };
}

export interface PoolOptions {
  name?: string;
  minRunners?: number;
  maxRunners?: number;
  idleTimeout?: number;
  ram?: string;
  labels?: string[];
  /** Kernel command line additions after the hub address. */
  cmdline?: string;
  /** Given: the pool sets fireactions' `firecracker.kernelArgs` (these, then the hub address) instead of `cmdline`. */
  kernelArgs?: string;
}

/** A serve config (JSON) for one or more tiny-guest pools against the fake GitHub and the hub. */
export function serveConfig(o: { port: number; gh: FakeGitHub; hub: Hub; image: string; pollInterval?: number; shutdownTimeout?: number; maxWebhookBytes?: string; pools: PoolOptions[] }): Record<string, unknown> {
  return {
    listen: `127.0.0.1:${o.port}`,
    github: { apiUrl: o.gh.url, token: o.gh.validToken },
    webhookSecret: SECRET,
    apiToken: TOKEN,
    pollInterval: o.pollInterval ?? 5,
    shutdownTimeout: o.shutdownTimeout ?? 60,
    ...(o.maxWebhookBytes ? { maxWebhookBytes: o.maxWebhookBytes } : {}),
    pools: o.pools.map((p) => ({
      name: p.name ?? "tiny",
      minRunners: p.minRunners ?? 0,
      maxRunners: p.maxRunners ?? 2,
      idleTimeout: p.idleTimeout ?? 0,
      cpus: 1,
      ram: p.ram ?? "256M",
      "timeout-seconds": 600,
      ...(p.kernelArgs !== undefined
        ? { firecracker: { kernelArgs: `${p.kernelArgs} tiny.hub=10.0.2.2:${o.hub.port}` } }
        : { cmdline: `console=ttyS0 panic=-1 quiet tiny.hub=10.0.2.2:${o.hub.port}${p.cmdline ? ` ${p.cmdline}` : ""}` }),
      // The pretend runner reaches the hub on the host: the one exception to the policy.
      network: { allow: [`host:${o.hub.port}`] },
      runner: { name: p.name ?? "tiny", image: o.image, repository: REPO, labels: p.labels ?? [p.name ?? "tiny"] },
    })),
  };
}

export interface ApiVm {
  id: string;
  pool: string;
  name: string;
  state: "starting" | "idle" | "busy" | "finished";
  runnerId: number | null;
  job: number | null;
  ageSeconds: number;
  exitReason: string | null;
  /** The host that runs it (a fleet). */
  host: string | null;
}

export type { ApiPool } from "../../src/server/index.js";

export interface Serve {
  e: CivmEnv;
  base: string;
  configFile: string;
  child: ChildProcess;
  done: Promise<CivmResult>;
  stdout(): string;
  /** GET /api/... with the bearer token (JSON). */
  api<T = unknown>(path: string): Promise<T>;
  /** POST /api/... with the bearer token (JSON). */
  post<T = unknown>(path: string, body?: unknown): Promise<{ status: number; body: T }>;
  liveVms(): Promise<ApiVm[]>;
  allVms(): Promise<ApiVm[]>;
  pools(): Promise<ApiPool[]>;
  /** Polls `cond` every 500 ms; fails with civm's output on timeout or if the daemon exits. */
  poll(cond: () => Promise<boolean> | boolean, ms: number, what: string): Promise<void>;
  /** SIGTERM, then the exit. */
  stop(): Promise<CivmResult>;
  /** The daemon's pid. */
  pid: number;
}

/** Writes `config` to ROOT/serve.json (unless configFile is given) and starts `civm serve`. */
export function startServe(o: { e?: CivmEnv; config: Record<string, unknown>; configFile?: string; grace?: number; port: number }): Serve {
  const e = o.e ?? civmEnv();
  const configFile = o.configFile ?? join(e.root, "serve.json");
  writeFileSync(configFile, JSON.stringify(o.config, null, 2));
  const base = `http://127.0.0.1:${o.port}`;
  const p = startCivm(["serve", "--config", configFile, "--grace", String(o.grace ?? 10)], e);
  let out = "";
  p.child.stdout!.on("data", (d) => (out += d));
  const auth = { authorization: `Bearer ${TOKEN}` };
  const api = async <T>(path: string): Promise<T> => (await (await fetch(`${base}${path}`, { headers: auth })).json()) as T;
  const s: Serve = {
    e,
    base,
    configFile,
    child: p.child,
    done: p.done,
    pid: p.child.pid!,
    stdout: () => out,
    api,
    post: async <T>(path: string, b?: unknown) => {
      const r = await fetch(`${base}${path}`, { method: "POST", headers: { ...auth, "content-type": "application/json" }, body: JSON.stringify(b ?? {}) });
      return { status: r.status, body: (await r.json()) as T };
    },
    liveVms: () => api<ApiVm[]>("/api/vms").catch(() => []),
    allVms: () => api<ApiVm[]>("/api/vms?all=1").catch(() => []),
    pools: () => api<ApiPool[]>("/api/pools"),
    poll: async (cond, ms, what) => {
      const end = Date.now() + ms;
      while (!(await cond())) {
        if (Date.now() > end || p.child.exitCode !== null) {
          throw new Error(`${p.child.exitCode !== null ? `civm serve exited (${p.child.exitCode})` : "timed out"} waiting for ${what}\n--- stderr ---\n${p.stderrSoFar()}\n--- stdout ---\n${out.slice(-6000)}`);
        }
        await new Promise((r) => setTimeout(r, 500));
      }
    },
    stop: async () => {
      if (p.child.exitCode === null) p.child.kill("SIGTERM");
      return p.done;
    },
  };
  return s;
}

/** The pino lines of civm serve's stdout. */
export function logLines(stdout: string): Record<string, unknown>[] {
  return stdout
    .trim()
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** pids of running processes whose parent is `ppid` and whose command line contains `match`. */
export function childrenOf(ppid: number, match: string): number[] {
  const out: number[] = [];
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, "utf8");
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      if (Number(fields[1]) !== ppid) continue;
      if (readFileSync(`/proc/${d}/cmdline`, "utf8").includes(match)) out.push(Number(d));
    } catch {
      /* gone */
    }
  }
  return out;
}

/** VmRSS of a process in KiB (undefined once it is gone). */
export function rssKiB(pid: number): number | undefined {
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}
