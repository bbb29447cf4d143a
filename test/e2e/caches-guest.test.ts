// The guest agent's side of the caches on real QEMU (TCG) with the runner image that has
// Docker (civm-gha): civm serve's caches (src/caches, run by test/support/cache-host.ts)
// and a local upstream registry run in a network namespace this test creates, with civm and
// QEMU (so nothing, not even a fallback to docker.io, can leave it). The VM gets what a runner
// VM of civm serve gets (instance.json's config.caches and the caches' ports in its network
// policy); its job pulls an image with the docker CLI through the docker.io mirror, sees
// HTTP_PROXY and apt's proxy, fetches through the proxy, and has containerd's and BuildKit's
// mirror files.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { consoleLogOf, runCivm } from "../support/civm-cli.js";
import { ensureGhaImage, ghaEnv, GHA_IMAGE } from "../support/gha-image.js";
import { createTestNet, type TestNet } from "../support/netns.js";
import { repoRoot, tempDir, testCacheUser } from "../support/paths.js";
import { startUpstream, type PushedImage, type Upstream } from "../support/registry.js";
import { leftoversNamed, uniqueName } from "../support/runner-image.js";

let net: TestNet;
let upstream: Upstream;
let image: PushedImage;
let caches: ChildProcess;
let guest: { config: Record<string, unknown>; allow: string[] };
const ORIGIN = 8090;

before(async () => {
  testCacheUser();
  await ensureGhaImage();
  net = createTestNet();
  // Pushed from here (the test's own namespace), then served from the test namespace.
  const staging = await startUpstream();
  image = await staging.push("library/hello", "latest", { layerBytes: 32 * 1024 });
  await staging.stop();
  upstream = await startUpstream({ wrap: net.wrap, dir: staging.dir });
  // On the test host's own address: not in the guest's NO_PROXY, and denied to it directly.
  await net.serve(net.host, ORIGIN, "from-the-origin");
  const stateDir = tempDir("civm-cache-host-");
  const arg = {
    caches: { registry: { mirrors: [{ registry: "docker.io", upstream: upstream.url }, { registry: "ghcr.io", upstream: upstream.url }], maxSize: "1G" }, http: { maxSize: "200M", allow: [`${net.hostAddr}:${ORIGIN}`] } },
    stateDir,
    network: "restricted",
  };
  caches = spawn("ip", ["netns", "exec", net.host, process.execPath, join(repoRoot, "dist", "test", "support", "cache-host.js"), JSON.stringify(arg)], { stdio: ["ignore", "pipe", "inherit"], env: process.env });
  const line = await new Promise<string>((resolve, reject) => {
    let out = "";
    caches.stdout!.on("data", (d: Buffer) => {
      out += d;
      if (out.includes("\n")) resolve(out.split("\n")[0]!);
    });
    caches.once("exit", (c) => reject(new Error(`cache-host exited with ${c}`)));
  });
  const started = JSON.parse(line) as { status: { name: string; state: string }[]; guest: typeof guest };
  assert.deepEqual(started.status.map((s) => `${s.name} ${s.state}`), ["registry/docker.io up", "registry/ghcr.io up", "http up"]);
  guest = started.guest;
});

after(async () => {
  if (caches && caches.exitCode === null) {
    caches.kill("SIGTERM");
    await new Promise((r) => caches.once("exit", r));
  }
  await upstream?.stop();
  net?.close();
});

test("civm-gha: docker pull through the registry cache, the job's proxy and apt's, containerd's and BuildKit's mirrors", { timeout: 1_200_000 }, async (t) => {
  const e = ghaEnv();
  t.after(() => rmSync(e.root, { recursive: true, force: true }));
  const name = uniqueName("caches");
  const command = [
    "set -u",
    'echo "proxy=${HTTP_PROXY:-none} https=${HTTPS_PROXY:-none} no=${NO_PROXY:-none}"',
    "apt-config dump | grep -i 'Acquire::http::Proxy' || echo no-apt-proxy",
    "docker pull hello:latest >/dev/null && echo \"pulled $(docker image inspect hello:latest --format '{{json .RootFS.Layers}}')\"",
    `echo "$(curl -fsS http://${net.hostAddr}:${ORIGIN}/) (through the proxy)"`,
    "grep -h '^\\[host\\|^server' /etc/containerd/certs.d/docker.io/hosts.toml /etc/containerd/certs.d/ghcr.io/hosts.toml",
    "grep -c mirrors /etc/buildkit/buildkitd.toml ~/.docker/buildx/buildkitd.default.toml",
    "echo job-done",
  ].join("\n");
  writeFileSync(
    join(e.root, "instances.json"),
    JSON.stringify([{ name, image: GHA_IMAGE, "cpu-cores": 2, ram: "2G", "timeout-seconds": 1500, network: { allow: guest.allow }, config: { command, caches: guest.config } }]),
  );
  const r = await runCivm(["run", name], e, { wrap: net.wrap });
  const text = consoleLogOf(r.stderr);
  assert.equal(r.code, 0, `${r.stderr}\n${text.slice(-6000)}`);
  const reg = (guest.config.registry as { registry: string; url: string }[]).find((m) => m.registry === "docker.io")!.url;
  const proxy = (guest.config.http as { url: string }).url;
  assert.match(reg, /^http:\/\/10\.0\.2\.2:\d+$/);
  assert.match(text, /civm-agent: registry caches: docker\.io ghcr\.io mirrored for docker containerd buildkit/);
  assert.match(text, new RegExp(`civm-agent: HTTP cache: ${proxy} answers; the job's HTTP\\(S\\)_PROXY and apt use it`));
  assert.match(text, new RegExp(`proxy=${proxy} https=${proxy} no=localhost,127\\.0\\.0\\.1,::1,10\\.0\\.2\\.2,10\\.0\\.2\\.3`));
  assert.match(text, new RegExp(`Acquire::http::Proxy "${proxy}";`));
  // The layer Docker unpacked is the one pushed upstream (diff_ids are the tar's digests).
  assert.ok(text.includes(`pulled ${JSON.stringify(image.diffIds)}`), "docker unpacked the pushed layer");
  assert.match(text, /from-the-origin \(through the proxy\)/);
  assert.match(text, /server = "https:\/\/registry-1\.docker\.io"/);
  assert.match(text, /server = "https:\/\/ghcr\.io"/);
  assert.match(text, new RegExp(`\\[host\\."${reg}"\\]`));
  assert.match(text, /buildkitd\.toml:2[\s\S]*buildkitd\.default\.toml:2/);
  assert.match(text, /job-done/);
  assert.deepEqual(leftoversNamed(e, name), []);
});
