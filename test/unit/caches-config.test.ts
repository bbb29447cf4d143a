// The serve config's `caches:` section (src/caches/config.ts), what a VM gets of the caches
// (inject.ts), and the pure parts of the registry and Squid caches: config files, log
// parsing, hit/miss bookkeeping, eviction.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parse } from "yaml";
import { parseCaches, summarizeCaches } from "../../src/caches/config.js";
import { guestCaches, guestEndpoint, launchWithCaches, noProxyFor, withCacheAccess } from "../../src/caches/inject.js";
import { blobPath, listBlobs, parseRegistryLine, planEviction, RegistryTally, registryEnv, renderRegistryConfig, type StoredBlob } from "../../src/caches/registry.js";
import { parseSquidRecord, parseSquidStoreSize, renderSquidConfig } from "../../src/caches/squid.js";
import { ConfigError } from "../../src/errors/index.js";
import { parseNetworkValue, DEFAULT_NETWORK } from "../../src/net/policy.js";
import { settingsChanges } from "../../src/pool/reload.js";
import { loadServeConfig, summarizeServeConfig } from "../../src/pool/config.js";
import { tempDir } from "../support/paths.js";

const GiB = 1024 ** 3;

function ok(v: unknown) {
  const r = parseCaches(v, "serve.yaml", "/etc/civm");
  assert.deepEqual(r.problems, []);
  return r.value!;
}

function problems(v: unknown): string {
  const r = parseCaches(v, "serve.yaml", "/etc/civm");
  assert.equal(r.value, undefined);
  assert.ok(r.problems.length > 0, "expected problems");
  return r.problems.join("\n");
}

test("caches: the issue's example, with defaults for the rest", () => {
  const c = ok({
    registry: { mirrors: ["docker.io", "ghcr.io", "quay.io"], storage: "/var/lib/civm/cache/registry", maxSize: "50G", credentials: { "docker.io": { username: "me", password: "s3cret-token" } } },
    http: { storage: "cache/http", maxSize: "20G" },
  });
  assert.deepEqual(
    c.registry!.mirrors.map((m) => [m.registry, m.upstream, m.url, m.credentials?.username]),
    [["docker.io", "https://registry-1.docker.io", undefined, "me"], ["ghcr.io", "https://ghcr.io", undefined, undefined], ["quay.io", "https://quay.io", undefined, undefined]],
  );
  assert.equal(c.registry!.storage, "/var/lib/civm/cache/registry");
  assert.equal(c.registry!.maxSizeBytes, 50 * GiB);
  assert.equal(c.http!.storage, "/etc/civm/cache/http", "relative to the config's folder");
  assert.equal(c.http!.maxSizeBytes, 20 * GiB);
  assert.equal(c.http!.maxObjectBytes, GiB);
  assert.equal(c.http!.url, undefined);
  // Defaults: 50G and 20G, the state dir for storage.
  const d = ok({ registry: { mirrors: ["docker.io"] }, http: {} });
  assert.equal(d.registry!.maxSizeBytes, 50 * GiB);
  assert.equal(d.registry!.storage, undefined);
  assert.equal(d.http!.maxSizeBytes, 20 * GiB);
  assert.deepEqual(summarizeCaches(c).slice(0, 2), ["cache registry/docker.io: pull-through cache of https://registry-1.docker.io (with credentials)", "cache registry/ghcr.io: pull-through cache of https://ghcr.io"]);
});

test("caches: mirror objects (upstream, port, an existing cache's url), an existing HTTP proxy, proxy allow entries", () => {
  const c = ok({
    registry: { mirrors: [{ registry: "Docker.io", upstream: "http://127.0.0.1:5000/", port: 15000 }, { registry: "registry.corp:5000", url: "http://cache.corp:5001" }] },
    http: { allow: ["127.0.0.1:8080", "pkgs.corp:80", "10.1.0.0/16"], maxObjectSize: "2G" },
  });
  assert.deepEqual(c.registry!.mirrors[0], { registry: "docker.io", upstream: "http://127.0.0.1:5000", url: undefined, port: 15000, credentials: undefined });
  assert.deepEqual(c.registry!.mirrors[1], { registry: "registry.corp:5000", upstream: undefined, url: "http://cache.corp:5001", port: undefined, credentials: undefined });
  assert.deepEqual(c.http!.allow.map((a) => a.target.kind), ["cidr", "name", "cidr"]);
  assert.equal(c.http!.maxObjectBytes, 2 * GiB);
  assert.deepEqual(ok({ http: { url: "http://squid.corp:3128" } }).http!.url, "http://squid.corp:3128");
  assert.equal(parseCaches(undefined, "f", "/").value, undefined);
});

