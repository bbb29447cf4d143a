// The image store: <state>/images/<name>/ holds one stored image.
//
//   <state>/images/<name>/
//     disk.<fmt>            the disk (qcow2 | raw | vhd)
//     disk.<fmt>.zst        optional compressed artifact (manifest.compressed)
//     vmlinuz, initrd.img   optional, for direct kernel boot (manifest.kernel / .initrd)
//     manifest.json         written LAST: a folder without it is not an image
//   <state>/images/.tmp-<name>-<rand>/   an image being built or pulled (.owner: its pid)
//   <state>/images/.old-<name>-<rand>/   an image being replaced or removed
//
// A build or pull writes into a PendingImage (a .tmp- folder); commit() hashes and measures
// the disk, writes manifest.json last, then swaps the folder in by rename. So a failed or
// interrupted build leaves nothing that could pass for a good image: list() and get() see
// only <name> folders holding a manifest.json and the disk it names; dot-folders never
// count. sweepStale() removes what crashed builds leave behind.
//
// Backing chains: a child image built as a qcow2 overlay on its parent has its backing file
// set to the parent's FINAL path, <state>/images/<parent>/disk.qcow2 (absolute), never to
// a .tmp- path: commit() renames folders, so only the <images>/<name>/ path of a committed
// image is stable. commit() refuses a disk whose backing file lies in a .tmp-/.old- folder
// or does not exist, and records the backing path in the manifest (`backing`); remove()
// refuses to delete an image that another image's disk is backed by. Replacing a parent
// (commit over it) leaves its backing-chain children pointing at the new disk, which they
// were not built on: the builder must rebuild them (their cache key covers the parent's
// key, and `dependents()` lists them).
import { createReadStream, type Dirent } from "node:fs";
import { chmod, lstat, mkdir, open, readdir, readFile, rename, rm, stat, unlink, writeFile } from "node:fs/promises";
import { createHash, randomBytes } from "node:crypto";
import { isAbsolute, join, relative, resolve, sep } from "node:path";
import { CivmError, ConfigError } from "../errors/index.js";
import { run } from "../exec/index.js";
import { STATE_LAYOUT } from "../host/paths.js";
import { didYouMean } from "../config/suggest.js";

export type StoredFormat = "qcow2" | "raw" | "vhd";

export interface ImageManifest {
  name: string;
  /** Cache key of the build (64 hex), or "sha256:<digest>" for a pulled image. */
  key: string;
  format: StoredFormat;
  /** File name of the disk inside the image folder (disk.<fmt>). */
  disk: string;
  /** sha256 of the disk file, hex. */
  sha256: string;
  /** Size of the disk file on the host (bytes, apparent size). */
  diskBytes: number;
  /** Size the guest sees (qemu-img info "virtual-size"). */
  virtualSize: number;
  /** File names of the kernel and initrd beside the disk, for direct kernel boot. */
  kernel?: string;
  initrd?: string;
  /** Name and cache key of the parent image (children). */
  parent?: string;
  parentKey?: string;
  /**
   * Absolute path of the disk's qcow2 backing file, when the disk is an overlay (set by
   * commit() from qemu-img info; absent for self-contained disks).
   */
  backing?: string;
  /** Package name → version installed in the image. */
  packages: Record<string, string>;
  /** The guest architecture the image is for ("arm64"); absent: x86_64. */
  arch?: string;
  /**
   * Built images: the spec's Debian suite and mirror (a child's inherited ones), so a spec
   * in another file can name this image as its parent (src/images/stored-parent.ts).
   * Absent in manifests of older civm versions; a cached build adds them (addSpecFields).
   */
  suite?: string;
  mirror?: string;
  buildSeconds: number;
  /** ISO 8601. */
  createdAt: string;
  source: "build" | "pull";
  /** Where a pulled image came from (an OCI pull: the reference pinned to its manifest digest). */
  url?: string;
  /** An image pulled from (or pushed to) an OCI registry: its source, digests and layout. */
  oci?: OciSource;
  /** File name of the zstd-compressed artifact beside the disk (disk.<fmt>.zst). */
  compressed?: string;
}

