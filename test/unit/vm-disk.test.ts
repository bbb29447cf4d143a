import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { imageInfo, createOverlay, classifyHeader, sniffImage } from "../../src/vm/disk.js";
import { ConfigError } from "../../src/errors/index.js";
import { tempDir } from "../support/paths.js";

function qemuImgInfo(path: string): { format: string; "virtual-size": number; "backing-filename-format"?: string; "full-backing-filename"?: string } {
  return JSON.parse(execFileSync("qemu-img", ["info", "-U", "--output=json", path], { encoding: "utf8" }));
}

test("imageInfo reads qcow2 headers as qemu-img does, and falls back to qemu-img for other formats", async () => {
  const d = tempDir();
  const q = join(d, "a.qcow2");
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", q, "1234567168"]);
  assert.deepEqual(await imageInfo(q), { format: "qcow2", virtualSize: qemuImgInfo(q)["virtual-size"] });
  const raw = join(d, "b.raw");
  writeFileSync(raw, Buffer.alloc(3 * 1024 * 1024));
  assert.deepEqual(await imageInfo(raw), { format: "raw", virtualSize: 3 * 1024 * 1024 });
  const vhd = join(d, "c.vhd");
  execFileSync("qemu-img", ["create", "-q", "-f", "vpc", vhd, "64M"]);
  assert.equal((await imageInfo(vhd)).format, "vpc");
});

test("overlay: backing format given explicitly, grown to root-disk, never shrunk", async () => {
  const d = tempDir();
  const base = join(d, "base.raw");
  writeFileSync(base, Buffer.alloc(4 * 1024 * 1024));
  const ov = join(d, "ov.qcow2");
  await createOverlay({ base, overlay: ov, sizeBytes: 8 * 1024 * 1024, where: "t" });
  const info = qemuImgInfo(ov);
  assert.equal(info.format, "qcow2");
  assert.equal(info["virtual-size"], 8 * 1024 * 1024);
  assert.equal(info["backing-filename-format"], "raw");
  assert.equal(info["full-backing-filename"], base);
  await assert.rejects(createOverlay({ base, overlay: join(d, "small.qcow2"), sizeBytes: 1024 * 1024, where: 'instances.json: instance "x"' }), /root-disk 1 MiB is smaller than the image .* \(4 MiB\); a disk can only grow/);
  const same = join(d, "same.qcow2");
  await createOverlay({ base, overlay: same, sizeBytes: undefined, where: "t" });
  assert.equal(qemuImgInfo(same)["virtual-size"], 4 * 1024 * 1024);
});

/** A zeroed buffer of `size` bytes with `bytes` written at `offset`. */
function withMagic(size: number, offset: number, bytes: Buffer | string): Buffer {
  const b = Buffer.alloc(size);
  Buffer.from(bytes as string, typeof bytes === "string" ? "latin1" : undefined).copy(b, offset);
  return b;
}

test("classifyHeader: QEMU formats and raw disks with a partition table or file system are accepted; the rest is named", () => {
  const accepted: [string, Buffer, string, string | undefined][] = [
    ["MBR", withMagic(4096, 510, Buffer.from([0x55, 0xaa])), "raw", "MBR"],
    ["GPT", withMagic(4096, 512, "EFI PART"), "raw", "GPT"],
    ["ext4 superblock", withMagic(4096, 1080, Buffer.from([0x53, 0xef])), "raw", "ext2/3/4"],
    ["ISO9660", withMagic(40000, 32769, "CD001"), "raw", "ISO9660"],
    ["XFS", withMagic(4096, 0, "XFSB"), "raw", "XFS"],
    ["squashfs", withMagic(4096, 0, "hsqs"), "raw", "squashfs"],
    ["btrfs", withMagic(0x10048, 0x10040, "_BHRfS_M"), "raw", "btrfs"],
    ["blank disk", Buffer.alloc(65536), "raw", "blank"],
    ["qed", withMagic(4096, 0, "QED\0"), "qed", undefined],
    ["vmdk descriptor", withMagic(4096, 0, "# Disk DescriptorFile\nversion=1\n"), "vmdk", undefined],
  ];
  for (const [what, buf, format, evidence] of accepted) {
    const r = classifyHeader(buf);
    assert.ok(r.ok, what);
    assert.equal(r.format, format, what);
    assert.equal(r.evidence, evidence, what);
  }
  const refused: [string, Buffer, RegExp][] = [
    ["empty", Buffer.alloc(0), /^an empty file$/],
    ["one sector short", Buffer.alloc(511), /only 511 bytes/],
    ["text", Buffer.from("#!/bin/sh\necho this is not a disk\n".repeat(40)), /^text$/],
    ["UTF-8 text", Buffer.from("größe: 2 GiB — ça va\n".repeat(60)), /^text$/],
    ["gzip", withMagic(4096, 0, Buffer.from([0x1f, 0x8b, 0x08])), /gzip-compressed/],
    ["xz", withMagic(4096, 0, Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])), /xz-compressed/],
    ["tar", withMagic(4096, 257, "ustar"), /tar archive/],
    ["ELF", withMagic(4096, 0, "\x7fELF"), /ELF/],
    ["random binary", Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 7919 + 13) % 251 || 1)), /no disk image header, partition table/],
  ];
  for (const [what, buf, found] of refused) {
    const r = classifyHeader(buf);
    assert.equal(r.ok, false, what);
    if (!r.ok) assert.match(r.found, found, what);
  }
});

test("sniffImage: images qemu-img makes pass; a text file is a ConfigError naming the field, the file and what was found, in well under a millisecond", async () => {
  const d = tempDir();
  for (const fmt of ["qcow2", "vpc", "vmdk", "vdi", "vhdx", "qed"]) {
    const p = join(d, `x.${fmt}`);
    execFileSync("qemu-img", ["create", "-q", "-f", fmt, p, "16M"]);
    assert.equal((await sniffImage(p))?.ok, true, fmt);
  }
  const text = join(d, "notes.txt");
  writeFileSync(text, "image: ubuntu-24.04.qcow2\n".repeat(100));
  const label = 'instances.json: instance "vm-1": "image"';
  await assert.rejects(sniffImage(text, label), (e: unknown) => {
    assert.ok(e instanceof ConfigError);
    assert.equal(e.exitCode, 2);
    assert.equal(e.message.split("\n").length, 1);
    assert.match(e.message, new RegExp(`^instances\\.json: instance "vm-1": "image" ${text.replace(/[.]/g, "\\.")} is not a disk image: it is text\\. Point it at a disk image: qcow2, a raw disk`));
    return true;
  });
  const empty = join(d, "empty.qcow2");
  writeFileSync(empty, "");
  await assert.rejects(imageInfo(empty), /empty\.qcow2 is not a disk image: it is an empty file/);
  const gz = join(d, "disk.img.gz");
  writeFileSync(gz, withMagic(4096, 0, Buffer.from([0x1f, 0x8b, 0x08])));
  await assert.rejects(sniffImage(gz), /gzip-compressed file\. .*; decompress or extract it first\./);
  assert.equal(await sniffImage(join(d, "missing.qcow2")), undefined, "I/O errors are left to the existing file checks");
  // On civm run's critical path: one small read.
  const q = join(d, "x.qcow2");
  await sniffImage(q);
  let best = Infinity; // the fastest of 50: robust to a busy machine
  for (let i = 0; i < 50; i++) {
    const t0 = performance.now();
    await sniffImage(q);
    best = Math.min(best, performance.now() - t0);
  }
  assert.ok(best < 1, `sniffImage took ${best.toFixed(3)} ms at best`);
});
