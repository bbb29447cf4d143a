// The caches of one civm serve: starts the ones civm runs (a docker-registry per mirrored
// registry, one Squid) as supervised children, checks the existing ones (`url:`), counts
// what they serve, keeps the registry caches under maxSize, and tells the launcher what
// each new runner VM gets (guestCaches: instance.json's config.caches and the ports to
// open). A cache that cannot start is a state ("failed", with the reason), never a
// failure of civm serve: VMs start without it and the daemon reports itself degraded.
import { createSocket, type Socket } from "node:dgram";
import { existsSync, statSync } from "node:fs";
import { chmod, chown, mkdir, stat, writeFile } from "node:fs/promises";
import { request as httpRequest } from "node:http";
import { request as httpsRequest } from "node:https";
import { createServer } from "node:net";
import { dirname, join } from "node:path";
import type { Registry } from "prom-client";
import type { DaemonLogger } from "../pool/daemon.js";
import { messageOf } from "../errors/index.js";
import { run, which } from "../exec/index.js";
import { accessProblem, systemUser } from "../net/identity.js";
import type { NetworkSpec } from "../net/policy.js";
import { DEFAULT_TIMING, SupervisedChild, sweepChildren, childArgv, type ChildUser, type SupervisorTiming } from "./child.js";
import { guestCaches, guestEndpoint, type GuestCaches, type OfferedCache } from "./inject.js";
import { cacheMetrics, type CacheMetrics } from "./metrics.js";
import { blobBytes, deleteBlob, listBlobs, parseRegistryLine, planEviction, RegistryTally, registryEnv, renderRegistryConfig } from "./registry.js";
import { parseSquidRecord, parseSquidStoreSize, renderSquidConfig } from "./squid.js";
import type { CacheKind, CacheState, CacheStatus, CachesSpec } from "./types.js";

export const DEFAULT_CACHE_USER = "civm-cache";

/** pino-compatible, as the daemon's (the same logger is passed). */
export type CacheLogger = DaemonLogger;

export interface CacheManagerOptions {
  spec: CachesSpec;
  stateDir: string;
  registry: Registry;
  logger: CacheLogger;
  /** The user the caches run as when civm is root (default $CIVM_CACHE_USER, else civm-cache, created on demand). */
  user?: string;
  timing?: SupervisorTiming;
  /** Sizes, eviction and checks of existing caches this often (ms; default 30 s). */
  maintenanceMs?: number;
  /** start() waits this long for the caches to answer (ms; default 20 s); slower ones join later. */
  startWaitMs?: number;
}

interface Counts {
  requests: number;
  hits: number;
  misses: number;
  servedBytes: number;
  upstreamBytes: number;
}

/** One cache: a supervised child, or an existing service checked now and then. */
interface Cache {
  name: string;
  kind: CacheKind;
  /** civm runs it (false: an existing service, `url:`). */
  managed: boolean;
  registry?: string;
  upstream?: string;
  /** Where this host reaches it. */
  url: string;
  child?: SupervisedChild;
  /** Registry caches civm runs: the storage root, and the hit/miss bookkeeping of its log. */
  root?: string;
  tally?: RegistryTally;
  maxSizeBytes: number | null;
  sizeBytes: number | null;
  counts: Counts;
  /** Existing services, and managed caches that could not even be set up. */
  own?: { state: CacheState; since: number; message: string | undefined };
  restartsSeen: number;
}

function isRoot(): boolean {
  return typeof process.getuid === "function" && process.getuid() === 0;
}

/** A free port on 127.0.0.1 (bound and released; the cache binds it a moment later). */
export async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((resolve, reject) => {
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => resolve());
  });
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** GET `url`: the status and up to 64 KiB of the body; rejects on no answer within `timeoutMs`. */
export function httpGet(url: string, timeoutMs = 3000): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = (url.startsWith("https:") ? httpsRequest : httpRequest)(url, { method: "GET", timeout: timeoutMs, headers: { "user-agent": "civm-cache-check" } }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => {
        if (body.length < 65536) body += d;
      });
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
      res.on("error", reject);
    });
    req.on("timeout", () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on("error", (e: NodeJS.ErrnoException) => reject(new Error(e.code === "ECONNREFUSED" ? "connection refused" : e.message)));
    req.end();
  });
}

