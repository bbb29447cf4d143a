// The kernel store: kernels a dev VM can boot instead of its image's own (`--kernel NAME`).
//
//   <state>/kernels/<name>/
//     vmlinuz                  the kernel (bzImage)
//     initrd.img               generated: busybox + the modules to reach the root fs + /init
//     modules.img              the kernel's lib/modules/<release> with depmod's indexes, as an
//                              ext4 filesystem labelled civm-modules (optional). A VM gets it as
//                              a read-only virtio disk; the initrd mounts it at
//                              /lib/modules/<release>. A disk, not a 9p share: every kernel that
//                              can mount its root (virtio_blk, ext4) can read it, and some have
//                              no 9p (Debian's cloud kernels).
//     config                   the kernel's build configuration, when its source has
//                              boot/config-<release> beside the kernel (optional)
//     manifest.json            written last: a folder without it is not a kernel
//   <state>/kernels/.tmp-<name>-<rand>/   a kernel being added
//
// Sources: a Debian package name (apt-get download; a meta-package such as
// linux-image-amd64 or linux-image-cloud-amd64 is resolved to the versioned package it
// depends on), a .deb file, a bzImage file (with an optional modules folder), or a folder
// laid out like lvh's kernel builds (boot/vmlinuz-<release> or boot/bzImage, lib/modules/<release>/).
import { existsSync } from "node:fs";
import { cp, mkdir, readdir, readFile, rename, rm, stat, writeFile, copyFile, chmod } from "node:fs/promises";
import { randomBytes } from "node:crypto";
import { basename, dirname, join, resolve } from "node:path";
import { ConfigError, CivmError } from "../errors/index.js";
import { run } from "../exec/index.js";
import { didYouMean } from "../config/suggest.js";
import { aptDownload, dependsOnKernelPackage, debFields, DEB_PACKAGE_RE, extractDeb, packageVersion } from "./debian.js";
import { readBzImage } from "./bzimage.js";
import { busyboxTree, copyModules, packInitramfs, readModuleIndex, staticBusybox } from "./initramfs.js";
import { moduleName, resolveModules } from "./modules.js";
import { INITRD_INIT, MODULES_LABEL } from "./init-script.js";
import { findLvhKernels } from "./lvh.js";
import type { KernelBuildInfo } from "./build.js";

export const KERNELS_DIR = "kernels";
export const MODULES_DISK = "modules.img";
/** The kernel's build configuration in its store folder (optional). */
export const KERNEL_CONFIG = "config";
const MANIFEST = "manifest.json";
export const KERNEL_NAME_RE = /^[a-z0-9][a-z0-9._-]*$/;

/** Modules the generated initrd loads (when they are modules, not built in): disk, root fs, 9p. */
export const INITRD_MODULES = [
  "virtio_pci",
  "virtio_blk",
  "virtio_scsi",
  "crc32c_generic",
  "crc32c_intel",
  "ext4",
  "9p",
  "9pnet_virtio",
] as const;

export interface KernelSource {
  kind: "package" | "deb" | "bzimage" | "dir" | "build";
  /** Package name (and version) for package/deb sources. */
  package?: string;
  version?: string;
  /** Absolute path for deb/bzimage/dir sources; for "build", what it was built from. */
  path?: string;
}

export interface KernelManifest {
  name: string;
  /** uname -r of the kernel. */
  release: string;
  source: KernelSource;
  /** Whether modules.img (the kernel's lib/modules/<release>) is stored. */
  hasModules: boolean;
  /** Module names in the initrd, in load order. */
  initrdModules: string[];
  /** Whether the kernel has virtio-9p (9p and 9pnet_virtio, built in or modules), which --host-mount needs; null when unknown (no modules). */
  ninep: boolean | null;
  createdAt: string;
  addSeconds: number;
  /** Set for kernels `civm kernel build` made from a kernels.json entry (its cache key and more). */
  build?: KernelBuildInfo;
}

export interface StoredKernel {
  name: string;
  dir: string;
  kernelPath: string;
  initrdPath: string;
  /** modules.img when the kernel has modules. */
  modulesDisk: string | undefined;
  /** The kernel's build configuration (`config`), when its source brought one. */
  configPath: string | undefined;
  manifest: KernelManifest;
}

