// A local "upstream" container registry for the cache tests and benchmarks: a plain CNCF
// Distribution (docker-registry) on 127.0.0.1 with its own storage, that can be stopped and
// started again (the upstream going away) and run in a test network namespace, holding Docker
// images the test pushes through the registry HTTP API (oci-registry.ts's push helpers). Images
// are real (a gzip tar layer and a config whose diff_ids match), so Docker in a guest can pull
// and unpack them.
// Also: a TCP proxy that throttles to a bandwidth (the benchmark's "realistic" upstream).
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { createServer, connect, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { freePort } from "./net.js";
import { tempDir } from "./paths.js";
import { digestOf, pushBlob, pushManifest } from "./oci-registry.js";

export interface PushedImage {
  repo: string;
  tag: string;
  manifest: string;
  manifestDigest: string;
  config: { digest: string; bytes: number };
  layers: { digest: string; bytes: number }[];
  /** The layers' uncompressed digests (what `docker image inspect` lists as RootFS.Layers). */
  diffIds: string[];
  /** Manifest, config and layers together. */
  totalBytes: number;
}

export interface Upstream {
  url: string;
  port: number;
  dir: string;
  /** Pushes an image of `layers` layers, each holding one file of `layerBytes` random bytes. */
  push(repo: string, tag: string, o?: { layers?: number; layerBytes?: number }): Promise<PushedImage>;
  stop(): Promise<void>;
  /** Starts it again on the same port and storage. */
  start(): Promise<void>;
}

export const MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json";

const sha = (b: Buffer | string) => digestOf(Buffer.from(b));

/** A gzip'd tar holding `name` with `bytes` random bytes, and its uncompressed digest (the diff_id). */
function layer(name: string, bytes: number): { gz: Buffer; diffId: string } {
  const dir = tempDir("civm-test-layer-");
  try {
    writeFileSync(join(dir, name), randomBytes(bytes));
    const tar = execFileSync("tar", ["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0", "--format=gnu", "-cf", "-", "-C", dir, name], { maxBuffer: 1 << 30 });
    return { gz: gzipSync(tar, { level: 1 }), diffId: sha(tar) };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export async function pushImage(base: string, repo: string, tag: string, o: { layers?: number; layerBytes?: number } = {}): Promise<PushedImage> {
  const layers: { digest: string; bytes: number; diffId: string }[] = [];
  for (let i = 0; i < (o.layers ?? 1); i++) {
    const l = layer(`file-${i}`, o.layerBytes ?? 4096);
    layers.push({ digest: (await pushBlob(base, repo, l.gz)).digest, bytes: l.gz.length, diffId: l.diffId });
  }
  const config = Buffer.from(JSON.stringify({ architecture: "amd64", os: "linux", config: { Cmd: ["/file-0"] }, rootfs: { type: "layers", diff_ids: layers.map((l) => l.diffId) } }));
  const configDigest = (await pushBlob(base, repo, config)).digest;
  const manifest = JSON.stringify({
    schemaVersion: 2,
    mediaType: MANIFEST_V2,
    config: { mediaType: "application/vnd.docker.container.image.v1+json", size: config.length, digest: configDigest },
    layers: layers.map((l) => ({ mediaType: "application/vnd.docker.image.rootfs.diff.tar.gzip", size: l.bytes, digest: l.digest })),
  });
  await pushManifest(base, repo, tag, MANIFEST_V2, manifest);
  return {
    repo,
    tag,
    manifest,
    manifestDigest: sha(manifest),
    config: { digest: configDigest, bytes: config.length },
    layers: layers.map(({ digest, bytes }) => ({ digest, bytes })),
    diffIds: layers.map((l) => l.diffId),
    totalBytes: manifest.length + config.length + layers.reduce((n, l) => n + l.bytes, 0),
  };
}

/** Pulls an image over the registry API (manifest, config, layers) and checks every digest; returns the bytes. */
export async function pullImage(base: string, repo: string, tag: string): Promise<number> {
  const m = await fetch(`${base}/v2/${repo}/manifests/${tag}`, { headers: { accept: MANIFEST_V2 } });
  if (m.status !== 200) throw new Error(`GET manifest ${repo}:${tag} from ${base}: ${m.status}`);
  const text = await m.text();
  const manifest = JSON.parse(text) as { config: { digest: string }; layers: { digest: string }[] };
  let bytes = text.length;
  for (const d of [manifest.config.digest, ...manifest.layers.map((l) => l.digest)]) {
    const r = await fetch(`${base}/v2/${repo}/blobs/${d}`);
    if (r.status !== 200) throw new Error(`GET blob ${d} from ${base}: ${r.status}`);
    const data = Buffer.from(await r.arrayBuffer());
    if (sha(data) !== d) throw new Error(`blob ${d} from ${base} has the wrong digest`);
    bytes += data.length;
  }
  return bytes;
}

/**
 * Starts an upstream registry on 127.0.0.1 (a free port) with storage in a temp dir, or in
 * `dir` (another upstream's: what was pushed there). `wrap`: run it under a command (e.g.
 * ["ip", "netns", "exec", NS]); readiness is then checked with curl under the same command.
 */
export async function startUpstream(o: { wrap?: string[]; dir?: string } = {}): Promise<Upstream> {
  const dir = o.dir ?? tempDir("civm-test-upstream-");
  const port = await freePort();
  mkdirSync(join(dir, "data"), { recursive: true });
  const config = join(dir, `config-${port}.yml`);
  writeFileSync(config, `version: 0.1\nlog: {level: error, accesslog: {disabled: true}}\nstorage: {filesystem: {rootdirectory: ${join(dir, "data")}}}\nhttp: {addr: 127.0.0.1:${port}, secret: test-upstream}\n`);
  let child: ChildProcess | undefined;
  const url = `http://127.0.0.1:${port}`;
  const wrap = o.wrap ?? [];
  const answers = async () => {
    if (!wrap.length) return fetch(`${url}/v2/`).then((r) => r.status === 200, () => false);
    try {
      return execFileSync(wrap[0]!, [...wrap.slice(1), "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", `${url}/v2/`], { encoding: "utf8" }) === "200";
    } catch {
      return false;
    }
  };
  const start = async () => {
    const argv = [...wrap, "docker-registry", "serve", config];
    child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "ignore", "inherit"] });
    for (let i = 0; i < 100; i++) {
      const ok = await answers();
      if (ok) return;
      if (child.exitCode !== null) throw new Error(`the upstream registry exited with ${child.exitCode}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error("the upstream registry did not answer within 10 s");
  };
  const stop = async () => {
    const c = child;
    child = undefined;
    if (!c || c.exitCode !== null) return;
    await new Promise<void>((r) => {
      c.once("exit", () => r());
      c.kill("SIGKILL");
    });
  };
  await start();
  return {
    url,
    port,
    dir,
    push: (repo, tag, o) => pushImage(url, repo, tag, o),
    stop,
    start,
  };
}

export interface Throttle {
  url: string;
  port: number;
  close(): Promise<void>;
}

/**
 * A TCP proxy on 127.0.0.1 to `targetPort` that sends the answers at most `bytesPerSecond`
 * per connection (a registry on the internet, as far as one download sees it).
 */
export async function throttledProxy(targetPort: number, bytesPerSecond: number): Promise<Throttle> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((client) => {
    const up = connect(targetPort, "127.0.0.1");
    sockets.add(client).add(up);
    for (const s of [client, up]) s.on("close", () => sockets.delete(s)).on("error", () => {});
    client.pipe(up);
    // A token bucket refilled by the time that passed (a late timer does not slow it down),
    // holding at most 100 ms of the bandwidth.
    const burst = Math.max(1, Math.floor(bytesPerSecond / 10));
    let queue: Buffer[] = [];
    let timer: NodeJS.Timeout | undefined;
    let tokens = 0;
    let last = Date.now();
    const pump = () => {
      const now = Date.now();
      tokens = Math.min(burst, tokens + ((now - last) * bytesPerSecond) / 1000);
      last = now;
      while (tokens >= 1 && queue.length) {
        const b = queue[0]!;
        const n = Math.min(Math.floor(tokens), b.length);
        client.write(b.subarray(0, n));
        tokens -= n;
        if (n === b.length) queue.shift();
        else queue[0] = b.subarray(n);
      }
      if (!queue.length) {
        clearInterval(timer);
        timer = undefined;
        up.resume();
        if (up.readableEnded) client.end();
      }
    };
    up.on("data", (d: Buffer) => {
      queue.push(d);
      up.pause();
      if (!timer) {
        last = Date.now();
        timer = setInterval(pump, 5);
      }
    });
    up.on("end", () => {
      if (!queue.length && !timer) client.end();
    });
    client.on("close", () => {
      clearInterval(timer);
      queue = [];
      up.destroy();
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  const port = (server.address() as { port: number }).port;
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}
