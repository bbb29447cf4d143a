// The build's download cache: files an image spec pins by sha256 (the GitHub Actions runner)
// are fetched once on the host into <state>/downloads/sha256-<hex>, verified, and reused by
// every later build. The guest never downloads them (the build VM reaches only its Debian
// mirror). A file whose digest is not the pinned one is deleted, never stored; a cached file is
// hashed again before each use (a corrupted one is fetched again).
import { createHash, randomBytes } from "node:crypto";
import { createReadStream, createWriteStream } from "node:fs";
import { mkdir, rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { Readable, Transform, type TransformCallback } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { ReadableStream as WebReadableStream } from "node:stream/web";
import { ConfigError, ExternalError, messageOf } from "../errors/index.js";

export const DOWNLOADS_DIR = "downloads";

export interface VerifiedFileOptions {
  /** https:// URL, or undefined when `localPath` is given. */
  url: string;
  /** A host file to copy instead of downloading (offline hosts). */
  localPath?: string;
  sha256: string;
  /** <state>/downloads */
  cacheDir: string;
  /** Names the spec field in errors, e.g. `images.yaml: image "civm-gha" (#1): field "githubRunner"`. */
  where: string;
  log: (line: string) => void;
  /** Give up when no data arrives for this long (default 60 s). */
  stallMs?: number;
}

export interface VerifiedFile {
  path: string;
  /** false: it came from the cache. */
  downloaded: boolean;
  bytes: number;
}

/** The cache path of a file with that digest. */
export function cachedPath(cacheDir: string, sha256: string): string {
  return join(cacheDir, `sha256-${sha256}`);
}

export async function sha256OfFile(path: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest("hex");
}

function hashTap(h: ReturnType<typeof createHash>, after?: (n: number) => void): Transform {
  return new Transform({
    transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) {
      h.update(chunk);
      after?.(chunk.length);
      cb(null, chunk);
    },
  });
}

/** The verified file: from the cache, else downloaded (or copied) and checked first. */
export async function ensureVerifiedFile(o: VerifiedFileOptions): Promise<VerifiedFile> {
  const dest = cachedPath(o.cacheDir, o.sha256);
  const existing = await stat(dest).catch(() => undefined);
  if (existing?.isFile()) {
    if ((await sha256OfFile(dest)) === o.sha256) {
      o.log(`using ${dest} from the download cache (sha256 ${o.sha256})`);
      return { path: dest, downloaded: false, bytes: existing.size };
    }
    o.log(`warning: ${dest} in the download cache no longer matches its sha256; fetching it again`);
    await rm(dest, { force: true });
  }
  await mkdir(o.cacheDir, { recursive: true, mode: 0o755 });
  const tmp = join(o.cacheDir, `.tmp-${o.sha256.slice(0, 16)}-${randomBytes(4).toString("hex")}`);
  const from = o.localPath ?? o.url;
  try {
    const h = createHash("sha256");
    let bytes = 0;
    const out = createWriteStream(tmp, { mode: 0o644 });
    if (o.localPath) {
      o.log(`copying ${o.localPath} into the download cache`);
      await pipeline(createReadStream(o.localPath), hashTap(h, (n) => (bytes += n)), out);
    } else {
      o.log(`downloading ${o.url}`);
      await download(o.url, hashTap(h, (n) => (bytes += n)), out, o.stallMs ?? 60_000);
    }
    const got = h.digest("hex");
    if (got !== o.sha256) {
      throw new ConfigError(
        `${o.where}: ${from} has sha256 ${got}, but the spec pins ${o.sha256}. Nothing was stored. ` +
          `Check that "version", "url" and "sha256" name the same release (GitHub publishes each release asset's sha256 with the release); a different file at that URL is refused.`,
      );
    }
    await rename(tmp, dest);
    o.log(`stored ${bytes} bytes as ${dest} (sha256 verified)`);
    return { path: dest, downloaded: true, bytes };
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
}

async function download(url: string, hasher: Transform, out: NodeJS.WritableStream, stallMs: number): Promise<void> {
  const controller = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  const arm = (): void => {
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => controller.abort(new ExternalError(`download of ${url} stalled: no data for ${Math.round(stallMs / 1000)} s`)), stallMs);
  };
  arm();
  try {
    let res: Response;
    try {
      res = await fetch(url, { redirect: "follow", signal: controller.signal });
    } catch (e) {
      throw downloadError(url, e, controller.signal);
    }
    if (!res.ok || !res.body) {
      await res.body?.cancel().catch(() => {});
      throw new ExternalError(`GET ${url} failed: HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ""}; check "githubRunner.url" and "version", or download the file yourself and give its path as "url" (offline hosts).`);
    }
    const source = Readable.fromWeb(res.body as unknown as WebReadableStream<Uint8Array>);
    const stallWatch = new Transform({
      transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) {
        arm();
        cb(null, chunk);
      },
    });
    try {
      await pipeline(source, stallWatch, hasher, out);
    } catch (e) {
      throw downloadError(url, e, controller.signal);
    }
  } finally {
    if (timer) clearTimeout(timer);
  }
}

function downloadError(url: string, e: unknown, signal: AbortSignal): Error {
  if (signal.aborted && signal.reason instanceof Error) return signal.reason;
  if (e instanceof ExternalError || e instanceof ConfigError) return e;
  const cause = (e as { cause?: unknown }).cause;
  const why = cause ? `${messageOf(cause)}${(cause as { code?: string }).code ? ` (${(cause as { code?: string }).code})` : ""}` : messageOf(e);
  return new ExternalError(
    `could not download ${url}: ${why}. A host without internet access can download the file elsewhere and give its path as "githubRunner.url".`,
    { cause: e },
  );
}
