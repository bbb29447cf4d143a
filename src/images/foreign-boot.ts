// A foreign image (a disk path civm did not build: seed 000's images, GRUB on a BIOS disk)
// booted by its own kernel directly, skipping SeaBIOS and GRUB (8-9 s under TCG). civm reads
// the image's partition table, finds GRUB's grub.cfg on an ext2/3/4 partition with e2fsprogs'
// debugfs (no mount, no loop device, no root), decides GRUB's default entry
// (grub-cfg.ts) and copies that entry's kernel and initrds out. The result, or the reason
// it could not be read, is cached under <state>/boot-cache/<key>, keyed by the image's
// identity (path, inode, size, times; a qcow2's backing chain too), so the work happens
// once per image. Whoever cannot be read boots through the firmware, with the reason logged.
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, open, readFile, readdir, realpath, rename, rm, stat, writeFile, appendFile } from "node:fs/promises";
import { dirname, isAbsolute, join, resolve } from "node:path";
import type { InstanceSpec } from "../config/types.js";
import { CivmError } from "../errors/index.js";
import { run } from "../exec/index.js";
import { qemuOptValue } from "../vm/argv.js";
import { imageInfo } from "../vm/disk.js";
import { defaultBootEntry, GrubCfgError, GrubNeedsFile, parseGrubenv, type GrubDevice, type GrubPath } from "./grub-cfg.js";

/** Bump when what is extracted, or how, changes: older cache entries are ignored. */
const RECIPE = 1;
export const BOOT_CACHE_DIR = "boot-cache";
const QCOW2_MAGIC = 0x514649fb;

export interface ForeignKernel {
  kernel: string;
  initrd: string | undefined;
  /** GRUB's arguments, after BOOT_IMAGE= as GRUB passes it, with console=ttyS0 added when missing. */
  cmdline: string;
  /** The entry's title (submenus joined with " > "). */
  entry: string;
  /** The kernel's release from its bzImage header (e.g. "6.1.0-28-amd64"). */
  release: string | undefined;
  /** Where grub.cfg was found ("partition 1: /boot/grub/grub.cfg"). */
  config: string;
}

export type ForeignBoot = { ok: true; boot: ForeignKernel; cached: boolean } | { ok: false; reason: string; cached: boolean };

interface CacheRecord {
  recipe: number;
  image: string;
  boot?: Omit<ForeignKernel, "kernel" | "initrd"> & { initrd: boolean };
  reason?: string;
  seconds: number;
}

/** Why an image cannot be booted directly (cached: the image will not change its mind). */
class Unreadable extends Error {}

/** The image and its backing chain, as stat sees them: a change to any makes a new key. */
async function identity(image: string): Promise<{ key: string; real: string }> {
  const real = await realpath(image);
  const parts: string[] = [`recipe ${RECIPE}`];
  let p = real;
  for (let depth = 0; depth < 16; depth++) {
    const st = await stat(p);
    parts.push(`${p} ${st.dev} ${st.ino} ${st.size} ${st.mtimeMs} ${st.ctimeMs}`);
    const fh = await open(p, "r");
    const head = Buffer.alloc(4096);
    try {
      await fh.read(head, 0, head.length, 0);
    } finally {
      await fh.close();
    }
    if (head.readUInt32BE(0) !== QCOW2_MAGIC) break;
    const off = Number(head.readBigUInt64BE(8));
    const len = head.readUInt32BE(16);
    if (!off || !len || off + len > head.length) break;
    const backing = head.subarray(off, off + len).toString("utf8");
    if (/^[a-z]+:/.test(backing) && !backing.startsWith("file:")) break; // a protocol (nbd:, http:): not stat'able
    const bp = backing.replace(/^file:/, "");
    p = isAbsolute(bp) ? bp : resolve(dirname(p), bp);
    if (!existsSync(p)) break;
  }
  return { key: createHash("sha256").update(parts.join("\n")).digest("hex").slice(0, 24), real };
}