/** Where a program is: PATH, then the sbin folders (squid lives in /usr/sbin). */
async function findProgram(name: string): Promise<string | undefined> {
  const found = await which(name);
  if (found) return found;
  for (const dir of ["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"]) if (existsSync(join(dir, name))) return join(dir, name);
  return undefined;
}

const zero = (): Counts => ({ requests: 0, hits: 0, misses: 0, servedBytes: 0, upstreamBytes: 0 });

export class CacheManager {
  private readonly caches: Cache[] = [];
  private readonly metrics: CacheMetrics;
  private readonly runDir: string;
  private timer: NodeJS.Timeout | undefined;
  private settleTimer: NodeJS.Timeout | undefined;
  private udp: Socket | undefined;
  private stopped = false;
  /** Last request per stored blob ("root\0digest" → ms), for eviction. */
  private readonly lastUse = new Map<string, number>();
  private maintaining: Promise<void> | undefined;

  constructor(private readonly o: CacheManagerOptions) {
    this.metrics = cacheMetrics(o.registry);
    this.runDir = join(o.stateDir, "caches", "run");
  }

  /** Ends copies a killed civm left, starts every cache; returns within startWaitMs. */
  async start(): Promise<void> {
    const log = this.o.logger;
    await mkdir(this.runDir, { recursive: true, mode: 0o755 });
    await chmod(join(this.o.stateDir, "caches"), 0o755).catch(() => {});
    for (const line of await sweepChildren(this.runDir, (l) => log.warn({ component: "cache" }, l))) void line;
    let user: ChildUser | undefined;
    let userProblem: string | undefined;
    if (isRoot()) {
      const name = this.o.user ?? (process.env.CIVM_CACHE_USER || DEFAULT_CACHE_USER);
      try {
        user = await systemUser(name, { create: name === DEFAULT_CACHE_USER, comment: "civm caches (docker-registry, squid)", what: "civm's caches run", setting: "CIVM_CACHE_USER" });
      } catch (e) {
        userProblem = messageOf(e);
      }
    }
    if (user) {
      // The caches' user must enter the state dir (it may be a 0700 folder) to reach its files.
      const st = await stat(this.o.stateDir);
      if ((st.mode & 0o001) === 0) await chmod(this.o.stateDir, (st.mode & 0o777) | 0o711);
    }
    const starts: Promise<void>[] = [];
    for (const m of this.o.spec.registry?.mirrors ?? []) {
      const name = `registry/${m.registry}`;
      if (m.url !== undefined) {
        this.add({ name, kind: "registry", managed: false, registry: m.registry, url: m.url, maxSizeBytes: null, sizeBytes: null, counts: zero(), own: { state: "starting", since: Date.now(), message: undefined }, restartsSeen: 0 });
        continue;
      }
      const port = m.port ?? (await freePort());
      const root = join(this.o.spec.registry!.storage ?? join(this.o.stateDir, "caches", "registry"), m.registry);
      const c: Cache = { name, kind: "registry", managed: true, registry: m.registry, upstream: m.upstream!, url: `http://127.0.0.1:${port}`, root, tally: new RegistryTally(), maxSizeBytes: this.o.spec.registry!.maxSizeBytes, sizeBytes: null, counts: zero(), own: { state: "starting", since: Date.now(), message: undefined }, restartsSeen: 0 };
      this.add(c);
      const program = await findProgram("docker-registry");
      const problem = userProblem ?? (program ? undefined : "docker-registry (CNCF Distribution) is not installed; install it with: apt-get install -y docker-registry");
      if (problem) {
        this.setOwn(c, "failed", problem);
        continue;
      }
      const dir = join(this.runDir, `registry-${m.registry}`);
      starts.push(
        this.prepareFiles(dir, "config.yml", renderRegistryConfig({ root, port, upstream: m.upstream! }), [root], user)
          .then((configFile) => {
            c.child = this.supervise(c, {
              name,
              program: program!,
              args: ["serve", configFile],
              env: registryEnv(m.credentials),
              user,
              recordFile: join(dir, "child.json"),
              check: async () => {
                const r = await httpGet(`${c.url}/v2/`).catch((e: Error) => ({ status: 0, body: e.message }));
                return r.status === 200 || r.status === 401 ? undefined : r.status ? `GET /v2/ answered ${r.status}` : r.body;
              },
              onLine: (line) => this.registryLine(c, line),
            });
            return c.child.start();
          })
          .catch((e: unknown) => this.setOwn(c, "failed", messageOf(e))),
      );
    }
    const h = this.o.spec.http;
    if (h?.url !== undefined) {
      this.add({ name: "http", kind: "http", managed: false, url: h.url, maxSizeBytes: null, sizeBytes: null, counts: zero(), own: { state: "starting", since: Date.now(), message: undefined }, restartsSeen: 0 });
    } else if (h) {
      const port = h.port ?? (await freePort());
      const managerPort = await freePort();
      const storage = h.storage ?? join(this.o.stateDir, "caches", "http");
      const c: Cache = { name: "http", kind: "http", managed: true, url: `http://127.0.0.1:${port}`, maxSizeBytes: h.maxSizeBytes, sizeBytes: null, counts: zero(), own: { state: "starting", since: Date.now(), message: undefined }, restartsSeen: 0 };
      this.add(c);
      const program = await findProgram("squid");
      const problem = userProblem ?? (program ? undefined : "squid is not installed; install it with: apt-get install -y squid");
      if (problem) this.setOwn(c, "failed", problem);
      else {
        const logPort = await this.accessLog(c);
        const dir = join(this.runDir, "http");
        starts.push(
          this.prepareFiles(dir, "squid.conf", renderSquidConfig({ port, managerPort, logPort, storage, maxSizeBytes: h.maxSizeBytes, maxObjectBytes: h.maxObjectBytes, allow: h.allow }), [storage], user)
            .then((configFile) => {
              c.child = this.supervise(c, {
                name: "http",
                program: program!,
                args: ["-N", "-d", "1", "-f", configFile],
                user,
                recordFile: join(dir, "child.json"),
                // A new cache folder gets Squid's swap directories first (squid -z).
                prepare: async () => {
                  if (existsSync(join(storage, "00"))) return;
                  await run("setpriv", childArgv({ program: program!, args: ["-N", "-z", "-f", configFile], user }), { failCode: "host", timeoutMs: 120_000 }).catch((e: unknown) => {
                    const said = (e as { stderr?: string }).stderr?.split("\n").filter((l) => /FATAL|ERROR|denied|cannot/i.test(l)).slice(-2).join(" | ");
                    throw new Error(`squid -z (making the cache folder ${storage}) failed${said ? `: ${said}` : ""}`);
                  });
                },
                check: async () => {
                  const r = await httpGet(`http://127.0.0.1:${managerPort}/squid-internal-mgr/storedir`).catch((e: Error) => ({ status: 0, body: e.message }));
                  if (r.status !== 200) return r.status ? `the cache manager answered ${r.status}` : r.body;
                  const size = parseSquidStoreSize(r.body);
                  if (size !== undefined) this.setSize(c, size);
                  return undefined;
                },
                onLine: (line) => {
                  // Running unprivileged, Squid tries to regain root now and then and says so.
                  if (/no_suid: setuid\(0\)/.test(line)) return;
                  if (/FATAL|ERROR:/.test(line)) log.error({ component: "cache", cache: "http" }, line.replace(/^\S+ \S+\| /, ""));
                  else if (/WARNING/.test(line)) log.warn({ component: "cache", cache: "http" }, line.replace(/^\S+ \S+\| /, ""));
                },
              });
              return c.child.start();
            })
            .catch((e: unknown) => this.setOwn(c, "failed", messageOf(e))),
        );
      }
    }
    const existing = this.caches.filter((c) => !c.managed).map((c) => this.checkExisting(c));
    let waited: NodeJS.Timeout | undefined;
    await Promise.race([Promise.allSettled([...starts, ...existing]), new Promise((r) => (waited = setTimeout(r, this.o.startWaitMs ?? 20_000)))]);
    clearTimeout(waited);
    this.timer = setInterval(() => void this.maintain(), this.o.maintenanceMs ?? 30_000);
    this.timer.unref();
    this.settleTimer = setInterval(() => this.settleHits(), 1000);
    this.settleTimer.unref();
    void this.maintain();
    for (const c of this.caches) {
      const s = this.statusOf(c);
      const fields = { component: "cache", cache: c.name, state: s.state, url: c.url, ...(c.upstream ? { upstream: c.upstream } : {}) };
      if (s.state === "failed") log.error({ ...fields, err: s.message }, "cache not available: runner VMs start without it");
      else log.info(fields, c.child ? "cache started" : "existing cache checked");
    }
  }