export interface OciSource {
  /** The reference as pulled, canonical (REGISTRY/REPO:TAG or REGISTRY/REPO@DIGEST). */
  reference: string;
  registry: string;
  repository: string;
  tag?: string;
  /** Digest of the image manifest the disk came from. */
  digest: string;
  /** Digest of the index (manifest list) the manifest was picked from, when there was one. */
  index?: string;
  /** os/architecture[/variant]. */
  platform: string;
  /** Digest of the blob (layer or artifact) holding the disk. */
  layer: string;
  /** The disk's file name in the image (base.qcow2.zst) or its title annotation. */
  file: string;
  /** "layer" (lvh: a file in an image layer) or "artifact" (a blob titled *.qcow2[.zst]). */
  layout: "layer" | "artifact";
}

/** What commit() is given: the store fills in sha256, sizes and backing (sha256 and sizes may be given). */
export type ManifestInput = Omit<ImageManifest, "sha256" | "diskBytes" | "virtualSize" | "backing"> &
  Partial<Pick<ImageManifest, "sha256" | "diskBytes" | "virtualSize">>;

export interface StoredImage {
  name: string;
  /** <state>/images/<name> */
  dir: string;
  diskPath: string;
  kernelPath?: string;
  initrdPath?: string;
  manifest: ImageManifest;
}

export interface PendingImage {
  name: string;
  /** <state>/images/.tmp-<name>-<rand>, 0755: write the disk (and kernel, initrd) here. */
  dir: string;
  /**
   * Hashes and measures the disk, writes manifest.json last, then atomically replaces
   * <images>/<name>. On failure the pending folder is removed and nothing is stored.
   */
  commit(manifest: ManifestInput): Promise<StoredImage>;
  /** Removes the pending folder (idempotent). */
  abort(): Promise<void>;
}

export const IMAGE_NAME_RE = /^[a-z0-9][a-z0-9._-]*$/;
const MANIFEST = "manifest.json";
const OWNER = ".owner";
const TMP_PREFIX = ".tmp-";
const OLD_PREFIX = ".old-";
/** Stale .tmp-/.old- folders: removed when their owner is gone or after this long. */
export const STALE_AFTER_MS = 60 * 60 * 1000;
const QEMU_FORMAT: Record<StoredFormat, string> = { qcow2: "qcow2", raw: "raw", vhd: "vpc" };

/**
 * Test seams: called inside commit() at the named points (after the disk is hashed and
 * measured, before manifest.json is written; after manifest.json, before the swap).
 * Production code never sets them.
 */
export const commitHooks: {
  beforeManifest?: (pendingDir: string) => void | Promise<void>;
  beforeSwap?: (pendingDir: string) => void | Promise<void>;
} = {};

export function isValidImageName(name: string): boolean {
  return name.length <= 128 && IMAGE_NAME_RE.test(name);
}

export function checkImageName(name: string, what = "image name"): string {
  if (!isValidImageName(name)) {
    throw new ConfigError(
      `${what} ${JSON.stringify(name)} is not valid: use lowercase letters, digits, ".", "_" and "-", starting with a letter or digit (at most 128 characters)`,
    );
  }
  return name;
}

function rand(): string {
  return randomBytes(4).toString("hex");
}

function errno(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException | undefined)?.code;
}

/** A plain file name (no folders), as the manifest's file fields must be. */
function isPlainFileName(f: string): boolean {
  return f.length > 0 && f !== "." && f !== ".." && !f.includes("/") && !f.includes("\0");
}

function isInside(path: string, dir: string): boolean {
  const rel = relative(dir, path);
  return rel === "" || (!rel.startsWith("..") && !isAbsolute(rel));
}

export async function sha256File(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

export interface QemuImgInfo {
  format: string;
  "virtual-size": number;
  "actual-size"?: number;
  "backing-filename"?: string;
  "full-backing-filename"?: string;
  "format-specific"?: { type?: string; data?: Record<string, unknown> };
}

/** qemu-img info -U (readable while a VM uses the image); `format` avoids probing when known. */
export async function qemuImgInfo(path: string, format?: StoredFormat): Promise<QemuImgInfo> {
  const args = ["info", "-U", "--output=json", ...(format ? ["-f", QEMU_FORMAT[format]] : []), path];
  const { stdout } = await run("qemu-img", args);
  return JSON.parse(stdout) as QemuImgInfo;
}

async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, "r");
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

