// The VM's disk: a qcow2 overlay on the base image, never a copy. The backing format is
// always given (QEMU 6.1+ refuses to guess it), so creation costs the same for any base size.
import { resolve } from "node:path";
import { ConfigError } from "../errors/index.js";
import { run } from "../exec/index.js";
import { formatBytes } from "./format.js";

export interface ImageInfo {
  format: string;
  virtualSize: number;
}

export async function imageInfo(path: string): Promise<ImageInfo> {
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
