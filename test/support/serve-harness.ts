// Shared setup for `civm serve` end-to-end tests and benchmarks on real QEMU: the fake GitHub,
// a "hub" that plays GitHub's side for the tiny guest's pretend runner, a config writer and a
// running daemon with helpers for its API.
//
// The tiny guest in runner mode (test/support/tiny-guest-init.sh) POSTs its JIT config to
// http://HUB/register, then polls /job every second and, on "run", POSTs /done and powers off.
// The hub maps the JIT config back to the fake's runner and updates the fake as GitHub would
// (online, busy, offline) and sends civm the signed in_progress / completed webhooks.
import assert from "node:assert/strict";
import type { ChildProcess } from "node:child_process";
import { createServer as createHttpServer, type IncomingMessage } from "node:http";
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { civmEnv, leftovers, qemuProcessesOf, startCivm, type CivmEnv, type CivmResult } from "./civm-cli.js";
import { sendWebhook, startFakeGitHub, workflowJobPayload, type FakeGitHub, type FakeRunner } from "./fake-github.js";
import { freePort } from "./net.js";
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
  /** The tiny guest's job script (GET /tiny-script; 404 without one): run as the job, output on the console. */
  tinyScript?: string;
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
      if (req.url === "/tiny-script") return opts.tinyScript === undefined ? res.writeHead(404).end() : res.end(opts.tinyScript);
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
  /** The pool's `start` (snapshot | boot); unset: left out of the config. */
  start?: "snapshot" | "boot";
}

export interface ServeConfigOptions {
  port: number;
  gh: FakeGitHub;
  hub: Hub;
  image: string;
  pollInterval?: number;
  shutdownTimeout?: number;
  maxWebhookBytes?: string;
  /** More `github:` keys (requestTimeout, degradedAfter, ...). */
  github?: Record<string, unknown>;
  pools: PoolOptions[];
  /** The config's `caches:` section (docs/caches.md). */
  caches?: Record<string, unknown>;
}