// ---- ownership of .tmp-/.old- folders ---------------------------------------------------

interface Owner {
  pid: number;
  /** Process start time (field 22 of /proc/<pid>/stat), to survive pid reuse. */
  start?: string;
}

async function processStart(pid: number): Promise<string | undefined> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8");
    // comm (field 2) may hold spaces and parentheses: fields after the last ")".
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return fields[19]; // field 22 overall
  } catch {
    return undefined;
  }
}

export async function writeOwner(dir: string): Promise<void> {
  const owner: Owner = { pid: process.pid };
  const start = await processStart(process.pid);
  if (start) owner.start = start;
  await writeFile(join(dir, OWNER), JSON.stringify(owner) + "\n");
}

export async function readOwner(dir: string): Promise<{ owner?: Owner; mtimeMs?: number }> {
  try {
    const path = join(dir, OWNER);
    const [text, st] = await Promise.all([readFile(path, "utf8"), stat(path)]);
    const trimmed = text.trim();
    let owner: Owner | undefined;
    if (/^\d+$/.test(trimmed)) owner = { pid: Number(trimmed) };
    else {
      const parsed = JSON.parse(trimmed) as Partial<Owner>;
      if (typeof parsed.pid === "number" && Number.isInteger(parsed.pid) && parsed.pid > 0) {
        owner = { pid: parsed.pid, ...(typeof parsed.start === "string" ? { start: parsed.start } : {}) };
      }
    }
    return owner ? { owner, mtimeMs: st.mtimeMs } : { mtimeMs: st.mtimeMs };
  } catch {
    return {};
  }
}

type Liveness = "dead" | "alive" | "alive-unverified";

export async function ownerLiveness(owner: Owner): Promise<Liveness> {
  try {
    process.kill(owner.pid, 0);
  } catch (e) {
    if (errno(e) !== "EPERM") return "dead";
  }
  if (!owner.start) return "alive-unverified";
  const start = await processStart(owner.pid);
  if (start === undefined) return "alive-unverified";
  return start === owner.start ? "alive" : "dead"; // same pid, another process
}

/** Deletes a folder that is no image any more: manifest.json first, so a crash midway leaves no image. */
async function destroy(dir: string): Promise<void> {
  await unlink(join(dir, MANIFEST)).catch(() => {});
  await rm(dir, { recursive: true, force: true, maxRetries: 3 });
}

// ---- the store -----------------------------------------------------------------------------

export class ImageStore {
  readonly dir: string;

  constructor(stateDir: string) {
    this.dir = join(stateDir, STATE_LAYOUT.images);
  }

  /** Folder a committed image lives in (stable: backing chains point here). */
  pathOf(name: string): string {
    return join(this.dir, name);
  }

