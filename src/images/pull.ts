// civm image pull URL [--name N]: fetch a .qcow2 or .qcow2.zst over HTTP(S) with its
// .sha256 (the digest of the UNCOMPRESSED image, as Rust CI's images server publishes it,
// at <url without .zst>.sha256), verify, store.
//
// The checksum file is fetched first (fail fast, before a large download). The image
// streams into a PendingImage folder, through `zstd -d -c` when it ends in .zst, hashed as
// it is written. A wrong digest, a file that is not a self-contained qcow2, or any failure
// deletes the download: nothing is stored unless everything checked out.
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { createWriteStream } from "node:fs";
import { join } from "node:path";
import { Readable, Transform, type TransformCallback } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { ReadableStream as WebReadableStream } from "node:stream/web";
import { CivmError, ConfigError, ExternalError, messageOf } from "../errors/index.js";
import { missingProgram } from "../exec/index.js";
import { checkImageName, qemuImgInfo, type ImageStore, type QemuImgInfo, type StoredImage } from "./store.js";

export interface PullProgress {
  /** Bytes received from the network so far (compressed bytes for .zst). */
  bytes: number;
  /** Content-Length, when the server sent one. */
  total?: number;
  /** Average rate since the download started, bytes per second. */
  bytesPerSecond: number;
  elapsedMs: number;
}

export interface PullOptions {
  url: string;
  /** Stored name; defaults to the URL's file name without .qcow2 / .qcow2.zst. */
  name?: string;
  store: ImageStore;
  log: (line: string) => void;
  /** Called at most every 500 ms while the image downloads. */
  onProgress?: (p: PullProgress) => void;
  /** Aborts the download (the pending folder is removed). */
  signal?: AbortSignal;
  /** Give up when no data arrives for this long (default 60 s). */
  stallMs?: number;
}

export const PROGRESS_INTERVAL_MS = 500;
const DEFAULT_STALL_MS = 60_000;
const IMAGE_RE = /\.qcow2(\.zst)?$/i;

/** Name, checksum URL and compression of an image URL; ConfigError when it is not one civm can pull. */
export function describePullUrl(url: string): { url: URL; fileName: string; compressed: boolean; sha256Url: URL; defaultName: string } {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new ConfigError(`${JSON.stringify(url)} is not a URL; civm image pull takes an http(s) URL of a .qcow2 or .qcow2.zst file`);
  }
  if (u.protocol !== "http:" && u.protocol !== "https:") {
    throw new ConfigError(`${url}: civm image pull fetches over http or https only, not ${u.protocol.replace(/:$/, "")}`);
  }
  const segments = u.pathname.split("/");
  const fileName = decodeURIComponent(segments[segments.length - 1] ?? "");
  const m = IMAGE_RE.exec(fileName);
  if (!m) {
    throw new ConfigError(`${url} does not name a .qcow2 or .qcow2.zst file; civm image pull stores qcow2 images only`);
  }
  const compressed = m[1] !== undefined;
  const sha256Url = new URL(u.href);
  sha256Url.pathname = (compressed ? u.pathname.replace(/\.zst$/i, "") : u.pathname) + ".sha256";
  sha256Url.hash = "";
  return { url: u, fileName, compressed, sha256Url, defaultName: fileName.replace(IMAGE_RE, "") };
}

/**
 * The digest in a .sha256 file: a hex digest, optionally followed by whitespace and a file
 * name (sha256sum's format). With several lines, the one naming `fileName`.
 */
export function parseSha256File(text: string, fileName: string, where: string): string {
  const lines = text
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l.length > 0);
  const parsed = lines.map((l) => /^([0-9a-fA-F]{64})(?:\s+\*?(.*))?$/.exec(l));
  if (lines.length === 0 || parsed.some((p) => p === null)) {
    const first = (lines[0] ?? "").slice(0, 80);
    throw new ExternalError(`${where} does not hold a sha256 digest (expected 64 hex digits, optionally followed by a file name; got ${JSON.stringify(first)})`);
  }
  const matches = parsed as RegExpExecArray[];
  if (matches.length === 1) return (matches[0]![1] as string).toLowerCase();
  const named = matches.find((m) => (m[2] ?? "").split("/").pop() === fileName);
  if (!named) throw new ExternalError(`${where} lists ${matches.length} digests and none for ${fileName}`);
  return (named[1] as string).toLowerCase();
}

async function httpGet(url: URL, signal: AbortSignal | undefined): Promise<Response> {
  let res: Response;
  try {
    res = await fetch(url, { redirect: "follow", ...(signal ? { signal } : {}) });
  } catch (e) {
    throw fetchError(url, e, signal);
  }
  if (!res.ok) {
    await res.body?.cancel().catch(() => {});
    const status = `${res.status}${res.statusText ? ` ${res.statusText}` : ""}`;
    throw new ExternalError(`GET ${url.href} failed: HTTP ${status}` + (res.url && res.url !== url.href ? ` (redirected to ${res.url})` : ""));
  }
  return res;
}

