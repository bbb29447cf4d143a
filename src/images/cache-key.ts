// Cache keys: an image is rebuilt only when its key changes. The key is a sha256 over a
// canonical JSON of everything that shapes the image: the spec minus cosmetic fields (name,
// description, comments, where the file lives), the parent's key (not its name), the content
// of every host file a copy/provision action reads, the guest agent's version and the
// builder's own version. computeCacheKey is pure; cacheKeyFor reads the files it needs.
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { lstat, readFile, readdir, readlink, stat } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { guestVersionFile } from "./paths.js";
import type { ImageAction, ImageSpec } from "./types.js";

/**
 * Bump when a change in how civm builds images must invalidate every cached image.
 * test/unit/images-builder-version.test.ts fingerprints the builder's fixed scripts and lists
 * and fails when they change without a bump.
 */
// 2 was the reverted PVH builder (dc893e5): never reuse a number, its images may still be cached.
// 4: the clean-root script says its read-only check once (a shell function); same behaviour.
export const IMAGE_BUILDER_VERSION = 5;

export interface CacheKeyInputs {
  spec: ImageSpec;
  /** The parent image's key; required for children, absent for root images. */
  parentKey?: string;
  /** Content hash (hashPath) of every host path a copy/provision action reads, by absolute path. */
  fileHashes: Readonly<Record<string, string>>;
  /** The guest agent's version (guest/VERSION). */
  agentVersion: string;
  /** `civm: true` images: the release's identity (releaseIdentity: its files' hash and the Node package). */
  civmRelease?: string;
}

/** Paths on the host an image's actions read (copy sources, provision scripts), in order. */
export function inputFiles(spec: ImageSpec): string[] {
  const out: string[] = [];
  for (const a of spec.actions) {
    if (a.kind === "copy") out.push(a.srcPath);
    if (a.kind === "provision" && a.script) out.push(a.script.srcPath);
  }
  return [...new Set(out)];
}

/** The image's key: 64 hex digits. Same inputs, same key; throws if a file hash is missing. */
export function computeCacheKey(inputs: CacheKeyInputs): string {
  const { spec } = inputs;
  if (spec.parent !== undefined && inputs.parentKey === undefined) {
    throw new Error(`cache key of ${spec.name}: its parent's key is needed`);
  }
  const doc = {
    builder: IMAGE_BUILDER_VERSION,
    agent: inputs.agentVersion,
    parentKey: inputs.parentKey ?? null,
    suite: spec.suite,
    mirror: spec.mirror,
    kernel: spec.kernel ?? null,
    packages: [...new Set(spec.packages)].sort(),
    sizeBytes: spec.sizeBytes,
    format: spec.format,
    compress: spec.compress ?? null,
    flatten: spec.parent !== undefined ? spec.flatten : null,
    actions: spec.actions.map((a) => canonicalAction(a, inputs.fileHashes)),
    // Left out when unset (canonicalJson drops undefined), so older images keep their keys.
    // The runner is its sha256 (and version): where it is downloaded from does not change it.
    githubRunner: spec.githubRunner ? { version: spec.githubRunner.version, sha256: spec.githubRunner.sha256 } : undefined,
    sudo: spec.sudo,
    civm: spec.civm ? (inputs.civmRelease ?? missing("the civm release's identity")) : undefined,
    uefi: spec.uefi,
    arch: spec.arch,
  };
  return createHash("sha256").update(canonicalJson(doc)).digest("hex");
}

function missing(what: string): never {
  throw new Error(`cache key: ${what} is needed`);
}

function canonicalAction(a: ImageAction, hashes: Readonly<Record<string, string>>): unknown {
  const hashOf = (p: string): string => {
    const h = hashes[p];
    if (h === undefined) throw new Error(`cache key: no content hash for ${p}`);
    return h;
  };
  switch (a.kind) {
    case "run":
      return { run: a.command };
    case "copy":
      // The source's base name matters (copying into a folder keeps it); where it lives does not.
      return { copy: { name: basename(a.srcPath), content: hashOf(a.srcPath), dest: a.dest, mode: a.mode ?? null } };
    case "write":
      return { write: { path: a.path, content: a.content, mode: a.mode ?? null } };
    case "mkdir":
      return { mkdir: { path: a.path, mode: a.mode ?? null } };
    case "symlink":
      return { symlink: { target: a.target, path: a.path } };
    case "append-line":
      return { "append-line": { file: a.file, line: a.line } };
    case "set-hostname":
      return { "set-hostname": a.hostname };
    case "enable-service":
      return { "enable-service": a.unit };
    case "provision":
      return a.script ? { provision: { script: hashOf(a.script.srcPath) } } : { provision: { inline: a.inline ?? "" } };
    case "install-kernel":
      // buildImage expands it (images/install-kernel.ts) into a copy of the kernel's files first.
      throw new Error(`cache key: install-kernel ${a.kernel} must be expanded before the key is computed`);
  }
}

