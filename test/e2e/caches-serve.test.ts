// civm serve's caches end to end on real QEMU (TCG) with the tiny guest: a local upstream
// registry (a second docker-registry holding an image this test pushes over the registry
// API) behind the registry cache, a local HTTP origin behind Squid; the guest's job script
// pulls through the cache over the v2 API (busybox wget) and fetches through the proxy,
// with the addresses instance.json gave it. Then: the upstream stopped, a second job's pull
// is still served; a cache killed is restarted; civm killed with -9 and started again
// leaves one copy of each; a cache that cannot start makes the daemon degraded and VMs run
// without it. Everything listens on 127.0.0.1; nothing leaves the machine.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer, type Server } from "node:http";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { leftovers, qemuProcessesOf } from "../support/civm-cli.js";
import { startFakeGitHub, sendWebhook, workflowJobPayload, type FakeGitHub } from "../support/fake-github.js";
import { freePort } from "../support/net.js";
import { REPO, SECRET, serveConfig, startHub, startServe, type Hub, type Serve } from "../support/serve-harness.js";
import { startUpstream, type PushedImage, type Upstream } from "../support/registry.js";
import { testCacheUser } from "../support/paths.js";
import type { CacheStatus } from "../../src/caches/types.js";

let guest: TinyGuest;
let upstream: Upstream;
let image: PushedImage;
let origin: Server;
let originPort: number;
let originGets = 0;
const PKG = Buffer.alloc(256 * 1024, 7);

before(async () => {
  testCacheUser();
  guest = await buildTinyGuest();
  upstream = await startUpstream();
  image = await upstream.push("library/hello", "latest", { layerBytes: 64 * 1024 });
  origin = createServer((req, res) => {
    if (req.url !== "/pool/pkg_1.0_amd64.deb") return res.writeHead(404).end();
    originGets++;
    res.writeHead(200, { "content-type": "application/vnd.debian.binary-package", "content-length": PKG.length, "cache-control": "public, max-age=3600", "last-modified": new Date(0).toUTCString() }).end(PKG);
  });
  originPort = await new Promise<number>((r) => origin.listen(0, "127.0.0.1", () => r((origin.address() as { port: number }).port)));
});
after(async () => {
  await upstream?.stop();
  origin?.close();
});

/** The job the tiny guest runs (busybox sh): pull hello through the docker.io mirror, fetch through the proxy twice, try the API port. */
function jobScript(apiPort: number): string {
  return `cfg=$(tr -d '\\n' </tmp/instance.json)
reg=$(echo "$cfg" | sed -n 's/.*"registry":[[:space:]]*"docker\\.io",[[:space:]]*"url":[[:space:]]*"\\([^"]*\\)".*/\\1/p')
proxy=$(echo "$cfg" | sed -n 's/.*"http":[[:space:]]*{[[:space:]]*"url":[[:space:]]*"\\([^"]*\\)".*/\\1/p')
echo "caches registry=$reg proxy=$proxy"
if wget -q -O /tmp/m --header "Accept: application/vnd.docker.distribution.manifest.v2+json" "$reg/v2/library/hello/manifests/latest"; then
  layer=$(grep -o 'sha256:[0-9a-f]*' /tmp/m | tail -n 1)
  if wget -q -O /tmp/l "$reg/v2/library/hello/blobs/$layer" && [ "sha256:$(sha256sum /tmp/l | cut -d' ' -f1)" = "$layer" ]; then echo "pull ok $layer"; else echo "pull failed (layer)"; fi
else
  echo "pull failed (manifest)"
fi
for i in 1 2; do
  if http_proxy=$proxy wget -q -O /tmp/f "http://127.0.0.1:${originPort}/pool/pkg_1.0_amd64.deb"; then echo "fetch $i ok $(wc -c </tmp/f)"; else echo "fetch $i failed"; fi
done
if timeout 5 wget -q -O /dev/null "http://10.0.2.2:${apiPort}/healthz" 2>/dev/null; then echo "api reachable"; else echo "api refused"; fi
`;
}

/** pids of cache programs whose command line names this state dir's caches. */
function cachePids(stateDir: string): { registry: number[]; squid: number[] } {
  const out = { registry: [] as number[], squid: [] as number[] };
  const needle = join(stateDir, "caches", "run");
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      if (/^State:\s+Z/m.test(readFileSync(`/proc/${d}/status`, "utf8"))) continue;
      const cmd = readFileSync(`/proc/${d}/cmdline`, "utf8").split("\0");
      if (!cmd.some((a) => a.startsWith(needle)) || cmd[0] === "setpriv") continue;
      if (/docker-registry$/.test(cmd[0]!)) out.registry.push(Number(d));
      else if (/squid$/.test(cmd[0]!)) out.squid.push(Number(d));
    } catch {
      /* gone */
    }
  }
  return out;
}

