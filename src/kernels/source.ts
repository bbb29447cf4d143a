// Where a kernels.json entry's source comes from (`url`), and a fingerprint of it for the
// build's cache key:
//   - a local source folder: a path (relative to kernels.json) or file:// URL. Never written
//     to: civm builds out of tree (make O=...). Fingerprint: its git HEAD and `git diff HEAD`
//     when it is a git checkout, else every file's path, size and mtime.
//   - a tarball (.tar, .tar.gz/.tgz, .tar.xz, .tar.bz2, .tar.zst): a path or an http(s) URL
//     (downloaded once into <state>/downloads/). Fingerprint: its sha256.
//   - git (lvh's form): git://, ssh://, git@host:path, or https:// not naming a tarball;
//     `?depth=N` and `#ref` (branch, tag or commit; default master, as lvh). Fingerprint:
//     the commit `git ls-remote` names, so a cached build needs no clone.
import { createHash } from "node:crypto";
import { createReadStream, createWriteStream, existsSync } from "node:fs";
import { lstat, mkdir, readdir, rename, rm, stat } from "node:fs/promises";
import { basename, dirname, isAbsolute, join, resolve } from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { ConfigError, ExternalError } from "../errors/index.js";
import { run } from "../exec/index.js";

export type KernelSourceSpec =
  | { kind: "dir"; path: string }
  | { kind: "tarball"; path: string }
  | { kind: "tarball-url"; url: string }
  | { kind: "git"; repo: string; ref: string; depth: number | undefined };

const TARBALL_RE = /\.(tar|tar\.gz|tgz|tar\.xz|txz|tar\.bz2|tbz2|tar\.zst)$/;