interface Partition {
  number: number;
  start: number;
  size: number;
}

/** Primary MBR partitions or GPT entries of the disk's first MiB (GRUB's numbering: 1-based). */
export function partitionTable(head: Buffer): { scheme: "msdos" | "gpt"; partitions: Partition[] } {
  if (head.length < 1024 || head[510] !== 0x55 || head[511] !== 0xaa) throw new Unreadable("the disk has no MBR or GPT partition table");
  const mbr: Partition[] = [];
  let protective = false;
  for (let i = 0; i < 4; i++) {
    const e = 446 + 16 * i;
    const type = head[e + 4]!;
    if (type === 0xee) protective = true;
    if (type === 0 || type === 0x05 || type === 0x0f || type === 0x85) continue; // empty or extended
    mbr.push({ number: i + 1, start: head.readUInt32LE(e + 8) * 512, size: head.readUInt32LE(e + 12) * 512 });
  }
  if (!protective) return { scheme: "msdos", partitions: mbr };
  if (head.subarray(512, 520).toString("latin1") !== "EFI PART") throw new Unreadable("the protective MBR has no GPT header after it");
  const lba = Number(head.readBigUInt64LE(512 + 72));
  const count = head.readUInt32LE(512 + 80);
  const size = head.readUInt32LE(512 + 84);
  const parts: Partition[] = [];
  for (let i = 0; i < Math.min(count, 256); i++) {
    const e = lba * 512 + i * size;
    if (e + 48 > head.length) throw new Unreadable("the GPT's partition entries are beyond the disk's first MiB");
    if (head.subarray(e, e + 16).every((b) => b === 0)) continue;
    const first = Number(head.readBigUInt64LE(e + 32));
    const last = Number(head.readBigUInt64LE(e + 40));
    parts.push({ number: i + 1, start: first * 512, size: (last - first + 1) * 512 });
  }
  return { scheme: "gpt", partitions: parts };
}

/** What a partition holds, from its first 68 KiB: ext2/3/4 with its UUID and label, or the name of another file system. */
function superblock(buf: Buffer): { ext: true; uuid: string; label: string } | { ext: false; what: string } {
  if (buf.length >= 2048 && buf.readUInt16LE(1024 + 56) === 0xef53) {
    const u = buf.subarray(1024 + 104, 1024 + 120).toString("hex");
    const uuid = `${u.slice(0, 8)}-${u.slice(8, 12)}-${u.slice(12, 16)}-${u.slice(16, 20)}-${u.slice(20)}`;
    const label = buf.subarray(1024 + 120, 1024 + 136).toString("utf8").replace(/\0.*$/s, "");
    return { ext: true, uuid, label };
  }
  const magics: [string, number, string][] = [["XFS", 0, "XFSB"], ["btrfs", 0x10040, "_BHRfS_M"], ["vfat", 0x52, "FAT32   "], ["vfat", 0x36, "FAT16   "], ["vfat", 0x36, "FAT12   "], ["swap", 4086, "SWAPSPACE2"]];
  for (const [what, at, m] of magics) if (buf.subarray(at, at + m.length).toString("latin1") === m) return { ext: false, what };
  return { ext: false, what: "no file system civm knows" };
}

/** Reads the disk: raw files directly, other formats (qcow2) through qemu-img, a range at a time. */
class DiskReader {
  private readonly converted = new Map<number, string>();
  constructor(
    readonly image: string,
    readonly format: string,
    readonly virtualSize: number,
    private readonly tmp: string,
    private readonly log: (l: string) => void,
  ) {}

