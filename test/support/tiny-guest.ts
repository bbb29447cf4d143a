// A tiny Linux guest for tests that need a real boot but not a real distribution: the
// current Debian kernel (linux-image-amd64) plus an initramfs holding busybox-static, a few
// kernel modules and /init = tiny-guest-init.sh. It reads instance.json from the config CD,
// ejects the CD and then powers off / hangs / reboots / panics / waits for the ACPI power
// button, as config.tiny says (see the init script). Boots in a few seconds under TCG.
//
// Built once per set of inputs (kernel package version, busybox version, init script,
// module list, ...) into testCacheDir/tiny-guest/<sha256 of the inputs>; later calls only
// ask apt/dpkg for the versions (< 1 s). Several processes may build at once: each builds
// into its own temp dir and renames it into place; the loser uses the winner's copy.
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, copyFile, mkdir, mkdtemp, readFile, readdir, rename, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { run } from "../../src/exec/index.js";
import {
  aptDownload, busyboxTree, copyModules, dependsOnKernelPackage, extractDeb, foreignAptOptions, foreignAptUpdate, installedBusybox, moduleName,
  packInitramfs, packageVersion, readModuleIndex, resolveModules, staticBusybox,
} from "../../src/kernels/index.js";
import { ARCH_INFO, type GuestArch } from "../../src/vm/arch.js";
import { repoRoot, testCacheDir } from "./paths.js";

// The module resolution, apt and initramfs helpers live in src/kernels/ (civm kernel add
// builds its initrds the same way); re-exported for existing callers.
export { resolveModules };

export interface TinyGuest {
  /** bzImage of the Debian kernel. */
  kernel: string;
  /** gzip'd newc initramfs (busybox, modules, /init). */
  initrd: string;
  /** 64 MiB empty qcow2: the instance's "image". Shared: use it as a backing file, don't write it. */
  disk: string;
  /** uname -r of the kernel, e.g. 6.1.0-56-amd64. */
  kernelVersion: string;
  /** The guest's architecture (x86_64 unless built with arch: "arm64"). */
  arch: GuestArch;
  /** The cache folder holding the files above (and manifest.json). */
  dir: string;
}

export interface BuildTinyGuestOptions {
  /** Parent cache dir (default testCacheDir); the guest goes to <cacheDir>/tiny-guest/<hash>. */
  cacheDir?: string;
  /** Progress lines (default: stderr). */
  log?: (line: string) => void;
  /**
   * arm64: Debian's linux-image-arm64 and busybox-static:arm64 (from arm64 package lists of
   * the test cache's own, the host's dpkg untouched), an AArch64 eject, cached in
   * <cacheDir>/tiny-guest-arm64/. Boots on qemu-system-aarch64's virt machine.
   */
  arch?: GuestArch;
}

/** Kernel modules the init loads (with their dependencies, resolved from modules.dep). */
export const TINY_GUEST_MODULES = [
  // config CD on the pc machine (IDE) and q35 (AHCI)
  "cdrom",
  "sr_mod",
  "isofs",
  "ata_piix",
  "ahci",
  "libata",
  "scsi_mod",
  "sd_mod",
  // virtio devices
  "virtio_pci",
  "virtio_blk",
  "virtio_net",
  "virtio_scsi",
  "9p",
  "9pnet_virtio",
  // ACPI power button -> /dev/input/event*
  "button",
  "evdev",
] as const;

/**
 * The arm64 guest's modules: no IDE/AHCI (the config CD is a SCSI CD on virtio-scsi), and the
 * virt machine's power button is a GPIO key (gpio_keys) rather than ACPI's.
 */
export const TINY_GUEST_MODULES_ARM64 = [
  "cdrom", "sr_mod", "isofs", "scsi_mod", "sd_mod",
  "virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "9p", "9pnet_virtio",
  "gpio_keys", "evdev",
] as const;

/** Bump when the recipe changes in a way the other inputs don't capture. */
const RECIPE = 1;

export const TINY_GUEST_INIT = join(repoRoot, "test", "support", "tiny-guest-init.sh");

const UDHCPC_SCRIPT = `#!/bin/sh
# udhcpc event script for the tiny guest: configure the interface, route and DNS.
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/\${mask:-24}" dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    ;;
esac
exit 0
`;

