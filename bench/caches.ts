// The registry cache (issue 13): pulling an image through civm's cache against pulling it
// from the upstream directly, the upstream being a local registry (test/support/registry.ts)
// behind a proxy throttled to a realistic bandwidth (default 100 Mbit/s per connection, a
// CI host pulling from Docker Hub). A pull is what a client does: the manifest, then the
// config and layers one after another, each digest checked. Measured in the same run:
//   direct:  pulls from the throttled upstream;
//   first:   the first pull through the cache (a miss: the cache fetches from the upstream);
//   later:   second and later pulls through the cache (hits, from its disk).
// Then the daemon's memory with the caches on: `civm serve` (no VM) with and without a
// `caches:` section (registry + HTTP), its VmRSS after start and after --pulls pulls through
// its registry cache, and the caches' own RSS (docker-registry, squid) separately.
// Usage: npm run build && node dist/bench/caches.js [--runs 5] [--layers 4] [--layer-mib 16]
//          [--mbit 100] [--pulls 10] [--only pull,memory] [--out FILE]
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Registry } from "prom-client";
import { CacheManager } from "../src/caches/manager.js";
import { parseCaches } from "../src/caches/config.js";
import { testCacheUser, tempDir } from "../test/support/paths.js";
import { pullImage, startUpstream, throttledProxy } from "../test/support/registry.js";
import { startFakeGitHub } from "../test/support/fake-github.js";
import { freePort } from "../test/support/net.js";
import { rssKiB, serveConfig, startHub, startServe } from "../test/support/serve-harness.js";
import type { CacheStatus } from "../src/caches/types.js";
import { benchArg } from "./args.js";

const runs = Number(benchArg("runs", "5")) || 5;
const layers = Number(benchArg("layers", "4")) || 4;
const layerMiB = Number(benchArg("layer-mib", "16")) || 16;
const mbit = Number(benchArg("mbit", "100")) || 100;
const pulls = Number(benchArg("pulls", "10")) || 10;
const only = new Set(benchArg("only", "pull,memory").split(","));
const out = process.argv.includes("--out") ? benchArg("out", "") : undefined;
const log = (m: string) => process.stderr.write(`[bench caches] ${m}\n`);
const loadavg = () => readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).map(Number);
const r3 = (x: number) => Math.round(x * 1000) / 1000;
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? r3(s[Math.floor((s.length - 1) / 2)]!) : null;
};
const timed = async (f: () => Promise<unknown>) => {
  const t = process.hrtime.bigint();
  await f();
  return Number(process.hrtime.bigint() - t) / 1e9;
};

testCacheUser();
const result: Record<string, unknown> = { date: new Date().toISOString(), loadBefore: loadavg(), runs, layers, layerMiB, mbit };
const upstream = await startUpstream();
const image = await upstream.push("library/bench", "latest", { layers, layerBytes: layerMiB * 1024 * 1024 });
log(`image: ${layers} layers, ${(image.totalBytes / 1024 ** 2).toFixed(1)} MiB; upstream throttled to ${mbit} Mbit/s`);
const throttle = await throttledProxy(upstream.port, (mbit * 1e6) / 8);

