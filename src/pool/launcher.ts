// The production VmLauncher: one VmRun per runner VM, from the pool's spec. A stored image
// brings its kernel and initrd, and its architecture (an arm64 image runs on virt, under
// TCG on an x86_64 host; pools have no "arch" of their own); an OCI reference is pulled into the
// store per imagePullPolicy (ociImage); a disk path with `vmlinuz` and `initrd.img` next to
// it boots those too (the layout of a stored image's folder).
import { existsSync } from "node:fs";
import { readdir, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import type { InstanceSpec } from "../config/types.js";
import { ConfigError } from "../errors/index.js";
import type { Paths } from "../host/paths.js";
import { STORED_IMAGE_CMDLINE, withStoredImage } from "../images/resolve.js";
import { accelFor, archOfImage, withArch } from "../vm/arch.js";
import type { StoredImage } from "../images/store.js";
import { Registry } from "../vm/registry.js";
import { reconcile } from "../vm/reconcile.js";
import { VmRun, type SnapshotRequest } from "../vm/run.js";
import type { LaunchRequest, VmHandle, VmLauncher } from "./daemon.js";
import { cmdlineField, combineCmdline } from "./cmdline.js";
import type { PoolSpec } from "./types.js";

export interface VmRunLauncherOptions {
  paths: Paths;
  accel: "kvm" | "tcg";
  /** ACPI grace before QEMU is killed on stop (s). */
  graceSeconds: number;
  /** The user QEMU runs as (undefined: civm-qemu). */
  qemuUser?: string | undefined;
  /** Lines from VmRun (already redacted). */
  log: (line: string, fields: Record<string, unknown>) => void;
  /** imagePullPolicy Always: how long a tag's digest is trusted before it is asked again (default OCI_RECHECK_MS). */
  ociRecheckMs?: number;
}

/** How often a pool with imagePullPolicy Always asks the registry whether its tag moved. */
export const OCI_RECHECK_MS = 60_000;

export class VmRunLauncher implements VmLauncher {
  constructor(private readonly opts: VmRunLauncherOptions) {}

  /** The VM spec of a pool's runner; `log` gets how a foreign disk boots (its kernel read from GRUB's config, or why not). */
  async spec(pool: PoolSpec, id: string, log?: (line: string) => void): Promise<InstanceSpec> {
    const img = pool.runner.image;
    let spec: InstanceSpec = {
      name: pool.runner.namePrefix,
      image: img.kind === "path" && img.path ? img.path : img.ref,
      imageRef: img.ref,
      cpus: pool.vm.cpus,
      ramBytes: pool.vm.ramBytes,
      rootDiskBytes: pool.vm.rootDiskBytes,
      timeoutSeconds: pool.vm.timeoutSeconds,
      sshPort: undefined,
      config: null,
      kernel: undefined,
      initrd: undefined,
      // civm's own command line for the image, with the pool's options appended (cmdline.ts).
      cmdline: undefined,
      machine: "pc",
      qemuArgs: [],
      network: pool.vm.network,
      ...(pool.vm.firmwareBoot ? { firmwareBoot: true } : {}),
      source: { file: `pool ${pool.name}`, index: pool.index },
    };
    if (img.kind === "oci") {
      const stored = await this.ociImage(pool);
      spec = withStoredImage(withImageArch(spec, stored), stored, stored.diskPath);
    } else if (img.kind === "stored") {
      const stored = await this.storedImage(pool, img.ref);
      spec = withStoredImage(withImageArch(spec, stored), stored, stored.diskPath);
    } else {
      const dir = dirname(spec.image);
      if (pool.vm.firmwareBoot) {
        // SeaBIOS and the image's bootloader.
      } else if (existsSync(join(dir, "vmlinuz")) && existsSync(join(dir, "initrd.img"))) {
        spec.kernel = join(dir, "vmlinuz");
        spec.initrd = join(dir, "initrd.img");
      } else {
        // A foreign disk (GRUB on a BIOS disk): its own kernel, as civm run boots it (docs/images.md).
        const { withForeignKernel } = await import("../images/foreign-boot.js");
        spec = await withForeignKernel(spec, { stateDir: this.opts.paths.stateDir, log: (l) => log?.(l) });
        if (!spec.kernel && pool.vm.cmdline !== undefined) log?.(`pool ${pool.name}: "${cmdlineField(pool)}" is ignored: ${spec.image} boots through its own boot loader, which has its own kernel command line`);
      }
    }
    if (spec.kernel) spec.cmdline = combineCmdline(spec.cmdline ?? STORED_IMAGE_CMDLINE, pool.vm.cmdline, spec.machine).cmdline;
    void id;
    return spec;
  }

  /**
   * What a new VM of the pool boots: for a stored image its name, build key and disk hash
   * (a rebuild under the same name is a new image), for a disk path its path, size and
   * mtime.
   */
  async imageKey(pool: PoolSpec): Promise<string> {
    const img = pool.runner.image;
    if (img.kind === "oci") {
      const stored = await this.ociImage(pool);
      return `oci:${img.ref}:${stored.manifest.oci?.digest ?? stored.manifest.key}:${stored.manifest.sha256.slice(0, 16)}`;
    }
    if (img.kind === "stored") {
      const stored = await this.storedImage(pool, img.ref);
      return `stored:${img.ref}:${stored.manifest.key}:${stored.manifest.sha256.slice(0, 16)}`;
    }
    const path = img.kind === "path" && img.path ? img.path : img.ref;
    const s = await stat(path);
    return `${path}:${s.size}:${Math.floor(s.mtimeMs)}`;
  }

  /** The pool's stored image (its disk there: ImageStore.get checks), or a ConfigError. */
  private async storedImage(pool: PoolSpec, ref: string): Promise<StoredImage> {
    const { ImageStore } = await import("../images/store.js");
    const stored = await new ImageStore(this.opts.paths.stateDir).get(ref);
    if (!stored) throw new ConfigError(`pool ${pool.name}: image ${JSON.stringify(ref)} is not in the image store (civm image ls)`);
    return stored;
  }

  /** OCI pulls in flight, and when a reference was last asked of the registry (Always). */
  private readonly ociPulls = new Map<string, { at: number; pending?: Promise<StoredImage> }>();

  /**
   * The stored image of a pool's OCI reference, pulled per runner.imagePullPolicy:
   * IfNotPresent pulls when nothing is stored for it, Never only looks in the store, Always
   * asks the registry for the tag's digest again once the last check is older than
   * ociRecheckMs (a new digest is pulled, and the image key change replaces idle runners).
   * Looking in the store costs no request. One pull per reference at a time; its lines go
   * to the daemon's log.
   */
  private async ociImage(pool: PoolSpec): Promise<StoredImage> {
    const ref = pool.runner.image.ref;
    const policy = pool.runner.imagePullPolicy;
    const memo = this.ociPulls.get(ref);
    if (memo?.pending) return memo.pending;
    const now = Date.now();
    const recheck = policy === "Always" && (!memo || now - memo.at >= (this.opts.ociRecheckMs ?? OCI_RECHECK_MS));
    const { ensureOciImage } = await import("../images/oci.js");
    const { parseOciReference } = await import("../images/oci-ref.js");
    const { ImageStore } = await import("../images/store.js");
    const oci = parseOciReference(ref);
    if (!oci) throw new ConfigError(`pool ${pool.name}: ${JSON.stringify(ref)} is not an OCI reference`);
    const pending = ensureOciImage({
      ref: oci,
      store: new ImageStore(this.opts.paths.stateDir),
      stateDir: this.opts.paths.stateDir,
      policy: recheck ? "always" : policy === "Never" ? "never" : "missing",
      log: (line) => this.opts.log(line, { pool: pool.name, image: ref }),
    });
    this.ociPulls.set(ref, { at: memo?.at ?? 0, pending });
    try {
      const image = await pending;
      this.ociPulls.set(ref, { at: recheck ? now : (memo?.at ?? now) });
      return image;
    } catch (e) {
      this.ociPulls.set(ref, { at: memo?.at ?? 0 });
      throw e;
    }
  }

  /** The pool's `start` (docs/serve.md): the snapshot to restore, made first for "snapshot"; undefined boots. */
  private async snapshotStart(pool: PoolSpec, spec: InstanceSpec, log: (l: string) => void, signal: AbortSignal): Promise<SnapshotRequest | undefined> {
    const mode = pool.vm.start ?? "auto";
    if (mode === "boot") return undefined;
    const img = pool.runner.image;
    let stored: StoredImage | undefined;
    if (img.kind === "oci") stored = await this.ociImage(pool);
    else if (img.kind === "stored") {
      const { ImageStore } = await import("../images/store.js");
      stored = await new ImageStore(this.opts.paths.stateDir).get(img.ref);
    }
    if (!stored && mode === "auto") return undefined;
    const { planSnapshotStart } = await import("../images/snapshot.js");
    return planSnapshotStart({
      mode, img: stored, spec, paths: this.opts.paths, accel: accelFor(spec.arch, this.opts.accel), network: pool.vm.network, log, signal,
      ...(this.opts.qemuUser ? { qemuUser: this.opts.qemuUser } : {}),
    });
  }

  async reconcileLeftovers(): Promise<void> {
    await reconcile(new Registry(this.opts.paths.stateDir), (l) => this.opts.log(l, {}), { sweep: true });
  }

  start(req: LaunchRequest): VmHandle {
    let vm: VmRun | undefined;
    let stopAsked: boolean | undefined;
    const fields = { pool: req.pool.name, vm: req.id, runner: req.name };
    const result = (async () => {
      const spec = await this.spec(req.pool, req.id, (l) => this.opts.log(l, fields));
      vm = new VmRun({
        // Inside run(): a stop while the image's snapshot is made (first use) ends the make at once.
        prepareSnapshot: (signal) => this.snapshotStart(req.pool, spec, (l) => this.opts.log(l, fields), signal),
        id: req.id,
        spec: { ...spec, config: req.config },
        paths: this.opts.paths,
        accel: accelFor(spec.arch, this.opts.accel),
        graceSeconds: this.opts.graceSeconds,
        qemuUser: this.opts.qemuUser,
        secrets: req.secrets,
        log: (l) => this.opts.log(l, fields),
        meta: { pool: req.pool.name, runner: req.name },
      });
      if (stopAsked !== undefined) vm.stop("stopped", stopAsked);
      const r = await vm.run();
      if (r.start === "restore" || r.start === "boot-after-failed-restore") this.opts.log(`${req.name}: started by ${r.start === "restore" ? "a snapshot restore" : "a cold boot after a failed restore"}`, { ...fields, start: r.start });
      else if (r.start === "none") this.opts.log(`${req.name}: stopped while its image's snapshot was being made; it never started`, { ...fields, start: r.start });
      return { reason: r.reason, exitCode: r.exitCode, detail: r.detail };
    })();
    return {
      result,
      stop: (force = false) => {
        if (vm) vm.stop("stopped", force);
        else stopAsked = force;
      },
    };
  }
}

/** The console log VmRun wrote for VM `id` (`<name>-<timestamp>-<id>.log` in the logs dir), if any. */
export async function findConsoleLog(logsDir: string, id: string): Promise<string | undefined> {
  if (!/^[0-9a-f]{8}$/.test(id)) return undefined;
  const re = new RegExp(`-\\d{8}-\\d{6}-${id}\\.log$`);
  const files = await readdir(logsDir).catch(() => [] as string[]);
  const f = files.find((x) => re.test(x));
  return f === undefined ? undefined : join(logsDir, f);
}

/** A pool's VM of a stored image takes the image's architecture (and that architecture's machine). */
function withImageArch(spec: InstanceSpec, img: StoredImage): InstanceSpec {
  const arch = archOfImage(img.manifest);
  return arch && arch !== "x86_64" ? withArch(spec, arch) : spec;
}