/** The AArch64 twin of the x86-64 eject below (openat, ioctl, exit; little-endian words). */
// prettier-ignore
const EJECT_ARM64 = [
  0xf9400be1, //  0: ldr  x1, [sp, #16]      ; argv[1]
  0xb4000201, //  4: cbz  x1, usage (0x44)
  0x92800c60, //  8: mov  x0, #-100          ; AT_FDCWD
  0xd2810002, //  c: mov  x2, #0x800         ; O_RDONLY|O_NONBLOCK
  0xd2800003, // 10: mov  x3, #0
  0xd2800708, // 14: mov  x8, #56            ; openat
  0xd4000001, // 18: svc  #0
  0xb7f80100, // 1c: tbnz x0, #63, fail (0x3c)
  0xd28a6121, // 20: mov  x1, #0x5309        ; CDROMEJECT (x0: the fd)
  0xd2800002, // 24: mov  x2, #0
  0xd28003a8, // 28: mov  x8, #29            ; ioctl
  0xd4000001, // 2c: svc  #0
  0xb7f80060, // 30: tbnz x0, #63, fail (0x3c)
  0xd2800000, // 34: mov  x0, #0
  0x14000004, // 38: b    exit (0x48)
  0xcb0003e0, // 3c: fail: neg x0, x0
  0x14000002, // 40: b    exit (0x48)
  0xd2801fe0, // 44: usage: mov x0, #255
  0xd2800ba8, // 48: exit: mov x8, #93       ; exit
  0xd4000001, // 4c: svc  #0
];

/**
 * A static ELF (Debian's busybox has no eject applet) for x86-64 or AArch64: `eject DEVICE`
 * opens DEVICE with O_RDONLY|O_NONBLOCK and issues ioctl(CDROMEJECT). Exit status: 0
 * ejected, errno on failure, 255 without an argument.
 */
export function ejectProgram(arch: GuestArch = "x86_64"): Buffer {
  const base = 0x400000;
  const codeOffset = 64 + 56;
  const arm = Buffer.alloc(EJECT_ARM64.length * 4);
  EJECT_ARM64.forEach((w, i) => arm.writeUInt32LE(w, i * 4));
  // prettier-ignore
  const code = arch === "arm64" ? arm : Buffer.from([
    0x48, 0x8b, 0x7c, 0x24, 0x10, //  0: mov rdi, [rsp+16]   ; argv[1]
    0x48, 0x85, 0xff,             //  5: test rdi, rdi
    0x74, 0x2e,                   //  8: jz usage (56)
    0xbe, 0x00, 0x08, 0x00, 0x00, // 10: mov esi, O_RDONLY|O_NONBLOCK
    0xb8, 0x02, 0x00, 0x00, 0x00, // 15: mov eax, 2           ; open
    0x0f, 0x05,                   // 20: syscall
    0x85, 0xc0,                   // 22: test eax, eax
    0x78, 0x18,                   // 24: js fail (50)
    0x89, 0xc7,                   // 26: mov edi, eax
    0xbe, 0x09, 0x53, 0x00, 0x00, // 28: mov esi, 0x5309      ; CDROMEJECT
    0x31, 0xd2,                   // 33: xor edx, edx
    0xb8, 0x10, 0x00, 0x00, 0x00, // 35: mov eax, 16          ; ioctl
    0x0f, 0x05,                   // 40: syscall
    0x85, 0xc0,                   // 42: test eax, eax
    0x78, 0x04,                   // 44: js fail (50)
    0x31, 0xff,                   // 46: xor edi, edi
    0xeb, 0x0b,                   // 48: jmp exit (61)
    0xf7, 0xd8,                   // 50: fail: neg eax
    0x89, 0xc7,                   // 52: mov edi, eax
    0xeb, 0x05,                   // 54: jmp exit (61)
    0xbf, 0xff, 0x00, 0x00, 0x00, // 56: usage: mov edi, 255
    0xb8, 0x3c, 0x00, 0x00, 0x00, // 61: exit: mov eax, 60  ; exit
    0x0f, 0x05,                   // 66: syscall
  ]);
  const total = codeOffset + code.length;
  const elf = Buffer.alloc(total);
  // ELF header
  Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0]).copy(elf, 0);
  elf.writeUInt16LE(2, 16); // ET_EXEC
  elf.writeUInt16LE(arch === "arm64" ? 0xb7 : 0x3e, 18); // EM_AARCH64 or EM_X86_64
  elf.writeUInt32LE(1, 20);
  elf.writeBigUInt64LE(BigInt(base + codeOffset), 24); // entry
  elf.writeBigUInt64LE(64n, 32); // phoff
  elf.writeBigUInt64LE(0n, 40); // shoff
  elf.writeUInt32LE(0, 48);
  elf.writeUInt16LE(64, 52); // ehsize
  elf.writeUInt16LE(56, 54); // phentsize
  elf.writeUInt16LE(1, 56); // phnum
  // program header: one PT_LOAD R+X of the whole file
  elf.writeUInt32LE(1, 64);
  elf.writeUInt32LE(5, 68);
  elf.writeBigUInt64LE(0n, 72);
  elf.writeBigUInt64LE(BigInt(base), 80);
  elf.writeBigUInt64LE(BigInt(base), 88);
  elf.writeBigUInt64LE(BigInt(total), 96);
  elf.writeBigUInt64LE(BigInt(total), 104);
  elf.writeBigUInt64LE(0x1000n, 112);
  code.copy(elf, codeOffset);
  return elf;
}

