// instances.json's `image` may name an image in civm's store instead of a path. A stored
// image brings its kernel and initrd: unless the instance sets its own kernel or asks for
// firmware-boot, civm boots that kernel directly (no BIOS, no GRUB: faster).
import { existsSync } from "node:fs";
import type { InstanceSpec } from "../config/types.js";

/**
 * Kernel command line for a stored civm image booted by its kernel. Besides the root and
 * console: `quiet` (printk writes the serial console synchronously, byte by byte through
 * emulated port I/O);
 * `tsc=reliable` (under TCG the kernel marks the TSC unstable and falls back to the HPET, an
 * emulated MMIO read for every clock read, vDSO included; QEMU's TSC is one host clock for
 * all vCPUs, and under KVM kvm-clock is preferred anyway); `no_timer_check` (skips the IO-APIC
 * timer probe); `8250.nr_uarts=1` (QEMU gives one serial port; the kernel would register 4).
 * No security-relevant switch (mitigations, lockdown, module signing) is touched.
 */
export const STORED_IMAGE_CMDLINE = "console=ttyS0 root=LABEL=civm-root rw panic=-1 quiet tsc=reliable no_timer_check 8250.nr_uarts=1";

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