test("caches: each mistake names the file and the field and says what to write", () => {
  assert.match(problems({ registry: { mirrrors: ["docker.io"] } }), /^serve\.yaml: "caches\.registry" has an unknown key "mirrrors"; did you mean "mirrors"\?/m);
  assert.match(problems({ registry: {} }), /^serve\.yaml: "caches\.registry\.mirrors" is missing; it must be a list of registries, e\.g\. \["docker\.io", "ghcr\.io", "quay\.io"\]\.$/m);
  assert.match(problems({ registry: { mirrors: ["https://docker.io/v2"] } }), /"caches\.registry\.mirrors\[0\]" must be a registry host name such as "docker\.io"/);
  assert.match(problems({ registry: { mirrors: [{ registry: "quay.io", url: "http://c:1", upstream: "https://quay.io" }] } }), /"caches\.registry\.mirrors\[0\]" sets "url" \(an existing cache civm only checks\) together with "upstream"/);
  assert.match(problems({ registry: { mirrors: [{ registry: "quay.io", upstream: "https://quay.io/path" }] } }), /"caches\.registry\.mirrors\[0\]\.upstream" must be an http\(s\) URL such as https:\/\/ghcr\.io: scheme, host and port only/);
  assert.match(problems({ registry: { mirrors: ["docker.io", "DOCKER.IO"] } }), /"caches\.registry\.mirrors\[1\]" names "docker\.io" again \(first at caches\.registry\.mirrors\[0\]\)/);
  assert.match(problems({ registry: { mirrors: ["docker.io"], credentials: { "ghcr.io": { username: "u", password: "p" } } } }), /"caches\.registry\.credentials\.ghcr\.io" names a registry that is not in "caches\.registry\.mirrors" \(docker\.io\)/);
  assert.match(problems({ registry: { mirrors: ["docker.io"], credentials: { "docker.io": { username: "u" } } } }), /"caches\.registry\.credentials\.docker\.io\.password" is missing; it must be the password or token/);
  assert.match(problems({ registry: { mirrors: ["docker.io"], maxSize: "10M" } }), /"caches\.registry\.maxSize" is 10M; a cache needs at least 100M/);
  assert.match(problems({ http: { maxSize: "lots" } }), /"caches\.http\.maxSize" "lots" is not a size/);
  assert.match(problems({ http: { url: "http://squid:3128", maxSize: "1G" } }), /"caches\.http\.maxSize" applies to the proxy civm runs, but "caches\.http\.url" names an existing one; remove "maxSize" or "url"/);
  assert.match(problems({ http: { allow: ["host"] } }), /"caches\.http\.allow\[0\]" "host" names the host without a port/);
  assert.match(problems({ http: { storage: "/srv/my cache" } }), /"caches\.http\.storage" must be a folder path without spaces/);
  assert.match(problems({ http: { port: 80 } }), /"caches\.http\.port" must be a port number from 1024 to 65535/);
  assert.match(problems({ http: { port: 3128 }, registry: { mirrors: [{ registry: "docker.io", port: 3128 }] } }), /"caches\.http\.port" is 3128, which "caches\.registry\.mirrors\[0\]\.port" uses too/);
  assert.match(problems({ http: { maxSize: "1G", maxObjectSize: "2G" } }), /"caches\.http\.maxObjectSize" \(2G\) is larger than "caches\.http\.maxSize" \(1G\)/);
  assert.match(problems("yes"), /^serve\.yaml: "caches" must be an object with "registry" and\/or "http"/);
  assert.match(problems({ registri: {} }), /"caches" has an unknown key "registri"; did you mean "registry"\?$/m);
  // Every section's mistakes at once.
  const both = problems({ registri: {}, registry: { mirrors: ["docker.io"], maxSize: "1X" }, http: { maxSize: "2Y" } }).split("\n");
  assert.equal(both.length, 3, both.join("\n"));
});

