import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { imageInfo, createOverlay } from "../../src/vm/disk.js";
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
