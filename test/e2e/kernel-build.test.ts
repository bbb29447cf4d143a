// civm kernel build from lvh's kernels.json form (test/fixtures/kernels/kernels.json): a small
// kernel (tinyconfig + kvm_guest.config + what civm's guests need) from Debian's
// linux-source-6.1 tarball, built once into <test cache>/store-kernels and cached by its key
// across suite runs; a second build is "up to date" at once. The kernel boots on QEMU (TCG)
// with the tiny guest's initramfs: config CD read and ejected, power-off. It is installed into
// an image with the install-kernel action, on lvh's base (a stored image that the child's spec
// names as its parent), whose exported kernel is then this one.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { closeSync, mkdirSync, openSync, readFileSync, readSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { civmEnv, consoleLogOf, leftovers, qemuProcessesOf, runCivm } from "../support/civm-cli.js";
import { ensureTinyKernel, kernelEnv, TEST_KERNELS_JSON, TINY_KERNEL, type BuiltKernel } from "../support/kernel-build.js";
import { ensureLvhBaseImage, lvhEnv, lvhStoreDir, LVH_BASE } from "../support/lvh-image.js";
import { partitionTable } from "../../src/images/foreign-boot.js";

let guest: TinyGuest;
let kernel: BuiltKernel;
// Opt-in: compiling the test kernel takes tens of minutes on 2 cores: set CIVM_E2E_KERNEL=1 to run it (build, cache, boot and install-kernel green).
const SKIP = process.env.CIVM_E2E_KERNEL === "1" ? false : "compiling the test kernel takes tens of minutes on 2 cores: set CIVM_E2E_KERNEL=1 to run it";

before(async () => {
  if (SKIP) return;
  guest = await buildTinyGuest();
  kernel = await ensureTinyKernel();
  console.error(`# kernel ${TINY_KERNEL} ${kernel.release}: ${kernel.status} in ${kernel.seconds.toFixed(1)} s (cold build: ${kernel.buildSeconds.toFixed(1)} s)`);
});

const sha = (f: string) => createHash("sha256").update(readFileSync(f)).digest("hex");

