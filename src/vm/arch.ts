// Guest architectures: what differs between an x86_64 and an arm64 (AArch64) guest, as data.
// Pure apart from hostArch() and archProblems() (which look at the host); used by the argv
// builder, VmRun, the accelerator choice, civm doctor and the image builder.
import { existsSync } from "node:fs";
import { which } from "../exec/index.js";
import { HostError } from "../errors/index.js";
import type { InstanceSpec } from "../config/types.js";

export type GuestArch = "x86_64" | "arm64";
export const GUEST_ARCHES: readonly GuestArch[] = ["x86_64", "arm64"];

export interface ArchInfo {
  /** QEMU's system emulator for this guest. */
  qemuBinary: string;
  /** Debian package of qemuBinary. */
  qemuPackage: string;
  /** Machine type when an instance names none. */
  defaultMachine: "pc" | "virt";
  /** Machine types civm drives for this guest. */
  machines: readonly string[];
  /** The serial console's device name in the guest (console=...). */
  console: string;
  /** -cpu under TCG (KVM: host). */
  tcgCpu: string;
  /** UEFI firmware for disks that boot themselves (arm64 has no BIOS); undefined: SeaBIOS, QEMU's default. */
  firmware?: { path: string; package: string };
  /** Debian's and OCI's name for the architecture. */
  debianArch: string;
  /** Node's process.arch on a host of this architecture (KVM runs only guests of the host's own). */
  nodeArch: string;
  /** binfmt_misc entry through which foreign binaries of this architecture run (mmdebstrap --arch). */
  binfmt?: { entry: string; package: string };
}

export const ARCH_INFO: Record<GuestArch, ArchInfo> = {
  x86_64: {
    qemuBinary: "qemu-system-x86_64",
    qemuPackage: "qemu-system-x86",
    defaultMachine: "pc",
    machines: ["pc", "q35", "microvm"],
    console: "ttyS0",
    tcgCpu: "max",
    debianArch: "amd64",
    nodeArch: "x64",
    binfmt: { entry: "qemu-x86_64", package: "qemu-user-static" },
  },
  arm64: {
    qemuBinary: "qemu-system-aarch64",
    qemuPackage: "qemu-system-arm",
    defaultMachine: "virt",
    machines: ["virt"],
    console: "ttyAMA0",
    // cortex-a57 (ARMv8.0) rather than max: max emulates pointer authentication with
    // QARMA, which costs TCG a large share of every function call (docs/benchmarks.md).
    tcgCpu: "cortex-a57",
    // AAVMF (EDK2's ArmVirtQemu) from qemu-efi-aarch64, as -bios: no NVRAM file per VM, so
    // disks boot through the removable-media path (/EFI/BOOT/BOOTAA64.EFI).
    firmware: { path: "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd", package: "qemu-efi-aarch64" },
    debianArch: "arm64",
    nodeArch: "arm64",
    binfmt: { entry: "qemu-aarch64", package: "qemu-user-static" },
  },
};

/** "arm64" and its other spellings (aarch64); undefined for anything else. */
export function parseArch(v: string): GuestArch | undefined {
  const s = v.trim().toLowerCase();
  if (s === "x86_64" || s === "amd64" || s === "x86-64" || s === "x64") return "x86_64";
  if (s === "arm64" || s === "aarch64") return "arm64";
  return undefined;
}

export const ARCH_FORMS = '"x86_64" (the default; also "amd64") or "arm64" (also "aarch64")';

/** This host's architecture as a guest architecture (undefined on others, e.g. riscv64). */
export function hostArch(nodeArch: string = process.arch): GuestArch | undefined {
  return GUEST_ARCHES.find((a) => ARCH_INFO[a].nodeArch === nodeArch);
}

/** The machine type of an instance of `arch` that names `machine` (or none). */
export function machineFor(arch: GuestArch, machine: string | undefined): string {
  return machine ?? ARCH_INFO[arch].defaultMachine;
}