  /** Stored images, sorted by name. Folders without a manifest (or whose disk is gone) are not images. */
  async list(): Promise<StoredImage[]> {
    let entries: Dirent[];
    try {
      entries = await readdir(this.dir, { withFileTypes: true });
    } catch (e) {
      if (errno(e) === "ENOENT") return [];
      throw e;
    }
    const names = entries.filter((d) => d.isDirectory() && isValidImageName(d.name)).map((d) => d.name);
    const images = await Promise.all(names.map((n) => this.get(n)));
    return images.filter((i): i is StoredImage => i !== undefined).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /** The stored image, or undefined (also for names that are not valid image names). */
  async get(name: string): Promise<StoredImage | undefined> {
    const found = await this.examine(name);
    return found && "image" in found ? found.image : undefined;
  }

  /**
   * What <images>/<name> holds: the image; `damaged`, why the folder is no image (no or a
   * broken manifest.json, its disk gone); undefined when there is no such folder (or the name
   * is not a valid image name).
   */
  async examine(name: string): Promise<{ image: StoredImage } | { damaged: string } | undefined> {
    if (!isValidImageName(name)) return undefined;
    const dir = this.pathOf(name);
    if (!(await stat(dir).catch(() => undefined))?.isDirectory()) return undefined;
    const manifestPath = join(dir, MANIFEST);
    let text: string;
    try {
      text = await readFile(manifestPath, "utf8");
    } catch (e) {
      return { damaged: errno(e) === "ENOENT" ? `${dir} has no ${MANIFEST} (a build or removal that was cut short)` : `${manifestPath} cannot be read: ${(e as Error).message}` };
    }
    let manifest: ImageManifest;
    try {
      manifest = JSON.parse(text) as ImageManifest;
    } catch (e) {
      return { damaged: `${manifestPath} is not valid JSON (${(e as Error).message})` };
    }
    if (!looksLikeManifest(manifest)) return { damaged: `${manifestPath} lacks what a stored image's manifest has (name, key, format, disk, sha256, diskBytes, virtualSize)` };
    if (manifest.name !== name) return { damaged: `${manifestPath} names the image ${JSON.stringify(manifest.name)}, not ${JSON.stringify(name)}` };
    const diskPath = join(dir, manifest.disk);
    if (!(await stat(diskPath).catch(() => undefined))?.isFile()) return { damaged: `its disk ${diskPath} is missing` };
    const image: StoredImage = { name, dir, diskPath, manifest };
    if (manifest.kernel) image.kernelPath = join(dir, manifest.kernel);
    if (manifest.initrd) image.initrdPath = join(dir, manifest.initrd);
    return { image };
  }

  /**
   * Adds fields that a manifest written by an older civm lacks (never changes one it has) to
   * the stored image `name`, if its key is still `key` (a build found it up to date: the key
   * covers these fields, so they are the ones it was built with). The new manifest.json is
   * renamed over the old one, and only when the old one is still the one read. True when written.
   */
  async addSpecFields(name: string, key: string, fields: Pick<ImageManifest, "suite" | "mirror">): Promise<boolean> {
    if (!isValidImageName(name)) return false;
    const path = join(this.pathOf(name), MANIFEST);
    const before = await readFile(path, "utf8").catch(() => undefined);
    let m: unknown;
    try {
      m = before === undefined ? undefined : JSON.parse(before);
    } catch {
      return false;
    }
    if (!looksLikeManifest(m) || m.name !== name || m.key !== key) return false;
    const add = Object.fromEntries(Object.entries(fields).filter(([k, v]) => v !== undefined && (m as unknown as Record<string, unknown>)[k] === undefined));
    if (Object.keys(add).length === 0) return false;
    const tmp = join(this.pathOf(name), `.manifest-${rand()}.json`);
    try {
      await writeFile(tmp, JSON.stringify({ ...m, ...add }, null, 2) + "\n", { mode: 0o644 });
      await fsyncPath(tmp);
      if ((await readFile(path, "utf8").catch(() => undefined)) !== before) return false; // replaced meanwhile
      await rename(tmp, path);
    } finally {
      await unlink(tmp).catch(() => {});
    }
    await fsyncPath(this.pathOf(name)).catch(() => {});
    return true;
  }

  /** The stored image, or a ConfigError naming the stored ones and how to get it. */
  async require(name: string): Promise<StoredImage> {
    checkImageName(name);
    const image = await this.get(name);
    if (image) return image;
    throw await this.missing(name);
  }

  /** Stored images whose disk is a qcow2 overlay backed by `name`'s disk. */
  async dependents(name: string): Promise<StoredImage[]> {
    const dir = this.pathOf(name);
    return (await this.list()).filter((i) => i.name !== name && i.manifest.backing !== undefined && isInside(i.manifest.backing, dir));
  }

  /** Deletes a stored image; refuses when another image's disk is backed by it. */
  async remove(name: string): Promise<void> {
    checkImageName(name);
    const image = await this.get(name);
    if (!image) throw await this.missing(name, false);
    const children = await this.dependents(name);
    if (children.length > 0) {
      const list = children.map((c) => (c.manifest.parent === name ? c.name : `${c.name} (backing file ${c.manifest.backing})`)).join(", ");
      throw new ConfigError(
        `image ${name} is the base of ${list}: ${children.length === 1 ? "its disk is a qcow2 overlay" : "their disks are qcow2 overlays"} on ${image.diskPath}; ` +
          `remove ${children.length === 1 ? "it" : "them"} first (civm image rm ${children.map((c) => c.name).join(" ")})`,
      );
    }
    await writeOwner(image.dir).catch(() => {});
    const aside = join(this.dir, `${OLD_PREFIX}${name}-${rand()}`);
    try {
      await rename(image.dir, aside);
    } catch (e) {
      if (errno(e) === "ENOENT") throw await this.missing(name, false); // removed meanwhile
      throw e;
    }
    await destroy(aside);
  }

  /** Starts an image: a fresh .tmp- folder (0755) owned by this process. */
  async begin(name: string): Promise<PendingImage> {
    checkImageName(name);
    await mkdir(this.dir, { recursive: true, mode: 0o755 });
    const dir = join(this.dir, `${TMP_PREFIX}${name}-${rand()}`);
    await mkdir(dir, { mode: 0o755 });
    await chmod(dir, 0o755); // whatever the umask
    await writeOwner(dir);
    let state: "open" | "committed" | "aborted" = "open";
    const abort = async (): Promise<void> => {
      if (state === "committed") return;
      state = "aborted";
      await destroy(dir);
    };
    const commit = async (input: ManifestInput): Promise<StoredImage> => {
      if (state !== "open") throw new CivmError("internal", `image ${name}: commit after ${state}`);
      try {
        const image = await this.commitPending(name, dir, input);
        state = "committed";
        return image;
      } catch (e) {
        await abort().catch(() => {});
        throw e;
      }
    };
    return { name, dir, commit, abort };
  }

  private async commitPending(name: string, pendingDir: string, input: ManifestInput): Promise<StoredImage> {
    if (input.name !== name) throw new CivmError("internal", `image ${name}: manifest names ${JSON.stringify(input.name)}`);
    if (input.parent !== undefined) checkImageName(input.parent, "parent image name");
    const files: string[] = [input.disk];
    for (const f of [input.kernel, input.initrd, input.compressed]) if (f !== undefined) files.push(f);
    for (const f of files) {
      if (!isPlainFileName(f) || f === MANIFEST || f === OWNER) {
        throw new CivmError("internal", `image ${name}: ${JSON.stringify(f)} is not a file name for the image folder`);
      }
      const st = await lstat(join(pendingDir, f)).catch(() => undefined);
      if (!st?.isFile()) throw new CivmError("internal", `image ${name}: ${f} is missing from ${pendingDir}`);
    }
    const diskPath = join(pendingDir, input.disk);
    const finalDir = this.pathOf(name);
    const [sha256, st, info] = await Promise.all([
      input.sha256 ?? sha256File(diskPath),
      stat(diskPath),
      input.virtualSize !== undefined && input.format !== "qcow2" ? undefined : qemuImgInfo(diskPath, input.format),
    ]);
    const manifest: ImageManifest = {
      ...input,
      sha256,
      diskBytes: input.diskBytes ?? st.size,
      virtualSize: input.virtualSize ?? (info as QemuImgInfo)["virtual-size"],
    };
    const backingName = info?.["backing-filename"];
    if (backingName) {
      if (/^[a-z][a-z0-9+.-]*:/i.test(backingName)) {
        throw new CivmError("internal", `image ${name}: backing file ${backingName} is not a plain path`);
      }
      // Relative names resolve against the disk's folder; .tmp- folders are siblings of the final one.
      const backing = resolve(finalDir, backingName);
      const rel = relative(this.dir, backing);
      const top = rel.split(sep)[0] ?? "";
      if (isInside(backing, this.dir) && (top.startsWith(TMP_PREFIX) || top.startsWith(OLD_PREFIX) || top === name)) {
        throw new CivmError(
          "internal",
          `image ${name}: its disk is backed by ${backing}, a temporary or its own path; a child must reference its parent's committed path ${join(this.dir, "<parent>", "disk.qcow2")}`,
        );
      }
      const bst = await stat(backing).catch(() => undefined);
      if (!bst?.isFile()) throw new CivmError("internal", `image ${name}: its disk's backing file ${backing} does not exist`);
      manifest.backing = backing;
    }
    for (const f of files) await fsyncPath(join(pendingDir, f));

    await commitHooks.beforeManifest?.(pendingDir);
    const manifestPath = join(pendingDir, MANIFEST);
    await writeFile(manifestPath, JSON.stringify(manifest, null, 2) + "\n", { mode: 0o644 });
    await fsyncPath(manifestPath);
    await fsyncPath(pendingDir);
    await commitHooks.beforeSwap?.(pendingDir);

    await this.swapIn(name, pendingDir, finalDir);
    await unlink(join(finalDir, OWNER)).catch(() => {});
    await fsyncPath(this.dir).catch(() => {});
    const image: StoredImage = { name, dir: finalDir, diskPath: join(finalDir, manifest.disk), manifest };
    if (manifest.kernel) image.kernelPath = join(finalDir, manifest.kernel);
    if (manifest.initrd) image.initrdPath = join(finalDir, manifest.initrd);
    return image;
  }

  /** rename(old → .old-*), rename(pending → final), delete the old one; retried if another commit races us. */
  private async swapIn(name: string, pendingDir: string, finalDir: string): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      let aside: string | undefined;
      if (await exists(finalDir)) {
        await writeOwner(finalDir).catch(() => {}); // sweepStale leaves the .old- folder to us
        aside = join(this.dir, `${OLD_PREFIX}${name}-${rand()}`);
        try {
          await rename(finalDir, aside);
        } catch (e) {
          if (errno(e) !== "ENOENT") throw e;
          aside = undefined; // another process moved it
        }
      }
      try {
        await rename(pendingDir, finalDir);
      } catch (e) {
        const code = errno(e);
        if ((code === "ENOTEMPTY" || code === "EEXIST") && attempt < 5) {
          if (aside) await destroy(aside);
          continue; // another commit got in between: move it aside too
        }
        if (aside) await rename(aside, finalDir).catch(() => {}); // put the old image back
        throw e;
      }
      if (aside) await destroy(aside);
      return;
    }
  }

  private async missing(name: string, hintBuild = true): Promise<ConfigError> {
    const names = (await this.list()).map((i) => i.name);
    const stored = names.length > 0 ? `stored images: ${names.join(", ")}` : `no images are stored in ${this.dir}`;
    return new ConfigError(
      `no stored image named ${name}${didYouMean(name, names)} (${stored}); civm image ls lists them` +
        (hintBuild ? `; build it with civm image build ${name}, or fetch one with civm image pull URL|REGISTRY/REPO:TAG --name ${name}` : ""),
    );
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch {
    return false;
  }
}