test("kernel build: stored with its key; building again is up to date within seconds; kernel ls shows where it came from", { timeout: 120_000, skip: SKIP }, async (t) => {
  const e = kernelEnv();
  const t0 = Date.now();
  const again = await runCivm(["kernel", "build", TINY_KERNEL, "--kernels-file", TEST_KERNELS_JSON, "--json"], e);
  assert.equal(again.code, 0, again.stderr);
  const j = JSON.parse(again.stdout) as BuiltKernel;
  assert.equal(j.status, "up-to-date");
  assert.equal(j.key, kernel.key);
  assert.ok(Date.now() - t0 < 30_000, "a cached build costs no make");
  t.diagnostic(`cached build: ${((Date.now() - t0) / 1000).toFixed(1)} s; cold: ${kernel.buildSeconds.toFixed(1)} s`);
  assert.match(again.stderr, /up to date \(key [0-9a-f]{12}/);
  const ls = await runCivm(["kernel", "ls", "--json"], e);
  const entry = (JSON.parse(ls.stdout) as { name: string; release: string; modules: boolean; source: { kind: string; path: string } }[]).find((k) => k.name === TINY_KERNEL);
  assert.ok(entry, ls.stdout);
  assert.equal(entry.release, kernel.release);
  assert.equal(entry.modules, true, "CONFIG_DUMMY is a module: the modules disk is there");
  assert.deepEqual(entry.source, { kind: "build", path: "tarball /usr/src/linux-source-6.1.tar.xz" });
  const manifest = JSON.parse(readFileSync(join(kernel.dir, "manifest.json"), "utf8")) as { build: { notApplied: string[]; baseConfig: string[] } };
  assert.deepEqual(manifest.build.baseConfig, ["tinyconfig", "kvm_guest.config"]);
  assert.deepEqual(manifest.build.notApplied, [], "every option of the fixture took");
});

test("the built kernel boots the tiny guest: config CD read and ejected, power-off, exit 0", { timeout: 600_000, skip: SKIP }, async () => {
  const e = civmEnv();
  writeFileSync(join(e.root, "instances.json"), JSON.stringify([{
    name: "built-kernel", image: guest.disk, "cpu-cores": 1, ram: "256M", "timeout-seconds": 500,
    kernel: join(kernel.dir, "vmlinuz"), initrd: guest.initrd, cmdline: "console=ttyS0 panic=-1", config: { tiny: "poweroff" },
  }]));
  const r = await runCivm(["run", "built-kernel"], e);
  assert.equal(r.code, 0, r.stderr);
  const consoleText = consoleLogOf(r.stderr);
  assert.match(consoleText, new RegExp(`Linux version ${kernel.release.replace(/[.+]/g, "\\$&")} `));
  assert.match(consoleText, /tiny-guest: instance\.json:/);
  assert.match(r.stderr, /medium removed \(confirmed by query-block\)/);
  assert.match(r.stderr, /built-kernel: poweroff after [\d.]+ s \(exit 0\)/);
  assert.deepEqual(leftovers(e), []);
  assert.deepEqual(qemuProcessesOf(e), []);
});

// lvh's base is built from lvh's images.json (lvh's form, which refuses install-kernel) and is
// only a stored image here: the child's civm-form spec names it as its parent, and the build
// uses the stored disk as it is (its key and suite/mirror from its manifest).
test("install-kernel: a child of lvh's base (a stored parent) gets the built kernel and its modules; the image's exported kernel is it", { timeout: 1_800_000, skip: SKIP }, async (t) => {
  await ensureLvhBaseImage();
  const e = lvhEnv();
  // The lvh store gets the kernel (bzImage + its modules read out of the modules disk).
  // modules.img holds lib/modules/<release> at its root: dump it into a folder of that name.
  const mods = join(e.root, kernel.release);
  mkdirSync(mods);
  execFileSync("debugfs", ["-R", `rdump / ${mods}`, join(kernel.dir, "modules.img")], { stdio: "ignore" });
  const add = await runCivm(["kernel", "add", TINY_KERNEL, join(kernel.dir, "vmlinuz"), "--modules", mods, "--force"], e);
  assert.equal(add.code, 0, add.stderr);
  const spec = join(e.root, "images.yaml");
  writeFileSync(spec, `- name: base-tiny-kernel\n  parent: ${LVH_BASE}\n  actions:\n    - install-kernel: ${TINY_KERNEL}\n`);
  // --force: the child is built on every run (the lvh store keeps it between runs); its parent is not.
  const t0 = Date.now();
  const b = await runCivm(["image", "build", "base-tiny-kernel", "-f", spec, "--json", "--force"], e);
  assert.equal(b.code, 0, b.stderr);
  t.diagnostic(`install-kernel build on lvh's base: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  const lines = b.stdout.split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as { type: string; image: string; status?: string; message?: string });
  assert.deepEqual(lines.filter((l) => l.type === "result").map((l) => [l.image, l.status]), [[LVH_BASE, "cached"], ["base-tiny-kernel", "built"]]);
  assert.ok(lines.some((l) => l.image === LVH_BASE && /is a stored image, used as it is/.test(l.message ?? "")), b.stdout);
  const path = (await runCivm(["image", "path", "base-tiny-kernel"], e)).stdout.trim();
  const dir = join(path, "..");
  const base = JSON.parse(readFileSync(join(lvhStoreDir, "images", LVH_BASE, "manifest.json"), "utf8")) as { key: string; suite: string; mirror: string };
  const child = JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8")) as { parent: string; parentKey: string; backing: string; suite: string; mirror: string };
  assert.equal(child.parent, LVH_BASE);
  assert.equal(child.parentKey, base.key, "built on the stored parent's key");
  assert.equal(child.backing, join(lvhStoreDir, "images", LVH_BASE, "disk.qcow2"), "a qcow2 on the stored disk, used as it is");
  assert.deepEqual([child.suite, child.mirror], [base.suite, base.mirror], "suite and mirror inherited from the stored manifest");
  assert.equal(sha(join(dir, "vmlinuz")), sha(join(kernel.dir, "vmlinuz")), "the image exports the installed kernel");
  // In the disk (a raw copy read with debugfs, no mount): the marker naming the kernel, and its modules.
  const raw = join(e.root, "child.raw");
  execFileSync("qemu-img", ["convert", "-U", "-O", "raw", path, raw]);
  const fd = openSync(raw, "r");
  const head = Buffer.alloc(1024 * 1024);
  readSync(fd, head, 0, head.length, 0);
  closeSync(fd);
  const root = partitionTable(head).partitions.at(-1);
  assert.ok(root, "the disk has a partition");
  const inDisk = (cmd: string) => execFileSync("debugfs", ["-c", "-R", cmd, `${raw}?offset=${root.start}`], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
  assert.equal(inDisk("cat /boot/civm-kernel").trim(), kernel.release);
  assert.match(inDisk(`ls -p /lib/modules/${kernel.release}/kernel/drivers/net`), /\/dummy\.ko\/\d+\//, "the kernel's module (CONFIG_DUMMY=m) is in the image");
  assert.match(inDisk(`ls -p /lib/modules/${kernel.release}`), /\/modules\.dep\//, "depmod ran");
  rmSync(raw);
  // Unchanged inputs: cached, parent and child.
  const again = await runCivm(["image", "build", "base-tiny-kernel", "-f", spec], e);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stderr, /base-tiny-kernel is up to date/);
});