  private opts(offset: number, size: number): string {
    return `driver=raw,offset=${offset},size=${size},file.driver=${this.format},file.file.filename=${qemuOptValue(this.image)}`;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const len = Math.max(0, Math.min(length, this.virtualSize - offset));
    if (this.format === "raw") {
      const fh = await open(this.image, "r");
      try {
        const buf = Buffer.alloc(len);
        const { bytesRead } = await fh.read(buf, 0, len, offset);
        return buf.subarray(0, bytesRead);
      } finally {
        await fh.close();
      }
    }
    // QEMU's raw driver takes whole sectors.
    const sectors = Math.min(Math.ceil(len / 512) * 512, this.virtualSize - offset);
    const out = join(this.tmp, `range-${offset}-${sectors}.raw`);
    await run("qemu-img", ["convert", "-U", "-O", "raw", "--image-opts", this.opts(offset, sectors), out], { failCode: "external" });
    try {
      return (await readFile(out)).subarray(0, len);
    } finally {
      await rm(out, { force: true });
    }
  }

  /** A name debugfs opens for the partition: the raw image at an offset, else a raw copy of the partition. */
  async device(p: Partition): Promise<string> {
    if (this.format === "raw" && !/[?]/.test(this.image)) return `${this.image}?offset=${p.start}`;
    const have = this.converted.get(p.number);
    if (have) return have;
    const out = join(this.tmp, `partition-${p.number}.raw`);
    this.log(`reading partition ${p.number} (${(p.size / 2 ** 30).toFixed(1)} GiB) of ${this.image} once, to find its kernel (qemu-img convert)`);
    await run("qemu-img", ["convert", "-U", "-O", "raw", "--image-opts", this.opts(p.start, Math.min(p.size, this.virtualSize - p.start)), out], { failCode: "external" });
    this.converted.set(p.number, out);
    return out;
  }
}

/** debugfs's own quoting: a path in double quotes; paths it cannot quote are refused. */
function dq(p: string): string {
  if (/["\n\\]/.test(p)) throw new Unreadable(`the path ${JSON.stringify(p)} cannot be passed to debugfs`);
  return `"${p}"`;
}

/** Runs debugfs commands on a partition, read-only (-c: no bitmaps). */
async function debugfs(device: string, commands: string[]): Promise<string> {
  const r = await run("debugfs", ["-c", "-f", "-", device], { input: commands.join("\n") + "\n", failCode: "external" });
  return r.stdout + r.stderr;
}

/** Copies files out of a partition: each one's local copy, or null when it is not a regular file there. */
async function dumpFiles(device: string, files: { path: string; out: string }[]): Promise<(string | null)[]> {
  // Symlinks (a /boot/vmlinuz -> vmlinuz-6.1...) are followed by hand: debugfs dumps the link itself.
  const resolved: (string | null)[] = [];
  for (const f of files) {
    let p = f.path;
    let ok: string | null = null;
    for (let hop = 0; hop < 8; hop++) {
      const st = await debugfs(device, [`stat ${dq(p)}`]);
      if (/Type: regular/.test(st)) {
        ok = p;
        break;
      }
      const link = /Type: symlink/.test(st) ? /Fast link dest: "([^"]*)"/.exec(st) : null;
      if (!link) break;
      p = link[1]!.startsWith("/") ? link[1]! : `${dirname(p)}/${link[1]}`.replace(/\/+/g, "/");
    }
    resolved.push(ok);
  }
  const wanted = files.map((f, i) => (resolved[i] ? `dump ${dq(resolved[i]!)} ${dq(f.out)}` : "")).filter(Boolean);
  if (wanted.length) await debugfs(device, wanted);
  return files.map((f, i) => (resolved[i] && existsSync(f.out) ? f.out : null));
}

/** The release a bzImage names in its setup header (kernel_version at 0x20e), or undefined; throws when it is no bzImage. */
async function bzImageRelease(path: string): Promise<string | undefined> {
  const fh = await open(path, "r");
  try {
    const head = Buffer.alloc(0x10200); // kernel_version may point up to 64 KiB in
    const { bytesRead } = await fh.read(head, 0, head.length, 0);
    if (bytesRead < 0x210 || head.subarray(0x202, 0x206).toString("latin1") !== "HdrS") throw new Unreadable("the default entry's kernel is not a bzImage (no HdrS setup header)");
    const at = head.readUInt16LE(0x20e) + 0x200;
    if (at <= 0x200 || at >= bytesRead) return undefined;
    const s = head.subarray(at, Math.min(bytesRead, at + 256)).toString("latin1");
    return s.slice(0, s.indexOf("\0") >= 0 ? s.indexOf("\0") : s.length).split(" ")[0];
  } finally {
    await fh.close();
  }
}