test("caches in the serve config: problems with the rest of the file, passwords redacted, summary, reload needs a restart", async () => {
  const dir = tempDir();
  mkdirSync(join(dir, "img"));
  writeFileSync(join(dir, "img", "disk.qcow2"), "");
  writeFileSync(join(dir, "token"), "hub-token-value\n");
  const base = { github: { token: "gh-token" }, pools: [{ name: "p", maxRunners: 1, runner: { image: "img/disk.qcow2", organization: "o", labels: ["x"] } }] };
  const file = join(dir, "serve.json");
  writeFileSync(file, JSON.stringify({ ...base, caches: { registry: { mirrors: ["docker.io"], credentials: { "docker.io": { username: "me", password: "${{ file:token }}" } } }, htp: {} } }));
  await assert.rejects(loadServeConfig(file, { env: {} }), (e: unknown) => e instanceof ConfigError && new RegExp(`^${file.replace(/[.]/g, "\\.")}: "caches" has an unknown key "htp"; did you mean "http"\\?`, "m").test(e.message));
  writeFileSync(file, JSON.stringify({ ...base, caches: { registry: { mirrors: ["docker.io"], credentials: { "docker.io": { username: "me", password: "${{ file:token }}" } } }, http: { maxSize: "1G" } } }));
  const c = await loadServeConfig(file, { env: {} });
  assert.equal(c.caches!.registry!.mirrors[0]!.credentials!.password, "hub-token-value");
  assert.ok(c.secrets.includes("hub-token-value"), "the resolved password is redacted from logs");
  const summary = summarizeServeConfig(c).join("\n");
  assert.match(summary, /cache http: Squid, up to 1G/);
  assert.ok(!summary.includes("hub-token-value"));
  writeFileSync(file, JSON.stringify({ ...base, caches: { registry: { mirrors: ["docker.io", "ghcr.io"] } } }));
  const next = await loadServeConfig(file, { env: {} });
  const changes = settingsChanges(c, next, "/var/lib/civm");
  assert.deepEqual(changes.restartNeeded.find((r) => r.field === "caches"), { field: "caches", running: "registry/docker.io,http", configured: "registry/docker.io,registry/ghcr.io" });
  assert.ok(!JSON.stringify(changes).includes("hub-token-value"));
});

test("inject: a restricted VM gets the caches at 10.0.2.2 and exactly their ports opened; none gets nothing; unrestricted needs no rule", () => {
  const offered = [
    { kind: "registry" as const, registry: "docker.io", url: "http://127.0.0.1:41001" },
    { kind: "registry" as const, registry: "quay.io", url: "http://cache.corp:5001" },
    { kind: "registry" as const, registry: "ghcr.io", url: "https://10.9.8.7" },
    { kind: "http" as const, url: "http://127.0.0.1:41003" },
  ];
  const network = parseNetworkValue({ allow: ["host:8443", "10.1.2.3:5432", "10.2.0.0/16", "ghes.corp:443"] }).value!;
  const g = guestCaches(offered, network);
  assert.deepEqual(g.config, {
    registry: [
      { registry: "docker.io", url: "http://10.0.2.2:41001" },
      { registry: "quay.io", url: "http://cache.corp:5001" },
      { registry: "ghcr.io", url: "https://10.9.8.7:443" },
    ],
    http: { url: "http://10.0.2.2:41003", noProxy: "localhost,127.0.0.1,::1,10.0.2.2,10.0.2.3,10.1.2.3,10.2.0.0/16,ghes.corp" },
  });
  assert.deepEqual(g.allow.map((a) => a.raw), ["host:41001", "cache.corp:5001", "10.9.8.7:443", "host:41003"]);
  assert.deepEqual(guestCaches(offered, { mode: "none", allow: [] }), { config: undefined, allow: [] });
  const open = guestCaches(offered, { mode: "unrestricted", allow: [] });
  assert.equal(open.allow.length, 0);
  assert.equal(open.config!.registry!.length, 3);
  assert.deepEqual(guestCaches([], DEFAULT_NETWORK), { config: undefined, allow: [] });
  assert.equal(guestEndpoint("http://[::1]:5000").url, "http://10.0.2.2:5000");
  assert.equal(guestEndpoint("http://[fd00::5]:5000").allow.raw, "[fd00::5]:5000");
  assert.equal(noProxyFor(DEFAULT_NETWORK), "localhost,127.0.0.1,::1,10.0.2.2,10.0.2.3");
  // Already-allowed ports are not added twice; other modes are left alone.
  assert.deepEqual(withCacheAccess(network, g.allow).allow.map((a) => a.raw), ["host:8443", "10.1.2.3:5432", "10.2.0.0/16", "ghes.corp:443", "host:41001", "cache.corp:5001", "10.9.8.7:443", "host:41003"]);
  assert.deepEqual(withCacheAccess({ mode: "unrestricted", allow: [] }, g.allow), { mode: "unrestricted", allow: [] });
});