/** Queues a job, waits until it completed, returns the job's console lines ("tiny-guest: job: ..."). */
async function runJob(s: Serve, gh: FakeGitHub, base: string): Promise<{ job: string[]; console: string }> {
  const job = gh.addJob({ repository: REPO, labels: ["self-hosted", "tiny"] });
  const q = await sendWebhook(`${base}/webhook`, { secret: SECRET, payload: await workflowJobPayload("queued", { id: job.id, runId: job.runId, labels: job.labels, repository: REPO }) });
  assert.equal(q.status, 202);
  await s.poll(async () => gh.state.jobs.find((j) => j.id === job.id)?.status === "completed", 240_000, `job ${job.id} to complete`);
  const name = gh.state.jobs.find((j) => j.id === job.id)!.runnerName!;
  await s.poll(async () => (await s.allVms()).some((v) => v.name === name && v.state === "finished"), 60_000, "the job's VM to finish");
  const vm = (await s.allVms()).find((v) => v.name === name)!;
  const text = await (await fetch(`${s.base}/api/vms/${vm.id}/log`, { headers: { authorization: "Bearer serve-e2e-api-token" } })).text();
  return { job: text.split("\n").filter((l) => l.includes("tiny-guest: job: ")).map((l) => l.replace(/^.*tiny-guest: job: /, "").trim()), console: text };
}