interface Manifest {
  hash: string;
  kernelPackage: string;
  kernelPackageVersion: string;
  kernelVersion: string;
  busyboxVersion: string;
  modules: string[];
  builtAt: string;
  buildSeconds: number;
}

function defaultLog(line: string): void {
  process.stderr.write(`tiny-guest: ${line}\n`);
}

/** Name of the package linux-image-amd64 currently depends on, e.g. linux-image-6.1.0-56-amd64. */
async function kernelPackage(log: (l: string) => void, foreign?: ForeignApt): Promise<string> {
  const meta = `linux-image-${foreign?.debianArch ?? "amd64"}`;
  const find = (): Promise<string | undefined> => dependsOnKernelPackage(meta, foreign?.options);
  let pkg = await find();
  if (!pkg) {
    log(`apt-cache knows no ${meta}; running apt-get update`);
    if (foreign) await foreignAptUpdate(foreign.dir, foreign.debianArch);
    else await run("apt-get", ["update"], { timeoutMs: 300_000, failCode: "host" });
    pkg = await find();
  }
  if (!pkg) throw new Error(`apt-cache depends ${meta} names no kernel package (is this Debian?)`);
  return pkg;
}

/** Another architecture's apt (its own lists under the guest cache; the host's dpkg untouched). */
interface ForeignApt {
  dir: string;
  debianArch: string;
  options: string[];
}

/**
 * The arm64 guest's apt: its lists are fetched again whenever the host's change (apt-get
 * update here), so both see the same archive state.
 */
async function foreignApt(root: string, arch: GuestArch, log: (l: string) => void): Promise<ForeignApt> {
  const debianArch = ARCH_INFO[arch].debianArch;
  const dir = join(root, `apt-${debianArch}`);
  const stamp = join(dir, "host-apt-state");
  const key = await aptStateKey();
  const have = await readFile(stamp, "utf8").catch(() => "");
  if (have !== key) {
    log(`apt-get update for ${debianArch} (lists in ${dir})`);
    await foreignAptUpdate(dir, debianArch);
    await writeFile(stamp, key);
  }
  return { dir, debianArch, options: foreignAptOptions(dir, debianArch) };
}

interface Resolution {
  kernelPackage: string;
  kernelPackageVersion: string;
  busyboxVersion: string;
  busyboxInstalled: boolean;
}

/** Changes whenever apt's package lists change (apt-get update) or busybox-static does. */
async function aptStateKey(): Promise<string> {
  const parts: string[] = [];
  const add = async (p: string): Promise<void> => {
    try {
      const s = await stat(p);
      parts.push(`${p}:${s.size}:${s.mtimeMs}`);
    } catch {
      parts.push(`${p}:-`);
    }
  };
  const lists = "/var/lib/apt/lists";
  const names = await readdir(lists).catch(() => [] as string[]);
  for (const n of names.sort()) if (n !== "lock" && n !== "partial" && n !== "auxfiles") await add(join(lists, n));
  await add("/bin/busybox"); // busybox-static installed, removed or upgraded
  await add("/etc/apt/sources.list");
  await add("/etc/apt/sources.list.d");
  return createHash("sha256").update(parts.join("\n")).digest("hex");
}