test("inject: a launch gets config.caches next to the runner's config and the caches' ports in its policy; nothing to add leaves it as it is", () => {
  const req = { id: "0a1b2c3d", pool: { name: "p", vm: { cpus: 1, network: DEFAULT_NETWORK } }, config: { runner: "github", jitconfig: "J", pool: "p" }, secrets: ["J"] };
  const out = launchWithCaches(req, (n) => guestCaches([{ kind: "http", url: "http://127.0.0.1:41003" }], n));
  assert.deepEqual(out.config, { runner: "github", jitconfig: "J", pool: "p", caches: { http: { url: "http://10.0.2.2:41003", noProxy: "localhost,127.0.0.1,::1,10.0.2.2,10.0.2.3" } } });
  assert.deepEqual(out.pool.vm.network.allow.map((a) => a.raw), ["host:41003"]);
  assert.equal(out.pool.vm.cpus, 1);
  assert.equal(req.pool.vm.network, DEFAULT_NETWORK, "the pool's own spec is not changed");
  assert.equal(launchWithCaches(req, (n) => guestCaches([], n)), req);
});

test("registry: the config file (proxy of the upstream on loopback, JSON logs, no credentials in it), credentials in the environment", () => {
  const text = renderRegistryConfig({ root: "/var/lib/civm/caches/registry/docker.io", port: 41001, upstream: "https://registry-1.docker.io" });
  const c = parse(text) as Record<string, any>;
  assert.equal(c.http.addr, "127.0.0.1:41001");
  assert.equal(c.proxy.remoteurl, "https://registry-1.docker.io");
  assert.equal(c.proxy.username, undefined);
  assert.equal(c.storage.filesystem.rootdirectory, "/var/lib/civm/caches/registry/docker.io");
  assert.equal(c.storage.cache, undefined, "no blob descriptor cache: eviction removes blobs under it");
  assert.equal(c.log.formatter, "json");
  assert.deepEqual(registryEnv({ username: "me", password: "pw" }), { REGISTRY_PROXY_USERNAME: "me", REGISTRY_PROXY_PASSWORD: "pw" });
  assert.deepEqual(registryEnv(undefined), {});
});

const D1 = `sha256:${"a".repeat(64)}`;
const D2 = `sha256:${"b".repeat(64)}`;

