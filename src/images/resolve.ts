// instances.json's `image` may name an image in civm's store instead of a path. A stored
// image brings its kernel and initrd: unless the instance sets its own kernel or asks for
// firmware-boot, civm boots that kernel directly (no BIOS, no GRUB: faster).
import { existsSync } from "node:fs";
import type { InstanceSpec } from "../config/types.js";

/** Kernel command line for a stored civm image booted by its kernel. */
export const STORED_IMAGE_CMDLINE = "console=ttyS0 root=LABEL=civm-root rw panic=-1 quiet";

export function looksLikeImageName(ref: string | undefined): ref is string {
  return !!ref && !ref.includes("/") && !/\.(qcow2|img|raw|vhd|vmdk)$/i.test(ref);
}

export async function resolveStoredImage(spec: InstanceSpec, stateDir: string): Promise<InstanceSpec> {
  if (!looksLikeImageName(spec.imageRef) || existsSync(spec.image)) return spec;
  const { ImageStore } = await import("./store.js"); // only when a name is used: start-up time
  const img = await new ImageStore(stateDir).get(spec.imageRef);
  if (!img) return spec;
  const out: InstanceSpec = { ...spec, image: img.diskPath };
  if (!spec.kernel && !spec.firmwareBoot && img.kernelPath && img.initrdPath) {
    out.kernel = img.kernelPath;
    out.initrd = img.initrdPath;
    out.cmdline = spec.cmdline ?? STORED_IMAGE_CMDLINE;
  }
  return out;
}