/**
 * Kernel package (via apt-cache depends linux-image-amd64) and busybox-static versions.
 * apt-cache takes ~0.5 s a call here, so the answer is memoised next to the guests, keyed
 * by the state of apt's lists and of /bin/busybox.
 */
async function resolvePackages(root: string, log: (l: string) => void, foreign?: ForeignApt): Promise<Resolution> {
  const memoFile = join(root, "apt-resolution.json");
  const key = await aptStateKey();
  try {
    const memo = JSON.parse(await readFile(memoFile, "utf8")) as { key: string; resolution: Resolution };
    if (memo.key === key) return memo.resolution;
  } catch {
    /* absent or corrupt: resolve again */
  }
  const kernelPkg = await kernelPackage(log, foreign);
  // Another architecture's guest always takes that architecture's busybox from apt.
  const [kernelPackageVersion, bbInstalled] = await Promise.all([packageVersion(kernelPkg, foreign?.options), foreign ? undefined : installedBusybox()]);
  const resolution: Resolution = {
    kernelPackage: kernelPkg,
    kernelPackageVersion,
    busyboxVersion: bbInstalled ?? (await packageVersion("busybox-static", foreign?.options)),
    busyboxInstalled: bbInstalled !== undefined,
  };
  // apt-get update may have run meanwhile (kernelPackage does so when needed): key afresh.
  const memo = { key: await aptStateKey(), resolution };
  await mkdir(root, { recursive: true });
  const tmp = `${memoFile}.${process.pid}.${randomBytes(6).toString("hex")}.tmp`;
  await writeFile(tmp, JSON.stringify(memo, null, 2) + "\n");
  await rename(tmp, memoFile);
  return resolution;
}

async function readManifest(dir: string): Promise<Manifest | undefined> {
  try {
    return JSON.parse(await readFile(join(dir, "manifest.json"), "utf8")) as Manifest;
  } catch {
    return undefined;
  }
}

function result(dir: string, m: Manifest, arch: GuestArch): TinyGuest {
  return {
    kernel: join(dir, "vmlinuz"),
    initrd: join(dir, "initrd.img"),
    disk: join(dir, "disk.qcow2"),
    kernelVersion: m.kernelVersion,
    arch,
    dir,
  };
}

