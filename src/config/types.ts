// Typed, validated instance definitions: what config/ hands to vm/.
// Types only; loading and validation live in instances.ts.

import type { NetworkSpec } from "../net/policy.js";
import type { GuestArch } from "../vm/arch.js";

export type MachineType = "pc" | "q35" | "microvm" | "virt";
export type JsonValue = string | number | boolean | null | JsonValue[] | { [k: string]: JsonValue };

export interface InstanceSpec {
  name: string;
  /** Absolute path of the base disk image (relative paths resolve against the instances file's folder). */
  image: string;
  /** `image` as written: a path, or the name of an image in civm's store. */
  imageRef?: string;
  /** firmware-boot: boot a stored image through its bootloader, not its kernel (default false). */
  firmwareBoot?: boolean;
  /** cpu-cores (default 2). */
  cpus: number;
  /** ram in bytes (default 2 GiB). */
  ramBytes: number;
  /** root-disk in bytes; undefined = the base image's own virtual size. */
  rootDiskBytes: number | undefined;
  /** timeout-seconds (default 3600). */
  timeoutSeconds: number;
  /** ssh-port on the host forwarded to guest port 22; undefined = no forward. */
  sshPort: number | undefined;
  /** Arbitrary config, copied into instance.json after pre-processing. */
  config: JsonValue;
  /** Direct kernel boot (absolute paths). */
  kernel: string | undefined;
  initrd: string | undefined;
  cmdline: string | undefined;
  machine: MachineType;
  /** The guest's architecture (default x86_64): arm64 runs qemu-system-aarch64's virt machine. */
  arch?: GuestArch;
  /** QEMU's -cpu model (default: host with KVM, max with TCG); lvh's --cpu-kind. */
  cpuModel?: string;
  /** Extra QEMU arguments, appended last. */
  qemuArgs: string[];
  /** What the guest may reach (undefined: restricted, no exceptions). */
  network?: NetworkSpec;
  /**
   * Where it came from, for error messages: the file as named by the caller, the 0-based
   * position in its list (messages show it as #index+1), and the file's absolute folder,
   * against which relative paths in the instance (and `${{ file:... }}`) resolve.
   */
  source: { file: string; index: number; baseDir?: string };
}
