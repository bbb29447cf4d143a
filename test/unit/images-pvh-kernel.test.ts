// The PVH vmlinux beside a stored image's vmlinuz: found through the bzImage setup header,
// unpacked by the system's gzip/xz/zstd, kept only when it is an x86-64 ELF with the PVH
// entry note and the size the kernel build recorded. Synthetic bzImages here; the e2e test
// of civm-runner boots a real one.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { bzImagePayload, extractPvhKernel, hasPvhEntry } from "../../src/images/pvh-kernel.js";
import { tempDir as newTempDir } from "../support/paths.js";

const made: string[] = [];
after(() => {
  for (const d of made) rmSync(d, { recursive: true, force: true });
});
function tempDir(prefix: string): string {
  const d = newTempDir(prefix);
  made.push(d);
  return d;
}

/** A minimal ELF64 x86-64 executable with one PT_NOTE segment holding `notes`. */
function elf(notes: { name: string; type: number; desc?: Buffer }[], machine = 62): Buffer {
  const parts = notes.map((n) => {
    const name = Buffer.from(`${n.name}\0`, "latin1");
    const desc = n.desc ?? Buffer.alloc(4);
    const pad = (b: Buffer) => Buffer.concat([b, Buffer.alloc((4 - (b.length % 4)) % 4)]);
    const head = Buffer.alloc(12);
    head.writeUInt32LE(name.length, 0);
    head.writeUInt32LE(desc.length, 4);
    head.writeUInt32LE(n.type, 8);
    return Buffer.concat([head, pad(name), pad(desc)]);
  });
  const noteData = Buffer.concat(parts);
  const header = Buffer.alloc(64);
  header.writeUInt32BE(0x7f454c46, 0);
  header[4] = 2; // 64-bit
  header[5] = 1; // little-endian
  header[6] = 1;
  header.writeUInt16LE(2, 16); // ET_EXEC
  header.writeUInt16LE(machine, 18);
  header.writeBigUInt64LE(64n, 32); // e_phoff
  header.writeUInt16LE(64, 52);
  header.writeUInt16LE(56, 54); // e_phentsize
  header.writeUInt16LE(1, 56); // e_phnum
  const ph = Buffer.alloc(56);
  ph.writeUInt32LE(4, 0); // PT_NOTE
  ph.writeBigUInt64LE(BigInt(64 + 56 + 4096), 8); // p_offset: past some "text"
  ph.writeBigUInt64LE(BigInt(noteData.length), 32); // p_filesz
  return Buffer.concat([header, ph, Buffer.alloc(4096, 0x90), noteData, Buffer.alloc(1024)]);
}

const PVH = { name: "Xen", type: 18 };

/** A bzImage shell: setup header, then the payload (compressed + 4-byte size) at payload_offset. */
function bzImage(compressed: Buffer, size: number, opts: { version?: number; setupSects?: number } = {}): Buffer {
  const setupSects = opts.setupSects ?? 3;
  const setup = Buffer.alloc(((setupSects || 4) + 1) * 512); // 0 means 4, as the protocol says
  setup[0x1f1] = setupSects;
  setup.writeUInt32LE(0x53726448, 0x202); // "HdrS"
  setup.writeUInt16LE(opts.version ?? 0x020f, 0x206);
  const decompressorStub = Buffer.alloc(300, 0xcc);
  const sizeTrailer = Buffer.alloc(4);
  sizeTrailer.writeUInt32LE(size, 0);
  const payload = Buffer.concat([compressed, sizeTrailer]);
  setup.writeUInt32LE(decompressorStub.length, 0x248);
  setup.writeUInt32LE(payload.length, 0x24c);
  return Buffer.concat([setup, decompressorStub, payload, Buffer.alloc(64)]);
}

function write(dir: string, name: string, data: Buffer): string {
  const path = join(dir, name);
  writeFileSync(path, data);
  return path;
}

test("a gzip bzImage of a PVH kernel: vmlinux written, byte for byte the ELF", async () => {
  const dir = tempDir("civm-pvh-");
  const kernel = elf([{ name: "GNU", type: 3 }, PVH]);
  const ok = await extractPvhKernel(write(dir, "vmlinuz", bzImage(gzipSync(kernel), kernel.length)), join(dir, "vmlinux"));
  assert.equal(ok, true);
  assert.deepEqual(readFileSync(join(dir, "vmlinux")), kernel);
  assert.deepEqual(readdirSync(dir).sort(), ["vmlinux", "vmlinuz"], "no temp file left");
});

test("xz and zstd payloads are unpacked by the system's tools", async () => {
  const kernel = elf([PVH]);
  for (const [tool, args] of [["xz", ["-c", "--check=crc32"]], ["zstd", ["-c", "-q"]]] as const) {
    const dir = tempDir("civm-pvh-");
    const packed = spawnSync(tool, args, { input: kernel });
    assert.equal(packed.status, 0, `${tool} is needed by this test (scripts/install-deps.sh installs it)`);
    const ok = await extractPvhKernel(write(dir, "vmlinuz", bzImage(packed.stdout, kernel.length, { setupSects: 0 })), join(dir, "vmlinux"));
    assert.equal(ok, true, tool);
    assert.deepEqual(readFileSync(join(dir, "vmlinux")), kernel, tool);
  }
});

test("no PVH note, another architecture, a wrong recorded size, an old boot protocol or not a bzImage: false and no file", async () => {
  const good = elf([PVH]);
  const cases: [string, Buffer][] = [
    ["no PVH note", bzImage(gzipSync(elf([{ name: "Xen", type: 17 }, { name: "GNU", type: 18 }])), elf([]).length + 36)],
    ["aarch64", bzImage(gzipSync(elf([PVH], 183)), good.length)],
    ["size mismatch", bzImage(gzipSync(good), good.length + 1)],
    ["boot protocol 2.06", bzImage(gzipSync(good), good.length, { version: 0x0206 })],
    ["not a bzImage", good],
    ["unknown compression", bzImage(Buffer.from("BZh91AY&SY not really"), good.length)],
  ];
  for (const [what, image] of cases) {
    const dir = tempDir("civm-pvh-");
    assert.equal(await extractPvhKernel(write(dir, "vmlinuz", image), join(dir, "vmlinux")), false, what);
    assert.deepEqual(readdirSync(dir), ["vmlinuz"], `${what}: nothing written`);
  }
});

test("a payload that looks like gzip but is corrupt is an error naming the tool, and leaves nothing", async () => {
  const dir = tempDir("civm-pvh-");
  const good = elf([PVH]);
  const broken = gzipSync(good);
  broken.fill(0x41, 20, 60);
  await assert.rejects(extractPvhKernel(write(dir, "vmlinuz", bzImage(broken, good.length)), join(dir, "vmlinux")), /gzip -dc failed \(exit \d+\) unpacking the kernel/);
  assert.equal(existsSync(join(dir, "vmlinux")), false);
  assert.equal(existsSync(join(dir, "vmlinux.tmp")), false);
});

test("bzImagePayload reads the setup header; hasPvhEntry walks the notes", () => {
  const kernel = elf([{ name: "GNU", type: 1 }, PVH]);
  const p = bzImagePayload(bzImage(gzipSync(kernel), kernel.length));
  assert.ok(p);
  assert.equal(p.tool, "gzip");
  assert.equal(p.size, kernel.length);
  assert.equal(hasPvhEntry(kernel), true);
  assert.equal(hasPvhEntry(elf([{ name: "GNU", type: 1 }])), false);
  assert.equal(hasPvhEntry(Buffer.from("not an elf at all, just some bytes to read past 64..........")), false);
});
