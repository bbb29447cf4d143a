// src/kernels: module resolution, bzImage headers, lvh's kernels.json, the initrd's /init.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { resolveModules, moduleName } from "../../src/kernels/modules.js";
import { parseBzImage } from "../../src/kernels/bzimage.js";
import { parseLvhKernels, findLvhKernels } from "../../src/kernels/lvh.js";
import { INITRD_INIT, MODULES_LABEL } from "../../src/kernels/init-script.js";
import { KernelStore, checkKernelName } from "../../src/kernels/store.js";
import { tempDir } from "../support/paths.js";

const DEP = `kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/net/9p/9pnet-virtio.ko: kernel/net/9p/9pnet.ko
kernel/net/9p/9pnet.ko:
`;

test("resolveModules: dependencies first, each once; built-ins skipped; dashes and compression normalised", () => {
  assert.deepEqual(resolveModules(DEP, "kernel/drivers/virtio/virtio_ring.ko\n", ["ext4", "virtio_blk", "9pnet_virtio", "jbd2"]), [
    "kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko", "kernel/fs/ext4/ext4.ko",
    "kernel/drivers/block/virtio_blk.ko.xz", "kernel/net/9p/9pnet.ko", "kernel/net/9p/9pnet-virtio.ko",
  ]);
  assert.equal(moduleName("kernel/net/9p/9pnet-virtio.ko.zst"), "9pnet_virtio");
});

test("resolveModules: unknown modules fail unless optional (an optional module's missing dependency still fails)", () => {
  assert.throws(() => resolveModules(DEP, "", ["nope"]), /kernel module nope is not in modules.dep/);
  assert.deepEqual(resolveModules(DEP, "", ["nope", "crc16"], { optional: ["nope"] }), ["kernel/lib/crc16.ko"]);
  assert.throws(() => resolveModules("a.ko: b.ko\n", "", ["a"], { optional: ["a", "b"] }), /b \(needed by a\)/);
});

function bzImage(version: string | undefined): Buffer {
  const b = Buffer.alloc(0x8000);
  b.write("HdrS", 0x202, "latin1");
  if (version !== undefined) {
    b.writeUInt16LE(0x3000, 0x20e);
    b.write(version + "\0", 0x3200, "latin1");
  }
  return b;
}

test("parseBzImage: release and version string from the boot header; non-kernels are undefined", () => {
  assert.deepEqual(parseBzImage(bzImage("6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP")), {
    release: "6.1.0-56-amd64",
    versionString: "6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP",
  });
  assert.equal(parseBzImage(bzImage(undefined)), undefined);
  assert.equal(parseBzImage(bzImage("not a version")), undefined);
  assert.equal(parseBzImage(Buffer.alloc(0x8000)), undefined);
  assert.equal(parseBzImage(Buffer.from("short")), undefined);
});

test("lvh kernels.json: names (and urls) read; malformed files are clear errors", async () => {
  const k = parseLvhKernels(JSON.stringify({ kernels: [{ name: "bpf-next", url: "git://x/bpf-next.git", opts: [["--enable", "X"]] }, { name: "rhel8" }], common_opts: [] }), "k.json");
  assert.deepEqual(k.kernels.map((x) => [x.name, x.url]), [["bpf-next", "git://x/bpf-next.git"], ["rhel8", undefined]]);
  assert.deepEqual(k.kernels[0]!.opts, [{ op: "enable", name: "X" }]);
  assert.throws(() => parseLvhKernels("{", "k.json"), /k\.json: not valid JSON/);
  assert.throws(() => parseLvhKernels("[]", "k.json"), /kernels\.json form/);
  assert.throws(() => parseLvhKernels('{"kernels":[{}]}', "k.json"), /kernels\[0\] has no "name"/);
  const dir = tempDir();
  assert.equal(await findLvhKernels(undefined, dir), undefined);
  mkdirSync(join(dir, "_data"));
  writeFileSync(join(dir, "_data", "kernels.json"), JSON.stringify({ kernels: [{ name: "6.6" }] }));
  assert.deepEqual((await findLvhKernels(undefined, dir))?.kernels.map((x) => x.name), ["6.6"]);
  await assert.rejects(findLvhKernels("missing.json", dir), /missing\.json: no such file/);
});

test("kernel add: a name lvh's kernels.json defines is explained (no git builds); unknown sources and bad names are config errors", async () => {
  const dir = tempDir();
  writeFileSync(join(dir, "kernels.json"), JSON.stringify({ kernels: [{ name: "bpf-next", url: "git://git.kernel.org/bpf-next.git" }] }));
  const store = new KernelStore(join(dir, "state"));
  const code2 = (re: RegExp) => (e: Error & { exitCode?: number }) => re.test(e.message) && e.exitCode === 2;
  await assert.rejects(store.add({ name: "bpf-next", source: "bpf-next", cwd: dir }), code2(/kernels\.json \(lvh\) defines kernel "bpf-next" from git:.*kernel add takes built kernels.*civm kernel build bpf-next.*tar-install/s));
  await assert.rejects(store.add({ name: "k", source: "something", cwd: dir }), code2(/neither a file nor a Debian kernel package/));
  await assert.rejects(store.add({ name: "k", source: "./nope/bzImage", cwd: dir }), code2(/no such file or folder/));
  writeFileSync(join(dir, "notakernel"), "hello");
  await assert.rejects(store.add({ name: "k", source: "notakernel", cwd: dir }), code2(/not an x86 bzImage/));
  await assert.rejects(store.add({ name: "Bad Name", source: "x", cwd: dir }), code2(/kernel name "Bad Name" is not valid/));
  assert.throws(() => checkKernelName("-x"), /not valid/);
  await assert.rejects(store.require("k"), code2(/no kernel named "k"; no kernels are stored\. Add one with: civm kernel add k/));
  assert.deepEqual(await store.list(), []);
});