export async function buildTinyGuest(opts: BuildTinyGuestOptions = {}): Promise<TinyGuest> {
  const log = opts.log ?? defaultLog;
  const arch = opts.arch ?? "x86_64";
  const foreignArch = arch !== "x86_64";
  const root = join(opts.cacheDir ?? testCacheDir, foreignArch ? `tiny-guest-${arch}` : "tiny-guest");
  const initScript = await readFile(TINY_GUEST_INIT, "utf8");
  await mkdir(root, { recursive: true });
  const foreign = foreignArch ? await foreignApt(root, arch, log) : undefined;
  const { kernelPackage: kpkg, kernelPackageVersion: kver, busyboxVersion: bbVersion, busyboxInstalled: bbInstalled } =
    await resolvePackages(root, log, foreign);
  const wanted = foreignArch ? TINY_GUEST_MODULES_ARM64 : TINY_GUEST_MODULES;
  const inputs = {
    recipe: RECIPE,
    kernelPackage: kpkg,
    kernelPackageVersion: kver,
    busyboxVersion: bbVersion,
    init: initScript,
    modules: wanted,
    udhcpc: UDHCPC_SCRIPT,
    eject: ejectProgram(arch).toString("hex"),
    ...(foreignArch ? { arch } : {}),
  };
  const hash = createHash("sha256").update(JSON.stringify(inputs)).digest("hex").slice(0, 16);
  const final = join(root, hash);
  const cached = await readManifest(final);
  if (cached) return result(final, cached, arch);

  const t0 = Date.now();
  log(`building ${final} (${kpkg} ${kver}, busybox-static ${bbVersion})`);
  await mkdir(root, { recursive: true });
  const build = await mkdtemp(join(root, `.build-${hash}-`));
  const scratch = await mkdtemp(join(tmpdir(), "civm-tiny-guest-"));
  try {
    // Kernel package -> vmlinuz + modules.
    const dl = join(scratch, "dl");
    await mkdir(dl);
    log(`apt-get download ${kpkg}`);
    const deb = await aptDownload(kpkg, dl, foreign?.options);
    const kroot = join(scratch, "kernel");
    log(`dpkg-deb -x ${basename(deb)}`);
    await extractDeb(deb, kroot);
    const modVersions = await readdir(join(kroot, "lib", "modules"));
    const kernelVersion = modVersions[0];
    if (modVersions.length !== 1 || !kernelVersion) throw new Error(`expected one lib/modules/* in ${kpkg}, got ${modVersions.join(", ")}`);
    const modDir = join(kroot, "lib", "modules", kernelVersion);

    // The host's busybox runs depmod; the guest's is its own architecture's.
    const hostBusybox = bbInstalled ? "/bin/busybox" : await staticBusybox(scratch, log);
    let busybox = hostBusybox;
    if (foreign) {
      const bdl = join(scratch, "bbdl");
      await mkdir(bdl);
      log(`apt-get download busybox-static:${foreign.debianArch}`);
      const bdeb = await aptDownload("busybox-static", bdl, foreign.options);
      await extractDeb(bdeb, join(bdl, "root"));
      busybox = join(bdl, "root", "bin", "busybox");
    }

    // Debian ships no modules.dep (postinst runs depmod): make one with busybox depmod.
    if (!existsSync(join(modDir, "modules.dep"))) {
      log("busybox depmod");
      await run(hostBusybox, ["depmod", "-b", kroot, kernelVersion]);
    }
    const { dep, builtin } = await readModuleIndex(modDir);
    const modules = resolveModules(dep, builtin, wanted);

    // initramfs tree
    const tree = join(scratch, "initramfs");
    await busyboxTree(tree, busybox, ["etc/tiny-guest"]);
    await writeFile(join(tree, "bin", "eject"), ejectProgram(arch), { mode: 0o755 });
    await writeFile(join(tree, "init"), initScript, { mode: 0o755 });
    await writeFile(join(tree, "etc", "udhcpc.script"), UDHCPC_SCRIPT, { mode: 0o755 });
    const inGuest = await copyModules(tree, modDir, kernelVersion, modules);
    await writeFile(join(tree, "etc", "tiny-guest", "modules"), inGuest.join("\n") + "\n");

    // cpio (newc) + gzip
    log(`initramfs: busybox + ${modules.length} modules`);
    await packInitramfs(tree, join(build, "initrd.img"), scratch);
    await copyFile(join(kroot, "boot", `vmlinuz-${kernelVersion}`), join(build, "vmlinuz"));
    await run("qemu-img", ["create", "-q", "-f", "qcow2", join(build, "disk.qcow2"), "64M"]);

    const manifest: Manifest = {
      hash,
      kernelPackage: kpkg,
      kernelPackageVersion: kver,
      kernelVersion,
      busyboxVersion: bbVersion,
      modules: modules.map(moduleName),
      builtAt: new Date().toISOString(),
      buildSeconds: (Date.now() - t0) / 1000,
    };
    await writeFile(join(build, "manifest.json"), JSON.stringify(manifest, null, 2) + "\n");
    await chmod(build, 0o755);
    try {
      await rename(build, final);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      const theirs = await readManifest(final);
      if ((code === "ENOTEMPTY" || code === "EEXIST") && theirs) {
        log("another process built the same guest first; using theirs");
        await rm(build, { recursive: true, force: true });
        return result(final, theirs, arch);
      }
      throw e;
    }
    log(`built in ${manifest.buildSeconds.toFixed(1)} s`);
    return result(final, manifest, arch);
  } catch (e) {
    await rm(build, { recursive: true, force: true });
    throw e;
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}

/** For ad-hoc use: `node dist/test/support/tiny-guest.js` prints the built guest as JSON. */
if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const g = await buildTinyGuest(process.argv[2] === "arm64" ? { arch: "arm64" } : {});
  const s = await stat(g.initrd);
  process.stdout.write(JSON.stringify({ ...g, initrdBytes: s.size }, null, 2) + "\n");
}
