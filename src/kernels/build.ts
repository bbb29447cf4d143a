// `civm kernel build NAME`: builds a kernel lvh's kernels.json defines and stores it like
// `civm kernel add` (src/kernels/store.ts). As lvh does it: the base config (`make defconfig`,
// or the entry's `base_config` targets), then `common_opts` and the entry's `opts` through the
// tree's own scripts/config, `make olddefconfig`, `make bzImage modules`, `modules_install`.
// Always out of tree (make O=<work>/out): a local source folder is never written to.
//
// The cache key is a sha256 of the source's fingerprint (source.ts), the base config, the
// options in order, extra make args, the compiler's version and KERNEL_BUILD_VERSION. It is
// kept in the stored kernel's manifest (`build.key`): building a stored kernel whose key is
// unchanged does nothing (`up to date`), `--force` builds again.
import { createHash } from "node:crypto";
import { createWriteStream, existsSync, type WriteStream } from "node:fs";
import { mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { availableParallelism } from "node:os";
import { dirname, join, resolve } from "node:path";
import { ConfigError, CivmError } from "../errors/index.js";
import { run } from "../exec/index.js";
import { didYouMean } from "../config/suggest.js";
import { formatSeconds } from "../vm/format.js";
import { configSymbol, findLvhKernels, kconfigArgs, type KconfigOp, type LvhKernel } from "./lvh.js";
import { describeSource, fingerprintSource, materializeSource, parseKernelUrl } from "./source.js";
import { checkKernelName, KernelStore, type StoredKernel } from "./store.js";

/** Bump when what a build does changes in a way its inputs do not capture. */
export const KERNEL_BUILD_VERSION = 1;

export interface KernelBuildInfo {
  key: string;
  /** kernels.json and the entry's name in it. */
  file: string;
  entry: string;
  source: string;
  baseConfig: string[];
  /** Options that did not end up as asked (a dependency is off, or the option is not in this kernel). */
  notApplied: string[];
  buildSeconds: number;
}

export interface BuildKernelOptions {
  /** The kernels.json entry to build. */
  name: string;
  /** Store it under this name (default: the entry's name). */
  as?: string;
  /** kernels.json (default ./kernels.json, ./_data/kernels.json). */
  kernelsFile?: string;
  force?: boolean;
  jobs?: number;
  stateDir: string;
  logsDir: string;
  cwd?: string;
  log?: (line: string) => void;
}

export interface BuildKernelResult {
  kernel: StoredKernel;
  status: "built" | "up-to-date";
  seconds: number;
  logFile?: string;
}

async function compilerVersion(): Promise<string> {
  try {
    return (await run("gcc", ["--version"], { failCode: "host" })).stdout.split("\n")[0] ?? "";
  } catch {
    return "";
  }
}

/** The wanted final state of each option (the last operation on it wins, as in scripts/config). */
export function wantedStates(ops: readonly KconfigOp[]): Map<string, string> {
  const want = new Map<string, string>();
  for (const o of ops) {
    const sym = configSymbol(o.name);
    if (o.op === "enable") want.set(sym, "y");
    else if (o.op === "module") want.set(sym, "m");
    else if (o.op === "disable" || o.op === "undefine") want.set(sym, "n");
    else if ("value" in o) want.set(sym, o.op === "set-str" ? JSON.stringify(o.value) : o.value);
  }
  return want;
}

/** Options asked to be y/m/a value that the final .config does not have so (disables are never reported: an absent option is off). */
export function notApplied(ops: readonly KconfigOp[], config: string): string[] {
  const have = new Map<string, string>();
  for (const line of config.split("\n")) {
    const m = /^(CONFIG_\w+)=(.*)$/.exec(line);
    if (m) have.set(m[1]!, m[2]!);
  }
  const out: string[] = [];
  for (const [sym, want] of wantedStates(ops)) {
    if (want === "n") continue;
    const got = have.get(sym);
    // A module asked for but built in is more than asked: fine.
    if (got === want || (want === "m" && got === "y")) continue;
    out.push(`${sym}=${want} (is ${got ?? "not set"})`);
  }
  return out;
}

export function buildKey(parts: { source: string; entry: LvhKernel; commonOpts: readonly KconfigOp[]; cc: string }): string {
  return createHash("sha256").update(JSON.stringify({
    v: KERNEL_BUILD_VERSION,
    source: parts.source,
    base: parts.entry.baseConfig,
    ops: [...parts.commonOpts, ...parts.entry.opts].map(kconfigArgs),
    make: parts.entry.extraMakeArgs,
    cc: parts.cc,
    arch: process.arch,
  })).digest("hex");
}

/** Counts what make compiles and says so every `everyMs`. */
class MakeProgress {
  private n = 0;
  private last = "";
  private told = Date.now();
  constructor(private readonly say: (l: string) => void, private readonly started: number, private readonly out: WriteStream, private readonly everyMs = 15_000) {}
  chunk(text: string): void {
    this.out.write(text);
    for (const line of text.split("\n")) {
      const m = /^\s+(CC|LD|AS|AR)\s+(?:\[M\]\s+)?(\S+)/.exec(line);
      if (!m) continue;
      if (m[1] === "CC") this.n++;
      this.last = m[2]!;
    }
    if (Date.now() - this.told >= this.everyMs) {
      this.told = Date.now();
      this.say(`make: ${this.n} files compiled, ${formatSeconds(Date.now() - this.started)} (${this.last})`);
    }
  }
  get compiled(): number {
    return this.n;
  }
}

export async function buildKernel(o: BuildKernelOptions): Promise<BuildKernelResult> {
  const started = Date.now();
  const log = o.log ?? (() => {});
  const cwd = o.cwd ?? process.cwd();
  const lvh = await findLvhKernels(o.kernelsFile, cwd);
  if (!lvh) throw new ConfigError(`no kernels.json here (looked for ./kernels.json and ./_data/kernels.json); give one with --kernels-file FILE (lvh's format: {"kernels": [{"name": ..., "url": ..., "opts": [...]}]})`);
  const index = lvh.kernels.findIndex((k) => k.name === o.name);
  const entry = lvh.kernels[index];
  if (!entry) {
    const names = lvh.kernels.map((k) => k.name);
    throw new ConfigError(`${lvh.file} defines no kernel "${o.name}"${didYouMean(o.name, names)} (it defines ${names.join(", ") || "none"}); give one of those names or add an entry`);
  }
  const storeName = checkKernelName(o.as ?? entry.name);
  const where = `${lvh.file}: kernels[${index}] ("${entry.name}")`;
  if (!entry.url) {
    throw new ConfigError(`${lvh.file}: field "kernels[${index}].url": kernel "${entry.name}" has no source; add "url": a git URL (git://host/repo.git?depth=1#branch), a tarball (an http(s) URL or a path) or a local source folder (relative to kernels.json)`);
  }
  const source = parseKernelUrl(entry.url, dirname(resolve(cwd, lvh.file)), `${lvh.file}: field "kernels[${index}].url"`);
  const fingerprint = await fingerprintSource(source, `${lvh.file}: field "kernels[${index}].url"`);
  const key = buildKey({ source: fingerprint, entry, commonOpts: lvh.commonOpts, cc: await compilerVersion() });
  const store = new KernelStore(o.stateDir);
  const stored = await store.get(storeName);
  if (stored && !o.force && stored.manifest.build?.key === key) {
    log(`up to date (key ${key.slice(0, 12)}, built in ${formatSeconds(stored.manifest.build.buildSeconds * 1000)})`);
    return { kernel: stored, status: "up-to-date", seconds: (Date.now() - started) / 1000 };
  }
  if (stored && !o.force && !stored.manifest.build) {
    throw new ConfigError(`a kernel named "${storeName}" is stored and was not built from ${lvh.file} (civm kernel add); remove it first (civm kernel rm ${storeName}), pass --force to replace it, or build under another name (--name)`);
  }

  // A finished build whose storing failed (disk full, interrupted) is kept here by its key.
  const done = join(store.root, ".built", key);
  if (existsSync(join(done, "build.json"))) {
    const build = JSON.parse(await readFile(join(done, "build.json"), "utf8")) as KernelBuildInfo;
    log(`storing the build made earlier (key ${key.slice(0, 12)}, built in ${formatSeconds(build.buildSeconds * 1000)})`);
    const kernel = await store.add({ name: storeName, source: join(done, "install"), replace: true, build, log });
    await rm(done, { recursive: true, force: true });
    return { kernel, status: "built", seconds: (Date.now() - started) / 1000 };
  }
  await mkdir(o.logsDir, { recursive: true });
  const stamp = new Date().toISOString().replace(/[-:]/g, "").replace(/\..*/, "").replace("T", "-");
  const logFile = join(o.logsDir, `kernel-build-${storeName}-${stamp}.log`);
  const out = createWriteStream(logFile, { mode: 0o640 });
  const work = await store.workDir(`build-${storeName}`);
  try {
    log(`building from ${describeSource(source)} (key ${key.slice(0, 12)}); full log: ${logFile}`);
    const tree = await materializeSource(source, work, join(o.stateDir, "downloads"), log);
    const obj = join(work, "out");
    await mkdir(obj);
    const jobs = o.jobs ?? availableParallelism();
    const progress = new MakeProgress(log, started, out);
    const make = async (what: string, args: string[]): Promise<void> => {
      out.write(`\n$ make ${args.join(" ")}\n`);
      try {
        await run("make", ["-C", tree, `O=${obj}`, ...entry.extraMakeArgs, ...args], { failCode: "external", onStdout: (d) => progress.chunk(d), onStderr: (d) => progress.chunk(d) });
      } catch (e) {
        const tail = (e as { stderr?: string }).stderr?.trim().split("\n").slice(-25).join("\n");
        throw new CivmError("external", `kernel ${entry.name}: ${what} failed (make ${args.join(" ")}); the full log is ${logFile}`, { details: tail });
      }
    };
    log(`make ${entry.baseConfig.join(" ")}`);
    await make("the base config", entry.baseConfig);
    const ops = [...lvh.commonOpts, ...entry.opts];
    if (ops.length) {
      log(`scripts/config: ${lvh.commonOpts.length} common_opts + ${entry.opts.length} opts`);
      out.write(`\n$ scripts/config --file ${join(obj, ".config")} ...\n`);
      await run(join(tree, "scripts", "config"), ["--file", join(obj, ".config"), ...ops.flatMap(kconfigArgs)], { failCode: "config" });
    }
    await make("make olddefconfig", ["olddefconfig"]);
    const config = await readFile(join(obj, ".config"), "utf8");
    const missed = notApplied(ops, config);
    if (missed.length) {
      log(`warning: ${missed.length} option(s) not as asked after olddefconfig (a dependency is off, or the option is not in this kernel): ${missed.slice(0, 12).join(", ")}${missed.length > 12 ? `, … (${missed.length - 12} more in ${logFile})` : ""}`);
      out.write(`\nnot as asked:\n${missed.join("\n")}\n`);
    }
    const modules = /^CONFIG_MODULES=y$/m.test(config);
    log(`make -j${jobs} bzImage${modules ? " modules" : ""}`);
    await make("the build", [`-j${jobs}`, "bzImage", ...(modules ? ["modules"] : [])]);
    const release = (await run("make", ["-s", "-C", tree, `O=${obj}`, ...entry.extraMakeArgs, "kernelrelease"], { failCode: "external" })).stdout.trim().split("\n").pop()!;
    const install = join(work, "install");
    await mkdir(join(install, "boot"), { recursive: true });
    await run("cp", [join(obj, "arch", "x86", "boot", "bzImage"), join(install, "boot", `vmlinuz-${release}`)], { failCode: "internal" });
    // As Debian's kernels have it: /boot/config-<release> (libbpf's __kconfig, mkinitramfs's compression).
    await run("cp", [join(obj, ".config"), join(install, "boot", `config-${release}`)], { failCode: "internal" });
    if (modules) await make("modules_install", [`INSTALL_MOD_PATH=${install}`, "modules_install"]);
    const buildSeconds = (Date.now() - started) / 1000;
    log(`built ${release} in ${formatSeconds(buildSeconds * 1000)} (${progress.compiled} files compiled)`);
    const build: KernelBuildInfo = { key, file: lvh.file, entry: entry.name, source: describeSource(source), baseConfig: entry.baseConfig, notApplied: missed, buildSeconds };
    // Kept until stored: a failure from here on does not cost the build.
    await mkdir(join(store.root, ".built"), { recursive: true });
    await rm(done, { recursive: true, force: true });
    await mkdir(done);
    await rename(install, join(done, "install"));
    await writeFile(join(done, "build.json"), JSON.stringify(build, null, 2) + "\n");
    const kernel = await store.add({ name: storeName, source: join(done, "install"), replace: true, build, log });
    await rm(done, { recursive: true, force: true });
    return { kernel, status: "built", seconds: (Date.now() - started) / 1000, logFile };
  } finally {
    await new Promise<void>((r) => out.end(r));
    await rm(work, { recursive: true, force: true });
  }
}

/** Whether a kernel store entry came from a kernels.json build (for `kernel ls`). */
export function isBuilt(k: StoredKernel): boolean {
  return !!k.manifest.build;
}