test("kernel add: lvh's build layout (boot/, lib/modules/) is stored with a generated initrd and a modules disk with depmod's indexes", async (t) => {
  const has = (p: string) => spawnSync("sh", ["-c", `command -v ${p}`]).status === 0;
  if (!has("depmod") || !has("cpio") || !has("mke2fs") || !existsBusybox()) {
    t.skip("needs depmod (kmod), cpio, mke2fs and busybox-static");
    return;
  }
  const dir = tempDir();
  const release = "6.9.9-test";
  mkdirSync(join(dir, "build", "boot"), { recursive: true });
  writeFileSync(join(dir, "build", "boot", `vmlinuz-${release}`), bzImage(`${release} (test) #1`));
  writeFileSync(join(dir, "build", "boot", `config-${release}`), "CONFIG_BPF=y\nCONFIG_RD_ZSTD=y\n");
  const mods = join(dir, "build", "lib", "modules", release);
  mkdirSync(join(mods, "kernel"), { recursive: true });
  writeFileSync(join(mods, "modules.order"), "");
  writeFileSync(join(mods, "modules.builtin"), "kernel/fs/ext4/ext4.ko\n");
  const store = new KernelStore(join(dir, "state"));
  const k = await store.add({ name: "lvh-6.9", source: join(dir, "build"), cwd: dir });
  assert.equal(k.manifest.release, release);
  assert.equal(k.manifest.hasModules, true);
  assert.deepEqual(k.manifest.initrdModules, []);
  assert.equal(k.manifest.source.kind, "dir");
  assert.equal(k.modulesDisk, join(store.pathOf("lvh-6.9"), "modules.img"));
  const blk = spawnSync("blkid", ["-o", "export", k.modulesDisk!], { encoding: "utf8" });
  if (!blk.error) {
    assert.match(blk.stdout, /^LABEL=civm-modules$/m);
    assert.match(blk.stdout, /^TYPE=ext4$/m);
  }
  const ls = spawnSync("debugfs", ["-R", "ls -l /", k.modulesDisk!], { encoding: "utf8" });
  if (!ls.error) for (const f of ["modules.order", "modules.dep", "modules.dep.bin", "kernel"]) assert.match(ls.stdout, new RegExp(`\\s${f.replace(/\./g, "\\.")}\\s*$`, "m"), `${f} not on the modules disk:\n${ls.stdout}`);
  const cpio = spawnSync("sh", ["-c", `gzip -dc ${k.initrdPath} | cpio -it --quiet`], { encoding: "utf8" });
  for (const f of ["init", "bin/busybox", "etc/civm/modules", "etc/civm/has-modules"]) assert.ok(cpio.stdout.split("\n").includes(f), `${f} not in the initrd:\n${cpio.stdout}`);
  assert.deepEqual((await store.list()).map((x) => x.name), ["lvh-6.9"]);
  // The build's configuration comes along, and install-kernel stages it as /boot/config-<release>
  // (so the image's update-initramfs and libbpf read the kernel's real one).
  assert.equal(readFileSync(k.configPath!, "utf8"), "CONFIG_BPF=y\nCONFIG_RD_ZSTD=y\n");
  const { expandInstallKernels } = await import("../../src/images/install-kernel.js");
  const spec = {
    name: "img", parent: "base", actions: [{ kind: "install-kernel", kernel: "lvh-6.9" }],
    source: { file: "images.yaml", baseDir: dir, index: 0, lvh: false, builtin: false },
  } as unknown as import("../../src/images/types.js").ImageSpec;
  const [expanded] = await expandInstallKernels([spec], join(dir, "state"), join(dir, "stage"));
  const copy = expanded!.actions[0];
  assert.ok(copy?.kind === "copy", JSON.stringify(expanded!.actions));
  assert.equal(readFileSync(join(copy.srcPath!, "boot", `config-${release}`), "utf8"), "CONFIG_BPF=y\nCONFIG_RD_ZSTD=y\n");
  assert.ok(existsSync(join(copy.srcPath!, "boot", `vmlinuz-${release}`)));
  await assert.rejects(store.add({ name: "lvh-6.9", source: join(dir, "build"), cwd: dir }), /already stored/);
  await store.remove("lvh-6.9");
  assert.deepEqual(await store.list(), []);
});

function existsBusybox(): boolean {
  return spawnSync("dpkg-query", ["-W", "-f=${Status}", "busybox-static"], { encoding: "utf8" }).stdout.endsWith(" installed");
}

test("the initrd's /init is valid sh, mounts the modules disk by its label and hands over with switch_root", () => {
  const dir = tempDir();
  writeFileSync(join(dir, "init"), INITRD_INIT);
  const r = spawnSync("sh", ["-n", join(dir, "init")], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  assert.ok(INITRD_INIT.includes(`findfs LABEL=${MODULES_LABEL}`));
  assert.match(INITRD_INIT, /mount -t ext4 -o ro "\$mdev" "\$target"/);
  assert.match(INITRD_INIT, /exec switch_root \/newroot "\$init"/);
  assert.match(INITRD_INIT, /LABEL=\* \| UUID=\*\) dev=\$\(findfs "\$root"/);
  const sc = spawnSync("shellcheck", ["-s", "sh", "-e", "SC3045", join(dir, "init")], { encoding: "utf8" });
  if (sc.error) return; // shellcheck not installed
  assert.equal(sc.status, 0, sc.stdout + sc.stderr);
});
