// The registry caches: CNCF Distribution (Debian's docker-registry) in proxy mode, one
// instance per upstream registry. Here: its config file, what its JSON log lines say about
// requests, misses and bytes, and the least-recently-used eviction that keeps the caches
// under maxSize (Distribution itself only expires content after 7 days). Pure, or plain
// file system work; the supervision is child.ts's, the wiring manager.ts's.
import { randomBytes } from "node:crypto";
import { lstat, readdir, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { stringify } from "yaml";

/** Distribution's filesystem driver keeps blobs at <root>/docker/registry/v2/blobs/sha256/<2 hex>/<64 hex>/data. */
export const BLOBS_DIR = join("docker", "registry", "v2", "blobs", "sha256");

/**
 * The config file (YAML). Credentials are not in it: the upstream's username and password
 * reach the program as REGISTRY_PROXY_USERNAME / REGISTRY_PROXY_PASSWORD (registryEnv).
 */
export function renderRegistryConfig(o: { root: string; port: number; upstream: string }): string {
  return (
    "# civm serve: a pull-through cache (written at every start; edits are lost). docs/caches.md\n" +
    stringify({
      version: 0.1,
      log: { level: "info", formatter: "json", accesslog: { disabled: true } },
      storage: {
        filesystem: { rootdirectory: o.root },
        // No blob descriptor cache: eviction deletes blobs behind the program's back, and
        // it must then fetch them again rather than trust a cached descriptor.
        maintenance: { uploadpurging: { enabled: false } },
      },
      http: { addr: `127.0.0.1:${o.port}`, secret: randomBytes(16).toString("hex"), headers: { "X-Content-Type-Options": ["nosniff"] } },
      proxy: { remoteurl: o.upstream },
    })
  );
}

export function registryEnv(credentials: { username: string; password: string } | undefined): Record<string, string> {
  return credentials ? { REGISTRY_PROXY_USERNAME: credentials.username, REGISTRY_PROXY_PASSWORD: credentials.password } : {};
}

/** What one log line means for the counters. */
export type RegistryEvent =
  /** A GET of a manifest or blob answered 2xx/3xx: `bytes` sent; `digest` when the reference was one. */
  | { kind: "served"; repo: string; what: "blob" | "manifest"; digest: string | undefined; bytes: number }
  /** Content fetched from the upstream and stored (Distribution schedules its expiry). */
  | { kind: "stored"; repo: string; digest: string }
  /** A warning or error the operator should see. */
  | { kind: "problem"; level: "warn" | "error"; message: string };

const CONTENT_URI = /^\/v2\/(.+)\/(blobs|manifests)\/([^/?]+)/;

/** Parses one line of docker-registry's JSON log; undefined when it does not count. */
export function parseRegistryLine(line: string): RegistryEvent | undefined {
  if (!line.startsWith("{")) return undefined;
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
  const msg = typeof o.msg === "string" ? o.msg : "";
  if (msg === "response completed" || msg === "response completed with error") {
    const uri = String(o["http.request.uri"] ?? "");
    const status = Number(o["http.response.status"] ?? 0);
    const m = CONTENT_URI.exec(uri);
    if (o["http.request.method"] === "GET" && m && status >= 200 && status < 400) {
      const ref = decodeURIComponent(m[3]!);
      return { kind: "served", repo: m[1]!, what: m[2] === "blobs" ? "blob" : "manifest", digest: /^sha256:[0-9a-f]{64}$/.test(ref) ? ref : undefined, bytes: Number(o["http.response.written"] ?? 0) || 0 };
    }
    // A client's 404 (a tag that does not exist) is logged at level error too: only 5xx count.
    if (status < 500) return undefined;
  }
  const stored = /^Adding new scheduler entry for (\S+)@(sha256:[0-9a-f]{64})/.exec(msg);
  if (stored) return { kind: "stored", repo: stored[1]!, digest: stored[2]! };
  const level = o.level;
  if ((level === "error" || level === "fatal" || level === "panic" || level === "warning") && msg && !/No HTTP secret provided|does not implement RempositoryRemover/.test(msg)) {
    const detail = o["err.message"] ?? o.err ?? o.error;
    const err = typeof detail === "string" ? `: ${detail}` : "";
    return { kind: "problem", level: level === "warning" ? "warn" : "error", message: `${msg}${err}` };
  }
  return undefined;
}

/**
 * Tells hits from misses in docker-registry's log. Every stored content (a miss, fetched
 * from upstream) is logged next to the request that caused it, before or after it: a
 * request is a miss when a stored event of the same blob (or, for a manifest, of the same
 * repository) comes within `windowMs`, and a hit otherwise, decided once the window is over.
 */
export class RegistryTally {
  private served: { repo: string; what: "blob" | "manifest"; digest: string | undefined; at: number }[] = [];
  private stored: { repo: string; digest: string; at: number }[] = [];

  constructor(
    private readonly windowMs = 3000,
    private readonly now: () => number = Date.now,
  ) {}

  private matches(s: { repo: string; what: "blob" | "manifest"; digest: string | undefined }, st: { repo: string; digest: string }): boolean {
    return s.repo === st.repo && (s.what === "manifest" ? s.digest === undefined || s.digest === st.digest : s.digest === st.digest);
  }

  onServed(e: { repo: string; what: "blob" | "manifest"; digest: string | undefined }): void {
    const i = this.stored.findIndex((st) => this.matches(e, st));
    if (i >= 0) this.stored.splice(i, 1);
    else this.served.push({ ...e, at: this.now() });
  }

  onStored(e: { repo: string; digest: string }): void {
    const i = this.served.findIndex((s) => this.matches(s, e));
    if (i >= 0) this.served.splice(i, 1);
    else this.stored.push({ ...e, at: this.now() });
  }

  /** Requests whose window is over without a stored event: hits to count now. */
  settle(): number {
    const limit = this.now() - this.windowMs;
    const before = this.served.length;
    this.served = this.served.filter((s) => s.at > limit);
    this.stored = this.stored.filter((s) => s.at > limit);
    return before - this.served.length;
  }
}

/** The data file of a stored blob. */
export function blobPath(root: string, digest: string): string {
  const hex = digest.replace(/^sha256:/, "");
  return join(root, BLOBS_DIR, hex.slice(0, 2), hex, "data");
}

export interface StoredBlob {
  root: string;
  digest: string;
  bytes: number;
  /** Last use: a request the log showed (this civm), else the file's mtime (ms). */
  usedAt: number;
}

/** Every blob under the roots (one per mirror); missing roots are empty. */
export async function listBlobs(roots: readonly string[], lastUse: ReadonlyMap<string, number>): Promise<StoredBlob[]> {
  const out: StoredBlob[] = [];
  for (const root of roots) {
    const base = join(root, BLOBS_DIR);
    let prefixes: string[];
    try {
      prefixes = await readdir(base);
    } catch {
      continue;
    }
    for (const p of prefixes) {
      let hexes: string[];
      try {
        hexes = await readdir(join(base, p));
      } catch {
        continue;
      }
      for (const hex of hexes) {
        if (!/^[0-9a-f]{64}$/.test(hex)) continue;
        const digest = `sha256:${hex}`;
        try {
          const st = await stat(join(base, p, hex, "data"));
          out.push({ root, digest, bytes: st.size, usedAt: Math.max(lastUse.get(`${root}\0${digest}`) ?? 0, st.mtimeMs) });
        } catch {
          /* being written or removed */
        }
      }
    }
  }
  return out;
}

/**
 * Which blobs go when the total passes `maxBytes`: least recently used first, until the
 * total is at most `lowWater` of it (so eviction does not run at every new blob).
 */
export function planEviction(blobs: readonly StoredBlob[], maxBytes: number, lowWater = 0.9): StoredBlob[] {
  const total = blobs.reduce((n, b) => n + b.bytes, 0);
  if (total <= maxBytes) return [];
  const target = Math.floor(maxBytes * lowWater);
  const out: StoredBlob[] = [];
  let left = total;
  for (const b of [...blobs].sort((a, c) => a.usedAt - c.usedAt || a.digest.localeCompare(c.digest))) {
    if (left <= target) break;
    out.push(b);
    left -= b.bytes;
  }
  return out;
}

/** Deletes a blob's folder. The running registry fetches it from upstream again when asked. */
export async function deleteBlob(b: StoredBlob): Promise<void> {
  const dir = join(blobPath(b.root, b.digest), "..");
  const st = await lstat(dir).catch(() => undefined);
  if (st?.isDirectory()) await rm(dir, { recursive: true, force: true });
}

/** The size of a stored blob, once the registry has written it (0 when it is not there). */
export async function blobBytes(root: string, digest: string): Promise<number> {
  try {
    return (await stat(blobPath(root, digest))).size;
  } catch {
    return 0;
  }
}