export interface AddKernelOptions {
  name: string;
  /** Package name, .deb, bzImage or folder. */
  source: string;
  /** Modules folder for a bzImage source: lib/modules/<release> itself or a folder holding lib/modules/<release>. */
  modules?: string;
  /** Replace a kernel of the same name. */
  replace?: boolean;
  /** lvh kernels.json to consult for names (default ./kernels.json, ./_data/kernels.json). */
  lvhKernels?: string;
  cwd?: string;
  log?: (line: string) => void;
  /** civm kernel build: what was built (the source is its install folder). */
  build?: KernelBuildInfo;
}

export function checkKernelName(name: string): string {
  if (name.length > 64 || !KERNEL_NAME_RE.test(name)) {
    throw new ConfigError(`kernel name ${JSON.stringify(name)} is not valid: use lowercase letters, digits, ".", "_" and "-", starting with a letter or digit (at most 64 characters)`);
  }
  return name;
}

function looksLikePath(s: string): boolean {
  return s.includes("/") || s.startsWith(".") || s.endsWith(".deb");
}

export class KernelStore {
  readonly root: string;
  constructor(stateDir: string) {
    this.root = join(stateDir, KERNELS_DIR);
  }

  pathOf(name: string): string {
    return join(this.root, name);
  }

  async get(name: string): Promise<StoredKernel | undefined> {
    if (!KERNEL_NAME_RE.test(name)) return undefined;
    const dir = this.pathOf(name);
    let manifest: KernelManifest;
    try {
      manifest = JSON.parse(await readFile(join(dir, MANIFEST), "utf8")) as KernelManifest;
    } catch {
      return undefined;
    }
    if (manifest?.name !== name || typeof manifest.release !== "string") return undefined;
    const modulesDisk = manifest.hasModules ? join(dir, MODULES_DISK) : undefined;
    const configPath = existsSync(join(dir, KERNEL_CONFIG)) ? join(dir, KERNEL_CONFIG) : undefined;
    return { name, dir, kernelPath: join(dir, "vmlinuz"), initrdPath: join(dir, "initrd.img"), modulesDisk, configPath, manifest };
  }

  async list(): Promise<StoredKernel[]> {
    const names = await readdir(this.root).catch(() => [] as string[]);
    const all = await Promise.all(names.filter((n) => !n.startsWith(".")).map((n) => this.get(n)));
    return all.filter((k): k is StoredKernel => !!k).sort((a, b) => a.name.localeCompare(b.name));
  }

  /** The stored kernel, or a ConfigError naming the stored ones and how to add one. */
  async require(name: string): Promise<StoredKernel> {
    checkKernelName(name);
    const k = await this.get(name);
    if (k) return k;
    const names = (await this.list()).map((x) => x.name);
    throw new ConfigError(
      `no kernel named "${name}"${didYouMean(name, names)}; ` +
        (names.length ? `stored kernels: ${names.join(", ")}. ` : "no kernels are stored. ") +
        `Add one with: civm kernel add ${name} linux-image-amd64 (a Debian package), or civm kernel add ${name} PATH (a bzImage, a .deb, or lvh's boot/ + lib/modules/ folder).`,
    );
  }

  async remove(name: string): Promise<void> {
    checkKernelName(name);
    if (!(await this.get(name))) await this.require(name);
    const old = join(this.root, `.old-${name}-${randomBytes(4).toString("hex")}`);
    await rename(this.pathOf(name), old);
    await rm(old, { recursive: true, force: true });
  }

