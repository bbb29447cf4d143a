// Builds QEMU's command line as data, section by section. Pure: no I/O, table-tested.
import type { MachineType } from "../config/types.js";
import { ARCH_INFO, type GuestArch } from "./arch.js";

/** Names of the devices civm refers to over QMP. */
export const DEVICE_IDS = {
  configCd: "cfgcd",
  configDrive: "cfgdrive",
  rootDrive: "root",
  net: "net0",
} as const;

export interface PortForward {
  proto: "tcp" | "udp";
  hostAddr: string;
  hostPort: number;
  guestPort: number;
}

/**
 * How QEMU stores what the guest sets (owner, mode, device nodes) for a 9p share.
 * mapped-xattr (default): in user.virtfs.* xattrs; host files stay plain files owned by
 * QEMU's user, so guest root cannot plant setuid or device files on the host.
 * mapped-file: the same, kept in .virtfs_metadata folders (filesystems without xattrs).
 * passthrough: guest owners and modes land on the host as they are (only when asked).
 */
export type NinePSecurityModel = "mapped-xattr" | "mapped-file" | "passthrough";

export interface HostMount {
  path: string;
  tag: string;
  readOnly: boolean;
  /** Default mapped-xattr. */
  securityModel?: NinePSecurityModel;
}

/** Host modes of files and folders the guest creates in a mapped share (readable by the host user). */
export const MAPPED_FILE_MODE = "0644";
export const MAPPED_DIR_MODE = "0755";

export interface QemuPlan {
  binary: string;
  name: string;
  /** The guest's architecture (default x86_64); arm64 runs on the virt machine. */
  arch?: GuestArch;
  accel: "kvm" | "tcg";
  machine: MachineType;
  /** -cpu model; default host (KVM), else the architecture's TCG model (max; cortex-a57 on arm64). */
  cpuModel?: string;
  cpus: number;
  ramBytes: number;
  overlay: string;
  /** Format of `overlay` (qcow2 unless an image build boots a raw disk directly). */
  overlayFormat?: "qcow2" | "raw";
  configIso: string | undefined;
  qmpSocket: string;
  /** Unix socket QEMU listens on for the serial console; civm reads it and writes the log. */
  consoleSocket: string;
  /**
   * A 2-byte file holding 0x3f8 (little-endian): SeaBIOS mirrors its screen to that serial
   * port, so a firmware boot's messages ("No bootable device.") reach the console. Only
   * used without -kernel.
   */
  serconPortFile?: string;
  forwards: PortForward[];
  mounts: HostMount[];
  kernel: { path: string; initrd: string | undefined; cmdline: string } | undefined;
  extraArgs: string[];
  /** "user": QEMU's user-mode network (fenced by the host's nftables); "none": no network device. */
  network?: "user" | "none";
  /**
   * The config CD drive without a disc (configIso unset): a snapshot's VM, whose disc is
   * inserted over QMP after a restore.
   */
  emptyCd?: boolean;
  /** `-device vmgenid` with this GUID: a restored VM's fresh generation id (the guest reseeds its RNG). */
  vmgenid?: string;
  /** `-incoming` URI: restore a snapshot's migration stream (fd:3) instead of booting. */
  incoming?: string;
  /** `-bios` image: UEFI firmware (arm64 disks booted without -kernel). */
  firmware?: string;
}

/** QEMU's seccomp filter: no obsolete syscalls, no set*id, no fork/exec, no scheduler/affinity changes. */
export const SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/** Kernel command line used for direct kernel boot when the instance sets none. */
export const DEFAULT_CMDLINE = "console=ttyS0 root=/dev/vda1 rw panic=-1";

/** Escapes a value for QEMU's comma-separated option syntax (a comma is doubled). */
export function qemuOptValue(v: string): string {
  return v.replace(/,/g, ",,");
}

function bus(machine: MachineType): { pci: boolean; suffix: string } {
  return machine === "microvm" ? { pci: false, suffix: "device" } : { pci: true, suffix: "pci" };
}

export function machineSection(p: QemuPlan): string[] {
  // virt under KVM: the host's own interrupt controller version (TCG emulates the default GICv2).
  const machineOpts = p.machine === "microvm" ? "microvm,rtc=on" : p.machine === "virt" && p.accel === "kvm" ? "virt,gic-version=host" : p.machine;
  const args = ["-machine", `${machineOpts},accel=${p.accel}`, "-cpu", p.cpuModel ?? (p.accel === "kvm" ? "host" : ARCH_INFO[p.arch ?? "x86_64"].tcgCpu)];
  args.push("-smp", String(p.cpus), "-m", `${Math.max(1, Math.floor(p.ramBytes / (1024 * 1024)))}M`);
  return args;
}