/** JSON with object keys sorted at every level: equal values give equal text. */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== "object") return JSON.stringify(value) ?? "null";
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  const entries = Object.entries(value as Record<string, unknown>)
    .filter(([, v]) => v !== undefined)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(",")}}`;
}

/**
 * Content hash of a file or folder: for a file its permission bits and bytes; for a folder,
 * recursively, every entry's name, type, permission bits and content (symlinks by target).
 * Owners and timestamps are left out. Follows a symlink given as `path` itself.
 */
export async function hashPath(path: string): Promise<string> {
  const info = await stat(path);
  return info.isDirectory() ? hashDir(path) : hashFile(path, info.mode);
}

async function hashFile(path: string, mode: number): Promise<string> {
  const h = createHash("sha256");
  h.update(`file ${(mode & 0o7777).toString(8)}\n`);
  await new Promise<void>((resolve, reject) => {
    createReadStream(path)
      .on("data", (d) => h.update(d))
      .on("end", resolve)
      .on("error", reject);
  });
  return h.digest("hex");
}

async function hashDir(path: string, skip: (name: string) => boolean = () => false): Promise<string> {
  const info = await lstat(path);
  const h = createHash("sha256");
  h.update(`dir ${(info.mode & 0o7777).toString(8)}\n`);
  const names = (await readdir(path)).filter((n) => !skip(n)).sort();
  for (const name of names) {
    const p = join(path, name);
    const st = await lstat(p);
    let sub: string;
    if (st.isSymbolicLink()) sub = `link ${await readlink(p)}`;
    else if (st.isDirectory()) sub = `dir ${await hashDir(p)}`;
    else if (st.isFile()) sub = `file ${await hashFile(p, st.mode)}`;
    else sub = `other ${(st.mode & 0o170000).toString(8)}`;
    h.update(`${JSON.stringify(name)} ${sub}\n`);
  }
  return h.digest("hex");
}

/**
 * The guest agent's identity: guest/VERSION plus a hash of the guest/ folder, so an
 * edit to the agent rebuilds every image (the builder installs it into each root image)
 * even when nobody bumped VERSION. Its README is not installed, so editing it rebuilds nothing.
 */
export async function readAgentVersion(file = guestVersionFile): Promise<string> {
  let v = "0";
  try {
    v = (await readFile(file, "utf8")).trim() || "0";
  } catch {
    return v;
  }
  return `${v}+${(await hashDir(dirname(file), (name) => name === "README.md")).slice(0, 16)}`;
}

/** Reads the files the image's actions use, then computes its key. */
export async function cacheKeyFor(
  spec: ImageSpec,
  opts: { parentKey?: string; agentVersion?: string; civmRelease?: string } = {},
): Promise<string> {
  const fileHashes: Record<string, string> = {};
  for (const p of inputFiles(spec)) fileHashes[p] = await hashPath(p);
  const agentVersion = opts.agentVersion ?? (await readAgentVersion());
  let civmRelease = opts.civmRelease;
  if (spec.civm && civmRelease === undefined) {
    const { releaseIdentity } = await import("./civm-release.js");
    const r = await releaseIdentity(`${spec.source.file}: image ${JSON.stringify(spec.name)} (#${spec.source.index + 1})`);
    civmRelease = `${r.hash} ${r.node.package}=${r.node.version}:${r.node.arch}`;
  }
  return computeCacheKey({
    spec, fileHashes, agentVersion,
    ...(opts.parentKey !== undefined ? { parentKey: opts.parentKey } : {}),
    ...(civmRelease !== undefined ? { civmRelease } : {}),
  });
}

/** Keys of a build chain (resolveBuildOrder's result), parents first. */
export async function cacheKeysFor(chain: readonly ImageSpec[], opts: { agentVersion?: string } = {}): Promise<Map<string, string>> {
  const keys = new Map<string, string>();
  const agentVersion = opts.agentVersion ?? (await readAgentVersion());
  for (const spec of chain) {
    // A stored image standing in as a parent (no spec here): its key is the one it was built with.
    if (spec.stored) {
      keys.set(spec.name, spec.stored.key);
      continue;
    }
    const parentKey = spec.parent !== undefined ? keys.get(spec.parent) : undefined;
    keys.set(spec.name, await cacheKeyFor(spec, { agentVersion, ...(parentKey !== undefined ? { parentKey } : {}) }));
  }
  return keys;
}

/** A stable UUID (for the filesystem and MBR disk id) derived from an image's key. */
export function uuidFromKey(key: string): string {
  const h = createHash("sha256").update(`civm-fs-uuid:${key}`).digest("hex");
  const v = `${h.slice(0, 12)}4${h.slice(13, 16)}${((parseInt(h[16] as string, 16) & 0x3) | 0x8).toString(16)}${h.slice(17, 32)}`;
  return `${v.slice(0, 8)}-${v.slice(8, 12)}-${v.slice(12, 16)}-${v.slice(16, 20)}-${v.slice(20, 32)}`;
}