interface ReadOptions {
  image: string;
  dir: string;
  tmp: string;
  log: (l: string) => void;
}

/** Reads the default entry's kernel, initrd and command line into `dir`. Throws Unreadable (or a tool's error). */
async function extract(o: ReadOptions): Promise<Omit<ForeignKernel, "kernel" | "initrd"> & { initrd: boolean }> {
  const info = await imageInfo(o.image);
  const disk = new DiskReader(o.image, info.format, info.virtualSize, o.tmp, o.log);
  const table = partitionTable(await disk.read(0, 1024 * 1024));
  if (!table.partitions.length) throw new Unreadable("the partition table has no partitions");
  const parts = new Map<number, { p: Partition; sb: ReturnType<typeof superblock> }>();
  for (const p of table.partitions) parts.set(p.number, { p, sb: superblock(await disk.read(p.start, 0x10048)) });
  const ext = [...parts.values()].filter((x) => x.sb.ext);
  if (!ext.length) {
    throw new Unreadable(`no partition holds an ext2/3/4 file system (${[...parts.values()].map((x) => `partition ${x.p.number}: ${x.sb.ext ? "ext4" : x.sb.what}`).join(", ")}); civm reads GRUB's files only from ext2/3/4`);
  }
  const device = (n: number) => `hd0,${table.scheme}${n}`;
  // grub.cfg where grub-install puts it: /boot/grub on the root file system, or /grub on a /boot partition.
  let cfg: { part: Partition; dir: string; text: string } | undefined;
  for (const { p } of ext) {
    const dev = await disk.device(p);
    const got = await dumpFiles(dev, ["/boot/grub", "/grub"].map((d, i) => ({ path: `${d}/grub.cfg`, out: join(o.tmp, `grub-${p.number}-${i}.cfg`) })));
    const i = got.findIndex((g) => g !== null);
    if (i >= 0) {
      cfg = { part: p, dir: i === 0 ? "/boot/grub" : "/grub", text: await readFile(got[i]!, "utf8") };
      break;
    }
  }
  if (!cfg) throw new Unreadable(`no GRUB configuration (/boot/grub/grub.cfg or /grub/grub.cfg) on ${ext.map((x) => `partition ${x.p.number}`).join(", ")}`);
  const cfgDev = await disk.device(cfg.part);
  const files: Record<string, string | null> = {};
  let grubenv: Record<string, string> | undefined;
  const fetch = async (path: string) => {
    const [got] = await dumpFiles(cfgDev, [{ path, out: join(o.tmp, `file-${Object.keys(files).length}`) }]);
    files[path] = got ? await readFile(got, "utf8") : null;
    if (path === `${cfg!.dir}/grubenv` && got) grubenv = parseGrubenv(files[path]!);
  };
  await fetch(`${cfg.dir}/grubenv`);
  let entry;
  for (let round = 0; ; round++) {
    try {
      entry = defaultBootEntry(cfg.text, { configDir: cfg.dir, configDevice: device(cfg.part.number), files, ...(grubenv ? { grubenv } : {}) });
      break;
    } catch (e) {
      if (e instanceof GrubNeedsFile && round < 16 && !(e.path in files)) {
        await fetch(e.path);
        continue;
      }
      if (e instanceof GrubCfgError) throw new Unreadable(`partition ${cfg.part.number}: ${cfg.dir}/grub.cfg: ${e.message}`);
      throw e;
    }
  }
  const partOf = (d: GrubDevice, what: string): Partition => {
    if (d.kind === "default") return cfg!.part;
    if (d.kind === "partition") {
      const x = parts.get(d.partition);
      if (!x) throw new Unreadable(`${what} is on partition ${d.partition}, which the disk does not have`);
      return x.p;
    }
    if (d.kind === "file") throw new Unreadable(`${what} is on the partition GRUB finds by "search --file ${d.value}", which civm does not follow`);
    const x = ext.find((e) => e.sb.ext && (d.kind === "fs-uuid" ? e.sb.uuid === d.value.toLowerCase() : e.sb.label === d.value));
    if (!x) throw new Unreadable(`${what} is on the file system with ${d.kind === "fs-uuid" ? "UUID" : "label"} ${d.value}, which no ext2/3/4 partition of the disk has`);
    return x.p;
  };
  const copyOut = async (gp: GrubPath, out: string, what: string): Promise<void> => {
    const p = partOf(gp.device, what);
    const [got] = await dumpFiles(await disk.device(p), [{ path: gp.path, out }]);
    if (!got) throw new Unreadable(`${what} ${gp.path} is not a file on partition ${p.number}`);
  };
  const title = `"${entry.title}"`;
  await copyOut(entry.kernel, join(o.dir, "vmlinuz"), `the default entry ${title}'s kernel`);
  const release = await bzImageRelease(join(o.dir, "vmlinuz"));
  // Several initrds are concatenated, each padded to 4 bytes, as GRUB loads them.
  for (const [i, gp] of entry.initrds.entries()) {
    const out = join(o.tmp, `initrd-${i}`);
    await copyOut(gp, out, `the default entry ${title}'s initrd`);
    const data = await readFile(out);
    const pad = (4 - (data.length % 4)) % 4;
    await appendFile(join(o.dir, "initrd.img"), pad && i < entry.initrds.length - 1 ? Buffer.concat([data, Buffer.alloc(pad)]) : data, { mode: 0o644 });
  }
  const args = `BOOT_IMAGE=${entry.kernel.path}${entry.args ? ` ${entry.args}` : ""}`;
  const cmdline = /(^|\s)console=ttyS0(\s|,|$)/.test(args) ? args : `${args} console=ttyS0`;
  return { entry: entry.title, release, cmdline, config: `partition ${cfg.part.number}: ${cfg.dir}/grub.cfg`, initrd: entry.initrds.length > 0 };
}

