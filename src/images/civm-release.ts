// civm itself inside an image (`civm: true` in a root image's spec; civm-host uses it): the
// build of this checkout (bin/civm, dist/bundle, guest/, images/, packaging/, package.json),
// its production node_modules as installed here (native modules such as better-sqlite3 are
// built for this Node's ABI) and the Node.js runtime they were built for: the build host's own
// `nodejs` Debian package, repacked with dpkg-repack. That is the package of the host's apt
// source (NodeSource's on a host set up as the README says), at exactly the version civm was
// built and tested with, taken from the host instead of downloaded again: the build VM reaches
// only the Debian mirror, and a host whose apt source is gone (or off-line) still builds.
//
// The release's identity (a hash of those files and the Node package's version) is part of the
// image's cache key, so a new build of civm rebuilds the image and an unchanged one does not.
import { createHash } from "node:crypto";
import { existsSync, readFileSync, statSync } from "node:fs";
import { copyFile, cp, mkdir, readdir, realpath, rename, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { ConfigError } from "../errors/index.js";
import { ToolError, run } from "../exec/index.js";
import { hashPath } from "./cache-key.js";
import { repoRoot } from "./paths.js";
import type { ImageAction } from "./types.js";

/** Where the release lives in the image; /usr/local/bin/civm links to its bin/civm. */
export const RELEASE_DIR = "/opt/civm";

/** The checkout's files that make the release (besides node_modules). */
export const RELEASE_FILES: readonly string[] = ["bin", "dist/bundle", "guest", "images", "packaging", "package.json", "package-lock.json"];

export interface NodeRuntime {
  /** The Debian package that installed the running node, e.g. "nodejs". */
  package: string;
  /** Its version, e.g. "20.20.2-1nodesource1". */
  version: string;
  arch: string;
  /** The node binary (real path). */
  binary: string;
}

export interface ReleaseIdentity {
  /** sha256 over the release's files and production node_modules. */
  hash: string;
  node: NodeRuntime;
}

/** The Debian package of the running Node.js; a ConfigError naming `where` if it has none. */
export async function hostNodeRuntime(where: string, execPath = process.execPath): Promise<NodeRuntime> {
  const binary = await realpath(execPath);
  let pkg: string;
  try {
    const { stdout } = await run("dpkg-query", ["-S", binary]);
    pkg = (stdout.split("\n")[0] ?? "").split(":")[0]?.trim() ?? "";
  } catch (e) {
    if (!(e instanceof ToolError)) throw e;
    pkg = "";
  }
  if (!pkg) {
    throw new ConfigError(
      `${where}: field "civm": the Node.js that runs civm (${binary}, ${process.version}) is not from a Debian package, so it cannot go into the image as one. ` +
        `Install Node.js ${process.versions.node.split(".")[0]} from a Debian package (e.g. NodeSource's "nodejs"), run "npm ci && npm run build" with it, and build again.`,
    );
  }
  const { stdout } = await run("dpkg-query", ["-W", "-f", "${Version}\\t${Architecture}", pkg]);
  const [version, arch] = stdout.trim().split("\t");
  if (!version || !arch) throw new ConfigError(`${where}: field "civm": dpkg does not know the version of ${pkg} (the package of ${binary}).`);
  return { package: pkg, version, arch, binary };
}

/** Folders (relative to root) of the packages package-lock.json installs for production. */
export function productionPackages(lockText: string, root: string): string[] {
  const lock = JSON.parse(lockText) as { packages?: Record<string, { dev?: boolean; link?: boolean }> };
  if (!lock.packages) throw new ConfigError(`${join(root, "package-lock.json")}: no "packages" map (lockfile version 2 or later is needed); run "npm install" with npm 7 or later.`);
  return Object.entries(lock.packages)
    .filter(([path, p]) => path.startsWith("node_modules/") && !p.dev && !p.link && existsSync(join(root, path)))
    .map(([path]) => path)
    .sort();
}

/** The release's files, checked: a missing or stale bundle is a ConfigError naming `where`. */
function releasePaths(where: string, root: string): string[] {
  const bundle = join(root, "dist", "bundle", "main.js");
  const plain = join(root, "dist", "src", "cli", "main.js");
  if (!existsSync(bundle)) throw new ConfigError(`${where}: field "civm": ${bundle} is missing; run "npm ci && npm run build" in ${root} first.`);
  if (existsSync(plain) && statSync(plain).mtimeMs > statSync(bundle).mtimeMs) {
    throw new ConfigError(`${where}: field "civm": ${join(root, "dist", "bundle")} is older than ${join(root, "dist", "src")} (tsc ran without the bundle step); run "npm run build" in ${root} first.`);
  }
  // The current build's bundle files only (scripts/bundle.mjs lists them; earlier builds'
  // chunks stay beside them for a day for civm processes still running from them).
  const listFile = join(root, "dist", "bundle", "files.json");
  if (!existsSync(listFile)) throw new ConfigError(`${where}: field "civm": ${listFile} is missing (a bundle from an older build script); run "npm run build" in ${root} first.`);
  const bundleFiles = (JSON.parse(readFileSync(listFile, "utf8")) as string[]).map((f) => `dist/bundle/${f}`);
  const lockFile = join(root, "package-lock.json");
  if (!existsSync(lockFile)) throw new ConfigError(`${where}: field "civm": ${lockFile} is missing; the release's node_modules are those it lists.`);
  const modules = productionPackages(readFileSync(lockFile, "utf8"), root);
  return [...RELEASE_FILES.filter((f) => f !== "dist/bundle"), "dist/bundle/files.json", ...bundleFiles, ...modules];
}

/** The release's identity: part of the cache key of an image with `civm: true`. */
export async function releaseIdentity(where: string, root = repoRoot): Promise<ReleaseIdentity> {
  const node = await hostNodeRuntime(where);
  const h = createHash("sha256");
  for (const rel of releasePaths(where, root)) h.update(`${rel} ${await hashPath(join(root, rel))}\n`);
  return { hash: h.digest("hex"), node };
}

/**
 * Copies the release into `dir`/civm (the tree /opt/civm gets) and returns it. Only the
 * production packages of node_modules go in, with their native modules as built here.
 */
export async function stageRelease(dir: string, where: string, root = repoRoot): Promise<string> {
  const out = join(dir, "civm");
  await rm(out, { recursive: true, force: true });
  for (const rel of releasePaths(where, root)) {
    await mkdir(join(out, rel, ".."), { recursive: true });
    await cp(join(root, rel), join(out, rel), { recursive: true, preserveTimestamps: true, verbatimSymlinks: true });
  }
  return out;
}

/**
 * The build host's Node.js package as a .deb (dpkg-repack, uncompressed: it is only copied
 * into the image), cached in `cacheDir` by package, version and architecture.
 */
export async function repackNode(node: NodeRuntime, cacheDir: string, log: (l: string) => void): Promise<string> {
  const name = `dpkg-repack-${node.package}_${node.version.replace(/[^A-Za-z0-9.+~-]/g, "_")}_${node.arch}.deb`;
  const cached = join(cacheDir, name);
  if (existsSync(cached) && (await stat(cached)).size > 0) {
    log(`civm release: ${node.package} ${node.version} from the cache (${cached})`);
    return cached;
  }
  await mkdir(cacheDir, { recursive: true });
  const work = join(cacheDir, `.tmp-repack-${process.pid}`);
  await rm(work, { recursive: true, force: true });
  await mkdir(work, { recursive: true });
  try {
    log(`civm release: repacking the host's ${node.package} ${node.version} (dpkg-repack)`);
    const r = await run("dpkg-repack", ["--tag=none", "-d", "-Znone", node.package], { cwd: work });
    for (const l of `${r.stdout}\n${r.stderr}`.split("\n")) if (l.trim() && !/cannot find file/.test(l)) log(`dpkg-repack: ${l}`);
    const debs = (await readdir(work)).filter((n) => n.endsWith(".deb"));
    if (debs.length !== 1) throw new ConfigError(`dpkg-repack ${node.package} made ${debs.length} .deb files in ${work}, not one.`);
    await rename(join(work, debs[0] as string), cached);
    return cached;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** Stages the .deb beside the release (a hard link would cross into QEMU's share; a copy is plain). */
export async function stageNodeDeb(deb: string, dir: string): Promise<string> {
  const out = join(dir, "nodejs.deb");
  await copyFile(deb, out);
  return out;
}

/**
 * The actions that put the staged release into a root tree (run in the chroot, first): the
 * Node package (held: civm's native modules need its ABI), /opt/civm, /usr/local/bin/civm, and
 * a check that civm starts and its native SQLite module loads with that Node.
 */
export function releaseActions(stagedRelease: string, stagedDeb: string, node: NodeRuntime): ImageAction[] {
  return [
    { kind: "copy", src: stagedDeb, srcPath: stagedDeb, dest: "/var/cache/civm-nodejs.deb", comment: "the build host's Node.js package" },
    {
      kind: "run",
      command: `apt-get install -y -q --no-install-recommends /var/cache/civm-nodejs.deb && rm -f /var/cache/civm-nodejs.deb && apt-mark hold ${node.package} >/dev/null && apt-get clean`,
      comment: `Node.js ${node.version} (${node.package}), as on the build host; held: civm's native modules are built for its ABI`,
    },
    { kind: "copy", src: stagedRelease, srcPath: stagedRelease, dest: RELEASE_DIR, comment: "civm, built from this checkout" },
    { kind: "run", command: `chown -R root:root ${RELEASE_DIR} && chmod -R go-w ${RELEASE_DIR} && ln -sfn ${RELEASE_DIR}/bin/civm /usr/local/bin/civm` },
    {
      kind: "run",
      command:
        `v=$(civm --version) && echo "civm release: civm $v with node $(node --version)" >&2 && ` +
        `cd ${RELEASE_DIR} && node -e 'const D=require("better-sqlite3"); new D(":memory:").prepare("select 1").get(); console.error("civm release: better-sqlite3 loads")'`,
      comment: "civm starts, and its native SQLite module loads with this Node",
    },
  ];
}
