// Which QEMU accelerator to use: KVM when /dev/kvm is there AND a probe guest actually runs
// under it, TCG otherwise. A /dev/kvm that opens fine is not enough: under nested
// virtualisation KVM guests can hang, so we boot a one-sector probe guest with a timeout.
// The answer is cached in the state dir (host-cache.json) for 24 h, keyed by everything
// that could change it (QEMU binary and version, host kernel, /dev/kvm's ctime).
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { constants } from "node:fs";
import { access, mkdir, mkdtemp, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { release, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { ConfigError, HostError } from "../errors/index.js";
import { missingProgram, which } from "../exec/index.js";
import { STATE_LAYOUT } from "./paths.js";
import { hostArch, type GuestArch } from "../vm/arch.js";

export type Accel = "kvm" | "tcg";

export interface AccelDecision {
  accel: Accel;
  /** One line for humans: why this accelerator. */
  reason: string;
  /** True when the decision came from host-cache.json rather than a fresh probe. */
  cached: boolean;
  /** When the probe behind this decision ran (ms since epoch); absent when nothing was probed. */
  probedAt?: number;
}

export interface DetectAccelOptions {
  stateDir: string;
  /** The guest's architecture (default x86_64): KVM runs only guests of the host's own. */
  arch?: GuestArch;
  /** For tests: the host's architecture as Node names it (default process.arch). */
  hostNodeArch?: string;
  qemuBinary?: string;
  env?: NodeJS.ProcessEnv;
  /** Probe boot timeout (default 4000 ms). */
  timeoutMs?: number;
  /** For tests: the KVM device (default /dev/kvm). */
  kvmDevice?: string;
  /** For tests: clock (ms since epoch). */
  now?: () => number;
}

export interface QemuVersion {
  major: number;
  minor: number;
  micro: number;
  /** First line of `qemu-system-x86_64 --version`. */
  text: string;
}

/** The probe guest writes 0x10 to isa-debug-exit, so QEMU exits with (0x10 << 1) | 1. */
export const PROBE_EXIT_STATUS = 33;
export const CACHE_TTL_MS = 24 * 60 * 60 * 1000;
const CACHE_FORMAT = 1;

/** Iterations of the probe's busy loop (about 0.05 s under TCG, 0.01 s under working KVM). */
export const PROBE_SPIN_ITERATIONS = 10_000_000;

/**
 * The probe guest: a 512-byte boot sector that SeaBIOS loads at 0x7c00 and runs in real mode.
 *   mov ecx, PROBE_SPIN_ITERATIONS
 *   dec ecx        ; busy loop, see below
 *   jnz $-2
 *   mov dx, 0xf4   ; isa-debug-exit port
 *   mov al, 0x10
 *   out dx, al     ; QEMU exits with status 33
 *   hlt
 *   jmp $-1        ; back to hlt
 * followed by the 0x55 0xAA boot signature at offset 510.
 *
 * Why the busy loop: on some nested hosts KVM "works" but runs guest code about a thousand
 * times slower than TCG (seen on a CI VM: the bare out/hlt sector exited in 3.5 s, a Linux
 * kernel never got past decompression). The loop makes such a KVM miss the probe timeout
 * while costing a working KVM ~10 ms and TCG ~50 ms.
 */
export function probeBootSector(iterations = PROBE_SPIN_ITERATIONS): Buffer {
  const sector = Buffer.alloc(512);
  const code = Buffer.from([
    0x66, 0xb9, 0, 0, 0, 0, // mov ecx, imm32
    0x66, 0x49, // dec ecx
    0x75, 0xfc, // jnz -4 (dec ecx)
    0xba, 0xf4, 0x00, // mov dx, 0xf4
    0xb0, 0x10, // mov al, 0x10
    0xee, // out dx, al
    0xf4, // hlt
    0xeb, 0xfd, // jmp $-1
  ]);
  code.writeUInt32LE(Math.max(1, Math.floor(iterations)) >>> 0, 2);
  code.copy(sector, 0);
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
}

export function probeArgs(accel: Accel, image: string): string[] {
  return [
    "-accel", accel,
    "-machine", "pc",
    "-nodefaults",
    "-display", "none",
    "-no-user-config",
    "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    "-drive", `file=${image},format=raw,if=ide`,
    "-m", "16",
  ];
}

export interface ProbeResult {
  /** Exit status, null when killed. */
  status: number | null;
  timedOut: boolean;
  ms: number;
  stderr: string;
}

/** Boots the probe guest once under `accel`; never rejects for a guest/QEMU failure. */
export async function runProbe(opts: {
  accel: Accel;
  qemuBinary?: string;
  timeoutMs?: number;
  iterations?: number;
}): Promise<ProbeResult> {
  const qemu = opts.qemuBinary ?? "qemu-system-x86_64";
  const timeoutMs = opts.timeoutMs ?? 4000;
  const dir = await mkdtemp(join(tmpdir(), "civm-kvm-probe-"));
  try {
    const image = join(dir, "probe.img");
    await writeFile(image, probeBootSector(opts.iterations));
    const t0 = performance.now();
    return await new Promise<ProbeResult>((resolve, reject) => {
      const child = spawn(qemu, probeArgs(opts.accel, image), { stdio: ["ignore", "ignore", "pipe"] });
      let stderr = "";
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill("SIGKILL");
      }, timeoutMs);
      child.stderr.setEncoding("utf8").on("data", (d: string) => {
        if (stderr.length < 16_384) stderr += d;
      });
      child.on("error", (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(err.code === "ENOENT" ? missingProgram(qemu) : err);
      });
      child.on("close", (code) => {
        clearTimeout(timer);
        resolve({ status: code, timedOut, ms: Math.round(performance.now() - t0), stderr });
      });
    });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export function parseQemuVersion(output: string): QemuVersion {
  const text = (output.split("\n")[0] ?? "").trim();
  const m = /version\s+(\d+)\.(\d+)(?:\.(\d+))?/i.exec(text);
  if (!m) throw new HostError(`cannot parse the QEMU version from: ${JSON.stringify(text)}`);
  return { major: Number(m[1]), minor: Number(m[2]), micro: Number(m[3] ?? 0), text };
}

/** `qemu-system-x86_64 --version`, parsed. */
export async function qemuVersion(binary = "qemu-system-x86_64"): Promise<QemuVersion> {
  const out = await new Promise<string>((resolve, reject) => {
    const child = spawn(binary, ["--version"], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    child.on("error", (err: NodeJS.ErrnoException) => reject(err.code === "ENOENT" ? missingProgram(binary) : err));
    child.on("close", (code) => {
      if (code === 0) resolve(stdout);
      else reject(new HostError(`${binary} --version failed (exit ${code})`, { details: stderr.trim() || undefined }));
    });
  });
  return parseQemuVersion(out);
}

function forcedAccel(env: NodeJS.ProcessEnv): Accel | undefined {
  const v = (env.CIVM_ACCEL ?? "").trim().toLowerCase();
  if (v === "" || v === "auto") return undefined;
  if (v === "kvm" || v === "tcg") return v;
  throw new ConfigError(`CIVM_ACCEL must be kvm, tcg or auto, not ${JSON.stringify(env.CIVM_ACCEL)}`);
}

interface CacheEntry {
  key: string;
  accel: Accel;
  reason: string;
  probedAt: number;
}

interface HostCacheFile {
  format?: number;
  accel?: CacheEntry;
  [other: string]: unknown;
}

async function readHostCache(file: string): Promise<HostCacheFile> {
  try {
    const parsed: unknown = JSON.parse(await readFile(file, "utf8"));
    if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) return parsed as HostCacheFile;
  } catch {
    /* absent or corrupt: treated as empty */
  }
  return {};
}

function validEntry(e: unknown): e is CacheEntry {
  if (!e || typeof e !== "object") return false;
  const o = e as Record<string, unknown>;
  return (
    typeof o.key === "string" &&
    (o.accel === "kvm" || o.accel === "tcg") &&
    typeof o.reason === "string" &&
    typeof o.probedAt === "number" &&
    Number.isFinite(o.probedAt)
  );
}

/** Writes host-cache.json atomically, keeping entries other modules may have put there. */
async function writeAccelCache(file: string, entry: CacheEntry): Promise<void> {
  try {
    await mkdir(dirname(file), { recursive: true });
    const current = await readHostCache(file);
    const next: HostCacheFile = { ...current, format: CACHE_FORMAT, accel: entry };
    const tmp = `${file}.${process.pid}.${randomBytes(6).toString("hex")}.tmp`;
    await writeFile(tmp, JSON.stringify(next, null, 2) + "\n");
    await rename(tmp, file);
  } catch {
    /* a read-only state dir only costs a probe next time */
  }
}

/** Probes KVM with the boot sector; the decision without caching. */
async function probeKvm(qemu: string, timeoutMs: number): Promise<{ accel: Accel; reason: string }> {
  const kvm = await runProbe({ accel: "kvm", qemuBinary: qemu, timeoutMs });
  const secs = (kvm.ms / 1000).toFixed(kvm.ms < 1000 ? 2 : 1);
  if (kvm.status === PROBE_EXIT_STATUS) {
    return { accel: "kvm", reason: `KVM probe boot finished in ${secs} s` };
  }
  if (kvm.timedOut) {
    const limit = timeoutMs % 1000 === 0 ? `${timeoutMs / 1000} s` : `${timeoutMs} ms`;
    return { accel: "tcg", reason: `KVM probe boot did not finish within ${limit} (nested virtualisation?)` };
  }
  const lastLine = kvm.stderr.trim().split("\n").filter(Boolean).pop();
  // Tell a broken KVM from a broken QEMU: does the same probe run under TCG?
  const tcg = await runProbe({ accel: "tcg", qemuBinary: qemu, timeoutMs: Math.max(timeoutMs, 10_000) });
  const how = `exit status ${kvm.status ?? "none"}${lastLine ? `: ${lastLine}` : ""}`;
  if (tcg.status !== PROBE_EXIT_STATUS) {
    return { accel: "tcg", reason: `the probe guest fails under KVM and TCG alike (${how}); QEMU itself may be broken` };
  }
  return { accel: "tcg", reason: `KVM probe boot failed (${how})` };
}

/**
 * Chooses the accelerator. Order: CIVM_ACCEL=kvm|tcg forces it; no usable /dev/kvm means
 * TCG; else a cached decision (24 h) or a probe boot under KVM.
 */
export async function detectAccel(opts: DetectAccelOptions): Promise<AccelDecision> {
  const env = opts.env ?? process.env;
  const qemu = opts.qemuBinary ?? "qemu-system-x86_64";
  const timeoutMs = opts.timeoutMs ?? 4000;
  const device = opts.kvmDevice ?? "/dev/kvm";
  const now = opts.now ?? Date.now;

  const forced = forcedAccel(env);
  const arch = opts.arch ?? "x86_64";
  const host = hostArch(opts.hostNodeArch);
  if (host !== arch) {
    // KVM runs only the host's own instruction set: another architecture's guest is emulated.
    const hostName = host ?? opts.hostNodeArch ?? process.arch;
    if (forced === "kvm") throw new ConfigError(`KVM cannot run an ${arch} guest on this ${hostName} host (KVM runs only the host's own architecture): drop --accel kvm / CIVM_ACCEL=kvm, the guest runs under TCG`);
    return { accel: "tcg", reason: `an ${arch} guest on an ${hostName} host is emulated (KVM runs only the host's own architecture)`, cached: false };
  }
  if (forced) return { accel: forced, reason: `forced by CIVM_ACCEL=${forced}`, cached: false };

  let kvmStat;
  try {
    kvmStat = await stat(device);
  } catch {
    return {
      accel: "tcg",
      reason: `${device} does not exist (no hardware virtualisation, KVM modules not loaded, or a VM without nested virtualisation)`,
      cached: false,
    };
  }
  try {
    await access(device, constants.R_OK | constants.W_OK);
  } catch {
    return {
      accel: "tcg",
      reason: `${device} is not readable and writable by this user (add the user to the kvm group)`,
      cached: false,
    };
  }

  if (arch !== "x86_64") {
    // The probe guest is an x86 boot sector: a same-architecture non-x86 host trusts a
    // /dev/kvm it can open (no probe boot yet).
    return { accel: "kvm", reason: `${device} is usable (no probe boot for ${arch} guests)`, cached: false };
  }
  const qemuPath = qemu.includes("/") ? qemu : ((await which(qemu)) ?? qemu);
  // Keyed by the QEMU binary's identity (path, size, mtime: an upgrade changes them) rather
  // than `qemu --version`, whose extra process would cost every `civm run` ~15 ms.
  const bin = await stat(qemuPath).catch(() => undefined);
  const key = JSON.stringify({ qemu: qemuPath, size: bin?.size ?? 0, mtime: bin?.mtimeMs ?? 0, kernel: release(), kvmCtime: kvmStat.ctimeMs });
  const cacheFile = join(opts.stateDir, STATE_LAYOUT.hostCache);
  const cache = await readHostCache(cacheFile);
  const entry = cache.accel;
  if (validEntry(entry) && entry.key === key && now() - entry.probedAt >= 0 && now() - entry.probedAt < CACHE_TTL_MS) {
    return { accel: entry.accel, reason: entry.reason, cached: true, probedAt: entry.probedAt };
  }

  const probedAt = now();
  const decision = await probeKvm(qemuPath, timeoutMs);
  await writeAccelCache(cacheFile, { key, accel: decision.accel, reason: decision.reason, probedAt });
  return { ...decision, cached: false, probedAt };
}