function looksLikeManifest(m: unknown): m is ImageManifest {
  if (typeof m !== "object" || m === null) return false;
  const o = m as Record<string, unknown>;
  return (
    typeof o.name === "string" &&
    typeof o.key === "string" &&
    (o.format === "qcow2" || o.format === "raw" || o.format === "vhd") &&
    typeof o.disk === "string" &&
    isPlainFileName(o.disk) &&
    typeof o.sha256 === "string" &&
    typeof o.diskBytes === "number" &&
    typeof o.virtualSize === "number" &&
    (o.kernel === undefined || (typeof o.kernel === "string" && isPlainFileName(o.kernel))) &&
    (o.initrd === undefined || (typeof o.initrd === "string" && isPlainFileName(o.initrd)))
  );
}

// ---- sweeping ------------------------------------------------------------------------------

export interface SweepOptions {
  /** Folders without a live owner are removed after this long (default 1 h). */
  maxAgeMs?: number;
  now?: number;
}

export interface SweepResult {
  /** Folder names removed. */
  removed: string[];
  /** .old- folders renamed back to their image (a replace or remove that died between its renames). */
  restored: string[];
}

/**
 * Removes .tmp-* and .old-* folders left by builds, pulls and removals that died: those
 * whose owner process is gone, and those older than maxAgeMs whose owner cannot be shown to
 * be alive (a pid alive with the recorded start time keeps its folder however long it
 * runs). An .old-<name>-* folder still holding a manifest while <name> is missing is
 * renamed back instead: the swap died between its two renames.
 */