function fetchError(url: URL, e: unknown, signal: AbortSignal | undefined): CivmError {
  if (e instanceof CivmError) return e;
  if (signal?.aborted && signal.reason instanceof CivmError) return signal.reason;
  if (signal?.aborted) return new ExternalError(`download of ${url.href} was interrupted`, { cause: e });
  const cause = (e as { cause?: unknown }).cause;
  const why = cause ? `${messageOf(cause)}${(cause as { code?: string }).code ? ` (${(cause as { code?: string }).code})` : ""}` : messageOf(e);
  return new ExternalError(`could not download ${url.href}: ${why}`, { cause: e });
}

/** Passes bytes through, feeding a hash or a counter. */
function tap(onChunk: (chunk: Buffer) => void): Transform {
  return new Transform({
    transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) {
      onChunk(chunk);
      cb(null, chunk);
    },
  });
}

interface Downloaded {
  sha256: string;
  /** Uncompressed bytes written. */
  bytes: number;
  /** Bytes received. */
  received: number;
  ms: number;
}

async function download(
  url: URL,
  res: Response,
  compressed: boolean,
  dest: string,
  controller: AbortController,
  opts: PullOptions,
): Promise<Downloaded> {
  if (!res.body) throw new ExternalError(`GET ${url.href} returned no body`);
  const lengthHeader = res.headers.get("content-length");
  const total = lengthHeader !== null && /^\d+$/.test(lengthHeader) ? Number(lengthHeader) : undefined;
  const started = Date.now();
  let lastReport = started;
  let received = 0;
  const stallMs = opts.stallMs ?? DEFAULT_STALL_MS;
  let stallTimer: NodeJS.Timeout | undefined;
  const armStall = (): void => {
    if (stallTimer) clearTimeout(stallTimer);
    stallTimer = setTimeout(
      () => controller.abort(new ExternalError(`download of ${url.href} stalled: no data for ${Math.round(stallMs / 1000)} s (${received} bytes received)`)),
      stallMs,
    );
  };
  armStall();
  const counter = tap((chunk) => {
    received += chunk.length;
    armStall();
    const now = Date.now();
    if (opts.onProgress && now - lastReport >= PROGRESS_INTERVAL_MS) {
      lastReport = now;
      const elapsedMs = now - started;
      const p: PullProgress = { bytes: received, bytesPerSecond: elapsedMs > 0 ? Math.round((received * 1000) / elapsedMs) : 0, elapsedMs };
      if (total !== undefined) p.total = total;
      opts.onProgress(p);
    }
  });
  const hash = createHash("sha256");
  let bytes = 0;
  const hasher = tap((chunk) => {
    hash.update(chunk);
    bytes += chunk.length;
  });
  const source = Readable.fromWeb(res.body as unknown as WebReadableStream<Uint8Array>);
  const out = createWriteStream(dest, { mode: 0o644 });

  try {
    if (!compressed) {
      try {
        await pipeline(source, counter, hasher, out);
      } catch (e) {
        throw streamError(url, e, controller.signal, dest);
      }
    } else {
      const zstd = spawn("zstd", ["-d", "-c", "-q"], { stdio: ["pipe", "pipe", "pipe"] });
      let stderr = "";
      zstd.stderr.setEncoding("utf8").on("data", (d: string) => {
        if (stderr.length < 4096) stderr += d;
      });
      const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve, reject) => {
        zstd.on("error", reject);
        zstd.on("close", (code, signal) => resolve({ code, signal }));
      });
      const feed = pipeline(source, counter, zstd.stdin);
      const drain = pipeline(zstd.stdout, hasher, out);
      const [fed, drained, exit] = await Promise.allSettled([feed, drain, exited]);
      if (exit.status === "rejected") {
        throw (exit.reason as NodeJS.ErrnoException).code === "ENOENT" ? missingProgram("zstd") : exit.reason;
      }
      if (fed.status === "rejected" && !isPipeError(fed.reason)) throw streamError(url, fed.reason, controller.signal, dest);
      if (exit.value.code !== 0) {
        const why = exit.value.signal ? `was killed by ${exit.value.signal}` : `exit ${exit.value.code}`;
        throw new ExternalError(`${url.href} is not valid zstd data: zstd -d ${why}`, stderr.trim() ? { details: stderr.trim() } : {});
      }
      if (drained.status === "rejected") throw streamError(url, drained.reason, controller.signal, dest);
      if (fed.status === "rejected") throw streamError(url, fed.reason, controller.signal, dest);
    }
  } finally {
    if (stallTimer) clearTimeout(stallTimer);
  }
  return { sha256: hash.digest("hex"), bytes, received, ms: Date.now() - started };
}

function isPipeError(e: unknown): boolean {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  return code === "EPIPE" || code === "ERR_STREAM_DESTROYED" || code === "ERR_STREAM_PREMATURE_CLOSE";
}

