// The VM's disk: a qcow2 overlay on the base image, never a copy. The backing format is
// always given (QEMU 6.1+ refuses to guess it), so creation costs the same for any base size.
import { resolve } from "node:path";
import { open, writeFile } from "node:fs/promises";
import { ConfigError } from "../errors/index.js";
import { run } from "../exec/index.js";
import { formatBytes } from "./format.js";

export interface ImageInfo {
  format: string;
  virtualSize: number;
}

const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

interface Qcow2Header extends ImageInfo {
  /**
   * No backing file, not encrypted, no incompatible feature but the dirty bit: an overlay
   * on it needs nothing qemu-img would check (see writeOverlay).
   */
  plain: boolean;
}

/**
 * Format and virtual size from a qcow2 header (magic at 0, virtual size at 24, both
 * big-endian): the common case, without starting qemu-img (~15 ms of every VM start).
 * Anything else is left to qemu-img.
 */
async function qcow2Header(path: string): Promise<Qcow2Header | undefined> {
  let fh;
  try {
    fh = await open(path, "r");
    const buf = Buffer.alloc(80);
    const { bytesRead } = await fh.read(buf, 0, 80, 0);
    if (bytesRead < 32 || buf.readUInt32BE(0) !== QCOW2_MAGIC) return undefined;
    const size = Number(buf.readBigUInt64BE(24));
    if (!Number.isSafeInteger(size) || size <= 0) return undefined;
    const version = buf.readUInt32BE(4);
    const plain =
      bytesRead === 80 &&
      (version === 2 || version === 3) &&
      buf.readBigUInt64BE(8) === 0n && // backing_file_offset
      buf.readUInt32BE(32) === 0 && // crypt_method
      (version === 2 || (buf.readBigUInt64BE(72) & ~1n) === 0n); // incompatible_features
    return { format: "qcow2", virtualSize: size, plain };
  } catch {
    return undefined; // qemu-img gives the real error
  } finally {
    await fh?.close();
  }
}

export async function imageInfo(path: string): Promise<ImageInfo> {
  const fast = await qcow2Header(path);
  if (fast) return { format: fast.format, virtualSize: fast.virtualSize };
  return qemuImgInfo(path);
}

async function qemuImgInfo(path: string): Promise<ImageInfo> {
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
  const header = await qcow2Header(o.base);
  const base = header ? { format: header.format, virtualSize: header.virtualSize } : await qemuImgInfo(o.base);
  if (o.sizeBytes !== undefined && o.sizeBytes < base.virtualSize) {
    throw new ConfigError(
      `${o.where}: root-disk ${formatBytes(o.sizeBytes)} is smaller than the image ${o.base} (${formatBytes(base.virtualSize)}); ` +
        `a disk can only grow. Set root-disk to at least ${formatBytes(base.virtualSize)} or leave it out to keep the image's size.`,
    );
  }
  // A plain qcow2 or a raw base (qemu-img info has opened it): nothing for qemu-img create to
  // check, so the overlay is written here, as qemu-img would (~15 ms less per VM start).
  // Backing chains, encrypted and other formats, and huge disks go to qemu-img.
  const overlay = qcow2Overlay(resolve(o.base), base.format, o.sizeBytes ?? base.virtualSize);
  if (overlay && (header ? header.plain : base.format === "raw")) {
    await writeFile(o.overlay, overlay);
    return base;
  }
  const args = ["create", "-q", "-f", "qcow2", "-F", base.format, "-b", resolve(o.base), o.overlay];
  if (o.sizeBytes !== undefined) args.push(String(o.sizeBytes));
  await run("qemu-img", args, { failCode: "host" });
  return base;
}

const CLUSTER = 65536;

/** Names of the qcow2 feature bits, as qemu-img (7.2) writes them into a new image. */
const FEATURE_NAMES: [type: number, bit: number, name: string][] = [
  [0, 0, "dirty bit"], [0, 1, "corrupt bit"], [0, 2, "external data file"], [0, 3, "compression type"], [0, 4, "extended L2 entries"],
  [1, 0, "lazy refcounts"], [2, 0, "bitmaps"], [2, 1, "raw external data"],
];

/**
 * The bytes of an empty qcow2 (v3, 64 KiB clusters, 16-bit refcounts) on `backing` in
 * `backingFormat`, of `sizeBytes` (rounded up to 512 bytes): the file `qemu-img create -f
 * qcow2 -F FORMAT -b BACKING OVERLAY SIZE` writes, byte for byte (test/unit/vm-disk.test.ts
 * compares them). Layout: header + extensions + backing name in cluster 0, refcount table
 * in 1, its one refcount block in 2, the L1 table in 3. Undefined when that does not fit
 * (an L1 table of more than one cluster, i.e. over 4 TiB; a backing name or format too long).
 */
export function qcow2Overlay(backing: string, backingFormat: string, sizeBytes: number): Buffer | undefined {
  const size = Math.ceil(sizeBytes / 512) * 512;
  const l1Size = Math.ceil(size / (CLUSTER * (CLUSTER / 8)));
  const name = Buffer.from(backing);
  const format = Buffer.from(backingFormat);
  const align8 = (n: number) => Math.ceil(n / 8) * 8;
  const headerLength = 112;
  const formatExt = 8 + align8(format.length);
  const featureExt = 8 + FEATURE_NAMES.length * 48;
  const nameOffset = headerLength + formatExt + featureExt + 8; // + end-of-extensions
  if (l1Size < 1 || l1Size * 8 > CLUSTER || name.length > 1023 || format.length > 16 || nameOffset + name.length > CLUSTER) return undefined;

  const l1Offset = 3 * CLUSTER;
  const buf = Buffer.alloc(l1Offset + l1Size * 8);
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(3, 4); // version
  buf.writeBigUInt64BE(BigInt(nameOffset), 8);
  buf.writeUInt32BE(name.length, 16);
  buf.writeUInt32BE(16, 20); // cluster_bits
  buf.writeBigUInt64BE(BigInt(size), 24);
  buf.writeUInt32BE(l1Size, 36);
  buf.writeBigUInt64BE(BigInt(l1Offset), 40);
  buf.writeBigUInt64BE(BigInt(CLUSTER), 48); // refcount table
  buf.writeUInt32BE(1, 56); // refcount_table_clusters
  buf.writeUInt32BE(4, 96); // refcount_order: 16-bit refcounts
  buf.writeUInt32BE(headerLength, 100); // compression type (byte 104): zlib = 0

  let at = headerLength;
  buf.writeUInt32BE(0xe2792aca, at); // backing file format name
  buf.writeUInt32BE(format.length, at + 4);
  format.copy(buf, at + 8);
  at += formatExt;
  buf.writeUInt32BE(0x6803f857, at); // feature name table
  buf.writeUInt32BE(FEATURE_NAMES.length * 48, at + 4);
  at += 8;
  for (const [type, bit, feature] of FEATURE_NAMES) {
    buf.writeUInt8(type, at);
    buf.writeUInt8(bit, at + 1);
    buf.write(feature, at + 2, "latin1");
    at += 48;
  }
  at += 8; // end of extensions: zeros
  name.copy(buf, at);

  buf.writeBigUInt64BE(BigInt(2 * CLUSTER), CLUSTER); // refcount table -> block in cluster 2
  for (let c = 0; c < 4; c++) buf.writeUInt16BE(1, 2 * CLUSTER + 2 * c); // clusters 0-3 in use
  return buf;
}