  private add(c: Cache): void {
    this.caches.push(c);
    this.metrics.up.set({ cache: c.name }, 0);
    for (const k of ["requests", "hits", "misses"] as const) this.metrics[k].inc({ cache: c.name }, 0);
    for (const direction of ["served", "upstream"]) this.metrics.bytes.inc({ cache: c.name, direction }, 0);
    this.metrics.restarts.inc({ cache: c.name }, 0);
  }

  private setOwn(c: Cache, state: CacheState, message: string | undefined): void {
    if (c.own?.state === state && c.own.message === message) return;
    c.own = { state, since: Date.now(), message };
    this.metrics.up.set({ cache: c.name }, state === "up" ? 1 : 0);
  }

  private setSize(c: Cache, bytes: number): void {
    c.sizeBytes = bytes;
    this.metrics.size.set({ cache: c.name }, bytes);
  }

  /** The run dir (0755) with the config file (root:<caches' group> 0640), and storage owned by the caches' user. */
  private async prepareFiles(dir: string, file: string, content: string, storage: string[], user: ChildUser | undefined): Promise<string> {
    await mkdir(dir, { recursive: true, mode: 0o755 });
    const path = join(dir, file);
    await writeFile(path, content, { mode: 0o600 });
    if (user) {
      await chown(path, 0, user.gid);
      await chmod(path, 0o640);
    }
    for (const s of storage) {
      // Folders above the storage must be enterable by the caches' user; the storage is theirs.
      await mkdir(dirname(s), { recursive: true, mode: 0o755 });
      await mkdir(s, { recursive: true, mode: 0o750 });
      if (user) {
        const st = await stat(s);
        if (st.uid !== user.uid) await run("chown", ["-R", `${user.uid}:${user.gid}`, s], { failCode: "host", timeoutMs: 600_000 });
        const problem = accessProblem(s, user.uid, [user.gid], "rwx", statSync);
        if (problem) throw new Error(`the caches' user (uid ${user.uid}) cannot use ${s}: ${problem}; give the folders above it o+x (chmod o+x) or choose another storage folder`);
      }
    }
    for (const f of [dir, path]) {
      const problem = user ? accessProblem(f, user.uid, [user.gid], f === path ? "r" : "rx", statSync) : undefined;
      if (problem) throw new Error(`the caches' user (uid ${user!.uid}) cannot read ${f}: ${problem}; give the folders above it o+x (chmod o+x)`);
    }
    return path;
  }

