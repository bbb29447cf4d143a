// Stage 1b of `civm image build`: a root tree becomes a partitioned disk image, with no loop
// device and no mount. A sparse raw file gets an MBR (msdos) table with one bootable Linux
// partition from 1 MiB to the end (sfdisk works on the file); mke2fs writes the ext4
// filesystem straight into that partition (-E offset) and fills it from the tree (-d), which
// keeps owners, modes, symlinks, hard links, device nodes and extended attributes. Then the
// raw file is converted (qcow2, fixed VHD) and the kernel and initrd are copied out of /boot.
// The bootloader is installed later, in the VM stage (the 1 MiB gap holds GRUB's core.img).
import { copyFile, open, rename, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { CivmError, ConfigError } from "../errors/index.js";
import { ToolError, run } from "../exec/index.js";
import { formatSize } from "../config/sizes.js";
import { ROOT_LABEL, findKernelRelease, listPackages } from "./rootfs.js";
import type { ImageFormat } from "./types.js";

const MiB = 1024 ** 2;

/** Where things are on every civm disk image. */
export const DISK_LAYOUT = {
  table: "dos",
  /** The root partition starts at 1 MiB (sector 2048); GRUB's core.img fits in the gap. */
  partitionStartBytes: MiB,
  partitionNumber: 1,
  partitionType: "83",
  filesystem: "ext4",
  label: ROOT_LABEL,
  /** The root device with a virtio disk (QEMU -drive if=virtio). */
  rootDevice: "/dev/vda1",
} as const;

/**
 * Images with `uefi: true`: an EFI system partition (FAT, formatted and filled by GRUB in the
 * VM stage) takes the first 63 MiB after the 1 MiB gap, as partition 2; the root partition
 * (still number 1, still last on the disk, so it grows into the disk) starts after it.
 */
export const ESP_LAYOUT = {
  sizeBytes: 63 * MiB,
  partitionNumber: 2,
  partitionType: "ef",
  /** The ESP with a virtio disk. */
  device: "/dev/vda2",
} as const;

/** Where the root partition starts: 1 MiB, or after the EFI system partition. */
export function rootPartitionStart(uefi: boolean): number {
  return DISK_LAYOUT.partitionStartBytes + (uefi ? ESP_LAYOUT.sizeBytes : 0);
}

export interface DiskProgress {
  step: "check" | "partition" | "filesystem" | "convert" | "boot-files" | "compress" | "done";
  message: string;
}

export interface AssembleDiskOptions {
  /** The root tree (buildRootTree's result). */
  tree: string;
  /** The disk image to write; written under OUTPUT.partial and renamed when complete. */
  output: string;
  /** Virtual disk size; rounded up to a whole MiB. */
  sizeBytes: number;
  format: ImageFormat;
  log?: (line: string) => void;
  onProgress?: (p: DiskProgress) => void;
  /** Where to copy the kernel (default: "vmlinuz" beside the output). */
  kernelPath?: string;
  /** Where to copy the initrd (default: "initrd.img" beside the output). */
  initrdPath?: string;
  /** Filesystem UUID (and hash seed), e.g. uuidFromKey(key) for reproducible images; random otherwise. */
  uuid?: string;
  /** Also write OUTPUT.zst (the disk image itself is kept). */
  compress?: "zstd";
  /** Names the image in messages, e.g. `images.json: image "base" (#1)`. */
  label?: string;
  /** Leave room for an EFI system partition (ESP_LAYOUT) before the root partition. */
  uefi?: boolean;
}

export interface AssembledDisk {
  disk: string;
  format: ImageFormat;
  /** Virtual size of the disk in bytes. */
  sizeBytes: number;
  partition: { startBytes: number; sizeBytes: number };
  kernel?: string;
  initrd?: string;
  kernelRelease?: string;
  /** Installed packages: name -> version. */
  packages: Record<string, string>;
  /** OUTPUT.zst when compress was asked for. */
  compressed?: string;
  seconds: number;
}

/** Assembles the disk image from a root tree; see the file comment for the layout. */
export async function assembleDisk(opts: AssembleDiskOptions): Promise<AssembledDisk> {
  const log = opts.log ?? (() => {});
  const progress = (step: DiskProgress["step"], message: string) => {
    log(`${step}: ${message}`);
    opts.onProgress?.({ step, message });
  };
  const started = Date.now();
  const sizeBytes = Math.ceil(opts.sizeBytes / MiB) * MiB;
  const rootStart = rootPartitionStart(opts.uefi === true);
  const partSize = sizeBytes - rootStart;
  const label = opts.label ? `${opts.label}: ` : "";

  progress("check", `measuring ${opts.tree}`);
  const needed = await estimateNeededBytes(opts.tree);
  if (needed > partSize) {
    throw new ConfigError(
      `${label}field "size": ${formatSize(sizeBytes)} is too small: the root tree needs about ${formatSize(roundUpMiB(needed))} of filesystem; set "size" to at least ${formatSize(roundUpMiB(needed + MiB) + 256 * MiB)}.`,
    );
  }

  const raw = opts.format === "raw" ? `${opts.output}.partial` : `${opts.output}.raw.partial`;
  const converted = `${opts.output}.partial`;
  try {
    await createSparseFile(raw, sizeBytes);
    progress(
      "partition",
      `MBR, partition 1 (bootable, Linux) from ${rootStart / MiB} MiB to the end: ${partSize / MiB} MiB` +
        (opts.uefi ? `; partition 2 (EFI system) from 1 MiB: ${ESP_LAYOUT.sizeBytes / MiB} MiB` : ""),
    );
    await writePartitionTable(raw, sizeBytes, opts.uuid, opts.uefi === true);
    progress("filesystem", `ext4 "${DISK_LAYOUT.label}" from ${opts.tree}`);
    await makeFilesystem({ file: raw, tree: opts.tree, offsetBytes: rootStart, sizeBytes: partSize, label: DISK_LAYOUT.label, ...(opts.uuid ? { uuid: opts.uuid } : {}), sizeLabel: label });
    if (opts.format !== "raw") {
      progress("convert", `raw -> ${opts.format}`);
      await convertRaw(raw, converted, opts.format);
      await rm(raw, { force: true });
    }
    await rename(converted, opts.output);
  } catch (e) {
    await rm(raw, { force: true });
    await rm(converted, { force: true });
    throw e;
  }

  progress("boot-files", "kernel and initrd from /boot");
  const boot = await extractBootFiles(opts.tree, {
    kernelPath: opts.kernelPath ?? join(dirname(opts.output), "vmlinuz"),
    initrdPath: opts.initrdPath ?? join(dirname(opts.output), "initrd.img"),
  });
  const packages = await listPackages(opts.tree);
  let compressed: string | undefined;
  if (opts.compress === "zstd") {
    progress("compress", `zstd ${opts.output}`);
    compressed = await compressArtifact(opts.output);
  }
  const seconds = (Date.now() - started) / 1000;
  progress("done", `${opts.output} (${opts.format}, ${formatSize(sizeBytes)}) in ${seconds.toFixed(1)} s`);
  return {
    disk: opts.output,
    format: opts.format,
    sizeBytes,
    partition: { startBytes: rootStart, sizeBytes: partSize },
    ...boot,
    packages,
    ...(compressed ? { compressed } : {}),
    seconds,
  };
}

function roundUpMiB(n: number): number {
  return Math.ceil(n / MiB) * MiB;
}

/**
 * Rough space an ext4 filesystem needs for the tree: its allocated blocks, inode tables for
 * its files, the journal and 5% reserved blocks. Errs high so mke2fs does not run out.
 */
export async function estimateNeededBytes(tree: string): Promise<number> {
  const { stdout } = await run("du", ["-s", "-x", "--block-size=1", tree]);
  const used = Number(stdout.split(/\s/)[0]);
  const { stdout: files } = await run("du", ["-s", "-x", "--inodes", tree]);
  const inodes = Number(files.split(/\s/)[0]);
  return Math.ceil((used * 1.05 + inodes * 256 + 64 * MiB) / 0.95);
}

export async function createSparseFile(path: string, sizeBytes: number): Promise<void> {
  const fh = await open(path, "w", 0o644);
  try {
    await fh.truncate(sizeBytes);
  } finally {
    await fh.close();
  }
}

/**
 * One bootable Linux partition from 1 MiB to the end (with `uefi`: after an EFI system
 * partition at 1 MiB, which is partition 2); the disk id comes from uuid if given.
 */
export async function writePartitionTable(file: string, sizeBytes: number, uuid?: string, uefi = false): Promise<void> {
  const rootStart = rootPartitionStart(uefi);
  const start = rootStart / 512;
  const sectors = (sizeBytes - rootStart) / 512;
  const lines = ["label: dos", "unit: sectors"];
  if (uuid) lines.push(`label-id: 0x${uuid.replace(/-/g, "").slice(0, 8)}`);
  lines.push("", `start=${start}, size=${sectors}, type=${DISK_LAYOUT.partitionType}, bootable`);
  if (uefi) lines.push(`start=${DISK_LAYOUT.partitionStartBytes / 512}, size=${ESP_LAYOUT.sizeBytes / 512}, type=${ESP_LAYOUT.partitionType}`);
  lines.push("");
  await run("sfdisk", ["--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "always", file], { input: lines.join("\n") });
}

export interface MakeFilesystemOptions {
  /** The disk image (a regular file). */
  file: string;
  /** The root tree to copy in. */
  tree: string;
  offsetBytes: number;
  sizeBytes: number;
  label: string;
  uuid?: string;
  /** Prefix for "too small" messages. */
  sizeLabel?: string;
}

/** mke2fs -t ext4 -d TREE -E offset=... FILE SIZEk: the filesystem at the partition's place. */
export async function makeFilesystem(o: MakeFilesystemOptions): Promise<void> {
  const ext = [`offset=${o.offsetBytes}`];
  const args = ["-q", "-F", "-t", "ext4", "-L", o.label, "-d", o.tree];
  if (o.uuid) {
    args.push("-U", o.uuid);
    ext.push(`hash_seed=${o.uuid}`);
  }
  args.push("-E", ext.join(","), o.file, `${Math.floor(o.sizeBytes / 1024)}k`);
  try {
    await run("mke2fs", args);
  } catch (e) {
    if (e instanceof ToolError && /Could not allocate block|No space left|Could not allocate inode/.test(e.stderr)) {
      throw new ConfigError(`${o.sizeLabel ?? ""}field "size": the root tree does not fit in a ${formatSize(o.sizeBytes)} partition; raise "size".`, { cause: e });
    }
    throw e;
  }
}

/** raw -> qcow2 (uncompressed: compressed clusters slow every read at boot) or fixed VHD. */
export async function convertRaw(raw: string, output: string, format: Exclude<ImageFormat, "raw">): Promise<void> {
  if (format === "qcow2") {
    await run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, output]);
    return;
  }
  // Azure wants a fixed VHD whose virtual size is a whole number of MiB (the raw file is).
  const size = (await stat(raw)).size;
  if (size % MiB !== 0) throw new CivmError("internal", `convertRaw: ${raw} is ${size} bytes, not a whole number of MiB`);
  await run("qemu-img", ["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", raw, output]);
}

/** Copies /boot/vmlinuz-REL and /boot/initrd.img-REL (the newest REL) out of the tree. */
export async function extractBootFiles(
  tree: string,
  to: { kernelPath: string; initrdPath: string },
): Promise<{ kernel?: string; initrd?: string; kernelRelease?: string }> {
  const release = await findKernelRelease(tree);
  if (!release) return {};
  const out: { kernel?: string; initrd?: string; kernelRelease?: string } = { kernelRelease: release };
  await copyFile(join(tree, "boot", `vmlinuz-${release}`), to.kernelPath);
  out.kernel = to.kernelPath;
  try {
    await copyFile(join(tree, "boot", `initrd.img-${release}`), to.initrdPath);
    out.initrd = to.initrdPath;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
  }
  return out;
}

/** Writes PATH.zst beside PATH (kept); returns its path. */
export async function compressArtifact(path: string): Promise<string> {
  const out = `${path}.zst`;
  const partial = `${out}.partial`;
  try {
    await run("zstd", ["-q", "-f", "-T0", "-3", path, "-o", partial]);
    await rename(partial, out);
  } catch (e) {
    await rm(partial, { force: true });
    throw e;
  }
  return out;
}
