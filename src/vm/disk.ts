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

/**
 * Format and virtual size from a qcow2 header (magic at 0, virtual size at 24, both
 * big-endian): the common case, without starting qemu-img (~15 ms of every VM start).
 * Anything else is left to qemu-img.
 */
async function qcow2Header(path: string): Promise<ImageInfo | undefined> {
  let fh;
  try {
    fh = await open(path, "r");
    const buf = Buffer.alloc(32);
    const { bytesRead } = await fh.read(buf, 0, 32, 0);
    if (bytesRead < 32 || buf.readUInt32BE(0) !== QCOW2_MAGIC) return undefined;
    const size = Number(buf.readBigUInt64BE(24));
    return Number.isSafeInteger(size) && size > 0 ? { format: "qcow2", virtualSize: size } : undefined;
  } catch {
    return undefined; // qemu-img gives the real error
  } finally {
    await fh?.close();
  }
}

export async function imageInfo(path: string): Promise<ImageInfo> {
  const fast = await qcow2Header(path);
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
  const base = await imageInfo(o.base);
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
