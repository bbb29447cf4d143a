// Reading a foreign disk's GRUB default entry without booting it: real partition tables
// (sfdisk), real ext4 file systems (mke2fs -d), raw and qcow2 (qemu-img), the cache.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { foreignBoot, partitionTable } from "../../src/images/foreign-boot.js";
import { tempDir } from "../support/paths.js";

const UUID = "0d6f2a44-3b1c-4e5f-9a7b-8c9d0e1f2a3b";

/** A fake bzImage: the setup header's magic and a kernel_version string, as the real ones carry. */
function fakeBzImage(release: string): Buffer {
  const b = Buffer.alloc(0x1000);
  b.write("HdrS", 0x202, "latin1");
  b.writeUInt16LE(0x600, 0x20e);
  b.write(`${release} (test@example) #1 SMP`, 0x800, "latin1");
  return b;
}

/** A 24 MiB disk: partition 1 (8 MiB, ext4 "/boot"), partition 2 (rest, ext4 root with UUID), as sfdisk writes them. */
function makeDisk(dir: string, o: { label: "dos" | "gpt"; bootFiles: Record<string, string | Buffer> }): string {
  const disk = join(dir, `disk-${o.label}.raw`);
  writeFileSync(disk, Buffer.alloc(0));
  execFileSync("truncate", ["-s", "24M", disk]);
  execFileSync("sfdisk", ["--quiet", "--no-reread", "--no-tell-kernel", disk], { input: `label: ${o.label}\nstart=2048, size=16384, type=${o.label === "gpt" ? "L" : "83"}\nstart=18432, type=${o.label === "gpt" ? "L" : "83"}\n` });
  const boot = join(dir, `boot-${o.label}`);
  const rootTree = join(dir, `root-${o.label}`);
  for (const [p, content] of Object.entries(o.bootFiles)) {
    mkdirSync(join(boot, p, ".."), { recursive: true });
    writeFileSync(join(boot, p), content);
  }
  mkdirSync(join(rootTree, "etc"), { recursive: true });
  writeFileSync(join(rootTree, "etc", "hostname"), "x\n");
  execFileSync("mke2fs", ["-q", "-F", "-t", "ext4", "-d", boot, "-E", `offset=${2048 * 512}`, disk, "8M"]);
  execFileSync("mke2fs", ["-q", "-F", "-t", "ext4", "-U", UUID, "-L", "rootfs", "-d", rootTree, "-E", `offset=${18432 * 512}`, disk, `${24 * 1024 - 9 * 1024}k`]);
  return disk;
}

test("partition tables as sfdisk writes them: MBR and GPT, GRUB's 1-based numbers, byte offsets", () => {
  const dir = tempDir();
  for (const label of ["dos", "gpt"] as const) {
    const disk = makeDisk(dir, { label, bootFiles: { "x": "y" } });
    const t = partitionTable(readFileSync(disk).subarray(0, 1024 * 1024));
    const sf = JSON.parse(execFileSync("sfdisk", ["--json", disk], { encoding: "utf8" })) as { partitiontable: { partitions: { start: number; size: number }[] } };
    assert.equal(t.scheme, label === "dos" ? "msdos" : "gpt");
    assert.deepEqual(t.partitions, sf.partitiontable.partitions.map((p, i) => ({ number: i + 1, start: p.start * 512, size: p.size * 512 })));
  }
  assert.throws(() => partitionTable(Buffer.alloc(1024 * 1024)), /no MBR or GPT partition table/);
});

test("a separate /boot (grub.cfg in /grub, the kernel found on it), raw then qcow2; cached; reasons for what cannot be read", async () => {
  const dir = tempDir();
  const cfg = [
    "if [ -s $prefix/grubenv ]; then load_env; fi",
    'set default="${saved_entry}"',
    "menuentry 'Linux' {",
    "  search --no-floppy --fs-uuid --set=root BOOT-UUID-UNUSED",
    "  set root='hd0,gpt1'",
    `  linux /vmlinuz-9.9.9-test root=UUID=${UUID} ro`,
    "  initrd /microcode.img /initrd.img-9.9.9-test",
    "}",
    "menuentry 'Other' { linux /other }",
  ].join("\n");
  const disk = makeDisk(dir, {
    label: "gpt",
    bootFiles: {
      "grub/grub.cfg": cfg,
      "grub/grubenv": "# GRUB Environment Block\nsaved_entry=Linux\n" + "#".repeat(980),
      "vmlinuz-9.9.9-test": fakeBzImage("9.9.9-test"),
      "microcode.img": Buffer.from("abcde"), // 5 bytes: padded to 8 before the next
      "initrd.img-9.9.9-test": Buffer.from("INITRD"),
    },
  });
  const stateDir = join(dir, "state");
  const r = await foreignBoot(disk, { stateDir });
  assert.ok(r.ok, JSON.stringify(r));
  assert.equal(r.cached, false);
  assert.equal(r.boot.release, "9.9.9-test");
  assert.equal(r.boot.entry, "Linux");
  assert.equal(r.boot.config, "partition 1: /grub/grub.cfg");
  assert.equal(r.boot.cmdline, `BOOT_IMAGE=/vmlinuz-9.9.9-test root=UUID=${UUID} ro console=ttyS0`);
  assert.deepEqual(readFileSync(r.boot.initrd!), Buffer.concat([Buffer.from("abcde"), Buffer.alloc(3), Buffer.from("INITRD")]));
  const again = await foreignBoot(disk, { stateDir });
  assert.ok(again.ok && again.cached && again.boot.kernel === r.boot.kernel);

  // The same disk as qcow2: partitions read through qemu-img, same answer; its own cache entry.
  const q = join(dir, "disk.qcow2");
  execFileSync("qemu-img", ["convert", "-q", "-f", "raw", "-O", "qcow2", disk, q]);
  const rq = await foreignBoot(q, { stateDir });
  assert.ok(rq.ok && !rq.cached && rq.boot.cmdline === r.boot.cmdline, JSON.stringify(rq));
  assert.equal(readdirSync(join(stateDir, "boot-cache")).length, 2);

  // No grub.cfg: the reason, cached.
  const bare = makeDisk(tempDir(), { label: "dos", bootFiles: { "vmlinuz": fakeBzImage("1.0") } });
  const nb = await foreignBoot(bare, { stateDir });
  assert.deepEqual(nb, { ok: false, cached: false, reason: "no GRUB configuration (/boot/grub/grub.cfg or /grub/grub.cfg) on partition 1, partition 2" });
  assert.deepEqual(await foreignBoot(bare, { stateDir }), { ...nb, cached: true });

  // A kernel that is not there, a blank disk.
  const missing = makeDisk(tempDir(), { label: "dos", bootFiles: { "boot/grub/grub.cfg": "menuentry a { linux /boot/vmlinuz-gone ro }\n" } });
  const m = await foreignBoot(missing, { stateDir: join(dir, "state2") });
  assert.ok(!m.ok && /the default entry "a"'s kernel \/boot\/vmlinuz-gone is not a file on partition 1/.test(m.reason), JSON.stringify(m));
  const blank = join(dir, "blank.raw");
  writeFileSync(blank, Buffer.alloc(2 * 1024 * 1024));
  const b = await foreignBoot(blank, { stateDir });
  assert.ok(!b.ok && /no MBR or GPT/.test(b.reason));
});
