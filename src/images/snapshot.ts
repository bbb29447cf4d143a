// Memory snapshots of a stored image's VM (docs/images.md "Snapshots"). A snapshot is the VM
// booted with `civm.snapshot` on its kernel command line up to the point where the guest
// agent waits for its configuration disc (no disc has been inserted: no configuration, no
// secret is in it), saved with QEMU's migration stream (memory and device state) plus the
// disk as it was then (the VM's qcow2 overlay on the image's disk). It lives beside the image:
//
//   <state>/images/<name>/snapshots/<key>/   memory (0600), disk.qcow2 (0644), snapshot.json (written last)
//   <state>/images/<name>/snapshots/.tmp-<key>-<rand>/   one being made (.owner: its pid)
//
// The key covers everything that must match on restore: the image (its key and disk
// digest), the QEMU binary (path, size, mtime: an upgrade changes them) and every setting
// that shapes the machine (accel, machine, cpu model, cpus, memory, disk size, kernel,
// initrd, command line, network device, extra QEMU arguments). A restore that cannot use
// a snapshot says why and boots cold; a snapshot made by another QEMU, or damaged, is removed.
import { createHash, randomBytes } from "node:crypto";
import { chmod, mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { InstanceSpec } from "../config/types.js";
import type { Paths } from "../host/paths.js";
import type { NetworkSpec } from "../net/policy.js";
import { VmRun, type SnapshotRequest } from "../vm/run.js";
import { formatBytes } from "../vm/format.js";
import { ConfigError } from "../errors/index.js";
import { STORED_IMAGE_CMDLINE } from "./resolve.js";
import { ownerLiveness, readOwner, writeOwner, type StoredImage } from "./store.js";

export const SNAPSHOT_FORMAT = 1;
export const SNAPSHOT_LAYOUT = { dir: "snapshots", memory: "memory", disk: "disk.qcow2", meta: "snapshot.json" } as const;
/** How long making a snapshot may take (a cold boot to the agent's wait, then the save). */
export const SNAPSHOT_MAKE_TIMEOUT_SECONDS = 600;

export interface QemuIdentity {
  path: string;
  size: number;
  mtimeMs: number;
}

export interface FileIdentity {
  path: string;
  size: number;
  mtimeMs: number;
}

/** Every setting a restore must share with the snapshot. */
export interface SnapshotSettings {
  accel: "kvm" | "tcg";
  machine: string;
  cpuModel: string;
  cpus: number;
  ramBytes: number;
  /** The disk size the guest sees (root-disk, else the image's). */
  diskBytes: number;
  kernel: FileIdentity;
  initrd: FileIdentity | null;
  cmdline: string;
  network: "user" | "none";
  qemuArgs: string[];
}

export interface SnapshotMeta {
  format: number;
  key: string;
  image: { name: string; key: string; sha256: string };
  qemu: QemuIdentity;
  settings: SnapshotSettings;
  createdAt: string;
  memoryBytes: number;
  diskBytes: number;
  makeSeconds: number;
  /** How far QEMU's RTC lags the host's clock, in µs (measured when the snapshot was made). */
  rtcLagMicros?: number;
}

export interface StoredSnapshot {
  dir: string;
  memoryPath: string;
  diskPath: string;
  meta: SnapshotMeta;
}

async function fileIdentity(path: string): Promise<FileIdentity> {
  const st = await stat(path);
  return { path, size: st.size, mtimeMs: st.mtimeMs };
}

/** The QEMU binary as found on PATH (or the path given). */
export async function qemuIdentity(binary = "qemu-system-x86_64"): Promise<QemuIdentity> {
  let path = binary;
  if (!binary.includes("/")) {
    for (const dir of (process.env.PATH ?? "/usr/bin").split(":")) {
      const p = join(dir || ".", binary);
      if (await stat(p).then((s) => s.isFile(), () => false)) {
        path = p;
        break;
      }
    }
  }
  return fileIdentity(path);
}

/**
 * Why `spec` cannot have a snapshot (undefined: it can). Snapshots need the image's kernel
 * booted directly (the agent learns it is a snapshot's VM from the command line), a pc or
 * q35 machine (vmgenid, the RNG reseed, needs their ACPI tables) and no 9p shares (a
 * mounted share cannot be migrated and tags would have to match).
 */
export function snapshotUnsupported(spec: InstanceSpec, opts: { mounts?: number } = {}): string | undefined {
  if (!spec.kernel) return "the VM boots through its firmware (snapshots need the image's kernel booted directly; remove firmware-boot)";
  if (spec.machine === "microvm") return "the microvm machine has no vmgenid device, so a restored VM could not reseed its random number generator";
  if (spec.arch === "arm64") return "arm64 guests have no snapshots yet (QEMU 7.2's virt machine has no vmgenid device, so a restored VM could not reseed its random number generator)";
  if ((opts.mounts ?? 0) > 0) return "the VM has host mounts (9p shares cannot be part of a snapshot)";
  return undefined;
}

export async function snapshotSettings(spec: InstanceSpec, img: StoredImage, accel: "kvm" | "tcg", network: NetworkSpec | undefined): Promise<SnapshotSettings> {
  return {
    accel,
    machine: spec.machine,
    cpuModel: spec.cpuModel ?? (accel === "kvm" ? "host" : "max"),
    cpus: spec.cpus,
    ramBytes: spec.ramBytes,
    diskBytes: spec.rootDiskBytes ?? img.manifest.virtualSize,
    kernel: await fileIdentity(spec.kernel!),
    initrd: spec.initrd ? await fileIdentity(spec.initrd) : null,
    cmdline: spec.cmdline ?? "",
    network: (network ?? spec.network)?.mode === "none" ? "none" : "user",
    qemuArgs: spec.qemuArgs,
  };
}

export function snapshotKey(img: StoredImage, qemu: QemuIdentity, settings: SnapshotSettings): string {
  const input = { format: SNAPSHOT_FORMAT, image: { key: img.manifest.key, sha256: img.manifest.sha256 }, qemu, settings };
  return createHash("sha256").update(JSON.stringify(input)).digest("hex").slice(0, 32);
}

function snapshotsDir(img: StoredImage): string {
  return join(img.dir, SNAPSHOT_LAYOUT.dir);
}

function looksLikeMeta(m: unknown): m is SnapshotMeta {
  const o = m as Partial<SnapshotMeta>;
  return !!o && o.format === SNAPSHOT_FORMAT && typeof o.key === "string" && typeof o.memoryBytes === "number" && !!o.settings && !!o.qemu && !!o.image;
}

/** The image's snapshots (those with a readable snapshot.json), newest first. */
export async function listSnapshots(img: StoredImage): Promise<StoredSnapshot[]> {
  const dir = snapshotsDir(img);
  const names = await readdir(dir).catch(() => [] as string[]);
  const out: StoredSnapshot[] = [];
  for (const n of names) {
    if (n.startsWith(".")) continue;
    const d = join(dir, n);
    try {
      const meta = JSON.parse(await readFile(join(d, SNAPSHOT_LAYOUT.meta), "utf8")) as unknown;
      if (looksLikeMeta(meta) && meta.key === n) out.push({ dir: d, memoryPath: join(d, SNAPSHOT_LAYOUT.memory), diskPath: join(d, SNAPSHOT_LAYOUT.disk), meta });
    } catch {
      /* no snapshot.json: not (yet) a snapshot */
    }
  }
  return out.sort((a, b) => (a.meta.createdAt < b.meta.createdAt ? 1 : -1));
}

/** What is wrong with a snapshot's files (undefined: they are as recorded). */
export async function snapshotDamage(s: StoredSnapshot): Promise<string | undefined> {
  const mem = await stat(s.memoryPath).catch(() => undefined);
  if (!mem) return "its memory file is missing";
  if (mem.size !== s.meta.memoryBytes) return `its memory file is ${mem.size} bytes, ${s.meta.memoryBytes} were saved (truncated or damaged)`;
  const disk = await stat(s.diskPath).catch(() => undefined);
  if (!disk) return "its disk is missing";
  return undefined;
}

export async function removeSnapshot(s: StoredSnapshot | string): Promise<void> {
  const dir = typeof s === "string" ? s : s.dir;
  await rm(join(dir, SNAPSHOT_LAYOUT.meta), { force: true });
  await rm(dir, { recursive: true, force: true });
}

function mib(n: number): string {
  return formatBytes(n);
}

/** How two settings differ, in words ("memory 2 GiB (snapshot) vs 1 GiB"). */
export function describeDifference(snap: SnapshotSettings, want: SnapshotSettings): string {
  const diffs: string[] = [];
  const cmp = (what: string, a: unknown, b: unknown, show: (v: never) => string = (v) => JSON.stringify(v)) => {
    if (JSON.stringify(a) !== JSON.stringify(b)) diffs.push(`${what} ${show(a as never)} (snapshot) vs ${show(b as never)}`);
  };
  cmp("accel", snap.accel, want.accel);
  cmp("machine", snap.machine, want.machine);
  cmp("cpu model", snap.cpuModel, want.cpuModel);
  cmp("cpus", snap.cpus, want.cpus);
  cmp("memory", snap.ramBytes, want.ramBytes, mib);
  cmp("disk size", snap.diskBytes, want.diskBytes, mib);
  cmp("kernel", snap.kernel, want.kernel, (v: FileIdentity) => `${v.path} (${v.size} bytes)`);
  cmp("initrd", snap.initrd, want.initrd, (v: FileIdentity | null) => (v ? `${v.path} (${v.size} bytes)` : "none"));
  cmp("kernel command line", snap.cmdline, want.cmdline);
  cmp("network", snap.network, want.network);
  cmp("QEMU arguments", snap.qemuArgs, want.qemuArgs);
  return diffs.join(", ") || "no setting differs";
}

export type SnapshotChoice = { kind: "restore"; snap: StoredSnapshot } | { kind: "none"; reason: string; key: string; settings: SnapshotSettings; qemu: QemuIdentity };

/**
 * Finds the snapshot for these settings. Snapshots made by another QEMU binary, or whose
 * files are damaged, are removed (log says so); others (other settings) are kept.
 */
export async function findSnapshot(o: { img: StoredImage; spec: InstanceSpec; accel: "kvm" | "tcg"; network?: NetworkSpec; qemuBinary?: string; log: (l: string) => void }): Promise<SnapshotChoice> {
  const settings = await snapshotSettings(o.spec, o.img, o.accel, o.network);
  const qemu = await qemuIdentity(o.qemuBinary);
  const key = snapshotKey(o.img, qemu, settings);
  const all = await listSnapshots(o.img);
  let reason = `image ${o.img.name} has no snapshot`;
  for (const s of all) {
    // Stale: an older build of the image, or the same QEMU path holding another binary (an
    // upgrade). Another QEMU path is another setting: that snapshot is kept for it.
    const upgraded = s.meta.qemu.path === qemu.path && JSON.stringify(s.meta.qemu) !== JSON.stringify(qemu);
    const sameImage = s.meta.image.key === o.img.manifest.key && s.meta.image.sha256 === o.img.manifest.sha256;
    if (upgraded || !sameImage) {
      const why = !sameImage ? "an older build of the image" : `another QEMU binary (${s.meta.qemu.path}, ${s.meta.qemu.size} bytes, modified ${new Date(s.meta.qemu.mtimeMs).toISOString()})`;
      o.log(`snapshot ${s.meta.key.slice(0, 8)} of ${o.img.name} was made with ${why}: removed (stale)`);
      await removeSnapshot(s);
      if (s.meta.key !== key) reason = `the image's snapshot was made with ${why}`;
      continue;
    }
    if (s.meta.key === key) {
      const damage = await snapshotDamage(s);
      if (!damage) return { kind: "restore", snap: s };
      o.log(`snapshot ${key.slice(0, 8)} of ${o.img.name} is damaged (${damage}): removed`);
      await removeSnapshot(s);
      return { kind: "none", reason: `the snapshot is damaged (${damage})`, key, settings, qemu };
    }
    reason = s.meta.qemu.path !== qemu.path
      ? `the image's snapshot was made with the QEMU binary ${s.meta.qemu.path}, not ${qemu.path}`
      : `the image's snapshot was made with other settings: ${describeDifference(s.meta.settings, settings)}`;
  }
  return { kind: "none", reason, key, settings, qemu };
}

/**
 * Snapshots being made by this process, by folder and key: a second caller shares the first's.
 * `wanted` counts the callers that have not given up (aborted their signal); the make is
 * aborted when none is left.
 */
const making = new Map<string, { done: Promise<StoredSnapshot>; abort: AbortController; wanted: number }>();

/**
 * Boots `spec` to the agent's snapshot point and stores the snapshot. A snapshot of the same
 * key being made by this process is shared, by another live civm waited for (up to the make
 * timeout). `signal` gives up: once every caller sharing the make has, the make is aborted
 * (its VM ended at once, its unfinished folder removed) and the last one's promise rejects
 * with the signal's reason after that clean-up; an earlier one's rejects at once.
 */
export async function makeSnapshot(o: MakeOptions): Promise<StoredSnapshot> {
  o.signal?.throwIfAborted();
  const settings = await snapshotSettings(o.spec, o.img, o.accel, o.network);
  const key = snapshotKey(o.img, await qemuIdentity(o.qemuBinary), settings);
  const id = `${snapshotsDir(o.img)}:${key}`;
  let m = making.get(id);
  if (!m) {
    const abort = new AbortController();
    const entry = { done: makeSnapshotNow({ ...o, signal: abort.signal }), abort, wanted: 0 };
    void entry.done.catch(() => undefined).finally(() => making.delete(id));
    making.set(id, entry);
    m = entry;
  }
  const shared = m;
  shared.wanted++;
  const signal = o.signal;
  if (!signal) return shared.done;
  return new Promise<StoredSnapshot>((resolveP, rejectP) => {
    const onAbort = () => {
      if (--shared.wanted > 0) return rejectP(signal.reason);
      shared.abort.abort(signal.reason);
      shared.done.then(() => rejectP(signal.reason), () => rejectP(signal.reason));
    };
    signal.addEventListener("abort", onAbort, { once: true });
    shared.done.then(resolveP, rejectP).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

/** Sleeps `ms`, or less when `signal` is aborted. */
function sleepUnlessAborted(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolveP) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolveP();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

interface MakeOptions {
  img: StoredImage;
  spec: InstanceSpec;
  paths: Paths;
  accel: "kvm" | "tcg";
  network?: NetworkSpec;
  qemuBinary?: string;
  qemuUser?: string;
  log: (l: string) => void;
  /** Aborting it ends the make at once (see makeSnapshot). */
  signal?: AbortSignal;
}

async function makeSnapshotNow(o: MakeOptions): Promise<StoredSnapshot> {
  const started = performance.now();
  const settings = await snapshotSettings(o.spec, o.img, o.accel, o.network);
  const qemu = await qemuIdentity(o.qemuBinary);
  const key = snapshotKey(o.img, qemu, settings);
  const root = snapshotsDir(o.img);
  await mkdir(root, { recursive: true, mode: 0o755 });
  await chmod(root, 0o755);
  // Another civm making the same one: wait for it.
  const prefix = `.tmp-${key}-`;
  for (let waited = 0; ; waited += 1) {
    const busy = [];
    for (const n of await readdir(root).catch(() => [] as string[])) {
      if (!n.startsWith(prefix)) continue;
      const { owner } = await readOwner(join(root, n));
      if (owner && (await ownerLiveness(owner)) !== "dead") busy.push(n);
      else await rm(join(root, n), { recursive: true, force: true });
    }
    const done = (await listSnapshots(o.img)).find((s) => s.meta.key === key);
    if (done && !(await snapshotDamage(done))) return done;
    if (!busy.length) break;
    if (waited === 0) o.log(`${o.img.name}: another civm is making this snapshot; waiting for it`);
    if (waited > SNAPSHOT_MAKE_TIMEOUT_SECONDS) break;
    await sleepUnlessAborted(1000, o.signal);
    o.signal?.throwIfAborted();
  }
  const tmp = join(root, `${prefix}${randomBytes(4).toString("hex")}`);
  await mkdir(tmp, { mode: 0o755 });
  await writeOwner(tmp);
  try {
    const memoryPath = join(tmp, SNAPSHOT_LAYOUT.memory);
    const diskPath = join(tmp, SNAPSHOT_LAYOUT.disk);
    let rtcLagMicros: number | undefined;
    const request: SnapshotRequest = {
      mode: "make",
      memoryPath,
      onSaved: async (overlay, info) => {
        await rename(overlay, diskPath);
        await chmod(diskPath, 0o644);
        rtcLagMicros = info.rtcLagMicros;
      },
    };
    o.log(`${o.img.name}: making a snapshot (${settings.cpus} cpus, ${mib(settings.ramBytes)}, ${settings.machine}, ${settings.accel}): booting to the agent's wait for its configuration`);
    const vm = new VmRun({
      spec: { ...o.spec, name: `${o.img.name}-snapshot`, config: {}, sshPort: undefined, timeoutSeconds: SNAPSHOT_MAKE_TIMEOUT_SECONDS },
      paths: o.paths,
      accel: o.accel,
      graceSeconds: 5,
      ...(o.qemuBinary ? { qemuBinary: o.qemuBinary } : {}),
      ...(o.qemuUser ? { qemuUser: o.qemuUser } : {}),
      ...(o.network ? { network: o.network } : {}),
      log: o.log,
      snapshot: request,
    });
    // Given up: the snapshot's VM is ended at once (no ACPI grace: nothing in it is worth keeping).
    const onAbort = () => {
      o.log(`${o.img.name}: making the snapshot was interrupted: ending its VM`);
      vm.stop("signal", true);
    };
    o.signal?.addEventListener("abort", onAbort, { once: true });
    const r = await vm.run().finally(() => o.signal?.removeEventListener("abort", onAbort));
    o.signal?.throwIfAborted();
    if (!r.snapshotSaved) {
      throw new Error(`the VM ended (${r.reason}) before it reached the agent's snapshot point; console log: ${r.consoleLog}${r.detail ? `\n${r.detail}` : ""}`);
    }
    const memoryBytes = (await stat(memoryPath)).size;
    const meta: SnapshotMeta = {
      format: SNAPSHOT_FORMAT,
      key,
      image: { name: o.img.name, key: o.img.manifest.key, sha256: o.img.manifest.sha256 },
      qemu,
      settings,
      createdAt: new Date().toISOString(),
      memoryBytes,
      diskBytes: (await stat(diskPath)).size,
      makeSeconds: Math.round((performance.now() - started) / 100) / 10,
      ...(rtcLagMicros !== undefined ? { rtcLagMicros } : {}),
    };
    await rm(join(tmp, ".owner"), { force: true });
    await writeFile(join(tmp, SNAPSHOT_LAYOUT.meta), JSON.stringify(meta, null, 2) + "\n", { mode: 0o644 });
    const final = join(root, key);
    await removeSnapshot(final);
    await rename(tmp, final);
    o.log(`${o.img.name}: snapshot ${key.slice(0, 8)} made in ${meta.makeSeconds} s (memory file ${mib(memoryBytes)})`);
    return { dir: final, memoryPath: join(final, SNAPSHOT_LAYOUT.memory), diskPath: join(final, SNAPSHOT_LAYOUT.disk), meta };
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
}

/** The run request that restores `snap`; a failed restore removes it (the next first use makes it again). */
export function restoreRequest(snap: StoredSnapshot, log: (l: string) => void): SnapshotRequest {
  return {
    mode: "restore",
    memoryPath: snap.memoryPath,
    diskPath: snap.diskPath,
    describe: `snapshot ${snap.meta.key.slice(0, 8)} of ${snap.meta.image.name}`,
    ...(snap.meta.rtcLagMicros !== undefined ? { rtcLagMicros: snap.meta.rtcLagMicros } : {}),
    onFailed: async (why) => {
      log(`removing snapshot ${snap.meta.key.slice(0, 8)} of ${snap.meta.image.name} after a failed restore (${why})`);
      await removeSnapshot(snap);
    },
  };
}

export type StartMode = "snapshot" | "boot" | "auto";

/**
 * How a VM of a stored image starts. "auto": restore when a matching snapshot exists, else
 * boot. "snapshot": restore, making the snapshot first when there is none. "boot": boot.
 * Whatever stands in the way of a restore is logged with its reason and the VM boots cold.
 */
export async function planSnapshotStart(o: {
  mode: StartMode;
  img: StoredImage | undefined;
  spec: InstanceSpec;
  paths: Paths;
  accel: "kvm" | "tcg";
  network?: NetworkSpec;
  mounts?: number;
  qemuBinary?: string;
  qemuUser?: string;
  log: (l: string) => void;
  /** Aborting it ends a snapshot being made at once; the promise then rejects with its reason. */
  signal?: AbortSignal;
}): Promise<SnapshotRequest | undefined> {
  if (o.mode === "boot") return undefined;
  const say = (why: string) => o.log(`${o.spec.name}: booting cold: ${why}`);
  const img = o.img;
  if (!img) {
    if (o.mode === "snapshot") say("the image is not a stored image (snapshots live in the image store)");
    return undefined;
  }
  const unsupported = snapshotUnsupported(o.spec, { mounts: o.mounts ?? 0 });
  if (unsupported) {
    if (o.mode === "snapshot") say(unsupported);
    return undefined;
  }
  const choice = await findSnapshot({ ...o, img });
  if (choice.kind === "restore") return restoreRequest(choice.snap, o.log);
  if (o.mode === "auto") {
    if (!choice.reason.endsWith("has no snapshot")) say(choice.reason);
    return undefined;
  }
  o.log(`${o.spec.name}: no usable snapshot (${choice.reason}): making one first`);
  try {
    const snap = await makeSnapshot({ ...o, img });
    return restoreRequest(snap, o.log);
  } catch (e) {
    if (o.signal?.aborted) throw o.signal.reason;
    say(`making the snapshot failed: ${(e as Error).message}`);
    return undefined;
  }
}

/** The stored image whose disk `spec.image` is (a stored name or a pulled OCI reference), if any. */
export async function storedImageOf(spec: InstanceSpec, stateDir: string): Promise<StoredImage | undefined> {
  const { ImageStore } = await import("./store.js");
  return (await new ImageStore(stateDir).list()).find((i) => i.diskPath === spec.image);
}

/** The VM settings `snapshot: true` makes a snapshot for: civm run's and the pools' defaults (2 cpus, 2 GiB, pc). */
export function defaultSnapshotSpec(img: StoredImage): InstanceSpec {
  return {
    name: img.name,
    image: img.diskPath,
    imageRef: img.name,
    cpus: 2,
    ramBytes: 2 * 1024 ** 3,
    rootDiskBytes: undefined,
    timeoutSeconds: SNAPSHOT_MAKE_TIMEOUT_SECONDS,
    sshPort: undefined,
    config: {},
    kernel: img.kernelPath,
    initrd: img.initrdPath,
    cmdline: STORED_IMAGE_CMDLINE,
    machine: "pc",
    qemuArgs: [],
    source: { file: `(image ${img.name})`, index: 0 },
  };
}

/** `civm image build` of a spec with `snapshot: true`: the default settings' snapshot, made unless it exists. */
export async function ensureDefaultSnapshot(o: { img: StoredImage; paths: Paths; accel: "kvm" | "tcg"; log: (l: string) => void; signal?: AbortSignal }): Promise<StoredSnapshot> {
  if (!o.img.kernelPath || !o.img.initrdPath) throw new ConfigError(`image ${o.img.name} has no kernel and initrd beside its disk, so it cannot have a snapshot (snapshots need direct kernel boot); remove "snapshot: true" from its spec`);
  const spec = defaultSnapshotSpec(o.img);
  const found = await findSnapshot({ img: o.img, spec, accel: o.accel, log: o.log });
  if (found.kind === "restore") return found.snap;
  return makeSnapshot({ img: o.img, spec, paths: o.paths, accel: o.accel, log: o.log, ...(o.signal ? { signal: o.signal } : {}) });
}
