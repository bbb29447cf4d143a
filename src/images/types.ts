// The image spec after validation: what `civm image build` works from.
import type { GuestArch } from "../vm/arch.js";

export type ImageFormat = "qcow2" | "raw" | "vhd";
export const IMAGE_FORMATS: readonly ImageFormat[] = ["qcow2", "raw", "vhd"];

/** Where an image came from, for messages and for resolving relative paths. */
export interface ImageSource {
  /** The spec file as the caller named it. */
  file: string;
  /** Absolute folder of the spec file: relative `copy`/`provision` paths start here. */
  baseDir: string;
  /** 0-based position in the file. */
  index: number;
  /** The file was in lvh's images.json form and has been translated. */
  lvh: boolean;
  /** The spec ships with civm (images/ in the repo). */
  builtin: boolean;
}

interface ActionBase {
  /** Free text; cosmetic (not part of the cache key). lvh's "comment" lands here. */
  comment?: string;
}

/** Shell command run with `sh -e -c` inside the image (chroot for root images). */
export interface RunAction extends ActionBase {
  kind: "run";
  command: string;
}

/**
 * Host file or folder copied into the image, as `cp -R` does: `dest` is the new path, or,
 * when it ends with "/" or names an existing folder in the image, the folder to copy into.
 * Copies are owned by root and keep the source's permission bits unless `mode` is set
 * (applied to the copied file, or to the top folder of a copied folder).
 */
export interface CopyAction extends ActionBase {
  kind: "copy";
  /** As written in the spec. */
  src: string;
  /** Absolute host path (src resolved against the spec file's folder). */
  srcPath: string;
  dest: string;
  mode?: number;
}

/** Inline content written to a file (parents created; a symlink at `path` is replaced). */
export interface WriteAction extends ActionBase {
  kind: "write";
  path: string;
  content: string;
  mode?: number;
}

export interface MkdirAction extends ActionBase {
  kind: "mkdir";
  path: string;
  mode?: number;
}

export interface SymlinkAction extends ActionBase {
  kind: "symlink";
  target: string;
  path: string;
}

/** Appends one line (a newline is added first if the file does not end with one; the file is created if missing). */
export interface AppendLineAction extends ActionBase {
  kind: "append-line";
  file: string;
  line: string;
}

/** Writes /etc/hostname and the 127.0.1.1 line of /etc/hosts. */
export interface SetHostnameAction extends ActionBase {
  kind: "set-hostname";
  hostname: string;
}

/** `systemctl enable UNIT` (offline, in the image). */
export interface EnableServiceAction extends ActionBase {
  kind: "enable-service";
  unit: string;
}

/**
 * A script run inside the booted image (the VM stage), not in the chroot.
 * Either a host script (`src`/`srcPath`) or inline shell text.
 */
export interface ProvisionAction extends ActionBase {
  kind: "provision";
  script?: { src: string; srcPath: string };
  inline?: string;
}

/**
 * A kernel from civm's kernel store (`civm kernel build|add`) installed into the image:
 * /boot/vmlinuz-<release>, its modules in /lib/modules/<release>, an initramfs-tools initrd,
 * and /boot/civm-kernel naming it, so the image's exported kernel (direct boot) is this one.
 * Expanded into a copy and a run action before the cache key is computed
 * (images/install-kernel.ts), so the kernel's files are part of the key.
 */
export interface InstallKernelAction extends ActionBase {
  kind: "install-kernel";
  kernel: string;
}

export type ImageAction =
  | RunAction
  | CopyAction
  | WriteAction
  | MkdirAction
  | SymlinkAction
  | AppendLineAction
  | SetHostnameAction
  | EnableServiceAction
  | ProvisionAction
  | InstallKernelAction;

export type ActionKind = ImageAction["kind"];

export const ACTION_KINDS: readonly ActionKind[] = [
  "run",
  "copy",
  "write",
  "mkdir",
  "symlink",
  "append-line",
  "set-hostname",
  "enable-service",
  "provision",
  "install-kernel",
];

/**
 * The GitHub Actions runner release installed into the image (`githubRunner` in the spec):
 * civm downloads it on the host into its download cache (keyed by sha256), verifies it and
 * unpacks it for the runner user in the VM stage.
 */
export interface GithubRunnerSpec {
  version: string;
  /** The release asset's published sha256 (64 lowercase hex digits). */
  sha256: string;
  /** As written (default: GitHub's release asset for `version`). */
  url: string;
  /** Set when `url` is a host path (absolute; relative ones start from the spec file's folder). */
  localPath?: string;
}

export interface ImageSpec {
  name: string;
  description?: string;
  /** Name of the parent image; absent for root images (built with mmdebstrap). */
  parent?: string;
  /** Debian suite; children inherit their parent's. */
  suite: string;
  /** Debian mirror URL; children inherit their parent's. */
  mirror: string;
  /** Extra packages, as written (deduplicated, order kept). */
  packages: string[];
  /** Virtual disk size in bytes (a whole number of MiB). */
  sizeBytes: number;
  format: ImageFormat;
  compress?: "zstd";
  /** Kernel package; root images only (children use their parent's kernel). */
  kernel?: string;
  /** Child images: true = a standalone copy, false = a qcow2 backing chain on the parent. */
  flatten: boolean;
  actions: ImageAction[];
  /** The actions runner to install in this image's build (a child of an image that has one sets it only to replace it). */
  githubRunner?: GithubRunnerSpec;
  /** true: passwordless sudo for the runner user; false: none (removes a parent's). Unset: left as the parent has it. */
  sudo?: boolean;
  /**
   * Root images: true installs civm itself into /opt/civm (this checkout's bundle, its
   * production node_modules with their native modules, the build host's Node.js package);
   * see src/images/civm-release.ts.
   */
  civm?: boolean;
  /** Root images: true also makes the disk boot under UEFI (an EFI system partition with GRUB's removable-media loader). */
  uefi?: boolean;
  /**
   * The guest architecture (root images; a child takes its parent's): "arm64" builds the root
   * tree with mmdebstrap --arch arm64 (qemu-user through binfmt_misc) and boots the build VM
   * on qemu-system-aarch64's virt machine. Absent: x86_64.
   */
  arch?: GuestArch;
  /**
   * true: `civm image build` also makes the image's memory snapshot for the default VM
   * settings (2 cpus, 2 GiB, pc). Not part of the image's key: the disk does not change.
   */
  snapshot?: boolean;
  /**
   * Set on an image that is only a stored image (a parent named by a spec file that neither
   * defines it nor finds it among the built-in images): its key and inherited fields come
   * from its manifest, and the builder uses its stored disk as it is, never rebuilding it
   * (src/images/stored-parent.ts).
   */
  stored?: StoredParentRef;
  source: ImageSource;
}

/** A stored image standing in as a parent (ImageSpec.stored). */
export interface StoredParentRef {
  /** The stored image's key (manifest.json's `key`): the child's key covers it. */
  key: string;
  /** Its manifest.json, for messages. */
  manifest: string;
}

export interface LoadedImageSpecs {
  /** The spec file as the caller named it. */
  file: string;
  /** Absolute folder of the spec file. */
  baseDir: string;
  /**
   * Every image of the file plus the built-in images they descend from and the stored images
   * standing in as parents (`stored` set); parents first.
   */
  images: ImageSpec[];
}