try {
  if (only.has("pull")) {
    const stateDir = tempDir("civm-bench-caches-");
    const spec = parseCaches({ registry: { mirrors: [{ registry: "docker.io", upstream: throttle.url }], maxSize: "10G" } }, "bench", stateDir).value!;
    const quiet = { info: () => {}, warn: (f: object, m: string) => log(`warn: ${m} ${JSON.stringify(f)}`), error: (f: object, m: string) => log(`error: ${m} ${JSON.stringify(f)}`) };
    const direct: number[] = [];
    const first: number[] = [];
    const later: number[] = [];
    for (let i = 0; i < runs; i++) {
      direct.push(await timed(() => pullImage(throttle.url, "library/bench", "latest")));
      // A new, empty cache each run: its first pull is a miss.
      const m = new CacheManager({ spec: { ...spec, registry: { ...spec.registry!, storage: join(stateDir, `run-${i}`) } }, stateDir, registry: new Registry(), logger: quiet });
      await m.start();
      const url = m.status()[0]!.url;
      first.push(await timed(() => pullImage(url, "library/bench", "latest")));
      for (let k = 0; k < 3; k++) later.push(await timed(() => pullImage(url, "library/bench", "latest")));
      await new Promise((r) => setTimeout(r, 3500));
      const st = m.status()[0]!;
      log(`run ${i + 1}: direct ${direct.at(-1)!.toFixed(2)} s, first ${first.at(-1)!.toFixed(2)} s, later ${later.slice(-3).map((x) => x.toFixed(3)).join("/")} s (cache: ${st.requests} requests, ${st.hits} hits, ${st.misses} misses)`);
      await m.stop();
    }
    const d = median(direct)!;
    result.pull = {
      imageMiB: r3(image.totalBytes / 1024 ** 2),
      directSeconds: median(direct),
      firstThroughCacheSeconds: median(first),
      laterThroughCacheSeconds: median(later),
      ratioFirstToDirect: r3(median(first)! / d),
      ratioLaterToDirect: r3(median(later)! / d),
      all: { direct: direct.map(r3), first: first.map(r3), later: later.map(r3) },
    };
  }

  if (only.has("memory")) {
    const withCaches = async (caches: Record<string, unknown> | undefined) => {
      const gh = await startFakeGitHub();
      const port = await freePort();
      const hub = await startHub(gh, () => `http://127.0.0.1:${port}/webhook`);
      // A pool that never starts a VM: only the daemon and its caches run.
      const disk = join(tempDir("civm-bench-disk-"), "disk.qcow2");
      writeFileSync(disk, "");
      const s = startServe({ port, config: serveConfig({ port, gh, hub, image: disk, pools: [{ minRunners: 0, maxRunners: 0 }], ...(caches ? { caches } : {}) }) });
      try {
        await s.poll(async () => (await fetch(`${s.base}/healthz`).then((r) => r.ok, () => false)), 60_000, "civm serve to listen");
        if (caches) await s.poll(async () => (await s.api<CacheStatus[]>("/api/caches")).every((c) => c.state === "up"), 60_000, "the caches to be up");
        await new Promise((r) => setTimeout(r, 3000));
        const idle = rssKiB(s.pid)!;
        let afterPulls = idle;
        const children: Record<string, number> = {};
        if (caches) {
          const reg = (await s.api<CacheStatus[]>("/api/caches")).find((c) => c.kind === "registry")!;
          for (let i = 0; i < pulls; i++) await pullImage(reg.url, "library/bench", "latest");
          await new Promise((r) => setTimeout(r, 4000));
          afterPulls = rssKiB(s.pid)!;
          for (const c of await s.api<CacheStatus[]>("/api/caches")) if (c.pid) children[c.name] = rssKiB(c.pid) ?? 0;
        }
        return { daemonRssKiB: idle, daemonRssAfterPullsKiB: afterPulls, childrenRssKiB: children };
      } finally {
        await s.stop();
        await hub.close();
        await gh.close();
      }
    };
    const off = await withCaches(undefined);
    const on = await withCaches({ registry: { mirrors: [{ registry: "docker.io", upstream: upstream.url }], maxSize: "10G" }, http: { maxSize: "1G" } });
    log(`daemon RSS: without caches ${off.daemonRssKiB} KiB; with ${on.daemonRssKiB} KiB, after ${pulls} pulls ${on.daemonRssAfterPullsKiB} KiB; caches: ${JSON.stringify(on.childrenRssKiB)}`);
    result.memory = { pulls, without: off, with: on, ratioDaemonWithToWithout: r3(on.daemonRssAfterPullsKiB / off.daemonRssKiB) };
  }
} finally {
  await throttle.close();
  await upstream.stop();
}
result.loadAfter = loadavg();
const text = JSON.stringify(result, null, 2);
process.stdout.write(text + "\n");
if (out) writeFileSync(out, text + "\n");
