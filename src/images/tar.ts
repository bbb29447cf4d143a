// Just enough tar for OCI image layers, streamed: read a layer once, hand the contents of
// the entries a caller wants to a sink (the rest is skipped, never written anywhere), and
// write a layer of a few files. Reads ustar, POSIX pax ('x' path/size, 'g' ignored) and GNU
// long names ('L'/'K') and base-256 sizes; checks every header's checksum. Nothing here
// touches the file system: a layer's paths are only ever compared, never joined to a folder.
import { ExternalError } from "../errors/index.js";

const BLOCK = 512;

export type TarEntryType = "file" | "dir" | "symlink" | "hardlink" | "other";

export interface TarEntry {
  /** Path as stored, without a leading "./" or "/". */
  path: string;
  type: TarEntryType;
  size: number;
}

export interface TarSink {
  write(chunk: Buffer): Promise<void> | void;
  end(): Promise<void> | void;
}

/** Reads a tar stream; `onEntry` returns a sink for entries whose content it wants. */
export async function readTar(
  source: AsyncIterable<Buffer | Uint8Array>,
  onEntry: (entry: TarEntry) => TarSink | undefined | Promise<TarSink | undefined>,
  what: string,
): Promise<void> {
  let buf: Buffer = Buffer.alloc(0);
  let state: "header" | "body" | "pad" | "done" = "header";
  let remaining = 0;
  let pad = 0;
  let sink: TarSink | undefined;
  let entry: TarEntry | undefined;
  let special: Buffer[] | undefined; // content of pax / GNU long-name entries
  let specialKind: string | undefined;
  let pax: { path?: string; size?: number } = {};
  let longName: string | undefined;
  let zeroBlocks = 0;

  const finishEntry = async (): Promise<void> => {
    if (special) {
      const data = Buffer.concat(special);
      if (specialKind === "x") pax = { ...pax, ...parsePax(data, what) };
      else if (specialKind === "L") longName = cString(data);
      special = undefined;
      specialKind = undefined;
    } else if (sink) {
      await sink.end();
      sink = undefined;
    }
    entry = undefined;
  };

  for await (const piece of source) {
    const chunk = Buffer.isBuffer(piece) ? piece : Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength);
    if (state === "done") continue; // read to the end: the caller's digest covers every byte
    buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
    let off = 0;
    while (off < buf.length && state !== "done") {
      if (state === "body") {
        const n = Math.min(remaining, buf.length - off);
        if (n > 0) {
          const part = buf.subarray(off, off + n);
          if (special) special.push(Buffer.from(part));
          else if (sink) await sink.write(part);
          off += n;
          remaining -= n;
        }
        if (remaining === 0) {
          await finishEntry();
          state = pad > 0 ? "pad" : "header";
        }
        continue;
      }
      if (state === "pad") {
        const n = Math.min(pad, buf.length - off);
        off += n;
        pad -= n;
        if (pad === 0) state = "header";
        continue;
      }
      // header
      if (buf.length - off < BLOCK) break;
      const h = buf.subarray(off, off + BLOCK);
      off += BLOCK;
      if (h.every((b) => b === 0)) {
        zeroBlocks++;
        if (zeroBlocks >= 2) state = "done";
        continue;
      }
      zeroBlocks = 0;
      checkChecksum(h, what);
      const typeflag = String.fromCharCode(h[156]!);
      const size = pax.size ?? parseNumber(h.subarray(124, 136), what);
      const name = headerName(h);
      remaining = size;
      pad = (BLOCK - (size % BLOCK)) % BLOCK;
      if (typeflag === "x" || typeflag === "L" || typeflag === "g" || typeflag === "K") {
        if (size > 1 << 20) throw new ExternalError(`${what}: a tar extended header of ${size} bytes; refusing it`);
        special = [];
        specialKind = typeflag; // 'g' and 'K' are read and ignored
      } else {
        const path = normalizePath(pax.path ?? longName ?? name);
        pax = {};
        longName = undefined;
        entry = { path, type: typeOf(typeflag), size };
        sink = (await onEntry(entry)) ?? undefined;
        if (sink && entry.type !== "file") sink = undefined;
      }
      state = "body";
      if (remaining === 0) {
        await finishEntry();
        state = pad > 0 ? "pad" : "header";
      }
    }
    buf = off >= buf.length ? Buffer.alloc(0) : buf.subarray(off);
  }
  if (state === "body" || state === "pad" || (state === "header" && buf.length > 0)) {
    throw new ExternalError(`${what}: the tar stream ends in the middle of ${entry ? entry.path : "a header"}`);
  }
}

function typeOf(flag: string): TarEntryType {
  if (flag === "0" || flag === "\0" || flag === "7") return "file";
  if (flag === "5") return "dir";
  if (flag === "2") return "symlink";
  if (flag === "1") return "hardlink";
  return "other";
}

function cString(b: Buffer): string {
  const z = b.indexOf(0);
  return b.subarray(0, z < 0 ? b.length : z).toString("utf8");
}

function headerName(h: Buffer): string {
  const name = cString(h.subarray(0, 100));
  const magic = h.subarray(257, 263).toString("latin1");
  if (magic.startsWith("ustar")) {
    const prefix = cString(h.subarray(345, 500));
    if (prefix && magic === "ustar\0") return `${prefix}/${name}`;
  }
  return name;
}