  private supervise(c: Cache, spec: ConstructorParameters<typeof SupervisedChild>[0]): SupervisedChild {
    const log = this.o.logger;
    return new SupervisedChild(
      spec,
      {
        onState: (state) => {
          this.metrics.up.set({ cache: c.name }, state === "up" ? 1 : 0);
          const restarts = c.child?.restarts ?? 0;
          if (restarts > c.restartsSeen) {
            this.metrics.restarts.inc({ cache: c.name }, restarts - c.restartsSeen);
            c.restartsSeen = restarts;
          }
        },
        log: (level, fields, msg) => log[level]({ component: "cache", ...fields }, msg),
      },
      this.o.timing ?? DEFAULT_TIMING,
    );
  }

  /** The UDP socket Squid sends its access log to (loopback, a free port). */
  private async accessLog(c: Cache): Promise<number> {
    const udp = createSocket("udp4");
    this.udp = udp;
    udp.on("message", (msg) => {
      for (const line of msg.toString("utf8").split("\n")) {
        const r = parseSquidRecord(line);
        if (!r) continue;
        this.count(c, { requests: 1, hits: r.result === "hit" ? 1 : 0, misses: r.result === "miss" ? 1 : 0, servedBytes: r.servedBytes, upstreamBytes: r.upstreamBytes });
      }
    });
    udp.on("error", (e) => this.o.logger.warn({ component: "cache", cache: c.name, err: e.message }, "the HTTP cache's access log socket failed; its counters stop"));
    await new Promise<void>((r) => udp.bind(0, "127.0.0.1", () => r()));
    udp.unref();
    return udp.address().port;
  }