export function baseSection(p: QemuPlan): string[] {
  // -S: start paused so that civm is connected to QMP before the guest runs a single
  // instruction and no event (tray, shutdown) can be missed.
  return ["-name", qemuOptValue(p.name), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-S", "-sandbox", SANDBOX];
}

/** SeaBIOS reads its serial console port from this fw_cfg file (SeaBIOS's name, hence no "opt/"). */
export const SERCON_FW_CFG = "etc/sercon-port";

/** The content of serconPortFile: COM1's I/O port, little-endian. */
export const SERCON_PORT_BYTES = Buffer.from([0xf8, 0x03]);

export function controlSection(p: QemuPlan): string[] {
  // The console is a socket civm reads (and redacts) rather than a file QEMU writes: what
  // reaches the disk has passed civm's redaction, and QEMU needs no access to the logs dir.
  const args = [
    "-qmp", `unix:${qemuOptValue(p.qmpSocket)},server=on,wait=off`,
    "-chardev", `socket,id=console0,path=${qemuOptValue(p.consoleSocket)},server=on,wait=off`,
    "-serial", "chardev:console0",
  ];
  if (!p.kernel && p.serconPortFile) args.push("-fw_cfg", `name=${SERCON_FW_CFG},file=${qemuOptValue(p.serconPortFile)}`);
  if (!p.kernel && p.firmware) args.push("-bios", p.firmware);
  return args;
}

export function diskSection(p: QemuPlan): string[] {
  const b = bus(p.machine);
  const args = [
    "-drive", `file=${qemuOptValue(p.overlay)},if=none,id=${DEVICE_IDS.rootDrive},format=${p.overlayFormat ?? "qcow2"},discard=unmap,cache=writeback`,
    // Firmware boot must pick the disk, never the config CD; with -kernel, QEMU's
    // linuxboot ROM holds bootindex 0 itself.
    "-device", `virtio-blk-${b.suffix},drive=${DEVICE_IDS.rootDrive}${b.pci && !p.kernel ? ",bootindex=0" : ""}`,
  ];
  if (p.configIso || p.emptyCd) {
    args.push("-drive", p.configIso
      ? `file=${qemuOptValue(p.configIso)},if=none,id=${DEVICE_IDS.configDrive},media=cdrom,readonly=on,format=raw`
      : `if=none,id=${DEVICE_IDS.configDrive},media=cdrom,readonly=on`);
    if (p.machine === "microvm" || p.machine === "virt") {
      // microvm and virt have no IDE; a SCSI CD-ROM also has a tray the guest can open.
      args.push("-device", `virtio-scsi-${b.suffix},id=scsi0`, "-device", `scsi-cd,drive=${DEVICE_IDS.configDrive},id=${DEVICE_IDS.configCd}`);
    } else {
      args.push("-device", `ide-cd,drive=${DEVICE_IDS.configDrive},id=${DEVICE_IDS.configCd},bus=ide.1`);
    }
  }
  return args;
}

export function hostfwd(f: PortForward): string {
  return `hostfwd=${f.proto}:${f.hostAddr}:${f.hostPort}-:${f.guestPort}`;
}

export function networkSection(p: QemuPlan): string[] {
  const b = bus(p.machine);
  const args: string[] = [];
  if (p.network !== "none") {
    const netdev = ["user", `id=${DEVICE_IDS.net}`, ...p.forwards.map(hostfwd)].join(",");
    args.push("-netdev", netdev, "-device", `virtio-net-${b.suffix},netdev=${DEVICE_IDS.net}`);
  }
  // Entropy for the guest: sshd host key generation at boot would otherwise wait on it.
  args.push("-device", `virtio-rng-${b.suffix}`);
  if (p.vmgenid) args.push("-device", `vmgenid,guid=${p.vmgenid}`);
  return args;
}

export function mountSection(p: QemuPlan): string[] {
  const b = bus(p.machine);
  return p.mounts.flatMap((m, i) => {
    const model = m.securityModel ?? "mapped-xattr";
    // fmode/dmode: QEMU's default (0600/0700) would hide the guest's results from the host user.
    const modes = model === "passthrough" ? "" : `,fmode=${MAPPED_FILE_MODE},dmode=${MAPPED_DIR_MODE}`;
    return [
      "-fsdev", `local,id=fsdev${i},path=${qemuOptValue(m.path)},security_model=${model}${modes}${m.readOnly ? ",readonly=on" : ""}`,
      "-device", `virtio-9p-${b.suffix},fsdev=fsdev${i},mount_tag=${qemuOptValue(m.tag)}`,
    ];
  });
}

export function kernelSection(p: QemuPlan): string[] {
  if (!p.kernel) return [];
  const args = ["-kernel", p.kernel.path];
  if (p.kernel.initrd) args.push("-initrd", p.kernel.initrd);
  args.push("-append", p.kernel.cmdline);
  return args;
}

/** The whole argv (without the binary). */
export function buildQemuArgs(p: QemuPlan): string[] {
  return [
    ...baseSection(p),
    ...machineSection(p),
    ...controlSection(p),
    ...diskSection(p),
    ...networkSection(p),
    ...mountSection(p),
    ...kernelSection(p),
    ...p.extraArgs,
    ...(p.incoming ? ["-incoming", p.incoming] : []),
  ];
}
