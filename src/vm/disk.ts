// The VM's disk: a qcow2 overlay on the base image, never a copy. The backing format is
// always given (QEMU 6.1+ refuses to guess it), so creation costs the same for any base size.
import { resolve } from "node:path";
import { open } from "node:fs/promises";
import { ConfigError } from "../errors/index.js";
import { run } from "../exec/index.js";
import { formatBytes } from "./format.js";

export interface ImageInfo {
  format: string;
  virtualSize: number;
}

const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

/** Enough for every signature below: btrfs keeps its magic at 64 KiB + 64. */
const SNIFF_BYTES = 0x10048;

/** Header magics of formats QEMU opens (at offset 0 unless given). */
const FORMAT_MAGICS: { format: string; magic: Buffer; at?: number }[] = [
  { format: "qed", magic: Buffer.from("QED\0", "latin1") },
  { format: "vmdk", magic: Buffer.from("KDMV", "latin1") },
  { format: "vmdk", magic: Buffer.from("# Disk DescriptorFile", "latin1") },
  { format: "vdi", magic: Buffer.from([0x7f, 0x10, 0xda, 0xbe]), at: 0x40 },
  { format: "vhdx", magic: Buffer.from("vhdxfile", "latin1") },
  { format: "vpc", magic: Buffer.from("conectix", "latin1") },
  { format: "luks", magic: Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]) },
  { format: "parallels", magic: Buffer.from("WithoutFreeSpace", "latin1") },
  { format: "parallels", magic: Buffer.from("WithouFreSpacExt", "latin1") },
  { format: "bochs", magic: Buffer.from("Bochs Virtual HD Image", "latin1") },
];

/** What makes a raw file a disk: a partition table or a file system's superblock. */
const RAW_SIGNATURES: { what: string; magic: Buffer; at: number }[] = [
  { what: "MBR", magic: Buffer.from([0x55, 0xaa]), at: 510 },
  { what: "GPT", magic: Buffer.from("EFI PART", "latin1"), at: 512 },
  { what: "ext2/3/4", magic: Buffer.from([0x53, 0xef]), at: 1080 },
  { what: "ISO9660", magic: Buffer.from("CD001", "latin1"), at: 32769 },
  { what: "XFS", magic: Buffer.from("XFSB", "latin1"), at: 0 },
  { what: "squashfs", magic: Buffer.from("hsqs", "latin1"), at: 0 },
  { what: "btrfs", magic: Buffer.from("_BHRfS_M", "latin1"), at: 0x10040 },
];

/** Files people point "image" at by mistake: named, with what to do instead. */
const NOT_DISKS: { what: string; magic: Buffer; at?: number }[] = [
  { what: "a gzip-compressed file", magic: Buffer.from([0x1f, 0x8b]) },
  { what: "an xz-compressed file", magic: Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]) },
  { what: "a zstd-compressed file", magic: Buffer.from([0x28, 0xb5, 0x2f, 0xfd]) },
  { what: "a bzip2-compressed file", magic: Buffer.from("BZh", "latin1") },
  { what: "a zip archive", magic: Buffer.from("PK\x03\x04", "latin1") },
  { what: "a tar archive", magic: Buffer.from("ustar", "latin1"), at: 257 },
  { what: "an ELF executable or kernel module", magic: Buffer.from([0x7f, 0x45, 0x4c, 0x46]) },
];

const at = (buf: Buffer, n: number, magic: Buffer) => n + magic.length <= buf.length && buf.subarray(n, n + magic.length).equals(magic);

/** Text: no NUL byte and (nearly) only printable characters, whitespace or UTF-8 in the first 4 KiB. */
function looksLikeText(buf: Buffer): boolean {
  const head = buf.subarray(0, 4096);
  let printable = 0;
  for (const b of head) {
    if (b === 0) return false;
    if ((b >= 0x20 && b !== 0x7f) || b === 0x09 || b === 0x0a || b === 0x0d) printable++;
  }
  return printable >= head.length * 0.95;
}

export type Sniffed =
  | { ok: true; format: string; /** the raw evidence ("MBR", "blank"), or undefined for a format header */ evidence?: string; header: Buffer }
  | { ok: false; found: string };