export async function sweepStale(store: ImageStore, opts: SweepOptions = {}): Promise<SweepResult> {
  const maxAge = opts.maxAgeMs ?? STALE_AFTER_MS;
  const now = opts.now ?? Date.now();
  const result: SweepResult = { removed: [], restored: [] };
  let entries: Dirent[];
  try {
    entries = await readdir(store.dir, { withFileTypes: true });
  } catch (e) {
    if (errno(e) === "ENOENT") return result;
    throw e;
  }
  for (const d of entries) {
    if (!d.isDirectory()) continue;
    const isTmp = d.name.startsWith(TMP_PREFIX);
    const isOld = d.name.startsWith(OLD_PREFIX);
    if (!isTmp && !isOld) continue;
    const dir = join(store.dir, d.name);
    const { owner, mtimeMs } = await readOwner(dir);
    const liveness = owner ? await ownerLiveness(owner) : undefined;
    if (liveness === "alive") continue;
    const born = mtimeMs ?? (await stat(dir).catch(() => undefined))?.mtimeMs ?? now;
    const stale = liveness === "dead" || now - born > maxAge;
    if (!stale) continue;
    if (isOld) {
      const m = /^\.old-([a-z0-9][a-z0-9._-]*)-[0-9a-f]+$/.exec(d.name);
      const name = m?.[1];
      if (name && (await exists(join(dir, MANIFEST))) && !(await exists(store.pathOf(name)))) {
        try {
          await rename(dir, store.pathOf(name));
          await unlink(join(store.pathOf(name), OWNER)).catch(() => {});
          result.restored.push(name);
          continue;
        } catch {
          /* fall through: remove it */
        }
      }
    }
    await destroy(dir);
    result.removed.push(d.name);
  }
  return result;
}