/** What `url` names; `baseDir` is kernels.json's folder (relative paths start there). */
export function parseKernelUrl(url: string, baseDir: string, where: string): KernelSourceSpec {
  const fix = "give a git URL (git://host/repo.git?depth=1#branch), a tarball (an http(s) URL or a path), or a local source folder (a path, relative to kernels.json)";
  const scp = /^[\w.-]+@[\w.-]+:(?!\/\/)/.test(url);
  const m = /^([a-z][a-z0-9+.-]*):\/\//i.exec(url);
  if (!m && !scp) {
    const p = isAbsolute(url) ? url : resolve(baseDir, url);
    return TARBALL_RE.test(p) ? { kind: "tarball", path: p } : { kind: "dir", path: p };
  }
  const scheme = scp ? "ssh" : m![1]!.toLowerCase();
  if (scheme === "file") {
    const p = decodeURIComponent(url.slice("file://".length).split(/[?#]/)[0]!);
    return TARBALL_RE.test(p) ? { kind: "tarball", path: p } : { kind: "dir", path: p };
  }
  const [beforeFrag, ref] = url.split("#", 2) as [string, string | undefined];
  const [repo, query] = beforeFrag.split("?", 2) as [string, string | undefined];
  if ((scheme === "http" || scheme === "https") && TARBALL_RE.test(repo)) return { kind: "tarball-url", url: beforeFrag };
  if (scheme === "http") throw new ConfigError(`${where}: ${JSON.stringify(url)} is a plain http URL that names no tarball; ${fix}`);
  if (!["git", "https", "ssh", "git+ssh"].includes(scheme)) throw new ConfigError(`${where}: URL scheme "${scheme}:" is not supported; ${fix}`);
  let depth: number | undefined;
  for (const part of (query ?? "").split("&").filter(Boolean)) {
    const [k, v] = part.split("=", 2);
    if (k !== "depth" || !/^\d+$/.test(v ?? "") || Number(v) < 1) {
      throw new ConfigError(`${where}: ${JSON.stringify(part)} in ${JSON.stringify(url)} is not understood; the only query lvh's URLs take is ?depth=N (N ≥ 1)`);
    }
    depth = Number(v);
  }
  if (ref !== undefined && !/^[\w./-]+$/.test(ref)) throw new ConfigError(`${where}: ${JSON.stringify(ref)} after "#" is not a branch, tag or commit name`);
  return { kind: "git", repo, ref: ref || "master", depth };
}

export function describeSource(s: KernelSourceSpec): string {
  switch (s.kind) {
    case "dir": return `folder ${s.path}`;
    case "tarball": return `tarball ${s.path}`;
    case "tarball-url": return `tarball ${s.url}`;
    case "git": return `git ${s.repo} ${s.ref}`;
  }
}

async function sha256File(path: string): Promise<string> {
  const h = createHash("sha256");
  await pipeline(createReadStream(path), h);
  return h.digest("hex");
}

/** Every file's path, size and mtime under `dir` (.git and build output folders aside). */
async function treeFingerprint(dir: string): Promise<string> {
  const h = createHash("sha256");
  const walk = async (rel: string): Promise<void> => {
    const names = (await readdir(join(dir, rel))).sort();
    for (const n of names) {
      if (rel === "" && n === ".git") continue;
      const p = rel ? `${rel}/${n}` : n;
      const st = await lstat(join(dir, p));
      if (st.isDirectory()) await walk(p);
      else h.update(`${p}\0${st.size}\0${Math.floor(st.mtimeMs)}\n`);
    }
  };
  await walk("");
  return h.digest("hex");
}

/** Checks the source exists (and is a kernel tree, for folders); returns its fingerprint. */
export async function fingerprintSource(s: KernelSourceSpec, where: string): Promise<string> {
  switch (s.kind) {
    case "dir": {
      const st = await stat(s.path).catch(() => undefined);
      if (!st?.isDirectory()) throw new ConfigError(`${where}: ${s.path} is not a folder (a kernel source tree); fix the path (relative paths start at kernels.json's folder) or give a tarball or git URL`);
      if (!existsSync(join(s.path, "Makefile")) || !existsSync(join(s.path, "scripts", "config")) || !existsSync(join(s.path, "Kconfig"))) {
        throw new ConfigError(`${where}: ${s.path} is not a Linux source tree (no Makefile, Kconfig and scripts/config); point it at the folder holding the kernel's top-level Makefile`);
      }
      if (existsSync(join(s.path, ".git"))) {
        const head = (await run("git", ["-C", s.path, "rev-parse", "HEAD"], { failCode: "config" })).stdout.trim();
        const diff = (await run("git", ["-C", s.path, "diff", "HEAD", "--binary"], { failCode: "config" })).stdout;
        return `git:${head}:${createHash("sha256").update(diff).digest("hex")}`;
      }
      return `tree:${await treeFingerprint(s.path)}`;
    }
    case "tarball": {
      const st = await stat(s.path).catch(() => undefined);
      if (!st?.isFile()) throw new ConfigError(`${where}: ${s.path} is not a file (a kernel source tarball); fix the path (relative paths start at kernels.json's folder)`);
      return `sha256:${await sha256File(s.path)}`;
    }
    case "tarball-url":
      return `url:${s.url}`;
    case "git": {
      const r = await run("git", ["ls-remote", s.repo, s.ref, `refs/heads/${s.ref}`, `refs/tags/${s.ref}`, `refs/tags/${s.ref}^{}`], { failCode: "external", timeoutMs: 120_000 });
      const lines = r.stdout.trim().split("\n").filter(Boolean);
      const peeled = lines.find((l) => l.endsWith("^{}")) ?? lines[0];
      if (peeled) return `git:${peeled.split(/\s/)[0]}`;
      if (/^[0-9a-f]{40}$/.test(s.ref)) return `git:${s.ref}`;
      throw new ConfigError(`${where}: ${s.repo} has no branch or tag "${s.ref}" (git ls-remote found none); fix the part after "#"`);
    }
  }
}

/**
 * The source tree, ready for `make -C TREE O=...`: a folder is used in place; a tarball is
 * unpacked and a git URL cloned into `work`.
 */
export async function materializeSource(s: KernelSourceSpec, work: string, downloads: string, log: (l: string) => void): Promise<string> {
  if (s.kind === "dir") return s.path;
  const tree = join(work, "src");
  await mkdir(tree, { recursive: true });
  if (s.kind === "git") {
    log(`git clone ${s.repo} (${s.ref}${s.depth ? `, depth ${s.depth}` : ""})`);
    const depth = ["--depth", String(s.depth ?? 1)];
    if (/^[0-9a-f]{40}$/.test(s.ref)) {
      await run("git", ["-C", tree, "init", "-q"], { failCode: "external" });
      await run("git", ["-C", tree, "fetch", "-q", ...depth, s.repo, s.ref], { failCode: "external" });
      await run("git", ["-C", tree, "checkout", "-q", "FETCH_HEAD"], { failCode: "external" });
    } else {
      await run("git", ["clone", "-q", ...depth, "--single-branch", "--branch", s.ref, s.repo, tree], { failCode: "external" });
    }
    return tree;
  }
  const file = s.kind === "tarball" ? s.path : await downloadTarball(s.url, downloads, log);
  log(`unpacking ${basename(file)}`);
  await run("tar", ["-x", "-f", file, "-C", tree, "--no-same-owner", "--no-same-permissions"], { failCode: "config" });
  // Tarballs hold one top folder (linux-6.1/); use it when that is all there is.
  const top = await readdir(tree);
  if (top.length === 1 && (await stat(join(tree, top[0]!))).isDirectory() && !existsSync(join(tree, "Makefile"))) return join(tree, top[0]!);
  return tree;
}

/** An http(s) tarball, fetched once into `downloads` (a release tarball's URL does not change). */
async function downloadTarball(url: string, downloads: string, log: (l: string) => void): Promise<string> {
  const name = `kernel-${createHash("sha256").update(url).digest("hex").slice(0, 16)}-${basename(new URL(url).pathname)}`;
  const file = join(downloads, name);
  if (existsSync(file)) return file;
  await mkdir(dirname(file), { recursive: true });
  log(`downloading ${url}`);
  const res = await fetch(url, { redirect: "follow", signal: AbortSignal.timeout(60 * 60 * 1000) });
  if (!res.ok || !res.body) throw new ExternalError(`downloading ${url} failed: HTTP ${res.status}`);
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    await pipeline(Readable.fromWeb(res.body as import("node:stream/web").ReadableStream), createWriteStream(tmp));
    await rename(tmp, file);
  } finally {
    await rm(tmp, { force: true });
  }
  return file;
}