export interface ForeignBootOptions {
  stateDir: string;
  /** Progress and cache-housekeeping lines. */
  log?: (line: string) => void;
}

function fromRecord(dir: string, rec: CacheRecord, cached: boolean): ForeignBoot {
  if (!rec.boot) return { ok: false, reason: rec.reason ?? "unknown", cached };
  const { initrd, ...rest } = rec.boot;
  return { ok: true, cached, boot: { ...rest, kernel: join(dir, "vmlinuz"), initrd: initrd ? join(dir, "initrd.img") : undefined } };
}

/**
 * The kernel, initrd and command line GRUB would boot from `image` by default, from the
 * cache or read now (and cached, the reason too when it cannot be read). A failure of a
 * tool (qemu-img, debugfs missing) is not cached: the next run tries again.
 */
export async function foreignBoot(image: string, opts: ForeignBootOptions): Promise<ForeignBoot> {
  const log = opts.log ?? (() => {});
  const { key, real } = await identity(image);
  const root = join(opts.stateDir, BOOT_CACHE_DIR);
  const dir = join(root, key);
  const recordPath = join(dir, "boot.json");
  try {
    const hit = fromRecord(dir, JSON.parse(await readFile(recordPath, "utf8")) as CacheRecord, true);
    if (!hit.ok || (existsSync(hit.boot.kernel) && (!hit.boot.initrd || existsSync(hit.boot.initrd)))) return hit;
    await rm(dir, { recursive: true, force: true }); // a file of it was deleted: read again
  } catch {
    // not cached yet (or damaged: made again)
  }
  await mkdir(root, { recursive: true, mode: 0o755 });
  const tmpDir = join(root, `.tmp-${key}-${randomBytes(4).toString("hex")}`);
  const work = join(tmpDir, "work");
  await mkdir(tmpDir, { mode: 0o755 }); // QEMU's unprivileged user reads the kernel and initrd
  await mkdir(work, { mode: 0o700 });
  const t0 = performance.now();
  try {
    let rec: CacheRecord;
    try {
      const boot = await extract({ image: real, dir: tmpDir, tmp: work, log });
      rec = { recipe: RECIPE, image: real, boot, seconds: (performance.now() - t0) / 1000 };
    } catch (e) {
      if (!(e instanceof Unreadable)) {
        const msg = e instanceof CivmError ? `${e.message}${e.details ? `: ${e.details.split("\n").slice(-3).join(" / ")}` : ""}` : (e as Error).message;
        return { ok: false, reason: `reading it failed (${msg}); civm tries again next time`, cached: false };
      }
      rec = { recipe: RECIPE, image: real, reason: e.message, seconds: (performance.now() - t0) / 1000 };
    }
    await rm(work, { recursive: true, force: true });
    await writeFile(join(tmpDir, "boot.json"), JSON.stringify(rec, null, 2) + "\n", { mode: 0o644 });
    try {
      await rename(tmpDir, dir);
    } catch {
      // Another civm read the same image at the same time: theirs is as good.
      return fromRecord(dir, JSON.parse(await readFile(recordPath, "utf8")) as CacheRecord, true);
    }
    await pruneOthers(root, key, real);
    return fromRecord(dir, rec, false);
  } finally {
    await rm(tmpDir, { recursive: true, force: true });
  }
}

