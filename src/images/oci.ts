// OCI images: `civm image pull REF`, `--image REF` (resolveImageRef) and `civm image push
// NAME REF`, in little-vm-helper's layout, over the registry v2 API (oci-registry.ts).
//
// lvh's layout (cilium/little-vm-helper-images, dockerfiles/root-images and kind-images;
// lvh's pkg/images/pull.go): a container image built FROM busybox whose last layer holds
// /data/images/NAME.qcow2.zst, pushed by buildx as an index over linux/amd64 and
// linux/arm64 (plus attestation manifests, platform unknown/unknown). A civm pull walks:
//   index ──(platform)──► manifest ──► layers, last first ──► tar ──► data/images/*.qcow2[.zst]
// Layers may be tar, tar+gzip or tar+zstd; whiteouts of later layers hide earlier files.
// Also taken: an OCI artifact (ORAS style) whose layer is the disk itself, titled
// *.qcow2 or *.qcow2.zst by org.opencontainers.image.title; and KubeVirt's containerDisk
// (disk/*.qcow2 in a layer).
//
// Verification: every manifest's sha256 is compared with the digest asked for (the
// reference's, the index descriptor's, and the registry's Docker-Content-Digest); every
// blob is hashed as it streams and compared with its descriptor (digest and size). The
// disk is written into a PendingImage of the store, committed only after every check
// passed; any mismatch aborts it: nothing is stored. An image civm pushed also carries
// the uncompressed disk's sha256 (annotation dev.civm.image.disk.sha256), checked too.
//
// Cache by digest: a stored image records its manifest digest (manifest.oci); a pull whose
// manifest digest is already stored downloads no blob, and <state>/oci/refs.json maps a tag
// reference to the digest and stored image it was last pulled as, so `--image REF` needs
// no network once pulled (civm image pull REF refreshes a tag).
import { createHash, randomBytes } from "node:crypto";
import { createReadStream, createWriteStream } from "node:fs";
import { copyFile, link, mkdir, readFile, rename, stat, writeFile } from "node:fs/promises";
import { once } from "node:events";
import { join, posix } from "node:path";
import { PassThrough, Readable, Transform, type TransformCallback, type Writable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { ReadableStream as WebReadableStream } from "node:stream/web";
import { createGunzip } from "node:zlib";
import * as z from "zod";
import { CivmError, ConfigError, ExternalError, HostError } from "../errors/index.js";
import { run } from "../exec/index.js";
import { STATE_LAYOUT } from "../host/paths.js";
import {
  defaultOciImageName, formatOciReference, formatPlatform, hostOciArch, parsePlatform, pinnedReference,
  type OciPlatform, type OciReference,
} from "./oci-ref.js";
import { networkError, RegistryClient } from "./oci-registry.js";
import { checkSelfContainedQcow2 } from "./pull.js";
import { sha256File, type ImageStore, type OciSource, type PendingImage, type StoredImage } from "./store.js";
import { readTar, writeTar, type TarSink, type TarWriteEntry } from "./tar.js";
import { zstdDecompress, zstdProcess } from "./zstd-stream.js";

export const MEDIA_TYPES = {
  ociIndex: "application/vnd.oci.image.index.v1+json",
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  dockerList: "application/vnd.docker.distribution.manifest.list.v2+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  dockerConfig: "application/vnd.docker.container.image.v1+json",
  ociLayer: "application/vnd.oci.image.layer.v1.tar",
  ociLayerGzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  ociLayerZstd: "application/vnd.oci.image.layer.v1.tar+zstd",
  dockerLayer: "application/vnd.docker.image.rootfs.diff.tar",
  dockerLayerGzip: "application/vnd.docker.image.rootfs.diff.tar.gzip",
} as const;

export const ANNOTATIONS = {
  title: "org.opencontainers.image.title",
  created: "org.opencontainers.image.created",
  /** buildx marks its provenance/SBOM manifests in an index with this (value attestation-manifest). */
  referenceType: "vnd.docker.reference.type",
  civmName: "dev.civm.image.name",
  civmKey: "dev.civm.image.key",
  /** sha256 (hex) of the uncompressed qcow2 civm pushed. */
  civmDisk: "dev.civm.image.disk.sha256",
} as const;

const LAYER_COMPRESSION: Record<string, "none" | "gzip" | "zstd"> = {
  [MEDIA_TYPES.ociLayer]: "none",
  [MEDIA_TYPES.ociLayerGzip]: "gzip",
  [MEDIA_TYPES.ociLayerZstd]: "zstd",
  [MEDIA_TYPES.dockerLayer]: "none",
  [MEDIA_TYPES.dockerLayerGzip]: "gzip",
};

const MANIFEST_ACCEPT = [MEDIA_TYPES.ociIndex, MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerList, MEDIA_TYPES.dockerManifest].join(", ");
const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
const MAX_CONFIG_BYTES = 4 * 1024 * 1024;
/** Kernel and initrd beside a civm-pushed disk. */
const MAX_COMPANION_BYTES = 1024 * 1024 * 1024;
const DEFAULT_STALL_MS = 60_000;
export const PROGRESS_INTERVAL_MS = 500;

/** A disk inside a layer: lvh's data/images/*.qcow2[.zst], or KubeVirt's disk/*.qcow2[.zst]. */
const DISK_IN_LAYER_RE = /^(data\/images|disk)\/([^/]+\.qcow2)(\.zst)?$/i;
/** A disk as an artifact blob, by its title. */
const DISK_TITLE_RE = /^[^/]+\.qcow2(\.zst)?$/i;
const DIGEST_RE = /^sha256:[0-9a-f]{64}$/;

// ---- manifests (validated, never cast) -----------------------------------------------------

const digestSchema = z.string().regex(DIGEST_RE, { error: "must be sha256: and 64 lowercase hex digits (civm verifies sha256 digests)" });
const descriptorSchema = z.object({
  mediaType: z.string(),
  digest: digestSchema,
  size: z.number().int().nonnegative(),
  urls: z.array(z.string()).optional(),
  annotations: z.record(z.string(), z.string()).optional(),
  platform: z.object({ os: z.string(), architecture: z.string(), variant: z.string().optional() }).optional(),
});
const indexSchema = z.object({ schemaVersion: z.literal(2), mediaType: z.string().optional(), manifests: z.array(descriptorSchema) });
const manifestSchema = z.object({
  schemaVersion: z.literal(2),
  mediaType: z.string().optional(),
  artifactType: z.string().optional(),
  config: descriptorSchema,
  layers: z.array(descriptorSchema),
  annotations: z.record(z.string(), z.string()).optional(),
});
const configSchema = z.object({ os: z.string().optional(), architecture: z.string().optional(), variant: z.string().optional() });

export type Descriptor = z.infer<typeof descriptorSchema>;
export type OciIndex = z.infer<typeof indexSchema>;
export type OciManifest = z.infer<typeof manifestSchema>;

function sha256(b: Buffer): string {
  return `sha256:${createHash("sha256").update(b).digest("hex")}`;
}

function shortDigest(d: string): string {
  return d.replace(/^sha256:/, "").slice(0, 12);
}

function mismatch(what: string, expected: string, got: string, source: string): ExternalError {
  return new ExternalError(`${what}: the registry sent content whose digest is ${got}, not ${expected} (${source}); refused, nothing was stored`);
}

function issuesOf(e: z.ZodError): string {
  return e.issues
    .slice(0, 3)
    .map((i) => `${i.path.join(".") || "(top)"}: ${i.message}`)
    .join("; ");
}

async function readLimited(res: Response, limit: number, what: string): Promise<Buffer> {
  const declared = Number(res.headers.get("content-length") ?? "NaN");
  if (Number.isFinite(declared) && declared > limit) {
    await res.body?.cancel().catch(() => {});
    throw new ExternalError(`${what}: ${declared} bytes, more than the ${limit} civm accepts for a manifest`);
  }
  const parts: Buffer[] = [];
  let n = 0;
  if (res.body) {
    for await (const c of Readable.fromWeb(res.body as unknown as WebReadableStream<Uint8Array>)) {
      const b = c as Buffer;
      n += b.length;
      if (n > limit) throw new ExternalError(`${what}: more than the ${limit} bytes civm accepts for a manifest`);
      parts.push(b);
    }
  }
  return Buffer.concat(parts);
}

interface FetchedManifest {
  digest: string;
  mediaType: string;
  index?: OciIndex;
  manifest?: OciManifest;
}

/** GET a manifest by tag or digest; verifies its digest against `expect` and Docker-Content-Digest. */
export async function fetchManifest(client: RegistryClient, reference: string, what: string, expect?: { digest: string; size?: number; source: string }): Promise<FetchedManifest> {
  const res = await client.request(`/v2/${client.repository}/manifests/${reference}`, { headers: { accept: MANIFEST_ACCEPT }, what });
  const body = await readLimited(res, MAX_MANIFEST_BYTES, what);
  const digest = sha256(body);
  if (expect && digest !== expect.digest) throw mismatch(what, expect.digest, digest, expect.source);
  if (expect?.size !== undefined && body.length !== expect.size) {
    throw new ExternalError(`${what}: ${body.length} bytes, not the ${expect.size} its descriptor gives; refused, nothing was stored`);
  }
  const header = res.headers.get("docker-content-digest");
  if (header && header.startsWith("sha256:") && header !== digest) throw mismatch(what, header, digest, "the registry's Docker-Content-Digest header");
  let json: unknown;
  try {
    json = JSON.parse(body.toString("utf8"));
  } catch {
    throw new ExternalError(`${what}: the manifest is not JSON`);
  }
  const declared = (json as { mediaType?: unknown }).mediaType;
  const mediaType = typeof declared === "string" ? declared : (res.headers.get("content-type") ?? "").split(";")[0]!.trim();
  if ((json as { schemaVersion?: unknown }).schemaVersion === 1) {
    throw new ConfigError(`${what}: a Docker schema 1 manifest; civm reads OCI and Docker schema 2 images (push it again with a current docker or crane)`);
  }
  if (mediaType === MEDIA_TYPES.ociIndex || mediaType === MEDIA_TYPES.dockerList || Array.isArray((json as { manifests?: unknown }).manifests)) {
    const parsed = indexSchema.safeParse(json);
    if (!parsed.success) throw new ExternalError(`${what}: not a valid image index (${issuesOf(parsed.error)})`);
    return { digest, mediaType: mediaType || MEDIA_TYPES.ociIndex, index: parsed.data };
  }
  const parsed = manifestSchema.safeParse(json);
  if (!parsed.success) throw new ExternalError(`${what}: not a valid image manifest (${issuesOf(parsed.error)})`);
  return { digest, mediaType: mediaType || MEDIA_TYPES.ociManifest, manifest: parsed.data };
}

function isAttestation(d: Descriptor): boolean {
  return d.annotations?.[ANNOTATIONS.referenceType] === "attestation-manifest" || d.platform?.os === "unknown" || d.platform?.architecture === "unknown";
}

function platformMatches(have: { os: string; architecture: string; variant?: string | undefined }, want: OciPlatform): boolean {
  if (have.os !== want.os || have.architecture !== want.architecture) return false;
  if (want.variant === undefined || have.variant === undefined) return true;
  return have.variant === want.variant;
}

/** The index entry for `platform` (attestation manifests skipped), or a ConfigError listing what there is. */
export function selectPlatform(index: OciIndex, platform: OciPlatform, what: string): Descriptor {
  const candidates = index.manifests.filter((d) => !isAttestation(d));
  const hit = candidates.find((d) => d.platform && platformMatches(d.platform, platform));
  if (hit) return hit;
  if (candidates.length === 1 && !candidates[0]!.platform) return candidates[0]!;
  const have = candidates.map((d) => (d.platform ? formatPlatform(d.platform) : "(no platform)"));
  throw new ConfigError(
    `${what} has no image for ${formatPlatform(platform)} (it has ${have.length ? have.join(", ") : "no images"}); pass --platform to civm image pull to pick another`,
  );
}

// ---- resolving a reference to one image manifest ------------------------------------------

export interface ResolvedManifest {
  digest: string;
  /** The index it was picked from. */
  index?: string;
  manifest: OciManifest;
  platform: string;
}

async function resolveManifest(client: RegistryClient, ref: OciReference, platform: OciPlatform, what: string): Promise<ResolvedManifest> {
  const top = await fetchManifest(client, ref.digest ?? ref.tag!, `manifest of ${what}`, ref.digest ? { digest: ref.digest, source: "the digest in the reference" } : undefined);
  let current = top;
  let index: string | undefined;
  let chosen = formatPlatform(platform);
  for (let depth = 0; current.index; depth++) {
    if (depth >= 2) throw new ExternalError(`${what}: image indexes nested deeper than 2; not supported`);
    const d = selectPlatform(current.index, platform, what);
    if (d.platform) chosen = formatPlatform(d.platform);
    index ??= current.digest;
    current = await fetchManifest(client, d.digest, `manifest ${shortDigest(d.digest)} (${chosen}) of ${what}`, { digest: d.digest, size: d.size, source: "the index's descriptor" });
  }
  return { digest: current.digest, ...(index ? { index } : {}), manifest: current.manifest!, platform: chosen };
}

/**
 * A manifest that came without an index says its platform only in its config (a small
 * blob): a ConfigError when that is not the platform asked for. Returns the platform.
 */
async function checkConfigPlatform(client: RegistryClient, manifest: OciManifest, platform: OciPlatform, what: string): Promise<string> {
  const cfgType = manifest.config.mediaType;
  if (cfgType !== MEDIA_TYPES.ociConfig && cfgType !== MEDIA_TYPES.dockerConfig) return formatPlatform(platform); // an artifact
  const cfg = await fetchSmallBlob(client, manifest.config, `config of ${what}`);
  let json: unknown = {};
  try {
    json = JSON.parse(cfg.toString("utf8") || "{}");
  } catch {
    throw new ExternalError(`config of ${what}: not JSON`);
  }
  const parsed = configSchema.safeParse(json);
  const c = parsed.success ? parsed.data : {};
  if (!c.os || !c.architecture) return formatPlatform(platform);
  const have = { os: c.os, architecture: c.architecture, ...(c.variant ? { variant: c.variant } : {}) };
  if (!platformMatches(have, platform)) {
    throw new ConfigError(`${what} is a ${formatPlatform(have)} image, not ${formatPlatform(platform)}; pass --platform ${formatPlatform(have)} to civm image pull to take it anyway`);
  }
  return formatPlatform(have);
}

async function fetchSmallBlob(client: RegistryClient, d: Descriptor, what: string): Promise<Buffer> {
  if (d.size > MAX_CONFIG_BYTES) throw new ExternalError(`${what}: ${d.size} bytes, more than civm reads for a config`);
  const res = await client.request(`/v2/${client.repository}/blobs/${d.digest}`, { what, blob: true });
  const body = await readLimited(res, MAX_CONFIG_BYTES, what);
  const got = sha256(body);
  if (got !== d.digest) throw mismatch(what, d.digest, got, "the manifest's descriptor");
  if (body.length !== d.size) throw new ExternalError(`${what}: ${body.length} bytes, not the ${d.size} the manifest gives; refused`);
  return body;
}

// ---- where the disk is --------------------------------------------------------------------

export type DiskPlan =
  | { layout: "artifact"; layer: Descriptor; file: string }
  | { layout: "layer"; layers: Descriptor[] };

function fileMatches(file: string, wanted: string | undefined): boolean {
  if (wanted === undefined) return true;
  const w = wanted.toLowerCase();
  const f = file.toLowerCase();
  return f === w || f === `${w}.zst` || f === `${w}.qcow2` || f === `${w}.qcow2.zst`;
}

/** Where a manifest keeps its disk: a titled artifact blob, or (lvh) somewhere in its tar layers. */
export function planDisk(m: OciManifest, wantedFile: string | undefined, what: string): DiskPlan {
  if (m.layers.length === 0) throw new ConfigError(`${what} has no layers, so no disk image`);
  const titled = m.layers.filter((l) => DISK_TITLE_RE.test(l.annotations?.[ANNOTATIONS.title] ?? ""));
  if (titled.length > 0) {
    const hit = titled.find((l) => fileMatches(l.annotations![ANNOTATIONS.title]!, wantedFile));
    if (!hit) throw new ConfigError(`${what} holds no disk named ${wantedFile} (it has ${titled.map((l) => l.annotations![ANNOTATIONS.title]).join(", ")}); pick one with --file`);
    return { layout: "artifact", layer: hit, file: hit.annotations![ANNOTATIONS.title]! };
  }
  const bad = m.layers.filter((l) => LAYER_COMPRESSION[l.mediaType] === undefined);
  if (bad.length > 0) {
    const foreign = bad.some((l) => /foreign|nondistributable/.test(l.mediaType) || l.urls?.length);
    throw new ConfigError(
      `${what}: ${foreign ? "foreign (non-distributable) layers are not fetched by civm" : `layer media type ${bad[0]!.mediaType} is neither a tar layer (tar, tar+gzip, tar+zstd) nor a blob titled *.qcow2[.zst]`}; civm finds a disk in lvh's layout (data/images/NAME.qcow2[.zst] in a layer) or as an artifact titled NAME.qcow2[.zst]`,
    );
  }
  return { layout: "layer", layers: m.layers };
}

// ---- streaming a blob ---------------------------------------------------------------------

export interface OciProgress {
  /** What is being transferred ("layer 2 of 2", "disk"). */
  what: string;
  bytes: number;
  total: number;
  bytesPerSecond: number;
  elapsedMs: number;
}

interface TransferOptions {
  signal?: AbortSignal;
  stallMs?: number;
  onProgress?: (p: OciProgress) => void;
}

/**
 * Streams blob `d` into `consume` (through gunzip or zstd -d for compressed layers), hashing
 * every byte as it arrives. The blob's digest and size are checked at the end, and come
 * first: a blob whose content broke the consumer (corrupt gzip) is reported as the digest
 * mismatch it is. Throws when anything is off; the caller discards what the consumer wrote.
 */
async function streamBlob(
  client: RegistryClient,
  d: Descriptor,
  what: string,
  label: string,
  compression: "none" | "gzip" | "zstd",
  consume: (src: AsyncIterable<Buffer>) => Promise<void>,
  opts: TransferOptions,
): Promise<void> {
  const controller = new AbortController();
  const stallMs = opts.stallMs ?? DEFAULT_STALL_MS;
  let received = 0;
  let stallTimer: NodeJS.Timeout | undefined;
  const armStall = (): void => {
    if (stallTimer) clearTimeout(stallTimer);
    stallTimer = setTimeout(() => controller.abort(new ExternalError(`${what}: download stalled: no data for ${Math.round(stallMs / 1000)} s (${received} of ${d.size} bytes received)`)), stallMs);
  };
  const signal = opts.signal ? AbortSignal.any([controller.signal, opts.signal]) : controller.signal;
  armStall();
  const res = await client.request(`/v2/${client.repository}/blobs/${d.digest}`, { what, signal, blob: true }).catch((e: unknown) => {
    clearTimeout(stallTimer);
    throw e;
  });
  if (!res.body) throw new ExternalError(`${what}: the registry sent no body`);
  const source = Readable.fromWeb(res.body as unknown as WebReadableStream<Uint8Array>);
  const hash = createHash("sha256");
  const pass = new PassThrough({ highWaterMark: 1 << 20 });
  pass.on("error", () => {});
  const zstd = compression === "zstd" ? zstdDecompress(what) : undefined;
  const consumed = (async () => {
    try {
      if (compression === "none") await pipeline(pass, async (src: AsyncIterable<Buffer>) => consume(src));
      else if (compression === "gzip") await pipeline(pass, createGunzip(), async (src: AsyncIterable<Buffer>) => consume(src));
      else {
        await pipeline(pass, zstd!.duplex(), async (src: AsyncIterable<Buffer>) => consume(src));
        await zstd!.done;
      }
    } catch (e) {
      zstd?.kill();
      // zstd's exit status says more than the EPIPE a pipe stage saw
      if (zstd && !(e instanceof CivmError)) await zstd.done;
      throw e;
    }
  })();
  let failure: { e: unknown } | undefined;
  consumed.catch((e: unknown) => (failure ??= { e }));

  const started = Date.now();
  let lastReport = 0;
  try {
    for await (const c of source) {
      const chunk = c as Buffer;
      armStall();
      received += chunk.length;
      if (received > d.size) throw new ExternalError(`${what}: the registry sent more than the ${d.size} bytes the manifest gives; refused, nothing was stored`);
      hash.update(chunk);
      const now = Date.now();
      if (opts.onProgress && now - lastReport >= PROGRESS_INTERVAL_MS) {
        lastReport = now;
        const elapsedMs = now - started;
        opts.onProgress({ what: label, bytes: received, total: d.size, elapsedMs, bytesPerSecond: elapsedMs > 0 ? Math.round((received * 1000) / elapsedMs) : 0 });
      }
      if (failure) continue; // keep hashing: a mismatch explains a broken stream best
      if (!pass.write(chunk)) await Promise.race([once(pass, "drain").catch(() => {}), consumed.catch(() => {})]);
    }
  } catch (e) {
    pass.destroy();
    zstd?.kill();
    await consumed.catch(() => {});
    const code = (e as NodeJS.ErrnoException | undefined)?.code;
    if (code === "ENOSPC" || code === "EDQUOT") throw new HostError(`no space left while downloading ${what}`, { cause: e });
    throw networkError(`${what}: download`, e, signal);
  } finally {
    clearTimeout(stallTimer);
  }
  pass.end();
  await consumed.catch(() => {});
  const got = `sha256:${hash.digest("hex")}`;
  if (got !== d.digest) throw mismatch(what, d.digest, got, "the manifest's descriptor");
  if (received !== d.size) throw new ExternalError(`${what}: ${received} bytes, not the ${d.size} the manifest gives; refused, nothing was stored`);
  if (failure) throw failure.e;
  opts.onProgress?.({ what: label, bytes: received, total: d.size, elapsedMs: Date.now() - started, bytesPerSecond: 0 });
}

// ---- sinks: where file contents go --------------------------------------------------------

interface FileSink extends TarSink {
  /** sha256 (hex) and size of what was written (after decompression). */
  result(): { sha256: string; bytes: number };
  abort(): void;
}

/** Writes to `dest`, through `zstd -d` when `zstd`; hashes what lands on disk. */
function fileSink(dest: string, zstd: boolean, what: string): FileSink {
  const hash = createHash("sha256");
  let bytes = 0;
  const out = createWriteStream(dest, { mode: 0o644 });
  out.on("error", () => {});
  const hasher = new Transform({
    transform(chunk: Buffer, _e: BufferEncoding, cb: TransformCallback) {
      hash.update(chunk);
      bytes += chunk.length;
      cb(null, chunk);
    },
  });
  const proc = zstd ? zstdDecompress(what) : undefined;
  let input: Writable;
  let drained: Promise<void>;
  if (proc) {
    input = proc.stdin;
    drained = pipeline(proc.stdout, hasher, out).then(() => proc.done);
  } else {
    input = hasher;
    drained = pipeline(hasher, out);
  }
  drained.catch(() => {});
  return {
    async write(chunk: Buffer) {
      if (!input.write(chunk)) await Promise.race([once(input, "drain"), drained.then(() => { throw new ExternalError(`${what}: the writer stopped early`); })]);
    },
    async end() {
      input.end();
      try {
        await drained;
      } catch (e) {
        if (proc && !(e instanceof CivmError)) await proc.done; // zstd's own error explains an EPIPE
        throw e;
      }
    },
    result: () => ({ sha256: hash.digest("hex"), bytes }),
    abort() {
      proc?.kill();
      input.destroy();
      out.destroy();
    },
  };
}

// ---- pull ---------------------------------------------------------------------------------

export interface OciPullOptions {
  ref: OciReference;
  store: ImageStore;
  stateDir: string;
  /** Store under this name (default: REPO-TAG, see defaultOciImageName). */
  name?: string;
  /** Which disk, when the image holds several (lvh's root-images: base, kind, ...). */
  file?: string;
  /** os/arch (default linux/<this host>). */
  platform?: string;
  /** Replace an image of that name pulled from elsewhere. */
  force?: boolean;
  /** --image REF: pick a free name rather than fail when the default one is taken. */
  autoName?: boolean;
  authFile?: string;
  env?: NodeJS.ProcessEnv;
  log: (line: string) => void;
  onProgress?: (p: OciProgress) => void;
  signal?: AbortSignal;
  stallMs?: number;
}

export interface OciPullResult {
  image: StoredImage;
  /** pulled: downloaded; up-to-date: this digest was stored already; linked: stored under another name, hard-linked. */
  status: "pulled" | "up-to-date" | "linked";
  digest: string;
}

function defaultPlatform(p: string | undefined): OciPlatform {
  return p ? parsePlatform(p) : { os: "linux", architecture: hostOciArch() };
}

function sameRepository(src: OciSource | undefined, ref: OciReference): boolean {
  return !!src && src.registry === ref.registry && src.repository === ref.repository;
}

/** Stored images pulled with manifest `digest` (and `file`, when given), best match first. */
async function storedWithDigest(store: ImageStore, digest: string, file: string | undefined, platform: string): Promise<StoredImage[]> {
  const all = await store.list();
  return all.filter((i) => {
    const o = i.manifest.oci;
    return !!o && (o.digest === digest || o.index === digest) && o.platform === platform && (file === undefined || fileMatches(o.file, file));
  });
}

/** Pulls REF into the store (or finds it there by digest). */
export async function pullOciImage(opts: OciPullOptions): Promise<OciPullResult> {
  const { ref, store, log } = opts;
  const refText = formatOciReference(ref);
  const platform = defaultPlatform(opts.platform);
  const client = new RegistryClient({ ref, ...(opts.authFile ? { authFile: opts.authFile } : {}), ...(opts.env ? { env: opts.env } : {}), ...(opts.signal ? { signal: opts.signal } : {}) });
  const resolved = await resolveManifest(client, ref, platform, refText);
  const digest = resolved.digest;
  if (!resolved.index && !(await storedWithDigest(store, digest, opts.file, resolved.platform)).length) {
    resolved.platform = await checkConfigPlatform(client, resolved.manifest, platform, refText);
  }

  // Cache by digest: this manifest (and disk) may be stored already.
  const have = await storedWithDigest(store, digest, opts.file, resolved.platform);
  const wantedName = opts.name;
  const existing = have.find((i) => wantedName === undefined || i.name === wantedName);
  if (existing) {
    await recordRef(opts.stateDir, ref, resolved.platform, opts.file, digest, existing.name);
    log(`${refText}: ${digest} is stored as ${existing.name}; nothing to download`);
    return { image: existing, status: "up-to-date", digest };
  }

  let name = wantedName ?? defaultOciImageName(ref);
  const taken = await store.get(name);
  if (taken && !sameRepository(taken.manifest.oci, ref) && !opts.force) {
    if (opts.autoName && wantedName === undefined) name = `${name.slice(0, 115)}-${shortDigest(digest)}`;
    else {
      const from = taken.manifest.oci ? `pulled from ${taken.manifest.oci.reference}` : taken.manifest.source === "pull" ? `pulled from ${taken.manifest.url}` : "built here";
      throw new ConfigError(`an image named "${name}" is already stored (${from}); pass --force to replace it, or --name for another name`);
    }
  }

  const plan = planDisk(resolved.manifest, opts.file, refText);
  const source: Omit<OciSource, "layer" | "file" | "layout"> = {
    reference: formatOciReference({ registry: ref.registry, repository: ref.repository, ...(ref.tag !== undefined && ref.digest === undefined ? { tag: ref.tag } : {}), ...(ref.digest ? { digest: ref.digest } : {}) }),
    registry: ref.registry,
    repository: ref.repository,
    ...(ref.tag !== undefined ? { tag: ref.tag } : {}),
    digest,
    ...(resolved.index ? { index: resolved.index } : {}),
    platform: resolved.platform,
  };

  const started = Date.now();
  const pending = await store.begin(name);
  const sinks: FileSink[] = [];
  try {
    const donor = have[0];
    let got: { file: string; layer: string; layout: "layer" | "artifact"; sha256: string; bytes: number; kernel: boolean; initrd: boolean };
    if (donor) {
      got = await linkFrom(donor, pending);
      log(`${refText}: ${digest} is stored as ${donor.name}; linking it as ${name}`);
    } else {
      log(`pulling ${refText} (${resolved.platform}, manifest ${digest}) as ${name}`);
      got = await download(client, plan, pending, refText, sinks, opts);
    }
    const info = await checkSelfContainedQcow2(join(pending.dir, "disk.qcow2"), `${got.file} from ${refText}`);
    const expectDisk = resolved.manifest.annotations?.[ANNOTATIONS.civmDisk];
    if (expectDisk && expectDisk !== got.sha256) {
      throw new ExternalError(`${got.file} from ${refText}: the disk's sha256 is ${got.sha256}, not ${expectDisk} as the manifest's ${ANNOTATIONS.civmDisk} says; refused, nothing was stored`);
    }
    const image = await pending.commit({
      name,
      key: digest,
      format: "qcow2",
      disk: "disk.qcow2",
      sha256: got.sha256,
      diskBytes: got.bytes,
      virtualSize: info["virtual-size"],
      ...(got.kernel && got.initrd ? { kernel: "vmlinuz", initrd: "initrd.img" } : {}),
      packages: {},
      buildSeconds: Math.round((Date.now() - started) / 100) / 10,
      createdAt: new Date().toISOString(),
      source: "pull",
      url: pinnedReference(ref, digest),
      oci: { ...source, layer: got.layer, file: got.file, layout: got.layout },
    });
    await recordRef(opts.stateDir, ref, resolved.platform, opts.file, digest, name);
    log(`${got.file}: ${donor ? "linked" : "downloaded and verified"} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    return { image, status: donor ? "linked" : "pulled", digest };
  } catch (e) {
    for (const s of sinks) s.abort();
    await pending.abort().catch(() => {});
    throw e;
  }
}

async function linkFrom(donor: StoredImage, pending: PendingImage): Promise<{ file: string; layer: string; layout: "layer" | "artifact"; sha256: string; bytes: number; kernel: boolean; initrd: boolean }> {
  const put = async (from: string, to: string): Promise<void> => {
    try {
      await link(from, join(pending.dir, to));
    } catch {
      await copyFile(from, join(pending.dir, to));
    }
  };
  await put(donor.diskPath, "disk.qcow2");
  const kernel = !!(donor.kernelPath && donor.initrdPath);
  if (kernel) {
    await put(donor.kernelPath!, "vmlinuz");
    await put(donor.initrdPath!, "initrd.img");
  }
  const o = donor.manifest.oci!;
  return { file: o.file, layer: o.layer, layout: o.layout, sha256: donor.manifest.sha256, bytes: donor.manifest.diskBytes, kernel, initrd: kernel };
}

async function download(
  client: RegistryClient,
  plan: DiskPlan,
  pending: PendingImage,
  refText: string,
  sinks: FileSink[],
  opts: OciPullOptions,
): Promise<{ file: string; layer: string; layout: "layer" | "artifact"; sha256: string; bytes: number; kernel: boolean; initrd: boolean }> {
  const transfer: TransferOptions = {
    ...(opts.signal ? { signal: opts.signal } : {}),
    ...(opts.stallMs !== undefined ? { stallMs: opts.stallMs } : {}),
    ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
  };
  const diskPath = join(pending.dir, "disk.qcow2");
  if (plan.layout === "artifact") {
    const zst = /\.zst$/i.test(plan.file);
    const sink = fileSink(diskPath, zst, `${plan.file} from ${refText}`);
    sinks.push(sink);
    await streamBlob(client, plan.layer, `blob ${shortDigest(plan.layer.digest)} (${plan.file}) of ${refText}`, plan.file, "none", async (src) => {
      for await (const c of src) await sink.write(c);
      await sink.end();
    }, transfer);
    return { file: plan.file, layer: plan.layer.digest, layout: "artifact", ...sink.result(), kernel: false, initrd: false };
  }

  // lvh: the last layer holding a disk wins; whiteouts of later layers hide earlier files.
  const hidden: string[] = [];
  const opaque: string[] = [];
  const isHidden = (p: string) => hidden.some((h) => p === h || p.startsWith(`${h}/`)) || opaque.some((o) => p.startsWith(`${o}/`));
  const found: string[] = [];
  let chosen: { file: string; stem: string; dir: string; layer: string; sink: FileSink } | undefined;
  const companions: { kernel?: FileSink; initrd?: FileSink } = {};
  const n = plan.layers.length;
  for (let i = n - 1; i >= 0 && !chosen; i--) {
    const layer = plan.layers[i]!;
    const whiteouts: string[] = [];
    const opaques: string[] = [];
    const what = `layer ${i + 1} of ${n} (${shortDigest(layer.digest)}) of ${refText}`;
    await streamBlob(client, layer, what, `layer ${i + 1}/${n}`, LAYER_COMPRESSION[layer.mediaType]!, (src) =>
      readTar(src, (entry) => {
        const base = posix.basename(entry.path);
        const dir = posix.dirname(entry.path);
        if (base === ".wh..wh..opq") {
          opaques.push(dir);
          return undefined;
        }
        if (base.startsWith(".wh.")) {
          whiteouts.push(posix.join(dir, base.slice(4)));
          return undefined;
        }
        if (entry.type !== "file" || isHidden(entry.path)) return undefined;
        const m = DISK_IN_LAYER_RE.exec(entry.path);
        if (m) {
          const file = `${m[2]}${m[3] ?? ""}`;
          found.push(entry.path);
          if (chosen || !fileMatches(file, opts.file)) return undefined;
          const sink = fileSink(diskPath, m[3] !== undefined, `${entry.path} in ${what}`);
          sinks.push(sink);
          chosen = { file, stem: m[2]!.replace(/\.qcow2$/i, ""), dir: m[1]!, layer: layer.digest, sink };
          return sink;
        }
        // A civm-pushed image's kernel and initrd follow its disk in the same layer.
        if (chosen && chosen.layer === layer.digest && dir === chosen.dir && entry.size <= MAX_COMPANION_BYTES) {
          const slot = base === `${chosen.stem}.vmlinuz` ? "kernel" : base === `${chosen.stem}.initrd.img` ? "initrd" : undefined;
          if (slot && !companions[slot]) {
            const sink = fileSink(join(pending.dir, slot === "kernel" ? "vmlinuz" : "initrd.img"), false, `${entry.path} in ${what}`);
            sinks.push(sink);
            companions[slot] = sink;
            return sink;
          }
        }
        return undefined;
      }, what),
      transfer,
    );
    hidden.push(...whiteouts);
    opaque.push(...opaques);
  }
  if (!chosen) {
    if (opts.file !== undefined && found.length > 0) {
      throw new ConfigError(`${refText} holds no disk named ${opts.file} (it has ${found.map((f) => posix.basename(f)).join(", ")}); pick one with --file`);
    }
    throw new ConfigError(
      `${refText} holds no disk image: civm looked in its ${n} layer${n === 1 ? "" : "s"} for data/images/NAME.qcow2[.zst] (little-vm-helper's layout) or disk/NAME.qcow2[.zst], and for a blob titled NAME.qcow2[.zst]`,
    );
  }
  const others = found.filter((f) => posix.basename(f) !== chosen!.file);
  if (others.length > 0 && opts.file === undefined) {
    opts.log(`${refText} holds ${others.length + 1} disks; took ${chosen.file} (the first, as lvh does); others: ${others.map((f) => posix.basename(f)).join(", ")} (civm image pull --file NAME)`);
  }
  return {
    file: chosen.file, layer: chosen.layer, layout: "layer", ...chosen.sink.result(),
    kernel: !!companions.kernel && !!companions.initrd, initrd: !!companions.kernel && !!companions.initrd,
  };
}

// ---- refs.json: tag → digest → stored image ----------------------------------------------

interface RefEntry {
  reference: string;
  platform: string;
  file?: string;
  digest: string;
  image: string;
  at: string;
}

function refsPath(stateDir: string): string {
  return join(stateDir, STATE_LAYOUT.oci, "refs.json");
}

async function readRefs(stateDir: string): Promise<RefEntry[]> {
  try {
    const data = JSON.parse(await readFile(refsPath(stateDir), "utf8")) as { refs?: unknown };
    return Array.isArray(data.refs) ? (data.refs as RefEntry[]).filter((r) => typeof r?.reference === "string" && typeof r.digest === "string" && typeof r.image === "string") : [];
  } catch {
    return []; // missing or damaged: only a cache
  }
}

async function recordRef(stateDir: string, ref: OciReference, platform: string, file: string | undefined, digest: string, image: string): Promise<void> {
  if (ref.tag === undefined || ref.digest !== undefined) return; // digests need no mapping
  const reference = formatOciReference({ registry: ref.registry, repository: ref.repository, tag: ref.tag });
  const refs = (await readRefs(stateDir)).filter((r) => !(r.reference === reference && r.platform === platform && r.file === file));
  refs.push({ reference, platform, ...(file !== undefined ? { file } : {}), digest, image, at: new Date().toISOString() });
  const path = refsPath(stateDir);
  await mkdir(join(stateDir, STATE_LAYOUT.oci), { recursive: true, mode: 0o755 });
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(3).toString("hex")}`;
  await writeFile(tmp, JSON.stringify({ version: 1, refs }, null, 2) + "\n", { mode: 0o644 });
  await rename(tmp, path);
}

export type PullPolicy = "missing" | "always" | "never";

export interface EnsureOciOptions extends Omit<OciPullOptions, "name" | "force" | "autoName" | "file"> {
  policy: PullPolicy;
}

/** The stored image for REF without asking the registry: by digest, or by the tag's last pull. */
export async function findStoredOci(store: ImageStore, stateDir: string, ref: OciReference, platform?: string): Promise<StoredImage | undefined> {
  const plat = formatPlatform(defaultPlatform(platform));
  if (ref.digest) return (await storedWithDigest(store, ref.digest, undefined, plat))[0];
  const reference = formatOciReference({ registry: ref.registry, repository: ref.repository, tag: ref.tag! });
  const entry = (await readRefs(stateDir)).find((r) => r.reference === reference && r.platform === plat && r.file === undefined);
  if (!entry) return undefined;
  const img = await store.get(entry.image);
  return img?.manifest.oci?.digest === entry.digest ? img : undefined;
}

/**
 * The stored image for an OCI reference, pulled as `policy` says: "missing" pulls only
 * when nothing is stored for it (civm run, dev VMs, pools' IfNotPresent), "always"
 * asks the registry for the tag's digest every time and downloads only a new one
 * (pools' Always), "never" only looks in the store (Never).
 */
export async function ensureOciImage(opts: EnsureOciOptions): Promise<StoredImage> {
  if (opts.policy !== "always") {
    const found = await findStoredOci(opts.store, opts.stateDir, opts.ref, opts.platform);
    if (found) return found;
    if (opts.policy === "never") {
      throw new ConfigError(`${formatOciReference(opts.ref)} has not been pulled (pull policy Never); run civm image pull ${formatOciReference(opts.ref)} first`);
    }
  }
  return (await pullOciImage({ ...opts, autoName: true })).image;
}

// ---- push ---------------------------------------------------------------------------------

export interface OciPushOptions {
  name: string;
  ref: OciReference;
  store: ImageStore;
  authFile?: string;
  env?: NodeJS.ProcessEnv;
  log: (line: string) => void;
  onProgress?: (p: OciProgress) => void;
  signal?: AbortSignal;
}

export interface OciPushResult {
  digest: string;
  reference: string;
  /** Bytes uploaded (blobs the registry had already are skipped). */
  uploaded: number;
}

/** OCI architecture of the images civm builds and runs on this host. */
function pushArchitecture(): string {
  return hostOciArch();
}

async function hashStream(src: AsyncIterable<Buffer>): Promise<{ digest: string; size: number }> {
  const h = createHash("sha256");
  let size = 0;
  for await (const c of src) {
    h.update(c);
    size += c.length;
  }
  return { digest: `sha256:${h.digest("hex")}`, size };
}

/** zstd -T0 of `input` into `output`, with progress on the bytes read. */
async function compressDisk(input: string, output: string, onProgress: ((p: OciProgress) => void) | undefined, signal?: AbortSignal): Promise<void> {
  signal?.throwIfAborted();
  const total = (await stat(input)).size;
  const proc = zstdProcess(["-T0", "-c"], (why, stderr) => new CivmError("internal", `zstd compressing ${input} ${why}`, stderr ? { details: stderr } : {}));
  let bytes = 0;
  const started = Date.now();
  let last = 0;
  const counter = new Transform({
    transform(chunk: Buffer, _e: BufferEncoding, cb: TransformCallback) {
      bytes += chunk.length;
      const now = Date.now();
      if (onProgress && now - last >= PROGRESS_INTERVAL_MS) {
        last = now;
        onProgress({ what: "compressing", bytes, total, elapsedMs: now - started, bytesPerSecond: Math.round((bytes * 1000) / Math.max(1, now - started)) });
      }
      cb(null, chunk);
    },
  });
  const onAbort = (): void => proc.kill();
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    await Promise.all([pipeline(createReadStream(input, { highWaterMark: 1 << 20 }), counter, proc.stdin), pipeline(proc.stdout, createWriteStream(output, { mode: 0o600 })), proc.done]);
  } catch (e) {
    proc.kill();
    if (signal?.aborted) throw signal.reason;
    throw e;
  } finally {
    signal?.removeEventListener("abort", onAbort);
  }
}

function appendQuery(location: string, key: string, value: string): string {
  return `${location}${location.includes("?") ? "&" : "?"}${encodeURIComponent(key)}=${encodeURIComponent(value)}`;
}

/** Uploads a blob unless the registry has it: POST, one streamed PATCH, PUT ?digest. Returns bytes sent. */
async function uploadBlob(
  client: RegistryClient,
  blob: { digest: string; size: number; body: () => AsyncIterable<Buffer>; what: string; label: string },
  opts: TransferOptions,
): Promise<number> {
  const head = await client.request(`/v2/${client.repository}/blobs/${blob.digest}`, { method: "HEAD", access: "push", ok: (s) => s === 200 || s === 404, what: blob.what });
  if (head.status === 200) return 0;
  const start = await client.request(`/v2/${client.repository}/blobs/uploads/`, { method: "POST", access: "push", ok: (s) => s === 202, what: blob.what });
  await start.body?.cancel().catch(() => {});
  let location = start.headers.get("location");
  if (!location) throw new ExternalError(`${blob.what}: the registry started an upload without a Location`);
  let sent = 0;
  const started = Date.now();
  let last = 0;
  const body = Readable.from(
    (async function* () {
      for await (const c of blob.body()) {
        sent += c.length;
        const now = Date.now();
        if (opts.onProgress && now - last >= PROGRESS_INTERVAL_MS) {
          last = now;
          opts.onProgress({ what: blob.label, bytes: sent, total: blob.size, elapsedMs: now - started, bytesPerSecond: Math.round((sent * 1000) / Math.max(1, now - started)) });
        }
        yield c;
      }
    })(),
  );
  const patched = await client.request(location, {
    method: "PATCH",
    access: "push",
    once: true,
    headers: { "content-type": "application/octet-stream" },
    body: Readable.toWeb(body) as unknown as BodyInit,
    ok: (s) => s === 202 || s === 204,
    what: blob.what,
    ...(opts.signal ? { signal: opts.signal } : {}),
  });
  await patched.body?.cancel().catch(() => {});
  location = patched.headers.get("location") ?? location;
  if (sent !== blob.size) throw new CivmError("internal", `${blob.what}: sent ${sent} bytes, expected ${blob.size}`);
  const done = await client.request(appendQuery(location, "digest", blob.digest), {
    method: "PUT",
    access: "push",
    ok: (s) => s === 201 || s === 204,
    what: blob.what,
  });
  await done.body?.cancel().catch(() => {});
  const got = done.headers.get("docker-content-digest");
  if (got && got !== blob.digest) throw mismatch(blob.what, blob.digest, got, "what civm uploaded");
  opts.onProgress?.({ what: blob.label, bytes: sent, total: blob.size, elapsedMs: Date.now() - started, bytesPerSecond: 0 });
  return sent;
}

/**
 * Pushes stored image NAME to REF in lvh's layout: one uncompressed tar layer holding
 * data/images/NAME.qcow2.zst (and NAME.vmlinuz, NAME.initrd.img when the image has a
 * kernel), an image config (linux/<arch>, a command so `docker create` works, as lvh's
 * `images pull` does), and an OCI image manifest annotated with the disk's sha256.
 * A disk that is a qcow2 overlay is flattened first. Timestamps come from the image, so
 * pushing the same image twice gives the same digests.
 */
export async function pushOciImage(opts: OciPushOptions): Promise<OciPushResult> {
  const { store, ref, log, name } = opts;
  const img = await store.require(name);
  if (img.manifest.format !== "qcow2") {
    throw new ConfigError(`image ${name} is ${img.manifest.format}; civm pushes qcow2 images (lvh's layout); convert it with qemu-img convert -O qcow2 and store that`);
  }
  const refText = formatOciReference(ref);
  const client = new RegistryClient({ ref, ...(opts.authFile ? { authFile: opts.authFile } : {}), ...(opts.env ? { env: opts.env } : {}), ...(opts.signal ? { signal: opts.signal } : {}) });
  const scratch = await store.begin(`push-${name}`.slice(0, 128));
  try {
    const created = Number.isNaN(Date.parse(img.manifest.createdAt)) ? new Date(0) : new Date(img.manifest.createdAt);
    const mtime = Math.floor(created.getTime() / 1000);
    let disk = img.diskPath;
    let diskSha = img.manifest.sha256;
    if (img.manifest.backing) {
      log(`${name} is an overlay on ${img.manifest.backing}; flattening it for the push`);
      disk = join(scratch.dir, "flat.qcow2");
      await run("qemu-img", ["convert", "-O", "qcow2", img.diskPath, disk]);
      diskSha = (await sha256File(disk)).replace(/^sha256:/, "");
    }
    const zst = join(scratch.dir, `${name}.qcow2.zst`);
    log(`compressing ${name} (zstd)`);
    await compressDisk(disk, zst, opts.onProgress, opts.signal);
    const files: TarWriteEntry[] = [
      { path: "data", type: "dir", mtime },
      { path: "data/images", type: "dir", mtime },
      { path: `data/images/${name}.qcow2.zst`, type: "file", size: (await stat(zst)).size, content: () => createReadStream(zst, { highWaterMark: 1 << 20 }), mtime },
    ];
    if (img.kernelPath && img.initrdPath) {
      for (const [p, suffix] of [[img.kernelPath, "vmlinuz"], [img.initrdPath, "initrd.img"]] as const) {
        files.push({ path: `data/images/${name}.${suffix}`, type: "file", size: (await stat(p)).size, content: () => createReadStream(p), mtime });
      }
    }
    const layer = await hashStream(writeTar(files));
    const config = Buffer.from(
      JSON.stringify({
        created: created.toISOString(),
        architecture: pushArchitecture(),
        os: "linux",
        // lvh extracts images with `docker create`, which needs a command; nothing runs it.
        config: { Cmd: ["/bin/true"], Labels: { [ANNOTATIONS.civmName]: name } },
        rootfs: { type: "layers", diff_ids: [layer.digest] },
        history: [{ created: created.toISOString(), created_by: "civm image push", comment: `data/images/${name}.qcow2.zst` }],
      }),
    );
    const configDigest = sha256(config);
    const manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MEDIA_TYPES.ociManifest,
        config: { mediaType: MEDIA_TYPES.ociConfig, digest: configDigest, size: config.length },
        layers: [{ mediaType: MEDIA_TYPES.ociLayer, digest: layer.digest, size: layer.size }],
        annotations: {
          [ANNOTATIONS.created]: created.toISOString(),
          [ANNOTATIONS.civmName]: name,
          [ANNOTATIONS.civmKey]: img.manifest.key,
          [ANNOTATIONS.civmDisk]: diskSha,
        },
      }),
    );
    const digest = sha256(manifest);
    const transfer: TransferOptions = { ...(opts.signal ? { signal: opts.signal } : {}), ...(opts.onProgress ? { onProgress: opts.onProgress } : {}) };
    log(`pushing ${name} to ${refText} (layer ${layer.digest}, ${layer.size} bytes)`);
    let uploaded = await uploadBlob(client, { digest: layer.digest, size: layer.size, body: () => writeTar(files), what: `layer of ${refText}`, label: "layer" }, transfer);
    if (uploaded === 0) log(`${refText}: the registry has the layer already`);
    uploaded += await uploadBlob(client, { digest: configDigest, size: config.length, body: async function* () { yield config; }, what: `config of ${refText}`, label: "config" }, {});
    const put = await client.request(`/v2/${client.repository}/manifests/${ref.tag}`, {
      method: "PUT",
      access: "push",
      headers: { "content-type": MEDIA_TYPES.ociManifest },
      body: manifest,
      ok: (s) => s === 201 || s === 200,
      what: `manifest of ${refText}`,
    });
    await put.body?.cancel().catch(() => {});
    const echoed = put.headers.get("docker-content-digest");
    if (echoed && echoed !== digest) throw mismatch(`manifest of ${refText}`, digest, echoed, "what civm uploaded");
    return { digest, reference: `${ref.registry}/${ref.repository}:${ref.tag}@${digest}`, uploaded };
  } finally {
    await scratch.abort().catch(() => {});
  }
}
