// A local OCI registry for the image pull/push tests: Debian's docker-registry (CNCF
// Distribution) on a loopback port with its config and storage in a temp dir, and in front
// of it a small proxy that records every request and can play a registry with token auth
// (the WWW-Authenticate Bearer flow against a fake token server checking a user and
// password). Fixture images are pushed through the plain registry API (no Docker needed).
import { spawn, type ChildProcess } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { freePort } from "./net.js";
import { tempDir } from "./paths.js";

export interface LocalRegistry {
  /** 127.0.0.1:PORT */
  host: string;
  url: string;
  /** Storage root (docker/registry/v2/...). */
  dataDir: string;
  /** The file holding a blob (or manifest) in the registry's storage: what the tamper tests edit. */
  blobFile(digest: string): string;
  close(): Promise<void>;
}

export async function startRegistry(): Promise<LocalRegistry> {
  const dir = tempDir("civm-oci-registry-");
  const dataDir = join(dir, "data");
  mkdirSync(dataDir);
  const port = await freePort();
  const host = `127.0.0.1:${port}`;
  writeFileSync(
    join(dir, "config.yml"),
    [
      "version: 0.1",
      "log:",
      "  level: error",
      "  accesslog:",
      "    disabled: true",
      "storage:",
      "  filesystem:",
      `    rootdirectory: ${dataDir}`,
      "  delete:",
      "    enabled: true",
      "http:",
      `  addr: ${host}`,
      `  secret: ${randomBytes(16).toString("hex")}`,
      "",
    ].join("\n"),
  );
  const child: ChildProcess = spawn("/usr/bin/docker-registry", ["serve", join(dir, "config.yml")], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr!.on("data", (d) => (stderr += d));
  const url = `http://${host}`;
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`docker-registry exited (${child.exitCode}): ${stderr}`);
    try {
      const r = await fetch(`${url}/v2/`);
      if (r.status === 200) break;
    } catch {
      /* not up yet */
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`docker-registry did not answer on ${url} within 15 s: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    host,
    url,
    dataDir,
    blobFile: (digest) => {
      const hex = digest.replace(/^sha256:/, "");
      return join(dataDir, "docker", "registry", "v2", "blobs", "sha256", hex.slice(0, 2), hex, "data");
    },
    close: async () => {
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once("exit", r));
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(t);
    },
  };
}

// ---- pushing fixtures through the API -------------------------------------------------------

export function digestOf(b: Buffer): string {
  return `sha256:${createHash("sha256").update(b).digest("hex")}`;
}

export async function pushBlob(url: string, repo: string, data: Buffer): Promise<{ digest: string; size: number }> {
  const digest = digestOf(data);
  const start = await fetch(`${url}/v2/${repo}/blobs/uploads/`, { method: "POST" });
  if (start.status !== 202) throw new Error(`upload start: ${start.status} ${await start.text()}`);
  const loc = new URL(start.headers.get("location")!, url);
  loc.searchParams.set("digest", digest);
  const put = await fetch(loc, { method: "PUT", body: new Uint8Array(data), headers: { "content-type": "application/octet-stream" } });
  if (put.status !== 201) throw new Error(`upload ${digest}: ${put.status} ${await put.text()}`);
  return { digest, size: data.length };
}

export async function pushManifest(url: string, repo: string, reference: string, mediaType: string, body: Buffer | string): Promise<{ digest: string; size: number }> {
  const b = Buffer.from(body);
  const r = await fetch(`${url}/v2/${repo}/manifests/${reference}`, { method: "PUT", body: new Uint8Array(b), headers: { "content-type": mediaType } });
  if (r.status !== 201) throw new Error(`manifest ${repo}:${reference}: ${r.status} ${await r.text()}`);
  return { digest: digestOf(b), size: b.length };
}

export const OCI = {
  index: "application/vnd.oci.image.index.v1+json",
  manifest: "application/vnd.oci.image.manifest.v1+json",
  config: "application/vnd.oci.image.config.v1+json",
  empty: "application/vnd.oci.empty.v1+json",
  layer: "application/vnd.oci.image.layer.v1.tar",
  layerGzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  layerZstd: "application/vnd.oci.image.layer.v1.tar+zstd",
};

export interface FixtureLayer {
  mediaType: string;
  data: Buffer;
  annotations?: Record<string, string>;
}

/** Pushes config + layers + an OCI image manifest under `reference`; returns the manifest's descriptor. */
export async function pushImage(
  url: string,
  repo: string,
  reference: string,
  o: { layers: FixtureLayer[]; config?: { mediaType: string; data: Buffer }; arch?: string; annotations?: Record<string, string>; artifactType?: string },
): Promise<{ digest: string; size: number; manifest: string }> {
  const config = o.config ?? { mediaType: OCI.config, data: Buffer.from(JSON.stringify({ architecture: o.arch ?? "amd64", os: "linux", rootfs: { type: "layers", diff_ids: [] } })) };
  const cfg = await pushBlob(url, repo, config.data);
  const layers = [];
  for (const l of o.layers) {
    const b = await pushBlob(url, repo, l.data);
    layers.push({ mediaType: l.mediaType, digest: b.digest, size: b.size, ...(l.annotations ? { annotations: l.annotations } : {}) });
  }
  const manifest = JSON.stringify({
    schemaVersion: 2,
    mediaType: OCI.manifest,
    ...(o.artifactType ? { artifactType: o.artifactType } : {}),
    config: { mediaType: config.mediaType, digest: cfg.digest, size: cfg.size },
    layers,
    ...(o.annotations ? { annotations: o.annotations } : {}),
  });
  const m = await pushManifest(url, repo, reference, OCI.manifest, manifest);
  return { ...m, manifest };
}

// ---- the recording / token-auth proxy -------------------------------------------------------

export interface RecordedRequest {
  method: string;
  path: string;
  authorization?: string;
}

export interface RegistryProxy {
  host: string;
  url: string;
  /** Requests the proxy saw (registry side). */
  requests: RecordedRequest[];
  /** Requests the token server saw (its Authorization header included). */
  tokenRequests: RecordedRequest[];
  close(): Promise<void>;
}

export interface ProxyOptions {
  /** Require Bearer tokens from the fake token server (default: no auth, just record). */
  auth?: { username: string; password: string; anonymousPull: boolean };
  /** Trickle blob bodies: 16 KiB every 100 ms (a download to interrupt). */
  slowBlobs?: boolean;
}

async function listen(server: Server): Promise<number> {
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return (server.address() as AddressInfo).port;
}

/**
 * A proxy to `upstream`. With `auth`, every /v2/ request needs `Authorization: Bearer T`
 * for a token the token server issued for the repository and action (GET/HEAD pull, the
 * rest push); otherwise 401 with the challenge. The token server grants pull to anyone
 * when anonymousPull, and pull,push to the right user and password (Basic); wrong
 * credentials get 401.
 */
export async function startProxy(upstream: LocalRegistry, opts: ProxyOptions = {}): Promise<RegistryProxy> {
  const requests: RecordedRequest[] = [];
  const tokenRequests: RecordedRequest[] = [];
  const tokens = new Map<string, { repo: string; actions: string[] }>();
  const tokenServer = createServer((req, res) => {
    const u = new URL(req.url ?? "/", "http://x");
    tokenRequests.push({ method: req.method ?? "GET", path: u.pathname + u.search, ...(req.headers.authorization ? { authorization: req.headers.authorization } : {}) });
    const scope = u.searchParams.get("scope") ?? "";
    const m = /^repository:([^:]+):([a-z,]+)$/.exec(scope);
    if (u.pathname !== "/token" || !m || u.searchParams.get("service") !== "civm-test") {
      res.writeHead(400, { "content-type": "application/json" }).end(JSON.stringify({ errors: [{ code: "BAD_REQUEST", message: "bad token request" }] }));
      return;
    }
    const auth = opts.auth!;
    let granted: string[] = [];
    const basic = /^Basic (.+)$/.exec(req.headers.authorization ?? "");
    if (basic) {
      const [user, ...rest] = Buffer.from(basic[1]!, "base64").toString("utf8").split(":");
      if (user !== auth.username || rest.join(":") !== auth.password) {
        res.writeHead(401, { "content-type": "application/json" }).end(JSON.stringify({ errors: [{ code: "UNAUTHORIZED", message: "bad credentials" }] }));
        return;
      }
      granted = ["pull", "push"];
    } else if (auth.anonymousPull) granted = ["pull"];
    const actions = m[2]!.split(",").filter((a) => granted.includes(a));
    const token = randomBytes(16).toString("hex");
    tokens.set(token, { repo: m[1]!, actions });
    res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ token, expires_in: 300 }));
  });
  const tokenPort = opts.auth ? await listen(tokenServer) : 0;

  const proxy = createServer((req: IncomingMessage, res: ServerResponse) => {
    const path = req.url ?? "/";
    requests.push({ method: req.method ?? "GET", path, ...(req.headers.authorization ? { authorization: req.headers.authorization } : {}) });
    if (opts.auth) {
      const m = /^\/v2\/(.+?)\/(manifests|blobs|tags)\//.exec(path);
      const repo = m?.[1] ?? "";
      const action = req.method === "GET" || req.method === "HEAD" ? "pull" : "push";
      const bearer = /^Bearer (.+)$/.exec(req.headers.authorization ?? "")?.[1];
      const grant = bearer ? tokens.get(bearer) : undefined;
      if (!grant || !m || grant.repo !== repo || !grant.actions.includes(action)) {
        const scope = m ? `,scope="repository:${repo}:${action === "push" ? "pull,push" : "pull"}"` : "";
        req.resume();
        res
          .writeHead(401, {
            "content-type": "application/json",
            "www-authenticate": `Bearer realm="http://127.0.0.1:${tokenPort}/token",service="civm-test"${scope}`,
          })
          .end(JSON.stringify({ errors: [{ code: grant ? "DENIED" : "UNAUTHORIZED", message: "authentication required" }] }));
        return;
      }
    }
    const headers = { ...req.headers };
    delete headers.authorization;
    const up = httpRequest({ host: "127.0.0.1", port: Number(upstream.host.split(":")[1]), method: req.method, path, headers }, (ur) => {
      res.writeHead(ur.statusCode ?? 502, ur.headers);
      if (!opts.slowBlobs || !path.includes("/blobs/sha256:")) {
        ur.pipe(res);
        return;
      }
      (async () => {
        for await (const c of ur) {
          const b = c as Buffer;
          for (let i = 0; i < b.length && !res.destroyed; i += 16384) {
            res.write(b.subarray(i, i + 16384));
            await new Promise((r) => setTimeout(r, 100));
          }
        }
        res.end();
      })().catch(() => res.destroy());
    });
    up.on("error", () => res.destroy());
    req.pipe(up);
  });
  const port = await listen(proxy);
  return {
    host: `127.0.0.1:${port}`,
    url: `http://127.0.0.1:${port}`,
    requests,
    tokenRequests,
    close: async () => {
      proxy.closeAllConnections();
      tokenServer.closeAllConnections();
      await Promise.all([new Promise((r) => proxy.close(r)), opts.auth ? new Promise((r) => tokenServer.close(r)) : Promise.resolve()]);
    },
  };
}

/** Flips one byte of a file in the registry's storage (a tampered blob or manifest). */
export function tamper(file: string, at: number, to?: number): void {
  const b = readFileSync(file);
  b[at] = to ?? b[at]! ^ 0x01;
  writeFileSync(file, b);
}
