// `civm run --image IMG ...`: turns the ad-hoc flags into a DevPlan (every check happens
// here, before anything is started: image, kernel, host folders, ports, name), and a DevPlan
// into the RunVmRequest that vm/ runs. A DevPlan is plain JSON: a detached supervisor gets
// it through its environment.
import { existsSync } from "node:fs";
import { stat } from "node:fs/promises";
import { isAbsolute, join, resolve } from "node:path";
import type { InstanceSpec, JsonValue } from "../config/types.js";
import { parseAllowEntry, type AllowRule, type NetworkSpec } from "../net/policy.js";
import { parseSize } from "../config/sizes.js";
import { parseSecondsFlag } from "../config/durations.js";
import { ConfigError } from "../errors/index.js";
import { STATE_LAYOUT, type Paths } from "../host/paths.js";
import { DEFAULT_CMDLINE, qemuOptValue, type HostMount, type PortForward } from "../vm/argv.js";
import { imageInfo, sniffImage } from "../vm/disk.js";
import { checkPortFree } from "../vm/ports.js";
import { newVmId, type RunVmRequest } from "../vm/run.js";
import { resolveImageRef, STORED_IMAGE_CMDLINE } from "../images/resolve.js";
import { almostOciReference } from "../images/oci-ref.js";
import type { OciProgress } from "../images/oci.js";
import { formatBytes } from "../vm/format.js";
import { ARCH_INFO, archOfImage, parseArch, requireArch, type GuestArch } from "../vm/arch.js";
import { securityModelFor } from "../vm/ninep.js";
import { checkForwardsDistinct, checkVmName, parsePortSpec, passthroughWarning, planHostMounts } from "./options.js";
import { freePort, makeKeyPair, SSH_DIR, SSH_KEY_FILE } from "./ssh.js";
import { liveEntries, sshOverride, type DevMeta } from "./meta.js";
import { openConsoleSinks, type ConsoleSinks } from "./console-sinks.js";

/** The plan's console sinks (lvh's --console-log-file, --serial-port), or undefined; close them after the run. */
export async function planConsoleSinks(plan: DevPlan, log: (line: string) => void): Promise<ConsoleSinks | undefined> {
  if (plan.consoleLogFile === undefined && !plan.serialPort) return undefined;
  return openConsoleSinks({ ...(plan.consoleLogFile !== undefined ? { logFile: plan.consoleLogFile } : {}), ...(plan.serialPort ? { serial: plan.serialPort } : {}), log });
}

/** What the guest agent is told: stay up (as root, so any image with the agent works), mount, install the key. */
export const KEEPALIVE_COMMAND = "exec sleep infinity";

export interface DevFlags {
  image: string;
  /** --firmware-boot: SeaBIOS and the image's bootloader, not a stored image's or a foreign image's own kernel. */
  firmwareBoot?: boolean;
  kernel?: string;
  initrd?: string;
  append?: string;
  cpus?: string;
  mem?: string;
  disk?: string;
  hostMount?: string[];
  port?: string[];
  name?: string;
  timeout?: string;
  sshBind?: string;
  grace?: string;
  keep?: boolean;
  /** --allow: network policy exceptions (repeatable). */
  allow?: string[];
  /** --network restricted|unrestricted (a dev VM always has its network: SSH needs it). */
  network?: string;
  /** --cpu-kind: QEMU's -cpu model. */
  cpuKind?: string;
  /** --console-log-file: a copy of the (redacted) console. */
  consoleLogFile?: string;
  /** --serial-port: the console over TCP on the SSH bind address. */
  serialPort?: string;
  /** --ssh-key/--ssh-user: an image without civm's agent; SSH with this key and user. */
  sshKey?: string;
  sshUser?: string;
  /** --snapshot: restore a stored image's memory snapshot (made first when there is none). */
  snapshot?: boolean;
  /** --arch: the guest's architecture (default a stored image's own, else x86_64). */
  arch?: string;
}

export interface DevPlan {
  id: string;
  spec: InstanceSpec;
  /** 9p shares: the host mounts. */
  mounts: HostMount[];
  /** Forwards besides SSH. */
  forwards: PortForward[];
  dev: DevMeta;
  /** Address the SSH forward listens on. */
  sshBind: string;
  accel: "kvm" | "tcg";
  graceSeconds: number;
  keep: boolean;
  /** Printed at every start (a :passthrough mount, a folder shared with mapped-file). */
  warnings: string[];
  /** lvh's --console-log-file (absolute) and --serial-port. */
  consoleLogFile?: string;
  serialPort?: { host: string; port: number };
  /** --snapshot (docs/images.md "Snapshots"). */
  snapshot?: boolean;
}