/** A serve config (JSON) for one or more tiny-guest pools against the fake GitHub and the hub. */
export function serveConfig(o: ServeConfigOptions): Record<string, unknown> {
  return {
    listen: `127.0.0.1:${o.port}`,
    github: { apiUrl: o.gh.url, token: o.gh.validToken, ...o.github },
    webhookSecret: SECRET,
    apiToken: TOKEN,
    pollInterval: o.pollInterval ?? 5,
    shutdownTimeout: o.shutdownTimeout ?? 60,
    ...(o.maxWebhookBytes ? { maxWebhookBytes: o.maxWebhookBytes } : {}),
    ...(o.caches ? { caches: o.caches } : {}),
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
      ...(p.start ? { start: p.start } : {}),
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
  /** Resolves once /healthz answers. */
  listening(ms?: number): Promise<void>;
  /** SIGTERM, then the exit. */
  stop(): Promise<CivmResult>;
  /** SIGTERM; asserts exit 0, no QEMU of this env left, no work dir or registry entry. */
  stopClean(): Promise<CivmResult>;
  /** The daemon's pid. */
  pid: number;
}

export interface SpawnedServe {
  child: ChildProcess;
  done: Promise<CivmResult>;
  stdout(): string;
  stderrSoFar(): string;
  /** Resolves with the "civm serve listening" log line; fails with the output if civm exits or takes longer than `ms`. */
  listening(ms?: number): Promise<{ url: string; metricsUrl?: string }>;
}

/** `civm serve ARGS...` as a child process (no config written, no port assumed). */
export function spawnServe(args: string[], e: CivmEnv): SpawnedServe {
  const p = startCivm(["serve", ...args], e);
  let out = "";
  p.child.stdout!.on("data", (d) => (out += d));
  return {
    child: p.child,
    done: p.done,
    stdout: () => out,
    stderrSoFar: p.stderrSoFar,
    listening: async (ms = 30_000) => {
      const end = Date.now() + ms;
      for (;;) {
        const line = out.split("\n").find((l) => l.includes('"civm serve listening"'));
        if (line) return JSON.parse(line) as { url: string; metricsUrl?: string };
        if (Date.now() > end || p.child.exitCode !== null) throw new Error(`civm serve did not start:\n${p.stderrSoFar()}\n${out}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    },
  };
}

/** Writes `config` to ROOT/serve.json (unless configFile is given) and starts `civm serve`. */
export function startServe(o: { e?: CivmEnv; config: Record<string, unknown>; configFile?: string; grace?: number; port: number }): Serve {
  const e = o.e ?? civmEnv();
  const configFile = o.configFile ?? join(e.root, "serve.json");
  writeFileSync(configFile, JSON.stringify(o.config, null, 2));
  const base = `http://127.0.0.1:${o.port}`;
  const p = spawnServe(["--config", configFile, "--grace", String(o.grace ?? 10)], e);
  const auth = { authorization: `Bearer ${TOKEN}` };
  const api = async <T>(path: string): Promise<T> => (await (await fetch(`${base}${path}`, { headers: auth })).json()) as T;
  const s: Serve = {
    e,
    base,
    configFile,
    child: p.child,
    done: p.done,
    pid: p.child.pid!,
    stdout: p.stdout,
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
          throw new Error(`${p.child.exitCode !== null ? `civm serve exited (${p.child.exitCode})` : "timed out"} waiting for ${what}\n--- stderr ---\n${p.stderrSoFar()}\n--- stdout ---\n${p.stdout().slice(-6000)}`);
        }
        await new Promise((r) => setTimeout(r, 500));
      }
    },
    listening: (ms = 60_000) => s.poll(async () => fetch(`${base}/healthz`).then((r) => r.ok).catch(() => false), ms, "civm serve to listen"),
    stop: async () => {
      if (p.child.exitCode === null) p.child.kill("SIGTERM");
      return p.done;
    },
    stopClean: async () => {
      const r = await s.stop();
      assert.equal(r.code, 0, `${r.stderr}\n${p.stdout().slice(-4000)}`);
      assert.deepEqual(qemuProcessesOf(e), [], "QEMU processes left");
      assert.deepEqual(leftovers(e), [], "work dirs or registry entries left");
      return r;
    },
  };
  return s;
}

/** SIGKILL to a daemon the test did not stop (after the test, whatever its outcome). */
export function killAfter(t: Pick<TestContext, "after">, s: { child: ChildProcess }): void {
  t.after(() => {
    if (s.child.exitCode === null && s.child.signalCode === null) s.child.kill("SIGKILL");
  });
}

export interface ServeWithHub {
  gh: FakeGitHub;
  hub: Hub;
  port: number;
  s: Serve;
  /** The config the daemon started with, or with other options (a reload writes it to s.configFile). */
  config(over?: Partial<ServeConfigOptions>): Record<string, unknown>;
  /** Another `civm serve` on the same env, port and config file (after the first has exited). */
  restart(): Serve;
}

/**
 * The fake GitHub, the hub (guest side of GitHub) and `civm serve` on a free port running
 * serveConfig(o); `setup` runs on the fake before the daemon starts. Everything is closed
 * (the daemon SIGKILLed if still running) after the test.
 */
export async function startServeWithHub(
  t: Pick<TestContext, "after">,
  o: Omit<ServeConfigOptions, "port" | "gh" | "hub"> & { e?: CivmEnv; hubOptions?: HubOptions; setup?: (gh: FakeGitHub) => void },
): Promise<ServeWithHub> {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const port = await freePort();
  const hub = await startHub(gh, () => `http://127.0.0.1:${port}/webhook`, o.hubOptions);
  t.after(() => hub.close());
  o.setup?.(gh);
  const { e, hubOptions: _h, setup: _s, ...rest } = o;
  const config = (over: Partial<ServeConfigOptions> = {}) => serveConfig({ ...rest, ...over, port, gh, hub });
  const s = startServe({ ...(e ? { e } : {}), port, config: config() });
  killAfter(t, s);
  return {
    gh,
    hub,
    port,
    s,
    config,
    restart: () => {
      const next = startServe({ e: s.e, port, config: config(), configFile: s.configFile });
      killAfter(t, next);
      return next;
    },
  };
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