/** The architecture a stored image's manifest names (absent: undefined, i.e. x86_64; an unknown name: undefined). */
export function archOfImage(manifest: { arch?: string }): GuestArch | undefined {
  return manifest.arch !== undefined ? parseArch(manifest.arch) : undefined;
}

/** `spec` as a guest of `arch` (civm run --arch, a pool's arm64 image): its default machine when the spec's does not fit it. */
export function withArch(spec: InstanceSpec, arch: GuestArch): InstanceSpec {
  const machine = ARCH_INFO[arch].machines.includes(spec.machine) ? spec.machine : ARCH_INFO[arch].defaultMachine;
  const { arch: _old, ...rest } = spec;
  return { ...rest, machine, ...(arch !== "x86_64" ? { arch } : {}) };
}

/** The accelerator for a guest of `arch` on a host that chose `hostAccel`: KVM runs only the host's own architecture. */
export function accelFor(arch: GuestArch | undefined, hostAccel: "kvm" | "tcg", nodeArch: string = process.arch): "kvm" | "tcg" {
  return hostAccel === "kvm" && hostArch(nodeArch) === (arch ?? "x86_64") ? "kvm" : "tcg";
}

/** x86-only kernel parameters civm's own command lines carry; dropped for other guests. */
const X86_ONLY_PARAMS = new Set(["tsc", "no_timer_check", "8250.nr_uarts"]);

/**
 * A kernel command line for `arch`: on arm64 `console=ttyS0` (the PC's first UART, as civm's
 * and most users' command lines say) becomes the virt machine's PL011 `console=ttyAMA0`, and
 * x86-only parameters are dropped. x86_64 lines are returned as they are.
 */
export function cmdlineFor(arch: GuestArch, cmdline: string): string {
  if (arch === "x86_64") return cmdline;
  return cmdline
    .split(/\s+/)
    .filter((w) => w !== "" && !X86_ONLY_PARAMS.has(w.split("=")[0]!))
    .map((w) => w.replace(/^console=ttyS0(?=,|$)/, `console=${ARCH_INFO[arch].console}`))
    .join(" ");
}

/**
 * What this host lacks to run a guest of `arch`: QEMU's emulator and, for a disk that boots
 * itself (no kernel given), the UEFI firmware. Each item is one sentence naming the package.
 */
export async function archProblems(arch: GuestArch, o: { firmware: boolean; exists?: (p: string) => boolean; which?: (p: string) => Promise<string | undefined> } ): Promise<string[]> {
  const info = ARCH_INFO[arch];
  const w = o.which ?? which;
  const exists = o.exists ?? existsSync;
  const out: string[] = [];
  if (!(await w(info.qemuBinary))) out.push(`${info.qemuBinary} is not installed (Debian package ${info.qemuPackage}; scripts/install-deps.sh installs it)`);
  if (o.firmware && info.firmware && !exists(info.firmware.path)) {
    out.push(`the UEFI firmware ${info.firmware.path} is missing (Debian package ${info.firmware.package}); it boots ${arch} disks that bring no kernel civm can boot directly`);
  }
  return out;
}

/**
 * Throws a HostError (one paragraph: where, the field, what is missing, the fix) when this
 * host cannot run a guest of `arch`; `where` names the file and instance, `field` the key or flag.
 */
export async function requireArch(arch: GuestArch, o: { firmware: boolean; where: string; field: string; dropHint: string }): Promise<void> {
  if (arch === "x86_64") return;
  const problems = await archProblems(arch, { firmware: o.firmware });
  if (!problems.length) return;
  const info = ARCH_INFO[arch];
  const pkgs = [info.qemuPackage, ...(o.firmware && info.firmware ? [info.firmware.package] : [])].join(" ");
  throw new HostError(`${o.where}: ${o.field} ${arch} needs what this host lacks: ${problems.join("; ")}. Install it (apt-get install ${pkgs}), or ${o.dropHint}.`);
}