/** Classifies the first bytes of a file (pure: table-tested). */
export function classifyHeader(buf: Buffer): Sniffed {
  if (buf.length === 0) return { ok: false, found: "an empty file" };
  if (buf.length < 512) return { ok: false, found: `a file of only ${buf.length} bytes (a disk has at least one 512-byte sector)` };
  if (buf.readUInt32BE(0) === QCOW2_MAGIC) return { ok: true, format: "qcow2", header: buf };
  for (const m of FORMAT_MAGICS) if (at(buf, m.at ?? 0, m.magic)) return { ok: true, format: m.format, header: buf };
  for (const m of NOT_DISKS) if (at(buf, m.at ?? 0, m.magic)) return { ok: false, found: m.what };
  for (const s of RAW_SIGNATURES) if (at(buf, s.at, s.magic)) return { ok: true, format: "raw", evidence: s.what, header: buf };
  // A blank disk (zeros, as qemu-img create -f raw makes): a valid raw image to install onto.
  if (!buf.some((b) => b !== 0)) return { ok: true, format: "raw", evidence: "blank", header: buf };
  if (looksLikeText(buf)) return { ok: false, found: "text" };
  return { ok: false, found: "data with no disk image header, partition table (MBR/GPT) or file system" };
}

/**
 * Reads the start of `path` (one read of ~64 KiB, ~0.1 ms) and refuses what is not a disk
 * image with a ConfigError naming `label` (e.g. `instances.json: instance "vm-1": "image"`).
 * I/O errors (missing, unreadable) are left to the caller's existing checks: undefined.
 */
export async function sniffImage(path: string, label = "the image"): Promise<Extract<Sniffed, { ok: true }> | undefined> {
  let fh;
  let buf: Buffer;
  try {
    fh = await open(path, "r");
    buf = Buffer.allocUnsafe(SNIFF_BYTES);
    const { bytesRead } = await fh.read(buf, 0, SNIFF_BYTES, 0);
    buf = buf.subarray(0, bytesRead);
  } catch {
    return undefined;
  } finally {
    await fh?.close();
  }
  const r = classifyHeader(buf);
  if (r.ok) return r;
  throw new ConfigError(
    `${label} ${path} is not a disk image: it is ${r.found}. Point it at a disk image: qcow2, a raw disk with a partition table ` +
      `or a file system, an ISO, or another format QEMU reads (vmdk, vdi, vhd/vhdx, qed), or at a stored image name (civm image ls)` +
      (r.found.includes("compressed") || r.found.includes("archive") ? "; decompress or extract it first" : "") + ".",
  );
}

/** Virtual size from a qcow2 header (big-endian at 24), as qemu-img reports it. */
function qcow2Size(buf: Buffer): ImageInfo | undefined {
  if (buf.length < 32) return undefined;
  const size = Number(buf.readBigUInt64BE(24));
  return Number.isSafeInteger(size) && size > 0 ? { format: "qcow2", virtualSize: size } : undefined;
}

/**
 * Format and virtual size. The header is sniffed first (not a disk image: a ConfigError
 * before anything starts); a qcow2 base's size comes from its header without starting
 * qemu-img (~15 ms of every VM start). Anything else is left to qemu-img.
 */
export async function imageInfo(path: string, label?: string): Promise<ImageInfo> {
  const sniffed = await sniffImage(path, label);
  const fast = sniffed?.format === "qcow2" ? qcow2Size(sniffed.header) : undefined;
  if (fast) return fast;
  // -U: the base may be open read-only by other running VMs.
  const { stdout } = await run("qemu-img", ["info", "-U", "--output=json", path], { failCode: "config" });
  const info = JSON.parse(stdout) as { format?: string; "virtual-size"?: number };
  if (!info.format || typeof info["virtual-size"] !== "number") {
    throw new ConfigError(`qemu-img could not tell the format and size of ${path}; is it a disk image?`);
  }
  return { format: info.format, virtualSize: info["virtual-size"] };
}

export interface OverlayOptions {
  base: string;
  overlay: string;
  /** Virtual size in bytes; undefined keeps the base's size. */
  sizeBytes: number | undefined;
  /** For messages: which instance/field asked for the size. */
  where: string;
}

export async function createOverlay(o: OverlayOptions): Promise<ImageInfo> {
  const base = await imageInfo(o.base, `${o.where}: "image"`);
  if (o.sizeBytes !== undefined && o.sizeBytes < base.virtualSize) {
    throw new ConfigError(
      `${o.where}: root-disk ${formatBytes(o.sizeBytes)} is smaller than the image ${o.base} (${formatBytes(base.virtualSize)}); ` +
        `a disk can only grow. Set root-disk to at least ${formatBytes(base.virtualSize)} or leave it out to keep the image's size.`,
    );
  }
  const args = ["create", "-q", "-f", "qcow2", "-F", base.format, "-b", resolve(o.base), o.overlay];
  if (o.sizeBytes !== undefined) args.push(String(o.sizeBytes));
  await run("qemu-img", args, { failCode: "host" });
  return base;
}
