// The uncompressed kernel for PVH direct boot, stored beside an image's vmlinuz.
//
// A bzImage decompresses itself before the kernel starts; under TCG that alone costs
// 2.5-3 s for Debian's xz-compressed kernel (QEMU start → first kernel line: 3.0 s with
// vmlinuz, 0.35 s with the uncompressed ELF). QEMU boots an ELF vmlinux that carries the
// PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY; Debian's amd64 kernels have CONFIG_PVH) through
// its pvh.bin option ROM, with the same -initrd and -append, so civm stores that ELF at
// build time and boots it instead. Any doubt (not a bzImage, an unknown compression, a
// size that does not match, no PVH note) means no vmlinux: the caller keeps vmlinuz.
//
// The payload is found through the boot protocol's setup header (Documentation/arch/x86/
// boot.rst: setup_sects at 0x1f1, payload_offset/payload_length at 0x248/0x24c, protocol
// 2.08+), the way the kernel's scripts/extract-vmlinux finds it by magic; the system's xz,
// zstd or gzip decompress it.
import { spawn } from "node:child_process";
import { open, readFile, rm, rename } from "node:fs/promises";
import { CivmError } from "../errors/index.js";
import { missingProgram } from "../exec/index.js";

/** ELF note type of the PVH 32-bit entry point, in notes named "Xen". */
const XEN_ELFNOTE_PHYS32_ENTRY = 18;

const DECOMPRESSORS: { magic: Buffer; tool: string; args: string[] }[] = [
  { magic: Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]), tool: "xz", args: ["-dc", "--single-stream"] },
  { magic: Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), tool: "zstd", args: ["-dcq"] },
  { magic: Buffer.from([0x1f, 0x8b]), tool: "gzip", args: ["-dc"] },
];

export interface BzImagePayload {
  /** The compressed kernel, without the 4-byte size the kernel build appends. */
  data: Buffer;
  /** The uncompressed size that trailer gives. */
  size: number;
  tool: string;
  args: string[];
}

/** The compressed vmlinux inside a bzImage, or undefined when this is not one civm can unpack. */
export function bzImagePayload(image: Buffer): BzImagePayload | undefined {
  if (image.length < 0x250 || image.readUInt32LE(0x202) !== 0x53726448 /* "HdrS" */) return undefined;
  if (image.readUInt16LE(0x206) < 0x0208) return undefined; // payload fields since 2.08
  const setupSects = image[0x1f1] || 4;
  const start = (setupSects + 1) * 512 + image.readUInt32LE(0x248);
  const length = image.readUInt32LE(0x24c);
  if (length <= 4 || start + length > image.length) return undefined;
  const payload = image.subarray(start, start + length);
  const kind = DECOMPRESSORS.find((d) => payload.subarray(0, d.magic.length).equals(d.magic));
  if (!kind) return undefined;
  return { data: payload.subarray(0, length - 4), size: payload.readUInt32LE(length - 4), tool: kind.tool, args: kind.args };
}

/** True when `elf` is an x86-64 ELF executable with a PVH entry note. */
export function hasPvhEntry(elf: Buffer): boolean {
  if (elf.length < 64 || elf.readUInt32BE(0) !== 0x7f454c46 || elf[4] !== 2 || elf[5] !== 1 || elf.readUInt16LE(18) !== 62) return false;
  const phoff = Number(elf.readBigUInt64LE(32));
  const phentsize = elf.readUInt16LE(54);
  const phnum = elf.readUInt16LE(56);
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    if (ph + 56 > elf.length || elf.readUInt32LE(ph) !== 4 /* PT_NOTE */) continue;
    const offset = Number(elf.readBigUInt64LE(ph + 8));
    const end = Math.min(elf.length, offset + Number(elf.readBigUInt64LE(ph + 32)));
    for (let n = offset; n + 12 <= end; ) {
      const namesz = elf.readUInt32LE(n);
      const descsz = elf.readUInt32LE(n + 4);
      const type = elf.readUInt32LE(n + 8);
      const name = elf.subarray(n + 12, n + 12 + namesz).toString("latin1").replace(/\0+$/, "");
      if (name === "Xen" && type === XEN_ELFNOTE_PHYS32_ENTRY) return true;
      n += 12 + align4(namesz) + align4(descsz);
    }
  }
  return false;
}

const align4 = (n: number) => (n + 3) & ~3;

/**
 * Writes the PVH-bootable vmlinux of `bzImage` to `out` and returns true; returns false
 * (writing nothing) when the kernel cannot be booted that way. Fails only when the
 * decompressor is missing or breaks on a payload that looked right.
 */
export async function extractPvhKernel(bzImage: string, out: string): Promise<boolean> {
  const payload = bzImagePayload(await readFile(bzImage));
  if (!payload) return false;
  const tmp = `${out}.tmp`;
  try {
    await decompress(payload, tmp);
    // Read whole (~65 MiB, once per image build): the note segment sits past the text.
    const elf = await readFile(tmp);
    const ok = elf.length === payload.size && hasPvhEntry(elf);
    if (!ok) {
      await rm(tmp, { force: true });
      return false;
    }
    await rename(tmp, out);
    return true;
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
}

function decompress(p: BzImagePayload, to: string): Promise<void> {
  return new Promise((resolve, reject) => {
    void open(to, "w", 0o644).then((fd) => {
      const child = spawn(p.tool, p.args, { stdio: ["pipe", fd.fd, "pipe"] });
      let stderr = "";
      child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
      child.stdin!.on("error", () => {}); // the exit status reports the failure
      child.on("error", (err: NodeJS.ErrnoException) => {
        void fd.close();
        reject(err.code === "ENOENT" ? missingProgram(p.tool) : new CivmError("host", `${p.tool}: ${err.message}`));
      });
      child.on("close", (code) => {
        void fd.close();
        if (code === 0) resolve();
        else reject(new CivmError("host", `${p.tool} ${p.args.join(" ")} failed (exit ${code}) unpacking the kernel: ${stderr.trim()}`));
      });
      child.stdin!.end(p.data);
    }, reject);
  });
}