/** Entries of earlier versions of the same image path, and temp dirs older than an hour, go. */
async function pruneOthers(root: string, key: string, image: string): Promise<void> {
  for (const name of await readdir(root)) {
    if (name === key) continue;
    const p = join(root, name);
    try {
      if (name.startsWith(".tmp-")) {
        if (Date.now() - (await stat(p)).mtimeMs > 3600_000) await rm(p, { recursive: true, force: true });
        continue;
      }
      const rec = JSON.parse(await readFile(join(p, "boot.json"), "utf8")) as CacheRecord;
      if (rec.image === image || rec.recipe !== RECIPE) await rm(p, { recursive: true, force: true });
    } catch {
      // unreadable: left alone
    }
  }
}

/** The line civm logs for a VM named `name` on `image`: which kernel boots it, or why the firmware does. */
export function describeForeignBoot(name: string, image: string, r: ForeignBoot, firmware = "SeaBIOS"): string {
  if (!r.ok) return `${name}: booting through the firmware (${firmware}, then the image's own bootloader): civm cannot boot ${image}'s kernel directly: ${r.reason}`;
  const b = r.boot;
  return `${name}: booting the image's own kernel${b.release ? ` ${b.release}` : ""} directly (GRUB's default entry "${b.entry}", ${b.config}${r.cached ? "" : "; read now and cached"}); "firmware-boot": true or --firmware-boot boots through its bootloader`;
}

/**
 * An instance on a foreign disk, booting its own kernel directly when civm can read it;
 * unchanged (firmware boot) when it brings a kernel, asks for `firmware-boot`, or the
 * image cannot be read (the reason is logged).
 */
export async function withForeignKernel(spec: InstanceSpec, opts: ForeignBootOptions & { log: (line: string) => void }): Promise<InstanceSpec> {
  if (spec.kernel || spec.firmwareBoot) return spec;
  const r = await foreignBoot(spec.image, opts);
  opts.log(describeForeignBoot(spec.name, spec.image, r, spec.arch === "arm64" ? "UEFI" : "SeaBIOS"));
  if (!r.ok) return spec;
  return { ...spec, kernel: r.boot.kernel, initrd: r.boot.initrd, cmdline: spec.cmdline ?? r.boot.cmdline };
}