// ---- `civm image ls` -----------------------------------------------------------------------

export function humanBytes(n: number): string {
  const units = ["B", "K", "M", "G", "T", "P"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  if (i === 0) return `${n}B`;
  const text = v < 10 ? (Math.round(v * 10) / 10).toString() : Math.round(v).toString();
  return `${text}${units[i]}`;
}

export function humanAge(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

/** Short form of a key: 12 characters, without a "sha256:" prefix. */
export function shortKey(key: string): string {
  return key.replace(/^sha256:/, "").slice(0, 12);
}

/** The table `civm image ls` prints: NAME KEY FORMAT SIZE VIRTUAL AGE, and SNAPSHOTS (count and sizes) when `snapshots` is given (header only when empty). */
export function formatImageTable(images: readonly StoredImage[], now: number = Date.now(), snapshots?: ReadonlyMap<string, readonly number[]>): string {
  const rows = [["NAME", "KEY", "FORMAT", "SIZE", "VIRTUAL", "AGE", ...(snapshots ? ["SNAPSHOTS"] : [])]];
  for (const i of images) {
    const created = Date.parse(i.manifest.createdAt);
    rows.push([
      i.name,
      shortKey(i.manifest.key),
      i.manifest.format,
      humanBytes(i.manifest.diskBytes),
      humanBytes(i.manifest.virtualSize),
      Number.isNaN(created) ? "?" : humanAge(now - created),
      ...(snapshots ? [(snapshots.get(i.name) ?? []).length ? `${snapshots.get(i.name)!.length} (${snapshots.get(i.name)!.map(humanBytes).join(", ")})` : "-"] : []),
    ]);
  }
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, k) => (widths[k] = Math.max(widths[k] ?? 0, c.length)));
  return rows.map((r) => r.map((c, k) => (k === r.length - 1 ? c : c.padEnd(widths[k] ?? 0))).join("  ")).join("\n") + "\n";
}

