// `civm image export NAME --format qcow2|raw|vhd -o FILE`: a stored image as one standalone
// disk file to upload elsewhere (libvirt, Proxmox, OpenStack: qcow2 or raw; Azure: a fixed
// VHD). qemu-img converts it, following the image's backing chain (a child image comes out
// whole). The file is written as FILE.partial and renamed when complete.
import { existsSync } from "node:fs";
import { rename, rm, stat } from "node:fs/promises";
import { ConfigError } from "../errors/index.js";
import { run } from "../exec/index.js";
import { IMAGE_FORMATS, type ImageFormat } from "./types.js";
import type { StoredImage } from "./store.js";

const MiB = 1024 ** 2;

export interface ExportOptions {
  image: StoredImage;
  format: ImageFormat;
  output: string;
  /** Replace an existing output file. */
  force?: boolean;
  onProgress?: (percent: number) => void;
}

export interface ExportResult {
  output: string;
  format: ImageFormat;
  virtualSize: number;
  bytes: number;
}

/** qemu-img's name for a civm format. */
export function qemuFormat(f: ImageFormat): string {
  return f === "vhd" ? "vpc" : f;
}

/** qemu-img convert arguments (pure): a fixed VHD keeps the exact virtual size (force_size). */
export function exportArgs(src: { path: string; format: ImageFormat }, format: ImageFormat, output: string): string[] {
  const args = ["convert", "-p", "-f", qemuFormat(src.format), "-O", qemuFormat(format)];
  if (format === "vhd") args.push("-o", "subformat=fixed,force_size=on");
  args.push(src.path, output);
  return args;
}

export function parseFormat(value: string): ImageFormat {
  if (!(IMAGE_FORMATS as readonly string[]).includes(value)) {
    throw new ConfigError(`--format ${JSON.stringify(value)}: must be one of ${IMAGE_FORMATS.join(", ")} (vhd: a fixed VHD for Azure).`);
  }
  return value as ImageFormat;
}

export async function exportImage(o: ExportOptions): Promise<ExportResult> {
  if (existsSync(o.output) && !o.force) {
    throw new ConfigError(`${o.output} already exists; pass --force to replace it, or -o another path.`);
  }
  const virtualSize = o.image.manifest.virtualSize;
  if (o.format === "vhd" && virtualSize % MiB !== 0) {
    throw new ConfigError(`image ${o.image.name}: its virtual size (${virtualSize} bytes) is not a whole number of MiB, which Azure requires of a VHD; rebuild it with a "size" in whole MiB.`);
  }
  const partial = `${o.output}.partial`;
  try {
    await run("qemu-img", exportArgs({ path: o.image.diskPath, format: o.image.manifest.format }, o.format, partial), {
      onStdout: (chunk) => {
        const m = /\((\d+(?:\.\d+)?)\/100%\)\s*$/.exec(chunk.trimEnd());
        if (m) o.onProgress?.(Number(m[1]));
      },
    });
    await rename(partial, o.output);
  } catch (e) {
    await rm(partial, { force: true });
    throw e;
  }
  return { output: o.output, format: o.format, virtualSize, bytes: (await stat(o.output)).size };
}