  private count(c: Cache, d: Counts): void {
    for (const k of ["requests", "hits", "misses", "servedBytes", "upstreamBytes"] as const) c.counts[k] += d[k];
    if (d.requests) this.metrics.requests.inc({ cache: c.name }, d.requests);
    if (d.hits) this.metrics.hits.inc({ cache: c.name }, d.hits);
    if (d.misses) this.metrics.misses.inc({ cache: c.name }, d.misses);
    if (d.servedBytes) this.metrics.bytes.inc({ cache: c.name, direction: "served" }, d.servedBytes);
    if (d.upstreamBytes) this.metrics.bytes.inc({ cache: c.name, direction: "upstream" }, d.upstreamBytes);
  }

  /**
   * docker-registry's log: a GET of a manifest or blob is a request; content it stored (its
   * expiry is scheduled) was fetched upstream: a miss. Requests with nothing stored around
   * them are hits, counted once RegistryTally's window is over (settleHits).
   */
  private registryLine(c: Cache, line: string): void {
    const e = parseRegistryLine(line);
    if (!e) return;
    if (e.kind === "served") {
      this.count(c, { requests: 1, hits: 0, misses: 0, servedBytes: e.bytes, upstreamBytes: 0 });
      c.tally!.onServed(e);
      if (e.digest) this.lastUse.set(`${c.root}\0${e.digest}`, Date.now());
    } else if (e.kind === "stored") {
      c.tally!.onStored(e);
      this.count(c, { requests: 0, hits: 0, misses: 1, servedBytes: 0, upstreamBytes: 0 });
      void blobBytes(c.root!, e.digest).then((bytes) => this.count(c, { requests: 0, hits: 0, misses: 0, servedBytes: 0, upstreamBytes: bytes }));
    } else {
      this.o.logger[e.level]({ component: "cache", cache: c.name }, e.message);
    }
  }

  private settleHits(): void {
    for (const c of this.caches) {
      const hits = c.tally?.settle() ?? 0;
      if (hits) this.count(c, { requests: 0, hits, misses: 0, servedBytes: 0, upstreamBytes: 0 });
    }
  }

  /** An existing cache (`url:`): a registry answers GET /v2/ with 200 or 401, a proxy with any status. */
  private async checkExisting(c: Cache): Promise<void> {
    const url = c.kind === "registry" ? `${c.url}/v2/` : `${c.url}/`;
    const r = await httpGet(url, 5000).catch((e: Error) => ({ status: 0, body: e.message }));
    const ok = c.kind === "registry" ? r.status === 200 || r.status === 401 : r.status > 0;
    const before = c.own?.state;
    this.setOwn(c, ok ? "up" : "failed", ok ? undefined : `${url} ${r.status ? `answered ${r.status}` : `does not answer: ${r.body}`}`);
    if (before !== c.own!.state && before !== "starting") {
      if (ok) this.o.logger.info({ component: "cache", cache: c.name, url: c.url }, "existing cache answers again");
      else this.o.logger.error({ component: "cache", cache: c.name, err: c.own!.message }, "existing cache does not answer: runner VMs start without it");
    }
  }

