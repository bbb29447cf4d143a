import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { imageInfo, createOverlay, qcow2Overlay } from "../../src/vm/disk.js";
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

test("qcow2Overlay writes the bytes qemu-img create writes; over 4 TiB it leaves the job to qemu-img", () => {
  const d = tempDir();
  const raw = join(d, "base.raw");
  writeFileSync(raw, Buffer.alloc(4 * 1024 * 1024));
  const q = join(d, "base.qcow2");
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", q, "64M"]);
  const cases: [string, string, number][] = [
    [q, "qcow2", 64 * 1024 ** 2],
    [raw, "raw", 8 * 1024 ** 2 + 1], // rounded up to 512 bytes, as qemu-img does
    [q, "qcow2", 512 * 1024 ** 2 + 512], // two L1 entries
    [q, "qcow2", 3 * 1024 ** 3],
    [q, "qcow2", 4 * 1024 ** 4], // the largest L1 table that fits one cluster
  ];
  for (const [base, format, size] of cases) {
    const ov = join(d, "ov.qcow2");
    rmSync(ov, { force: true });
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-F", format, "-b", base, ov, String(size)]);
    assert.deepEqual(qcow2Overlay(base, format, size), readFileSync(ov), `${format} base, ${size} bytes`);
  }
  assert.equal(qcow2Overlay(q, "qcow2", 4 * 1024 ** 4 + 1), undefined);
  assert.equal(qcow2Overlay("/" + "x".repeat(1024), "qcow2", 1024 ** 3), undefined);
});

test("overlay on a backing chain goes through qemu-img, which checks the chain opens", async () => {
  const d = tempDir();
  const grand = join(d, "grand.qcow2");
  const parent = join(d, "parent.qcow2");
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", grand, "16M"]);
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", grand, parent]);
  const ok = join(d, "ok.qcow2");
  await createOverlay({ base: parent, overlay: ok, sizeBytes: undefined, where: "t" });
  assert.equal(qemuImgInfo(ok)["full-backing-filename"], parent);
  execFileSync("qemu-img", ["check", ok]);
  rmSync(grand);
  await assert.rejects(createOverlay({ base: parent, overlay: join(d, "broken.qcow2"), sizeBytes: undefined, where: "t" }), /qemu-img/);
});
