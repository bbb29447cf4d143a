// The one place an image string becomes a disk: instances.json's `image`, `civm run
// --image`, pools' `runner.image`. It may be a disk path, the name of an image in civm's
// store, or an OCI reference (REGISTRY/REPO:TAG, @sha256:...) pulled into the store on
// first use; classifyImageRef (oci-ref.ts) says which, by syntax alone. A stored or pulled
// image brings its kernel and initrd: unless the instance sets its own kernel or asks for
// firmware-boot, civm boots that kernel directly (no BIOS, no GRUB: faster).
import { existsSync } from "node:fs";
import { isAbsolute, resolve } from "node:path";
import type { InstanceSpec } from "../config/types.js";
import { ConfigError } from "../errors/index.js";
import { classifyImageRef, type ImageRefKind } from "./oci-ref.js";
import { lvhImageName } from "./lvh.js";
import type { OciProgress, PullPolicy } from "./oci.js";
import type { StoredImage } from "./store.js";

export { classifyImageRef, type ImageRefKind };

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

/** Whether `ref` names a stored image (rule 3 of classifyImageRef). */
export function looksLikeImageName(ref: string | undefined): ref is string {
  return ref !== undefined && classifyImageRef(ref).kind === "stored";
}

/** Whether `ref` is an OCI reference (rule 2 of classifyImageRef). */
export function isOciImageRef(ref: string | undefined): ref is string {
  return ref !== undefined && classifyImageRef(ref).kind === "oci";
}

export interface ResolveImageOptions {
  stateDir: string;
  /** Relative paths (and a file shadowing a stored name) resolve against this folder. */
  baseDir: string;
  /** For OCI references (default "missing": pull only what is not stored). */
  pull?: PullPolicy;
  /** Progress lines of a pull. */
  log?: (line: string) => void;
  onProgress?: (p: OciProgress) => void;
  authFile?: string;
  env?: NodeJS.ProcessEnv;
  signal?: AbortSignal;
}

export interface ResolvedImage {
  kind: ImageRefKind["kind"];
  /** Absolute path of the disk (not checked for existence when kind is "path"). */
  path: string;
  /** The stored image (kinds "stored" and "oci"). */
  stored?: StoredImage;
}

/**
 * Resolves an image string. A path is made absolute; a name is looked up in the store (a
 * file of that name in baseDir wins, as it always has; a missing one is a ConfigError
 * naming the stored images); a reference is found in the store by digest or by its tag's
 * last pull, else pulled as `pull` says.
 */
export async function resolveImageRef(ref: string, opts: ResolveImageOptions): Promise<ResolvedImage> {
  const c = classifyImageRef(ref);
  if (c.kind === "path") {
    const t = ref.trim();
    const home = t === "~" || t.startsWith("~/") ? (opts.env ?? process.env).HOME : undefined;
    const p = home ? resolve(home, t.slice(2)) : t;
    const path = isAbsolute(p) ? p : resolve(opts.baseDir, p);
    // lvh's habit: a bare "base.qcow2" that is no file names the stored image base.
    const bare = lvhImageName(t);
    if (!existsSync(path) && bare !== t && looksLikeImageName(bare)) {
      const { ImageStore } = await import("./store.js");
      const img = await new ImageStore(opts.stateDir).get(bare);
      if (img) return { kind: "stored", path: img.diskPath, stored: img };
    }
    return { kind: "path", path };
  }
  const { ImageStore } = await import("./store.js"); // only when a name is used: start-up time
  const store = new ImageStore(opts.stateDir);
  if (c.kind === "stored") {
    const asPath = resolve(opts.baseDir, c.name);
    if (existsSync(asPath)) return { kind: "path", path: asPath };
    const img = await store.require(c.name);
    return { kind: "stored", path: img.diskPath, stored: img };
  }
  const { ensureOciImage } = await import("./oci.js");
  const img = await ensureOciImage({
    ref: c.oci,
    store,
    stateDir: opts.stateDir,
    policy: opts.pull ?? "missing",
    log: opts.log ?? (() => {}),
    ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
    ...(opts.authFile ? { authFile: opts.authFile } : {}),
    ...(opts.env ? { env: opts.env } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
  });
  return { kind: "oci", path: img.diskPath, stored: img };
}

/**
 * An instance whose `image` names a stored image or an OCI reference, pointed at the disk
 * (and kernel). A stored name that is not stored leaves the spec as it is: the caller's
 * file check reports it with its own words.
 */
export async function resolveStoredImage(spec: InstanceSpec, stateDir: string, opts: Omit<ResolveImageOptions, "stateDir" | "baseDir"> = {}): Promise<InstanceSpec> {
  const ref = spec.imageRef;
  if (ref === undefined) return spec;
  const c = classifyImageRef(ref);
  if (c.kind === "path" || (c.kind === "stored" && existsSync(spec.image))) return spec;
  if (c.kind === "stored") {
    const { ImageStore } = await import("./store.js");
    const img = await new ImageStore(stateDir).get(c.name);
    return img ? withStoredImage(spec, img, img.diskPath) : spec;
  }
  const resolved = await resolveImageRef(ref, { ...opts, stateDir, baseDir: "/" });
  return withStoredImage(spec, resolved.stored, resolved.path);
}

/** `spec` booting `img` (its disk, and its kernel unless the spec brings one or asks for firmware boot). */
export function withStoredImage(spec: InstanceSpec, img: StoredImage | undefined, diskPath: string): InstanceSpec {
  const imageArch = img?.manifest.arch ?? "x86_64";
  const arch = spec.arch ?? "x86_64";
  if (img && imageArch !== arch) {
    throw new ConfigError(
      `${spec.source.file}: instance ${JSON.stringify(spec.name)} (#${spec.source.index + 1}): "image" ${spec.imageRef ?? img.manifest.name} is an ${imageArch} image and the instance is ${arch}` +
        `${spec.arch ? "" : " (no \"arch\")"}: set "arch": "${imageArch}" (or civm run --arch ${imageArch}), or use an image built for ${arch}.`,
    );
  }
  const out: InstanceSpec = { ...spec, image: diskPath };
  if (img && !spec.kernel && !spec.firmwareBoot && img.kernelPath && img.initrdPath) {
    out.kernel = img.kernelPath;
    out.initrd = img.initrdPath;
    out.cmdline = spec.cmdline ?? STORED_IMAGE_CMDLINE;
  }
  return out;
}