function normalizePath(p: string): string {
  let s = p;
  while (s.startsWith("./")) s = s.slice(2);
  while (s.startsWith("/")) s = s.slice(1);
  return s.replace(/\/+$/, "");
}

function parseNumber(field: Buffer, what: string): number {
  if (field[0]! & 0x80) {
    // GNU base-256: big-endian, first byte's top bit set
    let n = field[0]! & 0x7f;
    for (let i = 1; i < field.length; i++) n = n * 256 + field[i]!;
    if (!Number.isSafeInteger(n)) throw new ExternalError(`${what}: a tar size field is out of range`);
    return n;
  }
  const text = field.toString("latin1").replace(/[\0 ]+$/, "").replace(/^[ ]+/, "");
  if (text === "") return 0;
  if (!/^[0-7]+$/.test(text)) throw new ExternalError(`${what}: a tar header has a bad number field (${JSON.stringify(text)}); the layer is not a tar archive`);
  return parseInt(text, 8);
}

function checkChecksum(h: Buffer, what: string): void {
  const stored = parseNumber(h.subarray(148, 156), what);
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 32 : h[i]!;
  if (sum !== stored) throw new ExternalError(`${what}: a tar header's checksum is wrong; the layer is not a valid tar archive`);
}

function parsePax(data: Buffer, what: string): { path?: string; size?: number } {
  const out: { path?: string; size?: number } = {};
  let off = 0;
  while (off < data.length) {
    const sp = data.indexOf(0x20, off);
    if (sp < 0) break;
    const len = Number(data.subarray(off, sp).toString("latin1"));
    if (!Number.isSafeInteger(len) || len <= 0 || off + len > data.length) throw new ExternalError(`${what}: a pax header is malformed`);
    const rec = data.subarray(sp + 1, off + len - 1).toString("utf8");
    const eq = rec.indexOf("=");
    const key = rec.slice(0, eq);
    const value = rec.slice(eq + 1);
    if (key === "path") out.path = value;
    else if (key === "size") {
      const n = Number(value);
      if (!Number.isSafeInteger(n) || n < 0) throw new ExternalError(`${what}: a pax size is malformed`);
      out.size = n;
    }
    off += len;
  }
  return out;
}

// ---- writing ---------------------------------------------------------------------------------

export interface TarWriteEntry {
  path: string;
  type: "file" | "dir";
  /** Files: size in bytes and the content, read when the entry is written. */
  size?: number;
  content?: () => AsyncIterable<Buffer | Uint8Array>;
  mode?: number;
  /** Seconds since the epoch (the same input gives the same bytes). */
  mtime: number;
}

function octal(n: number, width: number): string {
  return n.toString(8).padStart(width - 1, "0") + "\0";
}

function paxRecord(key: string, value: string): Buffer {
  const body = ` ${key}=${value}\n`;
  let len = body.length + 1;
  while (String(len).length + body.length !== len) len = String(len).length + body.length;
  return Buffer.from(`${len}${body}`, "utf8");
}

function header(path: string, type: "0" | "5" | "x", size: number, mode: number, mtime: number): Buffer {
  const h = Buffer.alloc(BLOCK);
  h.write(path.slice(0, 100), 0, "utf8");
  h.write(octal(mode, 8), 100, "latin1");
  h.write(octal(0, 8), 108, "latin1");
  h.write(octal(0, 8), 116, "latin1");
  h.write(size < 8 ** 11 ? octal(size, 12) : octal(0, 12), 124, "latin1");
  h.write(octal(Math.floor(mtime), 12), 136, "latin1");
  h.write("        ", 148, "latin1");
  h.write(type, 156, "latin1");
  h.write("ustar\0", 257, "latin1");
  h.write("00", 263, "latin1");
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += h[i]!;
  h.write(octal(sum, 7) + " ", 148, "latin1");
  return h;
}

/** The bytes of a tar archive holding `entries`, in order, ended by two zero blocks. */
export async function* writeTar(entries: readonly TarWriteEntry[]): AsyncGenerator<Buffer> {
  for (const e of entries) {
    const path = e.type === "dir" && !e.path.endsWith("/") ? `${e.path}/` : e.path;
    const size = e.type === "file" ? (e.size ?? 0) : 0;
    const records: Buffer[] = [];
    if (Buffer.byteLength(path) > 100) records.push(paxRecord("path", path));
    if (size >= 8 ** 11) records.push(paxRecord("size", String(size)));
    if (records.length) {
      const data = Buffer.concat(records);
      yield header(`PaxHeaders/${path.slice(-80)}`, "x", data.length, 0o644, e.mtime);
      yield data;
      const p = (BLOCK - (data.length % BLOCK)) % BLOCK;
      if (p) yield Buffer.alloc(p);
    }
    yield header(path, e.type === "dir" ? "5" : "0", size, e.mode ?? (e.type === "dir" ? 0o755 : 0o644), e.mtime);
    if (e.type === "file") {
      let written = 0;
      if (e.content) {
        for await (const c of e.content()) {
          const b = Buffer.isBuffer(c) ? c : Buffer.from(c);
          written += b.length;
          if (written > size) throw new Error(`tar: ${e.path} grew while it was being written`);
          yield b;
        }
      }
      if (written !== size) throw new Error(`tar: ${e.path} is ${written} bytes, expected ${size}`);
      const p = (BLOCK - (size % BLOCK)) % BLOCK;
      if (p) yield Buffer.alloc(p);
    }
  }
  yield Buffer.alloc(2 * BLOCK);
}