export interface PlanContext {
  paths: Paths;
  cwd: string;
  /** Default "tcg"; the caller may set plan.accel after probing (checks come first). */
  accel?: "kvm" | "tcg";
  /** Supervisor log path for detached VMs (given a name and id). */
  supervisorLog?: (name: string, id: string) => string;
  /** Lines and progress of an OCI pull (--image REF not pulled yet). */
  pullLog?: (line: string) => void;
  onPullProgress?: (p: OciProgress) => void;
  pullSignal?: AbortSignal;
}

function wholeNumber(v: string, flag: string, min: number): number {
  const n = Number(v);
  if (!/^\d+$/.test(v.trim()) || !Number.isSafeInteger(n) || n < min) throw new ConfigError(`${flag} must be a whole number${min > 0 ? ` of at least ${min}` : " (0 or more)"}, not "${v}"`);
  return n;
}

function size(v: string, flag: string): number {
  try {
    return parseSize(v);
  } catch (e) {
    throw new ConfigError(`${flag}: ${(e as Error).message}`);
  }
}

/** The least memory a VM gets: below it a guest cannot boot, and the value was surely meant in MiB. */
export const MIN_MEM_BYTES = 64 * 1024 ** 2;

/**
 * --mem: a size with a unit (1G, 512M), or a bare number of MiB as in QEMU's -m and lvh's
 * --mem (4096 is 4 GiB, never 4096 bytes). Less than 64 MiB is refused.
 */
export function memFlag(v: string): number {
  const bytes = /^\s*\d+\s*$/.test(v) ? Number(v) * 1024 ** 2 : size(v, "--mem");
  if (!Number.isSafeInteger(bytes) || bytes < MIN_MEM_BYTES) {
    throw new ConfigError(`--mem ${v}: a VM needs at least 64 MiB; give a size such as 2G or 512M (a bare number is MiB, as in QEMU's -m: 4096 is 4 GiB)`);
  }
  return bytes;
}

/** --cpu-kind: a QEMU CPU model with optional features (host, max, qemu64, EPYC,+ssse3...). */
export function cpuKindFlag(v: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9_.+=,-]*$/.test(v)) throw new ConfigError(`--cpu-kind ${JSON.stringify(v)} is not a QEMU CPU model; qemu-system-x86_64 -cpu help lists them (e.g. host, max, qemu64, or a model with features: max,-vmx)`);
  return v;
}

async function resolveImage(ref: string, ctx: PlanContext): Promise<{ path: string; kernel?: string; initrd?: string; stored: boolean; arch?: GuestArch }> {
  // A path, a stored name or an OCI reference (pulled on first use): resolveImageRef decides.
  const r = await resolveImageRef(ref, { stateDir: ctx.paths.stateDir, baseDir: ctx.cwd, ...(ctx.pullLog ? { log: ctx.pullLog } : {}), ...(ctx.onPullProgress ? { onProgress: ctx.onPullProgress } : {}), ...(ctx.pullSignal ? { signal: ctx.pullSignal } : {}) });
  if (r.kind === "path") {
    if (!existsSync(r.path)) {
      const hint = almostOciReference(ref);
      throw new ConfigError(`--image ${ref}: ${r.path} does not exist${hint ? ` (${hint})` : ""}`);
    }
    const st = await stat(r.path);
    if (!st.isFile()) throw new ConfigError(`--image ${ref}: ${r.path} is not a file (give a disk image, the name of a stored image or an OCI reference)`);
    return { path: r.path, stored: false };
  }
  const img = r.stored!;
  const arch = archOfImage(img.manifest);
  return { path: img.diskPath, ...(img.kernelPath && img.initrdPath ? { kernel: img.kernelPath, initrd: img.initrdPath } : {}), stored: true, ...(arch ? { arch } : {}) };
}