  /** Sizes (and eviction above maxSize) of the registry caches, checks of existing caches. */
  private maintain(): Promise<void> {
    this.maintaining ??= (async () => {
      try {
        for (const c of this.caches) if (!c.managed) await this.checkExisting(c);
        const managed = this.caches.filter((c) => c.kind === "registry" && c.root !== undefined);
        if (managed.length === 0) return;
        const roots = managed.map((c) => c.root!);
        let blobs = await listBlobs(roots, this.lastUse);
        const max = this.o.spec.registry!.maxSizeBytes;
        const evict = planEviction(blobs, max);
        for (const b of evict) await deleteBlob(b).catch((e: Error) => this.o.logger.warn({ component: "cache", err: e.message }, "could not evict a blob"));
        if (evict.length) {
          const freed = evict.reduce((n, b) => n + b.bytes, 0);
          this.o.logger.info({ component: "cache", blobs: evict.length, freedBytes: freed, maxSizeBytes: max }, "registry caches above maxSize: least recently used blobs evicted");
          const gone = new Set(evict);
          blobs = blobs.filter((b) => !gone.has(b));
        }
        for (const c of managed) this.setSize(c, blobs.filter((b) => b.root === c.root).reduce((n, b) => n + b.bytes, 0));
      } catch (e) {
        this.o.logger.warn({ component: "cache", err: messageOf(e) }, "cache maintenance failed; trying again later");
      } finally {
        this.maintaining = undefined;
      }
    })();
    return this.maintaining;
  }

  /** Runs the maintenance now (tests, and `civm caches` wants fresh sizes). */
  refresh(): Promise<void> {
    return this.maintain();
  }

  private statusOf(c: Cache): CacheStatus {
    const ch = c.child;
    const state: CacheState = ch ? ch.state : c.own?.state ?? "failed";
    const since = ch ? ch.since : c.own?.since ?? Date.now();
    const message = ch ? ch.message : c.own?.message;
    const n = c.counts;
    return {
      name: c.name,
      kind: c.kind,
      managed: c.managed,
      state,
      since: new Date(since).toISOString(),
      message: message ?? null,
      url: c.url,
      guestUrl: guestEndpoint(c.url).url,
      ...(c.registry ? { registry: c.registry } : {}),
      ...(c.upstream ? { upstream: c.upstream } : {}),
      pid: ch?.pid ?? null,
      restarts: ch?.restarts ?? 0,
      sizeBytes: c.sizeBytes,
      maxSizeBytes: c.maxSizeBytes,
      requests: n.requests,
      hits: n.hits,
      misses: n.misses,
      hitRatio: n.hits + n.misses > 0 ? n.hits / (n.hits + n.misses) : null,
      servedBytes: n.servedBytes,
      upstreamBytes: n.upstreamBytes,
    };
  }

  status(): CacheStatus[] {
    return this.caches.map((c) => this.statusOf(c));
  }

  /** "degraded" while a cache has failed (cannot start, or an existing one does not answer). */
  health(): { status: "ok" | "degraded"; caches: { name: string; state: CacheState; message: string | null }[] } {
    const caches = this.status().map((s) => ({ name: s.name, state: s.state, message: s.message }));
    return { status: caches.some((c) => c.state === "failed") ? "degraded" : "ok", caches };
  }

  /**
   * What a VM with `network` gets: registry caches that run (a restarting one too: Docker,
   * containerd and BuildKit fall back to the upstream), the HTTP cache only while it answers.
   */
  forVm(network: NetworkSpec): GuestCaches {
    const offered: OfferedCache[] = [];
    for (const c of this.caches) {
      const state = c.child ? c.child.state : c.own?.state;
      const ok = state === "up" || (c.kind === "registry" && c.child !== undefined && state === "restarting");
      if (ok) offered.push({ kind: c.kind, ...(c.registry ? { registry: c.registry } : {}), url: c.url });
    }
    return guestCaches(offered, network);
  }

  /** Stops every cache civm runs (SIGTERM, then SIGKILL) and the timers. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    if (this.settleTimer) clearInterval(this.settleTimer);
    this.settleHits();
    await Promise.allSettled(this.caches.map((c) => c.child?.stop()));
    await this.maintaining;
    this.udp?.close();
    for (const c of this.caches) this.metrics.up.set({ cache: c.name }, 0);
  }
}