test("caches: a pull through the registry cache (again with the upstream gone), a hit through Squid, a cache killed and restarted, kill -9 of civm leaves one copy, a cache that cannot start degrades without stopping VMs", { timeout: 1_200_000 }, async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  let hub: Hub | undefined;
  hub = await startHub(gh, () => `${base}/webhook`, { tinyScript: jobScript(port) });
  t.after(() => hub?.close());
  // quay.io's cache cannot start: its port is taken.
  const taken = createServer(() => {});
  const takenPort = await new Promise<number>((r) => taken.listen(0, "127.0.0.1", () => r((taken.address() as { port: number }).port)));
  t.after(() => taken.close());
  const caches = {
    registry: { mirrors: [{ registry: "docker.io", upstream: upstream.url }, { registry: "quay.io", upstream: upstream.url, port: takenPort }], maxSize: "1G" },
    http: { maxSize: "200M", allow: [`127.0.0.1:${originPort}`] },
  };
  const config = serveConfig({ port, gh, hub, image: guest.disk, pools: [{ minRunners: 0, maxRunners: 1 }], caches });
  let s = startServe({ port, config });
  const e = s.e;
  t.after(() => {
    if (s.child.exitCode === null) s.child.kill("SIGKILL");
  });
  const cachesNow = () => s.api<CacheStatus[]>("/api/caches");
  const byName = async () => new Map((await cachesNow()).map((c) => [c.name, c]));
  await s.poll(async () => {
    const m = await byName().catch(() => new Map<string, CacheStatus>());
    return m.get("registry/docker.io")?.state === "up" && m.get("http")?.state === "up" && m.get("registry/quay.io")?.state === "failed";
  }, 60_000, "docker.io's and the HTTP cache up, quay.io's failed");
  const health = (await (await fetch(`${base}/healthz`)).json()) as { status: string; caches: { name: string; state: string; message: string | null }[] };
  assert.equal(health.status, "degraded");
  assert.match(health.caches.find((c) => c.name === "registry/quay.io")!.message!, /docker-registry exited with status \d+: .*address already in use/);
  assert.match(s.stdout(), /"cache":"registry\/quay\.io".*"msg":"cache not available: runner VMs start without it"/);
  const first = cachePids(e.stateDir);
  assert.equal(first.registry.length, 1, "one docker-registry (quay.io's is not running)");
  assert.equal(first.squid.length, 1);
  // The caches run as their own unprivileged user.
  const uid = Number(/^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${first.squid[0]}/status`, "utf8"))![1]);
  assert.notEqual(uid, 0);

  // Job 1: pulled through the cache (misses), fetched twice through Squid (the second a hit).
  const j1 = await runJob(s, gh, base);
  const dockerio = (await byName()).get("registry/docker.io")!;
  assert.deepEqual(j1.job, [
    `caches registry=${dockerio.guestUrl} proxy=${(await byName()).get("http")!.guestUrl}`,
    `pull ok ${image.layers[0]!.digest}`,
    `fetch 1 ok ${PKG.length}`,
    `fetch 2 ok ${PKG.length}`,
    "api refused",
  ], j1.console.slice(-4000));
  assert.match(dockerio.guestUrl, /^http:\/\/10\.0\.2\.2:\d+$/);
  const instance = /tiny-guest: instance\.json: (.*)/.exec(j1.console)![1]!;
  assert.match(instance, /"caches"/);
  assert.doesNotMatch(instance, /quay\.io/, "a failed cache is not handed to VMs");
  assert.equal(originGets, 1, "the origin saw one request: the second fetch was a hit");

  // Job 2 with the upstream gone: the pull is served from the cache.
  await upstream.stop();
  const j2 = await runJob(s, gh, base);
  assert.ok(j2.job.includes(`pull ok ${image.layers[0]!.digest}`), j2.job.join("\n"));
  await upstream.start();
  await new Promise((r) => setTimeout(r, 4000)); // the registry's hits are settled after 3 s
  const after2 = await byName();
  const reg = after2.get("registry/docker.io")!;
  const http = after2.get("http")!;
  assert.ok(reg.requests >= 4 && reg.misses >= 2 && reg.hits >= 2, JSON.stringify(reg));
  assert.ok(reg.hitRatio! > 0 && reg.upstreamBytes >= image.layers[0]!.bytes && reg.sizeBytes! >= image.layers[0]!.bytes, JSON.stringify(reg));
  assert.ok(http.hits >= 3 && http.misses === 1, JSON.stringify(http));
  const metrics = await (await fetch(`${base}/metrics`)).text();
  assert.match(metrics, /^civm_cache_hits_total\{cache="http"\} [3-9]/m);
  assert.match(metrics, /^civm_cache_misses_total\{cache="registry\/docker\.io"\} [2-9]/m);
  assert.match(metrics, /^civm_cache_bytes_total\{cache="registry\/docker\.io",direction="served"\} [1-9]/m);
  assert.match(metrics, /^civm_cache_up\{cache="registry\/quay\.io"\} 0$/m);
  // civm caches (the CLI over the API).
  const { runCivm } = await import("../support/civm-cli.js");
  const cli = await runCivm(["caches"], { ...e, env: { ...e.env, CIVM_API_URL: base, CIVM_API_TOKEN: "serve-e2e-api-token" } });
  assert.equal(cli.code, 0, cli.stderr);
  assert.match(cli.stdout, /^registry\/docker\.io\s+up /m);
  assert.match(cli.stderr, /cache registry\/quay\.io failed: docker-registry exited/);

  // A cache killed is started again.
  const regPid = reg.pid!;
  process.kill(regPid, "SIGKILL");
  await s.poll(async () => {
    const c = (await byName()).get("registry/docker.io")!;
    return c.state === "up" && c.pid !== regPid && c.restarts === 1;
  }, 30_000, "the registry cache to be restarted");
  assert.match(await (await fetch(`${base}/metrics`)).text(), /^civm_cache_restarts_total\{cache="registry\/docker\.io"\} 1$/m);

  // kill -9 of civm: its caches end with it; started again, there is one copy of each.
  s.child.kill("SIGKILL");
  await s.done;
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline && (cachePids(e.stateDir).registry.length || cachePids(e.stateDir).squid.length)) await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(cachePids(e.stateDir), { registry: [], squid: [] }, "the caches outlived civm");
  taken.close();
  s = startServe({ e, port, config, configFile: s.configFile });
  await s.poll(async () => {
    const m = await byName().catch(() => new Map<string, CacheStatus>());
    return [...m.values()].length === 3 && [...m.values()].every((c) => c.state === "up");
  }, 60_000, "every cache up after the restart (quay.io's port is free now)");
  const again = cachePids(e.stateDir);
  assert.equal(again.registry.length, 2);
  assert.equal(again.squid.length, 1);
  assert.equal(((await (await fetch(`${base}/healthz`)).json()) as { status: string }).status, "ok");

  // SIGTERM: the caches stop with the daemon.
  const r = await s.stop();
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(cachePids(e.stateDir), { registry: [], squid: [] });
  assert.deepEqual(qemuProcessesOf(e), []);
  assert.deepEqual(leftovers(e), []);
  await hub.close();
  hub = undefined;
});