/** Checks everything and picks the SSH port; throws ConfigError (exit 2) or HostError (exit 8, a port in use). */
export async function planDevVm(f: DevFlags, ctx: PlanContext): Promise<DevPlan> {
  const { paths, cwd } = ctx;
  const id = newVmId();
  const name = f.name !== undefined ? checkVmName(f.name) : `dev-${id}`;
  const live = await liveEntries(paths.stateDir);
  if (live.some((e) => e.name === name)) throw new ConfigError(`a VM named "${name}" is already running (civm ls); pick another --name or stop it with civm stop ${name}`);

  const cpus = f.cpus !== undefined ? wholeNumber(f.cpus, "--cpus", 1) : 2;
  const ramBytes = f.mem !== undefined ? memFlag(f.mem) : 2 * 1024 ** 3;
  const rootDiskBytes = f.disk !== undefined ? size(f.disk, "--disk") : undefined;
  const timeoutSeconds = f.timeout !== undefined ? parseSecondsFlag(f.timeout, "--timeout", { zeroMeans: "= never" }) : 3600;
  const graceSeconds = f.grace !== undefined ? parseSecondsFlag(f.grace, "--grace") : 30;
  const sshBind = f.sshBind ?? "127.0.0.1";

  // Image (a stored name or a path) and the kernel that boots it.
  const image = await resolveImage(f.image, ctx);
  // The guest's architecture: --arch, else the stored image's own (built or pulled for it).
  let arch: GuestArch = image.arch ?? "x86_64";
  if (f.arch !== undefined) {
    const a = parseArch(f.arch);
    if (!a) throw new ConfigError(`--arch ${JSON.stringify(f.arch)} is not an architecture civm runs; give x86_64 (also amd64) or arm64 (also aarch64)`);
    if (image.arch && image.arch !== a) throw new ConfigError(`--arch ${f.arch}: the stored image ${f.image} is an ${image.arch} image; drop --arch (it runs as ${image.arch}) or use an image built for ${a}`);
    arch = a;
  }
  const sniffed = await sniffImage(image.path, `--image ${f.image}:`);
  if (rootDiskBytes !== undefined) {
    const info = await imageInfo(image.path, `--image ${f.image}:`);
    if (rootDiskBytes < info.virtualSize) {
      throw new ConfigError(`--disk ${f.disk} is smaller than the image ${f.image} (${formatBytes(info.virtualSize)}); a disk can only grow`);
    }
  }
  const mounts: HostMount[] = [];
  const qemuArgs: string[] = [];
  if (f.firmwareBoot && f.kernel !== undefined) throw new ConfigError("--firmware-boot boots the image through its own bootloader and --kernel boots a kernel directly; give one");
  let kernel = f.firmwareBoot ? undefined : image.kernel;
  let initrd = f.firmwareBoot ? undefined : image.initrd;
  let cmdline: string | undefined = kernel ? STORED_IMAGE_CMDLINE : undefined;
  let kernelRef: string | undefined;
  if (f.kernel !== undefined) {
    kernelRef = f.kernel;
    const asPath = f.kernel.startsWith("/") ? f.kernel : join(cwd, f.kernel);
    if (f.kernel.includes("/") || existsSync(asPath)) {
      if (!existsSync(asPath) || !(await stat(asPath)).isFile()) throw new ConfigError(`--kernel ${f.kernel}: ${asPath} is not a file (give a bzImage or the name of a stored kernel: civm kernel ls)`);
      kernel = asPath;
      initrd = undefined;
      cmdline = DEFAULT_CMDLINE;
    } else {
      const { KernelStore } = await import("../kernels/index.js");
      const k = await new KernelStore(paths.stateDir).require(f.kernel);
      if (f.initrd !== undefined) throw new ConfigError(`--initrd cannot be combined with a stored kernel (${f.kernel} brings its own initrd)`);
      if ((f.hostMount ?? []).length && k.manifest.ninep === false) {
        throw new ConfigError(`--host-mount needs virtio-9p in the guest kernel, and kernel ${f.kernel} (${k.manifest.release}) has none (CONFIG_9P_FS, CONFIG_NET_9P_VIRTIO; Debian's cloud kernels lack it): use another kernel or no --host-mount`);
      }
      kernel = k.kernelPath;
      initrd = k.initrdPath;
      cmdline = STORED_IMAGE_CMDLINE;
      // The kernel's modules: a read-only disk the initrd mounts at /lib/modules/<release>.
      if (k.modulesDisk) qemuArgs.push("-drive", `file=${qemuOptValue(k.modulesDisk)},if=none,id=civmmods,format=raw,readonly=on`, "-device", "virtio-blk-pci,drive=civmmods,serial=civm-modules");
    }
  }
  if (f.initrd !== undefined) {
    if (f.kernel === undefined) throw new ConfigError("--initrd needs --kernel (a kernel file)");
    const p = f.initrd.startsWith("/") ? f.initrd : join(cwd, f.initrd);
    if (!existsSync(p) || !(await stat(p)).isFile()) throw new ConfigError(`--initrd ${f.initrd}: ${p} is not a file`);
    initrd = p;
    cmdline = STORED_IMAGE_CMDLINE;
  }
  if (!kernel && !f.firmwareBoot && !image.stored && sniffed && sniffed.evidence !== "blank") {
    // A foreign disk with GRUB: its own kernel, read from the image once (docs/images.md).
    const { describeForeignBoot, foreignBoot } = await import("../images/foreign-boot.js");
    const r = await foreignBoot(image.path, { stateDir: paths.stateDir, ...(ctx.pullLog ? { log: ctx.pullLog } : {}) });
    ctx.pullLog?.(describeForeignBoot(name, image.path, r, arch === "arm64" ? "UEFI" : "SeaBIOS"));
    if (r.ok) {
      kernel = r.boot.kernel;
      initrd = r.boot.initrd;
      cmdline = r.boot.cmdline;
    }
  }
  if (f.append !== undefined) {
    if (!kernel) throw new ConfigError(`--append needs a kernel: image ${f.image} boots through its own bootloader; give --kernel`);
    cmdline = `${cmdline ?? DEFAULT_CMDLINE} ${f.append}`.trim();
  }

  // Host folders.
  const hostMounts = planHostMounts(f.hostMount ?? [], cwd);
  const warnings: string[] = [];
  for (const m of hostMounts) {
    let st;
    try {
      st = await stat(m.hostPath);
    } catch {
      throw new ConfigError(`--host-mount: ${m.hostPath} does not exist; create it or fix the path`);
    }
    if (!st.isDirectory()) throw new ConfigError(`--host-mount: ${m.hostPath} is not a folder (9p shares folders)`);
    const choice = await securityModelFor(m.hostPath, { passthrough: !!m.passthrough });
    if (choice.note) warnings.push(`--host-mount: ${choice.note}`);
    if (m.passthrough) warnings.push(passthroughWarning(m));
    mounts.push({ path: m.hostPath, tag: m.tag, readOnly: m.readOnly, securityModel: choice.model });
  }

  // Ports: -p HOST:22 picks the SSH port, otherwise a free one is chosen.
  const parsed = (f.port ?? []).map((p) => parsePortSpec(p, sshBind));
  checkForwardsDistinct(parsed);
  const sshForward = parsed.find((p) => p.guestPort === 22 && p.proto === "tcp");
  const forwards = parsed.filter((p) => p !== sshForward);
  for (const fw of parsed) await checkPortFree(fw.hostAddr, fw.hostPort, fw.proto, `-p ${fw.hostAddr}:${fw.hostPort}:${fw.guestPort}/${fw.proto}`);
  const sshHost = sshForward?.hostAddr ?? sshBind;
  const sshPort = sshForward?.hostPort ?? (await freePort(sshBind));
  let serialPort: DevPlan["serialPort"];
  if (f.serialPort !== undefined) {
    const port = wholeNumber(f.serialPort, "--serial-port", 1);
    if (port > 65535) throw new ConfigError(`--serial-port ${f.serialPort} is not a port (1-65535)`);
    if (port === sshPort || parsed.some((p) => p.proto === "tcp" && p.hostPort === port)) throw new ConfigError(`--serial-port ${port} is also forwarded with -p or used for SSH; pick another port`);
    await checkPortFree(sshHost, port, "tcp", `--serial-port ${port}`);
    serialPort = { host: sshHost, port };
  }
  let consoleLogFile: string | undefined;
  if (f.consoleLogFile !== undefined) {
    if (!f.consoleLogFile) throw new ConfigError("--console-log-file needs a file name");
    consoleLogFile = isAbsolute(f.consoleLogFile) ? f.consoleLogFile : resolve(cwd, f.consoleLogFile);
  }
  const connectHost = sshHost === "0.0.0.0" ? "127.0.0.1" : sshHost === "::" ? "::1" : sshHost;

  const config: JsonValue = {
    command: KEEPALIVE_COMMAND,
    user: "root",
    mounts: hostMounts.map((m) => ({ tag: m.tag, path: m.guestPath, ro: m.readOnly })),
  };
  await requireArch(arch, { firmware: !kernel, where: `civm run --image ${f.image}`, field: "--arch", dropHint: "drop --arch to run an x86_64 guest" });
  const spec: InstanceSpec = {
    name, image: image.path, imageRef: f.image, cpus, ramBytes, rootDiskBytes, timeoutSeconds, sshPort, config,
    kernel, initrd, cmdline, machine: ARCH_INFO[arch].defaultMachine, ...(arch !== "x86_64" ? { arch } : {}), ...(f.cpuKind !== undefined ? { cpuModel: cpuKindFlag(f.cpuKind) } : {}), qemuArgs, network: devNetwork(f), source: { file: "(civm run --image)", index: 0, baseDir: cwd },
  };
  const workDir = join(paths.stateDir, STATE_LAYOUT.vms, `${name}-${id}`);
  const dev: DevMeta = {
    kind: "dev",
    ssh: { host: connectHost, port: sshPort, key: join(workDir, SSH_DIR, SSH_KEY_FILE), user: "root", ...sshOverride(f, cwd) },
    ...(f.sshKey !== undefined ? { agent: false } : {}),
    forwards,
    mounts: hostMounts,
    image: f.image,
    ...(kernelRef !== undefined ? { kernel: kernelRef } : {}),
    detached: !!ctx.supervisorLog,
    ...(ctx.supervisorLog ? { supervisorLog: ctx.supervisorLog(name, id) } : {}),
    graceSeconds,
  };
  return {
    id, spec, mounts, forwards, dev, sshBind: sshHost, accel: ctx.accel ?? "tcg", graceSeconds, keep: !!f.keep, warnings, ...(f.snapshot ? { snapshot: true } : {}),
    ...(consoleLogFile !== undefined ? { consoleLogFile } : {}), ...(serialPort ? { serialPort } : {}),
  };
}