function streamError(url: URL, e: unknown, signal: AbortSignal, dest: string): CivmError {
  if (e instanceof CivmError) return e;
  if (signal.aborted && signal.reason instanceof CivmError) return signal.reason;
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code === "ENOSPC" || code === "EDQUOT") return new ExternalError(`no space left writing ${dest} while downloading ${url.href}`, { cause: e });
  return fetchError(url, e, signal);
}

function forwardAbort(from: AbortSignal | undefined, to: AbortController): () => void {
  if (!from) return () => {};
  if (from.aborted) {
    to.abort(from.reason);
    return () => {};
  }
  const onAbort = (): void => to.abort(from.reason);
  from.addEventListener("abort", onAbort, { once: true });
  return () => from.removeEventListener("abort", onAbort);
}

/**
 * qemu-img info of a downloaded disk, or a ConfigError when it is not a self-contained
 * qcow2 (another format, an overlay with a backing file, an external data file): such a
 * disk would read host files or not boot. `what` names where it came from.
 */
export async function checkSelfContainedQcow2(diskPath: string, what: string): Promise<QemuImgInfo> {
  const info = await qemuImgInfo(diskPath).catch((e: unknown) => {
    throw new ConfigError(`${what} is not a disk image qemu-img can read; the download was deleted`, { cause: e, ...(e instanceof CivmError && e.details ? { details: e.details } : {}) });
  });
  if (info.format !== "qcow2") {
    throw new ConfigError(`${what} is not a qcow2 image (qemu-img sees ${info.format}); the download was deleted`);
  }
  const backing = info["backing-filename"];
  if (backing) {
    throw new ConfigError(`${what} is a qcow2 overlay (backing file ${backing}); civm pulls only self-contained images; the download was deleted`);
  }
  const dataFile = info["format-specific"]?.data?.["data-file"];
  if (dataFile) {
    throw new ConfigError(`${what} keeps its data in an external file (${String(dataFile)}); civm pulls only self-contained images; the download was deleted`);
  }
  return info;
}

/** Downloads, verifies and stores an image; returns it as stored. */
export async function pullImage(opts: PullOptions): Promise<StoredImage> {
  const { store, log } = opts;
  const target = describePullUrl(opts.url);
  const name = opts.name ?? target.defaultName;
  if (opts.name === undefined) {
    try {
      checkImageName(name);
    } catch {
      throw new ConfigError(
        `the file name ${target.fileName} does not give a valid image name (${JSON.stringify(name)}): names use lowercase letters, digits, ".", "_" and "-"; pass --name NAME`,
      );
    }
  } else checkImageName(name);

  const controller = new AbortController();
  const unforward = forwardAbort(opts.signal, controller);
  try {
    const shaController = new AbortController();
    const shaTimer = setTimeout(() => shaController.abort(new ExternalError(`GET ${target.sha256Url.href} timed out after 60 s`)), 60_000);
    const stopSha = forwardAbort(controller.signal, shaController);
    let expected: string;
    try {
      const shaRes = await httpGet(target.sha256Url, shaController.signal);
      let text: string;
      try {
        text = await shaRes.text();
      } catch (e) {
        throw fetchError(target.sha256Url, e, shaController.signal);
      }
      expected = parseSha256File(text, target.fileName.replace(/\.zst$/i, ""), target.sha256Url.href);
    } finally {
      clearTimeout(shaTimer);
      stopSha();
    }

    log(`pulling ${target.url.href} as ${name} (sha256 ${expected})`);
    const pending = await store.begin(name);
    try {
      const res = await httpGet(target.url, controller.signal);
      const disk = "disk.qcow2";
      const diskPath = join(pending.dir, disk);
      const got = await download(target.url, res, target.compressed, diskPath, controller, opts);
      if (got.sha256 !== expected) {
        throw new ExternalError(
          `checksum mismatch for ${target.url.href}: expected ${expected}, got ${got.sha256}; the download was deleted`,
          { details: `checksum from ${target.sha256Url.href} (sha256 of the uncompressed image, ${got.bytes} bytes)` },
        );
      }
      log(`downloaded ${got.received} bytes in ${(got.ms / 1000).toFixed(1)} s; sha256 verified`);
      const info = await checkSelfContainedQcow2(diskPath, target.url.href);
      const stored = await pending.commit({
        name,
        key: `sha256:${expected}`,
        format: "qcow2",
        disk,
        sha256: got.sha256,
        diskBytes: got.bytes,
        virtualSize: info["virtual-size"],
        packages: {},
        buildSeconds: Math.round(got.ms / 100) / 10,
        createdAt: new Date().toISOString(),
        source: "pull",
        url: target.url.href,
      });
      log(`stored ${name}: ${stored.diskPath}`);
      return stored;
    } catch (e) {
      await pending.abort().catch(() => {});
      throw e;
    }
  } finally {
    unforward();
  }
}
