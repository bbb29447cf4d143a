// Stage 1a of `civm image build` for root images: mmdebstrap builds the root tree as a plain
// directory, then the spec's actions are applied inside it by --customize-hook scripts, in
// order. File operations run through `chroot`, so absolute symlinks in the tree resolve inside
// the image, never on the host. `provision` actions are not run here: they need the booted
// system and are handed back to the caller (the VM stage).
//
// No loop devices and no image mounts: mmdebstrap's root mode only bind-mounts /dev, /proc and
// /sys into the tree while it runs (and unmounts them). Hooks run as root on the host.
import { mkdir, readFile, readdir, rm, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { basename, join } from "node:path";
import { CivmError, ConfigError, ExternalError, HostError } from "../errors/index.js";
import { ToolError, missingProgram, run, which } from "../exec/index.js";
import { shq } from "./shell.js";
import { ARCH_INFO, hostArch } from "../vm/arch.js";
import { describeImage } from "./spec.js";
import type { ImageAction, ImageSpec, ProvisionAction } from "./types.js";

/** Packages every root image gets besides its kernel: what a systemd boot from disk needs. */
export const BASE_PACKAGES: readonly string[] = [
  "systemd-sysv",
  "udev",
  "initramfs-tools",
  "zstd",
  "e2fsprogs",
  // The bootloader is installed in the VM stage (grub-install); grub-pc-bin and grub2-common
  // hold everything it needs without grub-pc's debconf questions.
  "grub-pc-bin",
  "grub2-common",
];

/**
 * Modules the initrd carries (MODULES=list instead of Debian's "most": a small initrd boots
 * faster; MODULES=dep would detect the build host's modules). They are only included, not
 * force-loaded: udev in the initrd loads what the VM's devices need. Only what can hold the
 * root filesystem (virtio, SCSI, IDE and SATA disks, ext4): the CD-ROM, 9p, network and console
 * drivers load from the root filesystem once systemd-udevd runs, in parallel with the rest of
 * the boot, instead of being probed one by one before the root is mounted.
 */
export const INITRAMFS_MODULES: readonly string[] = [
  "virtio_pci",
  "virtio_blk",
  "virtio_scsi",
  "sd_mod",
  "ata_piix",
  "ahci",
  "ext4",
  "crc32c_generic",
];

/** Label of the root filesystem; fstab mounts / by it. */
export const ROOT_LABEL = "civm-root";
export const DEFAULT_HOSTNAME = "civm";

export type RootfsStep =
  | "setup"
  | "update"
  | "download"
  | "extract"
  | "install-essential"
  | "install"
  | "customize"
  | "cleanup"
  | "done";

export interface RootfsProgress {
  step: RootfsStep;
  /** One line for humans, e.g. "installing packages" or "action 3/9: run systemctl mask ...". */
  message: string;
  /** Milliseconds since mmdebstrap started. */
  elapsedMs: number;
}

export interface BuildRootTreeOptions {
  /** A root image (no parent). */
  spec: ImageSpec;
  /** Scratch folder (must exist); the tree is built in WORKDIR/rootfs, hooks in WORKDIR/hooks. */
  workDir: string;
  /** Every line mmdebstrap and the hooks print (the build log). */
  log?: (line: string) => void;
  onProgress?: (p: RootfsProgress) => void;
  /** Keep downloaded .deb files here across builds (apt verifies them before use). No spaces. */
  aptCacheDir?: string;
  /** mmdebstrap mode; only "root" is supported so far. */
  mode?: "root" | "unshare";
  /** Give up after this long (default 60 minutes). */
  timeoutMs?: number;
  /** Ends mmdebstrap (the tree is removed) when the build is interrupted. */
  signal?: AbortSignal;
}

export interface RootTree {
  /** The root directory. */
  tree: string;
  /** Provision actions, in order, to run in the booted image (with their spec index). */
  provision: { index: number; action: ProvisionAction }[];
  /** Installed packages: name -> version. */
  packages: Record<string, string>;
  /** Kernel release found in /boot (e.g. "6.1.0-50-amd64"). */
  kernelRelease?: string;
  seconds: number;
}

/** The packages mmdebstrap installs for a root image: base, kernel, then the spec's. */
export function includedPackages(spec: ImageSpec): string[] {
  // arm64 images boot by their kernel only (no BIOS GRUB: grub-pc-bin is x86's).
  const base = spec.arch === "arm64" ? BASE_PACKAGES.filter((p) => !p.startsWith("grub")) : BASE_PACKAGES;
  return [...new Set([...base, spec.kernel ?? (spec.arch === "arm64" ? "linux-image-arm64" : "linux-image-amd64"), ...spec.packages])];
}

/** ata_piix is x86's (PIIX IDE); arm64's virt machine has virtio and SCSI only. */
export function initramfsModules(spec: ImageSpec): readonly string[] {
  return spec.arch === "arm64" ? INITRAMFS_MODULES.filter((m) => m !== "ata_piix") : INITRAMFS_MODULES;
}

interface HookFile {
  name: string;
  text: string;
  /** Extra files the script reads (write contents), name -> content. */
  data?: Record<string, string>;
}

/** Builds the root tree of a root image; returns it with the provision actions left to run. */
export async function buildRootTree(opts: BuildRootTreeOptions): Promise<RootTree> {
  const { spec, workDir } = opts;
  const log = opts.log ?? (() => {});
  if (spec.parent !== undefined) {
    throw new CivmError("internal", `buildRootTree: ${spec.name} has a parent (${spec.parent}); only root images are built with mmdebstrap`);
  }
  if ((opts.mode ?? "root") !== "root") {
    throw new HostError(`mmdebstrap --mode=${opts.mode} is not supported yet by civm image build; run it as root (--mode=root).`);
  }
  if (typeof process.getuid === "function" && process.getuid() !== 0) {
    throw new HostError("building a root image needs root (mmdebstrap --mode=root, chroot); run civm image build as root.");
  }
  const tree = join(workDir, "rootfs");
  const hooksDir = join(workDir, "hooks");
  await removeTree(tree);
  await rm(hooksDir, { recursive: true, force: true });
  await mkdir(hooksDir, { recursive: true });

  const plan = planHooks(spec, hooksDir, opts.aptCacheDir, log);
  for (const h of plan.files) {
    await writeFile(join(hooksDir, h.name), h.text, { mode: 0o755 });
    for (const [n, content] of Object.entries(h.data ?? {})) await writeFile(join(hooksDir, n), content, { mode: 0o600 });
  }
  const args = [...plan.args, spec.suite, tree, spec.mirror];
  log(`$ mmdebstrap ${args.map(shq).join(" ")}`);

  const started = Date.now();
  const progress = new ProgressParser(started, log, opts.onProgress);
  progress.emit("setup", `mmdebstrap ${spec.suite} from ${spec.mirror}`);
  // mmdebstrap bind-mounts /dev, /proc and /sys into the tree. In a private mount namespace
  // of its own those mounts vanish with it, however it ends (SIGKILL, civm killed), so an
  // interrupted build never leaves mounts behind under the work dir.
  if (!(await which("mmdebstrap"))) throw missingProgram("mmdebstrap");
  if (spec.arch && spec.arch !== hostArch()) await requireBinfmt(spec);
  try {
    await run("unshare", ["--mount", "--propagation", "private", "--", "mmdebstrap", ...args], {
      timeoutMs: opts.timeoutMs ?? 60 * 60 * 1000,
      onStderr: (c) => progress.feed(c),
      onStdout: (c) => progress.feed(c),
      env: { ...process.env, LC_ALL: "C.UTF-8" },
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
  } catch (e) {
    progress.flush();
    await removeTree(tree).catch((err: unknown) => log(`warning: could not remove ${tree}: ${(err as Error).message}`));
    if (opts.signal?.aborted) throw e;
    throw explainFailure(e, spec, progress);
  }
  progress.flush();
  const packages = await listPackages(tree);
  const kernelRelease = await findKernelRelease(tree);
  const seconds = (Date.now() - started) / 1000;
  progress.emit("done", `root tree ready (${Object.keys(packages).length} packages) in ${seconds.toFixed(1)} s`);
  const provision = spec.actions.flatMap((action, index) => (action.kind === "provision" ? [{ index, action }] : []));
  return { tree, provision, packages, ...(kernelRelease ? { kernelRelease } : {}), seconds };
}

// ---------------------------------------------------------------- mmdebstrap arguments and hooks

export interface HookPlan {
  args: string[];
  files: HookFile[];
}

/** mmdebstrap's options (without SUITE TARGET MIRROR) and the hook scripts they run. Pure. */
export function planHooks(spec: ImageSpec, hooksDir: string, aptCacheDir?: string, log: (l: string) => void = () => {}): HookPlan {
  const files: HookFile[] = [];
  const hook = (name: string, text: string, data?: Record<string, string>): string => {
    files.push({ name, text, ...(data ? { data } : {}) });
    return `sh ${shq(join(hooksDir, name))} "$1"`;
  };
  const args = ["--mode=root", "--variant=minbase", "--format=directory", `--include=${includedPackages(spec).join(",")}`];
  // Another architecture's tree: its programs (dpkg, maintainer scripts, hooks' chroot) run
  // through qemu-user, registered with binfmt_misc (checked before mmdebstrap starts).
  if (spec.arch && spec.arch !== "x86_64") args.push(`--architectures=${ARCH_INFO[spec.arch].debianArch}`);
  // No translations: a faster apt-get update, in the build and in the image.
  args.push(`--aptopt=Acquire::Languages "none"`);
  let cache = aptCacheDir;
  if (cache !== undefined && /\s/.test(cache)) {
    log(`note: not caching .deb files: the cache path ${cache} contains spaces`);
    cache = undefined;
  }
  if (cache !== undefined) {
    args.push("--skip=essential/unlink");
    args.push(`--setup-hook=mkdir -p ${shq(cache)} "$1/var/cache/apt/archives/"`);
    args.push(`--setup-hook=sync-in ${cache} /var/cache/apt/archives/`);
  }
  // dpkg without fsync for the build only (a third faster); removed at the end.
  args.push(`--setup-hook=${hook("00-setup.sh", SETUP_SCRIPT)}`);
  args.push(`--essential-hook=${hook("10-initramfs.sh", initramfsScript(initramfsModules(spec)))}`);
  args.push(`--customize-hook=${hook("20-base.sh", baseScript())}`);
  // Before the actions: a `run: apt-get clean` must not empty the cache first.
  if (cache !== undefined) args.push(`--customize-hook=sync-out /var/cache/apt/archives ${cache}`);
  const total = spec.actions.length;
  spec.actions.forEach((action, i) => {
    const h = actionHook(action, i, total, hooksDir);
    if (!h) return;
    args.push(`--customize-hook=${hook(h.name, h.text, h.data)}`);
  });
  args.push(`--customize-hook=${hook("90-finish.sh", FINISH_SCRIPT)}`);
  return { args, files };
}

const PREAMBLE = `#!/bin/sh
# Written by civm image build; run by mmdebstrap with the root tree as $1.
set -eu
root=$1
umask 022
in_root() {
  chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive \\
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
`;

const SETUP_SCRIPT = `${PREAMBLE}
mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
echo force-unsafe-io > "$root/etc/dpkg/dpkg.cfg.d/zz-civm-build"
`;

export function initramfsScript(modules: readonly string[] = INITRAMFS_MODULES): string {
  return `${PREAMBLE}
# Before the kernel is installed: a small initrd with the modules a VM needs.
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/etc/initramfs-tools/hooks"
cat > "$root/etc/initramfs-tools/conf.d/civm.conf" <<'EOF'
# civm: only the modules listed by hooks/civm-modules (not "most": a smaller, faster initrd).
MODULES=list
EOF
cat > "$root/etc/initramfs-tools/hooks/civm-modules" <<'EOF'
#!/bin/sh
# civm: storage, network, console and 9p modules for QEMU VMs (udev loads what is present).
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
manual_add_modules ${modules.join(" ")}
EOF
chmod 0755 "$root/etc/initramfs-tools/hooks/civm-modules"
`;
}

function baseScript(): string {
  return `${PREAMBLE}
echo "civm-hook: base system (fstab, hostname, DNS for the build)" >&2
# Hooks that need DNS (apt, curl) get the host's resolver even if a package (systemd-resolved)
# turned /etc/resolv.conf into a link to a file that only exists at run time.
if [ -L "$root/etc/resolv.conf" ] && [ ! -e "$root/etc/resolv.conf" ]; then
  readlink "$root/etc/resolv.conf" > "$root/etc/.civm-resolv-link"
  rm -f "$root/etc/resolv.conf"
  cat /etc/resolv.conf > "$root/etc/resolv.conf"
fi
cat > "$root/etc/fstab" <<'EOF'
# <file system>    <mount point> <type> <options>                <dump> <pass>
LABEL=${ROOT_LABEL}     /             ext4   defaults,errors=remount-ro 0      1
EOF
echo ${DEFAULT_HOSTNAME} > "$root/etc/hostname"
if [ ! -s "$root/etc/hosts" ]; then
  printf '127.0.0.1\\tlocalhost\\n127.0.1.1\\t${DEFAULT_HOSTNAME}\\n\\n::1\\tlocalhost ip6-localhost ip6-loopback\\nff02::1\\tip6-allnodes\\nff02::2\\tip6-allrouters\\n' > "$root/etc/hosts"
fi
`;
}

const FINISH_SCRIPT = `${PREAMBLE}
echo "civm-hook: finishing" >&2
rm -f "$root/etc/dpkg/dpkg.cfg.d/zz-civm-build"
rm -rf "$root"/tmp/civm-stage-*
# Put back the run-time resolv.conf link, or drop the host's resolver copied in for the build.
if [ -f "$root/etc/.civm-resolv-link" ]; then
  rm -f "$root/etc/resolv.conf"
  ln -s "$(cat "$root/etc/.civm-resolv-link")" "$root/etc/resolv.conf"
  rm -f "$root/etc/.civm-resolv-link"
elif [ -f "$root/etc/resolv.conf" ] && [ ! -L "$root/etc/resolv.conf" ] && cmp -s /etc/resolv.conf "$root/etc/resolv.conf"; then
  rm -f "$root/etc/resolv.conf"
fi
`;

/** One-line description of an action for progress and errors. */
export function describeAction(a: ImageAction): string {
  const short = (s: string) => {
    const one = s.replace(/\s+/g, " ").trim();
    return one.length > 60 ? `${one.slice(0, 57)}...` : one;
  };
  switch (a.kind) {
    case "run":
      return `run ${short(a.command)}`;
    case "copy":
      return `copy ${a.src} to ${a.dest}`;
    case "write":
      return `write ${a.path}`;
    case "mkdir":
      return `mkdir ${a.path}`;
    case "symlink":
      return `symlink ${a.path} -> ${a.target}`;
    case "append-line":
      return `append-line to ${a.file}`;
    case "set-hostname":
      return `set-hostname ${a.hostname}`;
    case "enable-service":
      return `enable-service ${a.unit}`;
    case "provision":
      return a.script ? `provision ${a.script.src}` : `provision ${short(a.inline ?? "")}`;
    case "install-kernel":
      return `install-kernel ${a.kernel}`;
  }
}

function modeArg(mode: number | undefined): string {
  return mode === undefined ? "''" : shq(`0${mode.toString(8)}`);
}

/** The hook script for one action (undefined for provision, which runs in the VM stage). */
export function actionHook(a: ImageAction, index: number, total: number, hooksDir: string): HookFile | undefined {
  if (a.kind === "provision") return undefined;
  const n = String(index + 1).padStart(3, "0");
  const name = `50-action-${n}.sh`;
  const label = `${index + 1}/${total}`;
  let body: string;
  let data: Record<string, string> | undefined;
  const stage = `/tmp/civm-stage-${n}`;
  switch (a.kind) {
    case "run":
      body = `in_root /bin/sh -e -c ${shq(a.command)}`;
      break;
    case "copy": {
      const base = basename(a.srcPath);
      body = `rm -rf "$root${stage}"
mkdir -p "$root${stage}"
cp -R -H --preserve=mode,timestamps,links ${shq(a.srcPath)} "$root${stage}/"${shq(base)}
in_root /bin/sh -e -c '
src=$1 dest=$2 mode=$3
case $dest in */) mkdir -p "$dest" ;; *) mkdir -p "$(dirname "$dest")" ;; esac
if [ -d "$dest" ]; then final="\${dest%/}/\${src##*/}"; else final=$dest; fi
cp -R --preserve=mode,timestamps,links "$src" "$dest"
[ -z "$mode" ] || chmod "$mode" "$final"
' sh ${shq(`${stage}/${base}`)} ${shq(a.dest)} ${modeArg(a.mode)}
rm -rf "$root${stage}"`;
      break;
    }
    case "write": {
      const content = `50-action-${n}.content`;
      data = { [content]: a.content };
      body = `mkdir -p "$root/tmp"
cp ${shq(join(hooksDir, content))} "$root${stage}"
in_root /bin/sh -e -c '
f=$1 path=$2 mode=$3
mkdir -p "$(dirname "$path")"
[ ! -L "$path" ] || rm -f "$path"
cat "$f" > "$path"
[ -z "$mode" ] || chmod "$mode" "$path"
rm -f "$f"
' sh ${stage} ${shq(a.path)} ${modeArg(a.mode)}`;
      break;
    }
    case "mkdir":
      body = `in_root /bin/sh -e -c 'mkdir -p "$1"; [ -z "$2" ] || chmod "$2" "$1"' sh ${shq(a.path)} ${modeArg(a.mode)}`;
      break;
    case "symlink":
      body = `in_root /bin/sh -e -c 'mkdir -p "$(dirname "$2")"; ln -sfn "$1" "$2"' sh ${shq(a.target)} ${shq(a.path)}`;
      break;
    case "append-line":
      body = `in_root /bin/sh -e -c '
f=$1
mkdir -p "$(dirname "$f")"
if [ -s "$f" ] && [ -n "$(tail -c 1 "$f")" ]; then echo >> "$f"; fi
printf "%s\\n" "$2" >> "$f"
' sh ${shq(a.file)} ${shq(a.line)}`;
      break;
    case "set-hostname":
      body = `in_root /bin/sh -e -c '
name=$1 short=\${1%%.*}
if [ "$short" = "$name" ]; then names=$name; else names="$name $short"; fi
printf "%s\\n" "$name" > /etc/hostname
if [ -f /etc/hosts ] && grep -q "^127\\.0\\.1\\.1[[:space:]]" /etc/hosts; then
  sed -i "s/^127\\.0\\.1\\.1[[:space:]].*/127.0.1.1\\t$names/" /etc/hosts
else
  printf "127.0.1.1\\t%s\\n" "$names" >> /etc/hosts
fi
' sh ${shq(a.hostname)}`;
      break;
    case "enable-service":
      body = `in_root systemctl enable ${shq(a.unit)}`;
      break;
    case "install-kernel":
      throw new Error(`install-kernel ${a.kernel} must be expanded (images/install-kernel.ts) before the build`);
  }
  const text = `${PREAMBLE}
echo ${shq(`civm-hook: begin ${index} ${label} ${describeAction(a)}`)} >&2
${body}
echo ${shq(`civm-hook: end ${index}`)} >&2
`;
  return { name, text, ...(data ? { data } : {}) };
}

// ---------------------------------------------------------------- progress and errors

const STEP_LINES: [RegExp, RootfsStep, string][] = [
  [/^I: running apt-get update/, "update", "updating package lists"],
  [/^I: downloading packages/, "download", "downloading packages"],
  [/^I: extracting archives/, "extract", "extracting essential packages"],
  [/^I: installing essential packages/, "install-essential", "installing essential packages"],
  [/^I: installing remaining packages/, "install", "installing packages"],
  [/^I: cleaning package lists/, "cleanup", "cleaning up"],
];

class ProgressParser {
  private partial = "";
  /** Every line so far (for error messages). */
  readonly lines: string[] = [];
  /** Spec index of the action whose hook began and has not ended. */
  openAction: number | undefined;
  openActionLine = 0;

  constructor(
    private readonly started: number,
    private readonly log: (l: string) => void,
    private readonly onProgress?: (p: RootfsProgress) => void,
  ) {}

  emit(step: RootfsStep, message: string): void {
    this.onProgress?.({ step, message, elapsedMs: Date.now() - this.started });
  }

  feed(chunk: string): void {
    const text = this.partial + chunk;
    const parts = text.split(/\r?\n|\r/);
    this.partial = parts.pop() ?? "";
    for (const line of parts) this.line(line);
  }

  flush(): void {
    if (this.partial) this.line(this.partial);
    this.partial = "";
  }

  private line(line: string): void {
    if (line.trim() === "") return;
    this.lines.push(line);
    this.log(line);
    for (const [re, step, message] of STEP_LINES) {
      if (re.test(line)) return this.emit(step, message);
    }
    const begin = /^civm-hook: begin (\d+) (\d+\/\d+) (.*)$/.exec(line);
    if (begin) {
      this.openAction = Number(begin[1]);
      this.openActionLine = this.lines.length;
      return this.emit("customize", `action ${begin[2]}: ${begin[3]}`);
    }
    if (/^civm-hook: end \d+$/.test(line)) {
      this.openAction = undefined;
      return;
    }
    const other = /^civm-hook: (.*)$/.exec(line);
    if (other) this.emit("customize", other[1] as string);
  }
}

const MISSING_PACKAGE_RES = [
  /^E: Unable to locate package (\S+)/,
  /^E: Package '([^']+)' has no installation candidate/,
  /^E: Couldn't find any package by (?:glob|regex) '([^']+)'/,
  /^E: Version '[^']*' for '([^']+)' was not found/,
  /^E: Release '[^']*' for '([^']+)' was not found/,
];

function explainFailure(e: unknown, spec: ImageSpec, progress: ProgressParser): unknown {
  if (!(e instanceof ToolError)) return e;
  const lines = progress.lines;
  const where = describeImage(spec);
  if (progress.openAction !== undefined) {
    const i = progress.openAction;
    const action = spec.actions[i] as ImageAction;
    const output = lines.slice(progress.openActionLine).filter((l) => !/^(I|E): /.test(l) || /^E: (?!setup failed|mmdebstrap failed)/.test(l));
    return new ConfigError(`${where}: field "actions[${i}]" (${describeAction(action)}) failed while building the root tree.`, {
      cause: e,
      details: output.slice(-20).join("\n") || undefined,
    });
  }
  const missing: string[] = [];
  const complaints: string[] = [];
  for (const l of lines) {
    for (const re of MISSING_PACKAGE_RES) {
      const m = re.exec(l);
      if (m) {
        missing.push(m[1] as string);
        complaints.push(l);
      }
    }
  }
  if (missing.length > 0) {
    const names = [...new Set(missing)];
    const kernel = spec.kernel !== undefined && names.some((n) => n === spec.kernel || spec.kernel?.startsWith(`${n}=`));
    const field = kernel ? "kernel" : "packages";
    const list = names.map((n) => JSON.stringify(n)).join(", ");
    return new ConfigError(
      `${where}: field "${field}": ${names.length > 1 ? "packages" : "package"} ${list} not found in Debian ${spec.suite} (${spec.mirror}), so mmdebstrap failed. Fix the name (apt-cache search NAME) or remove it. mmdebstrap said:\n${[...new Set(complaints)].map((c) => `  ${c}`).join("\n")}`,
      { cause: e },
    );
  }
  const net = lines.find((l) => /(Temporary failure resolving|Could not resolve|Failed to fetch|Unable to connect|Connection (refused|timed out))/.test(l));
  if (net) {
    return new ExternalError(`${where}: mmdebstrap could not download from ${spec.mirror}: ${net.replace(/^\S+:\s*/, "")}`, {
      cause: e,
      details: lines.slice(-15).join("\n"),
    });
  }
  return new CivmError("internal", `${where}: mmdebstrap failed (exit ${e.exitStatus ?? "?"}) while building the root tree.`, {
    cause: e,
    details: lines.slice(-15).join("\n"),
  });
}

// ---------------------------------------------------------------- helpers shared with disk.ts

/** Installed packages of a root tree (name -> version), read from its dpkg database. */
export async function listPackages(tree: string): Promise<Record<string, string>> {
  const admindir = join(tree, "var", "lib", "dpkg");
  if (!existsSync(admindir)) return {};
  const { stdout } = await run("dpkg-query", [`--admindir=${admindir}`, "-W", "-f", "${db:Status-Abbrev}\\t${binary:Package}\\t${Version}\\n"]);
  const out: Record<string, string> = {};
  for (const line of stdout.split("\n")) {
    const [status, name, version] = line.split("\t");
    if (!status?.startsWith("ii") || !name || version === undefined) continue;
    out[name.replace(/:(amd64|arm64)$/, "")] = version;
  }
  return out;
}

/** The newest kernel release with a vmlinuz in TREE/boot, if any. */
export async function findKernelRelease(tree: string): Promise<string | undefined> {
  let names: string[];
  try {
    names = await readdir(join(tree, "boot"));
  } catch {
    return undefined;
  }
  const releases = names.filter((n) => n.startsWith("vmlinuz-")).map((n) => n.slice("vmlinuz-".length));
  releases.sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
  return releases.at(-1);
}

/** Mount points at or below `dir` (from /proc/self/mountinfo). */
export async function mountsUnder(dir: string): Promise<string[]> {
  let text: string;
  try {
    text = await readFile("/proc/self/mountinfo", "utf8");
  } catch {
    return [];
  }
  const prefix = dir.replace(/\/+$/, "");
  return text
    .split("\n")
    .map((l) => l.split(" ")[4])
    .filter((m): m is string => m !== undefined)
    .map((m) => m.replace(/\\040/g, " "))
    .filter((m) => m === prefix || m.startsWith(`${prefix}/`));
}

/** Removes a root tree, refusing while anything is still mounted inside it (mmdebstrap died). */
export async function removeTree(tree: string): Promise<void> {
  if (!existsSync(tree)) return;
  const mounts = await mountsUnder(tree);
  if (mounts.length > 0) {
    throw new HostError(`${tree} still has mounts inside (${mounts.join(", ")}); unmount them (umount -R ${shq(tree)}) before it can be removed.`);
  }
  await run("rm", ["-rf", "--one-file-system", tree]);
}

/**
 * A root tree of another architecture needs binfmt_misc to run its programs through
 * qemu-user (with the F flag: the interpreter is opened at registration, so it works inside
 * the chroot). Refused before mmdebstrap starts, naming the spec, the field and the fix.
 */
async function requireBinfmt(spec: ImageSpec, dir = "/proc/sys/fs/binfmt_misc"): Promise<void> {
  const arch = spec.arch!;
  const info = ARCH_INFO[arch];
  if (!info.binfmt) return;
  const entry = join(dir, info.binfmt.entry);
  const text = await readFile(entry, "utf8").catch(() => undefined);
  if (text !== undefined && /^enabled$/m.test(text) && /^flags:.*F/m.test(text)) return;
  const why = !existsSync(join(dir, "status"))
    ? `binfmt_misc is not mounted at ${dir}`
    : text === undefined
      ? `${entry} does not exist`
      : !/^enabled$/m.test(text) ? `${entry} is disabled` : `${entry} lacks the F flag`;
  throw new HostError(
    `${describeImage(spec)}: field "arch": building an ${arch} root tree on this ${hostArch() ?? process.arch} host runs its programs through qemu-user, and ${why}. ` +
      `Install ${info.binfmt.package} and binfmt-support (apt-get install ${info.binfmt.package} binfmt-support), then mount -t binfmt_misc binfmt_misc ${dir} if it is not mounted and run update-binfmts --enable ${info.binfmt.entry} (civm doctor checks it).`,
  );
}