export interface DevRequestOptions {
  paths: Paths;
  log: (line: string) => void;
  onConsole?: (text: string) => void;
  /** The plan's --console-log-file/--serial-port sinks (openConsoleSinks), if any. */
  sinks?: ConsoleSinks;
}

/** The VmRun request of a plan: the key pair is made in the work dir, its public half goes to the agent. */
export function devRunRequest(plan: DevPlan, o: DevRequestOptions): RunVmRequest {
  return {
    spec: plan.spec,
    paths: o.paths,
    accel: plan.accel,
    sshBind: plan.sshBind,
    extraForwards: plan.forwards,
    mounts: plan.mounts,
    graceSeconds: plan.graceSeconds,
    keep: plan.keep,
    log: o.log,
    ...(o.onConsole || o.sinks ? { onConsole: (t: string) => (o.onConsole?.(t), o.sinks?.onText(t)) } : {}),
    ...(o.sinks ? { onConsoleInput: o.sinks.onInput } : {}),
    id: plan.id,
    meta: { dev: plan.dev },
    ...(plan.snapshot
      ? {
          prepareSnapshot: async (signal: AbortSignal) => {
            const { planSnapshotStart, storedImageOf } = await import("../images/snapshot.js");
            return planSnapshotStart({
              mode: "snapshot", img: await storedImageOf(plan.spec, o.paths.stateDir), spec: plan.spec, paths: o.paths, accel: plan.accel,
              ...(plan.spec.network ? { network: plan.spec.network } : {}), mounts: plan.mounts.length, log: o.log, signal,
            });
          },
        }
      : {}),
    prepareWorkDir: async (workDir) => {
      const { publicKey } = await makeKeyPair(workDir, `civm-${plan.spec.name}-${plan.id}`);
      return { config: { ...(plan.spec.config as Record<string, JsonValue>), ssh_authorized_keys: [publicKey] } };
    },
  };
}

/** --network and --allow as a policy; the errors name the flag. */
export function devNetwork(f: Pick<DevFlags, "allow" | "network">): NetworkSpec {
  const mode = f.network ?? "restricted";
  if (mode !== "restricted" && mode !== "unrestricted") {
    throw new ConfigError(`--network ${JSON.stringify(mode)}: a dev VM's network is "restricted" (the default: the internet, not this host or its private networks) or "unrestricted"; "none" would leave no way in for SSH`);
  }
  const allow: AllowRule[] = [];
  for (const a of f.allow ?? []) {
    try {
      allow.push(parseAllowEntry(a));
    } catch (e) {
      throw new ConfigError(`--allow ${(e as Error).message}`);
    }
  }
  if (allow.length && mode === "unrestricted") throw new ConfigError("--allow only applies to the restricted network; with --network unrestricted everything is reachable already: drop one of them");
  return { mode, allow };
}