test("registry: log lines → served requests (GET of manifests and blobs), stored content (misses), problems", () => {
  const served = (uri: string, status = 200, method = "GET") => JSON.stringify({ msg: "response completed", "http.request.method": method, "http.request.uri": uri, "http.response.status": status, "http.response.written": 157, level: "info" });
  assert.deepEqual(parseRegistryLine(served(`/v2/library/hello/blobs/${D1}`)), { kind: "served", repo: "library/hello", what: "blob", digest: D1, bytes: 157 });
  assert.deepEqual(parseRegistryLine(served("/v2/my/deep/repo/manifests/latest")), { kind: "served", repo: "my/deep/repo", what: "manifest", digest: undefined, bytes: 157 });
  assert.equal(parseRegistryLine(served("/v2/")), undefined);
  assert.equal(parseRegistryLine(served("/v2/library/hello/manifests/latest", 200, "HEAD")), undefined);
  assert.equal(parseRegistryLine(served(`/v2/library/hello/blobs/${D1}`, 404)), undefined);
  assert.deepEqual(parseRegistryLine(JSON.stringify({ level: "info", msg: `Adding new scheduler entry for library/hello@${D2} with ttl=167h59m59.99s` })), { kind: "stored", repo: "library/hello", digest: D2 });
  assert.deepEqual(parseRegistryLine(JSON.stringify({ level: "error", msg: "response completed with error", "err.message": "upstream unreachable", "http.request.method": "GET", "http.request.uri": "/v2/x/blobs/y", "http.response.status": 500 })), { kind: "problem", level: "error", message: "response completed with error: upstream unreachable" });
  assert.equal(parseRegistryLine(JSON.stringify({ level: "error", msg: "response completed with error", "err.message": "manifest unknown", "http.request.method": "HEAD", "http.request.uri": "/v2/x/manifests/nope", "http.response.status": 404 })), undefined, "a client's 404 is not a problem");
  assert.deepEqual(parseRegistryLine(JSON.stringify({ level: "error", msg: "failed to store blob", err: "disk full" })), { kind: "problem", level: "error", message: "failed to store blob: disk full" });
  assert.equal(parseRegistryLine(JSON.stringify({ level: "warning", msg: "No HTTP secret provided - generated random secret." })), undefined);
  assert.equal(parseRegistryLine("127.0.0.1 - - [06/Dec/2026] \"GET /v2/ HTTP/1.1\" 200"), undefined);
});

test("registry: hits and misses from the log, whichever comes first of a request and its stored event", () => {
  let now = 0;
  const t = new RegistryTally(3000, () => now);
  t.onServed({ repo: "library/hello", what: "blob", digest: D1 }); // stored after the response
  t.onStored({ repo: "library/hello", digest: D1 });
  t.onStored({ repo: "library/hello", digest: D2 }); // a manifest: stored before the response
  t.onServed({ repo: "library/hello", what: "manifest", digest: undefined });
  t.onServed({ repo: "library/hello", what: "blob", digest: D1 }); // from storage
  t.onServed({ repo: "other/repo", what: "manifest", digest: undefined });
  now = 2000;
  assert.equal(t.settle(), 0, "not decided before the window is over");
  now = 3500;
  assert.equal(t.settle(), 2, "two requests with nothing stored around them: hits");
  assert.equal(t.settle(), 0);
});

test("registry: eviction takes the least recently used blobs until 90% of maxSize; a real store's blobs are listed", async () => {
  const blob = (d: string, bytes: number, usedAt: number): StoredBlob => ({ root: "/r", digest: d, bytes, usedAt });
  const blobs = [blob("sha256:1", 400, 30), blob("sha256:2", 300, 10), blob("sha256:3", 300, 20)];
  assert.deepEqual(planEviction(blobs, 1000), [], "at the limit: nothing");
  assert.deepEqual(planEviction(blobs, 900).map((b) => b.digest), ["sha256:2"], "1000 > 900: the oldest goes, 700 is under 810");
  assert.deepEqual(planEviction(blobs, 700).map((b) => b.digest), ["sha256:2", "sha256:3"], "down to 630 or less: the oldest two");
  assert.deepEqual(planEviction(blobs, 100).map((b) => b.digest), ["sha256:2", "sha256:3", "sha256:1"]);
  const root = tempDir();
  for (const [d, n] of [[D1, 10], [D2, 20]] as const) {
    mkdirSync(join(blobPath(root, d), ".."), { recursive: true });
    writeFileSync(blobPath(root, d), Buffer.alloc(n));
  }
  const listed = await listBlobs([root, join(root, "missing")], new Map([[`${root}\0${D2}`, Date.now() + 60_000]]));
  assert.deepEqual(listed.map((b) => [b.digest, b.bytes]).sort(), [[D1, 10], [D2, 20]]);
  assert.ok(listed.find((b) => b.digest === D2)!.usedAt > listed.find((b) => b.digest === D1)!.usedAt, "a logged request counts as a use");
});