  async add(o: AddKernelOptions): Promise<StoredKernel> {
    const log = o.log ?? (() => {});
    const started = Date.now();
    const name = checkKernelName(o.name);
    if (!o.replace && (await this.get(name))) {
      throw new ConfigError(`a kernel named "${name}" is already stored (civm kernel ls); remove it first (civm kernel rm ${name}) or pass --force`);
    }
    const cwd = o.cwd ?? process.cwd();
    await mkdir(this.root, { recursive: true, mode: 0o755 });
    await this.sweep();
    const tmp = join(this.root, `.tmp-${name}-${randomBytes(4).toString("hex")}`);
    await mkdir(tmp, { mode: 0o755 });
    await writeFile(join(tmp, ".owner"), `${process.pid}\n`);
    try {
      const scratch = join(tmp, ".scratch");
      await mkdir(scratch);
      const fetched = await this.fetch(o, cwd, scratch, log);
      const { release, vmlinuz, modulesDir } = fetched;
      const source: KernelSource = o.build ? { kind: "build", path: o.build.source } : fetched.source;
      await copyFile(vmlinuz, join(tmp, "vmlinuz"));
      await chmod(join(tmp, "vmlinuz"), 0o644);
      // The kernel's build configuration when its source has one beside the kernel
      // (boot/config-<release>: Debian's packages, lvh's and civm's builds); install-kernel puts it in /boot.
      const config = join(dirname(vmlinuz), `config-${release}`);
      if (existsSync(config)) {
        await copyFile(config, join(tmp, KERNEL_CONFIG));
        await chmod(join(tmp, KERNEL_CONFIG), 0o644);
      }
      let hasModules = false;
      const modRoot = join(scratch, "modroot");
      if (modulesDir) {
        const dest = join(modRoot, "lib", "modules", release);
        await mkdir(join(modRoot, "lib", "modules"), { recursive: true });
        if (modulesDir.startsWith(scratch)) await rename(modulesDir, dest);
        else await cp(modulesDir, dest, { recursive: true, verbatimSymlinks: true });
        // build/ and source/ point into a kernel tree on the build host: useless in the guest.
        await rm(join(dest, "build"), { force: true, recursive: true });
        await rm(join(dest, "source"), { force: true, recursive: true });
        log(`depmod -b ${basename(modRoot)} ${release}`);
        await run("depmod", ["-b", modRoot, release], { failCode: "host" });
        hasModules = true;
      }
      const { names: initrdModules, ninep } = await this.buildInitrd(tmp, scratch, join(modRoot, "lib", "modules", release), hasModules, release, log);
      if (hasModules) await makeModulesDisk(join(modRoot, "lib", "modules", release), join(tmp, MODULES_DISK), log);
      await rm(scratch, { recursive: true, force: true });
      const manifest: KernelManifest = {
        name, release, source, hasModules, initrdModules, ninep,
        createdAt: new Date().toISOString(), addSeconds: (Date.now() - started) / 1000,
        ...(o.build ? { build: o.build } : {}),
      };
      await writeFile(join(tmp, MANIFEST), JSON.stringify(manifest, null, 2) + "\n");
      await rm(join(tmp, ".owner"), { force: true });
      if (o.replace && existsSync(this.pathOf(name))) {
        const old = join(this.root, `.old-${name}-${randomBytes(4).toString("hex")}`);
        await rename(this.pathOf(name), old);
        await rm(old, { recursive: true, force: true });
      }
      try {
        await rename(tmp, this.pathOf(name));
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === "ENOTEMPTY" || code === "EEXIST") throw new ConfigError(`a kernel named "${name}" was added by another civm meanwhile`);
        throw e;
      }
      const k = await this.get(name);
      if (!k) throw new CivmError("internal", `kernel ${name} was stored but cannot be read back from ${this.pathOf(name)}`);
      return k;
    } catch (e) {
      await rm(tmp, { recursive: true, force: true });
      throw e;
    }
  }

  /** A scratch folder in the store (.tmp-<what>-<rand>, swept once this civm is gone). */
  async workDir(what: string): Promise<string> {
    await mkdir(this.root, { recursive: true, mode: 0o755 });
    await this.sweep();
    const dir = join(this.root, `.tmp-${what}-${randomBytes(4).toString("hex")}`);
    await mkdir(dir, { mode: 0o755 });
    await writeFile(join(dir, ".owner"), `${process.pid}\n`);
    return dir;
  }

  /** Removes .tmp-/.old- folders whose civm is gone. */
  private async sweep(): Promise<void> {
    for (const n of await readdir(this.root).catch(() => [] as string[])) {
      if (!n.startsWith(".tmp-") && !n.startsWith(".old-")) continue;
      const dir = join(this.root, n);
      const pid = Number((await readFile(join(dir, ".owner"), "utf8").catch(() => "")).trim());
      let alive = false;
      if (pid > 0) {
        try {
          process.kill(pid, 0);
          alive = true;
        } catch {
          /* gone */
        }
      }
      if (!alive) await rm(dir, { recursive: true, force: true });
    }
  }

  /** Gets the kernel and its modules from the source into `scratch` (or points at them in place). */
  private async fetch(o: AddKernelOptions, cwd: string, scratch: string, log: (l: string) => void): Promise<{ source: KernelSource; release: string; vmlinuz: string; modulesDir: string | undefined }> {
    const src = o.source;
    const asPath = resolve(cwd, src);
    if (existsSync(asPath)) {
      const st = await stat(asPath);
      if (st.isDirectory()) return this.fromDir(asPath, o.modules ? resolve(cwd, o.modules) : undefined);
      if (asPath.endsWith(".deb")) return this.fromDeb(asPath, scratch, { kind: "deb", path: asPath }, log);
      return this.fromBzImage(asPath, o.modules ? resolve(cwd, o.modules) : undefined);
    }
    if (looksLikePath(src)) throw new ConfigError(`${src}: no such file or folder (a kernel: a bzImage, a .deb, or a folder with boot/ and lib/modules/)`);
    if (o.modules) throw new ConfigError("--modules is for a bzImage source; a Debian package brings its own modules");
    if (!DEB_PACKAGE_RE.test(src) || !src.startsWith("linux-image-")) {
      const lvh = await findLvhKernels(o.lvhKernels, cwd);
      const known = lvh?.kernels.find((k) => k.name === src);
      if (known) {
        throw new ConfigError(
          `${lvh!.file} (lvh) defines kernel "${src}"${known.url ? ` from ${known.url}` : ""}: kernel add takes built kernels. ` +
            `Build it with: civm kernel build ${src}${o.lvhKernels ? ` --kernels-file ${o.lvhKernels}` : ""} (or add lvh's build of it: civm kernel add ${o.name} <lvh dir>/kernels/${src}/tar-install).`,
        );
      }
      throw new ConfigError(
        `"${src}" is neither a file nor a Debian kernel package (linux-image-...). ` +
          `Give a package such as linux-image-amd64 or linux-image-cloud-amd64 (apt-cache search --names-only '^linux-image-'), a .deb, a bzImage, or a folder with boot/ and lib/modules/.`,
      );
    }
    let pkg = src;
    await packageVersion(pkg); // unknown package: a ConfigError with a hint
    if (!/^linux-image-\d/.test(pkg)) {
      const dep = await dependsOnKernelPackage(pkg);
      if (dep) {
        log(`${pkg} depends on ${dep}`);
        pkg = dep;
      }
    }
    const version = await packageVersion(pkg);
    const dl = join(scratch, "dl");
    await mkdir(dl);
    log(`apt-get download ${pkg} (${version})`);
    const deb = await aptDownload(pkg, dl);
    return this.fromDeb(deb, scratch, { kind: "package", package: pkg, version }, log);
  }

  private async fromDeb(deb: string, scratch: string, source: KernelSource, log: (l: string) => void): Promise<{ source: KernelSource; release: string; vmlinuz: string; modulesDir: string | undefined }> {
    const fields = await debFields(deb).catch(() => ({}) as Record<string, string>);
    if (source.kind === "deb") {
      if (!fields.Package) throw new ConfigError(`${deb} is not a Debian package (dpkg-deb -f cannot read it)`);
      source.package = fields.Package;
      source.version = fields.Version;
    }
    const x = join(scratch, "x");
    log(`dpkg-deb -x ${basename(deb)}`);
    await extractDeb(deb, x);
    const found = await this.fromDir(x, undefined).catch((e: unknown) => {
      throw new ConfigError(`${basename(deb)} holds no kernel (${(e as Error).message}); give a linux-image-* package`);
    });
    return { ...found, source };
  }

  private async fromBzImage(path: string, modules: string | undefined): Promise<{ source: KernelSource; release: string; vmlinuz: string; modulesDir: string | undefined }> {
    const info = await readBzImage(path);
    if (!info) throw new ConfigError(`${path} is not an x86 bzImage (no "HdrS" boot header); give a bzImage, a .deb or a linux-image-* package`);
    let modulesDir: string | undefined;
    if (modules) modulesDir = await this.modulesIn(modules, info.release);
    return { source: { kind: "bzimage", path }, release: info.release, vmlinuz: path, modulesDir };
  }

  /** A folder: lvh's tar-install layout (boot/, lib/modules/), a kernel build tree, or one holding vmlinuz/bzImage. */
  private async fromDir(dir: string, modules: string | undefined): Promise<{ source: KernelSource; release: string; vmlinuz: string; modulesDir: string | undefined }> {
    const candidates: string[] = [];
    for (const sub of ["boot", "."]) {
      const names = await readdir(join(dir, sub)).catch(() => [] as string[]);
      for (const n of names.sort().reverse()) if (/^(vmlinuz|bzImage)(-|$)/.test(n)) candidates.push(join(dir, sub, n));
    }
    if (existsSync(join(dir, "arch", "x86", "boot", "bzImage"))) candidates.push(join(dir, "arch", "x86", "boot", "bzImage"));
    const kernels: { path: string; release: string }[] = [];
    for (const c of candidates) {
      const info = (await stat(c)).isFile() ? await readBzImage(c) : undefined;
      if (info) kernels.push({ path: c, release: info.release });
    }
    if (kernels.length === 0) throw new ConfigError(`${dir}: no kernel found (looked for boot/vmlinuz-*, boot/bzImage, vmlinuz, bzImage, arch/x86/boot/bzImage)`);
    const releases = [...new Set(kernels.map((k) => k.release))];
    if (releases.length > 1) throw new ConfigError(`${dir}: several kernels (${releases.join(", ")}); give the bzImage file itself and --modules`);
    const k = kernels[0]!;
    let modulesDir: string | undefined;
    if (modules) modulesDir = await this.modulesIn(modules, k.release);
    else if (existsSync(join(dir, "lib", "modules", k.release))) modulesDir = join(dir, "lib", "modules", k.release);
    return { source: { kind: "dir", path: dir }, release: k.release, vmlinuz: k.path, modulesDir };
  }

  /** lib/modules/<release> given as itself, or as a folder holding lib/modules/<release>. */
  private async modulesIn(dir: string, release: string): Promise<string> {
    for (const d of [join(dir, "lib", "modules", release), join(dir, release), dir]) {
      if (existsSync(join(d, "modules.order")) || existsSync(join(d, "modules.dep")) || existsSync(join(d, "kernel"))) {
        if (d === dir && basename(dir) !== release) {
          throw new ConfigError(`--modules ${dir}: the folder must be lib/modules/${release} (the kernel's release) or hold it`);
        }
        return d;
      }
    }
    throw new ConfigError(`--modules ${dir}: no modules of ${release} there (expected lib/modules/${release}/ with modules.order or kernel/)`);
  }

  private async buildInitrd(tmp: string, scratch: string, modDir: string, hasModules: boolean, release: string, log: (l: string) => void): Promise<{ names: string[]; ninep: boolean | null }> {
    const tree = join(scratch, "initramfs");
    const busybox = await staticBusybox(scratch, log);
    await busyboxTree(tree, busybox, ["newroot", "etc/civm"]);
    await writeFile(join(tree, "init"), INITRD_INIT, { mode: 0o755 });
    let names: string[] = [];
    let inTree: string[] = [];
    let ninep: boolean | null = null;
    if (hasModules) {
      const { dep, builtin } = await readModuleIndex(modDir);
      const known = new Set([...dep.split("\n").map((l) => l.split(":")[0] ?? ""), ...builtin.split("\n")].filter(Boolean).map(moduleName));
      ninep = known.has("9p") && known.has("9pnet_virtio");
      if (!ninep) log("this kernel has no virtio-9p (9p, 9pnet_virtio): VMs booting it cannot use --host-mount");
      const paths = resolveModules(dep, builtin, INITRD_MODULES, { optional: INITRD_MODULES });
      inTree = await copyModules(tree, modDir, release, paths);
      names = paths.map((p) => basename(p).replace(/\.ko(\.(xz|gz|zst))?$/, ""));
      await writeFile(join(tree, "etc", "civm", "has-modules"), "");
    }
    await writeFile(join(tree, "etc", "civm", "modules"), inTree.map((p) => p + "\n").join(""));
    log(`initrd: busybox + ${names.length} modules${names.length ? ` (${names.join(" ")})` : ""}`);
    await packInitramfs(tree, join(tmp, "initrd.img"), scratch);
    return { names, ninep };
  }
}

/** An ext4 filesystem (label civm-modules, no journal: it is only ever mounted read-only) holding `dir`. */
async function makeModulesDisk(dir: string, file: string, log: (l: string) => void): Promise<void> {
  const { estimateNeededBytes, createSparseFile } = await import("../images/disk.js");
  const size = await estimateNeededBytes(dir);
  await createSparseFile(file, size);
  log(`modules disk: mke2fs -d (${Math.round(size / 1024 / 1024)} MiB)`);
  await run("mke2fs", ["-q", "-F", "-t", "ext4", "-L", MODULES_LABEL, "-O", "^has_journal", "-m", "0", "-E", "root_owner=0:0", "-d", dir, file, `${Math.floor(size / 1024)}k`], { failCode: "host" });
  await chmod(file, 0o644);
}