test("squid: the config listens on loopback only, refuses what the VM policy denies except `allow`, logs to civm over UDP; squid -k parse accepts it", () => {
  const allow = parseNetworkValue({ allow: ["127.0.0.1:8080", "pkgs.corp:80", "host:9000"] }).value!.allow;
  const storage = tempDir();
  const text = renderSquidConfig({ port: 41003, managerPort: 41004, logPort: 41005, storage, maxSizeBytes: 20 * GiB, maxObjectBytes: GiB, allow, hostAddresses: ["198.51.100.1/32"] });
  const lines = text.split("\n");
  assert.deepEqual(lines.filter((l) => l.startsWith("http_port")), ["http_port 127.0.0.1:41003", "http_port 127.0.0.1:41004 name=civm_manager"]);
  assert.ok(lines.includes(`cache_dir ufs ${storage} 20480 16 256`));
  assert.ok(lines.includes("maximum_object_size 1048576 KB"));
  assert.ok(lines.includes("access_log udp://127.0.0.1:41005 logformat=civm buffer-size=0KB !civm_manager_port"));
  assert.match(text, /^acl civm_denied dst 0\.0\.0\.0\/8 10\.0\.0\.0\/8 .*169\.254\.0\.0\/16.* fc00::\/7 fe80::\/10/m);
  assert.match(text, /^acl civm_host dst 198\.51\.100\.1\/32 127\.0\.0\.0\/8 ::1\/128$/m);
  assert.match(text, /^acl civm_allow_1 dstdomain pkgs\.corp$/m);
  const at = (l: string) => lines.indexOf(l);
  // The cache manager only on its own port; allow entries before the denials; nothing but loopback clients.
  assert.ok(at("http_access allow manager civm_manager_port localhost") < at("http_access deny manager"));
  assert.ok(at("http_access allow localhost civm_allow_0 civm_allow_0_port") < at("http_access deny civm_host"));
  assert.ok(at("http_access deny civm_denied") < at("http_access allow localhost"));
  assert.equal(lines.filter((l) => l.startsWith("http_access")).at(-1), "http_access deny all");
  if (existsSync("/usr/sbin/squid")) {
    const file = join(storage, "squid.conf");
    writeFileSync(file, text);
    const out = execFileSync("/usr/sbin/squid", ["-k", "parse", "-f", file], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    assert.doesNotMatch(out, /FATAL|ERROR|WARNING/);
  }
});

test("squid: access log records → hits, misses, tunnels; refused and internal requests do not count; the store size", () => {
  assert.deepEqual(parseSquidRecord("civm TCP_MISS 200 1185 853 GET"), { result: "miss", servedBytes: 1185, upstreamBytes: 853 });
  assert.deepEqual(parseSquidRecord("civm TCP_REFRESH_UNMODIFIED 200 1192 0 GET"), { result: "hit", servedBytes: 1192, upstreamBytes: 0 });
  assert.deepEqual(parseSquidRecord("civm TCP_MEM_HIT 200 500 - GET"), { result: "hit", servedBytes: 500, upstreamBytes: 0 });
  assert.deepEqual(parseSquidRecord("civm TCP_SWAPFAIL_MISS 200 1159 827 GET"), { result: "miss", servedBytes: 1159, upstreamBytes: 827 });
  assert.deepEqual(parseSquidRecord("civm TCP_TUNNEL 200 9000 8000 CONNECT"), { result: "tunnel", servedBytes: 9000, upstreamBytes: 8000 });
  assert.equal(parseSquidRecord("civm TCP_DENIED 403 3445 - GET"), undefined);
  assert.equal(parseSquidRecord("civm NONE_NONE 400 3588 - GET"), undefined);
  assert.equal(parseSquidRecord("garbage"), undefined);
  assert.equal(parseSquidStoreSize("Store Directory Statistics:\nCurrent Store Swap Size: 8.00 KB\n\nStore Directory #0 (ufs): /x\nCurrent Size: 12.00 KB\n"), 12 * 1024);
});
