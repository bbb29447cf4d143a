// civm kernel build from lvh's kernels.json form (test/fixtures/kernels/kernels.json): a small
// kernel (tinyconfig + kvm_guest.config + what civm's guests need) from Debian's
// linux-source-6.1 tarball, built once into <test cache>/store-kernels and cached by its key
// across suite runs; a second build is "up to date" at once. The kernel boots on QEMU (TCG)
// with the tiny guest's initramfs: config CD read and ejected, power-off. It is installed into
// an image with the install-kernel action, whose exported kernel is then this one.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { civmEnv, consoleLogOf, leftovers, qemuProcessesOf, runCivm } from "../support/civm-cli.js";
import { ensureTinyKernel, kernelEnv, TEST_KERNELS_JSON, TINY_KERNEL, type BuiltKernel } from "../support/kernel-build.js";
import { ensureLvhBaseImage, lvhEnv, LVH_BASE } from "../support/lvh-image.js";

let guest: TinyGuest;
let kernel: BuiltKernel;
// Opt-in: compiling the test kernel takes tens of minutes on 2 cores: set CIVM_E2E_KERNEL=1 to run it (build, cache and boot green on 2026-12-07; install-kernel is a todo).
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

// todo: a spec's parent must be defined in the same file or be built in; lvh's base is built
// from lvh's images.json (lvh's form, which refuses install-kernel) and is only a stored image
// here, so the child's civm-form spec is refused at load time. Taking a stored image as a parent
// (its key and inherited fields from its manifest) is issue 17's open point.
const PARENT_GAP = "a parent that is only a stored image (lvh's base) is refused by the spec loader: issue 17";
test("install-kernel: a child of lvh's base gets the built kernel and its modules; the image's exported kernel is it", { timeout: 1_800_000, skip: SKIP, todo: SKIP ? false : PARENT_GAP }, async () => {
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
  const b = await runCivm(["image", "build", "base-tiny-kernel", "-f", spec, "--json"], e);
  assert.equal(b.code, 0, b.stderr);
  const path = (await runCivm(["image", "path", "base-tiny-kernel"], e)).stdout.trim();
  const dir = join(path, "..");
  assert.equal(sha(join(dir, "vmlinuz")), sha(join(kernel.dir, "vmlinuz")), "the image exports the installed kernel");
  // Unchanged inputs: cached.
  const again = await runCivm(["image", "build", "base-tiny-kernel", "-f", spec], e);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stderr, /up to date/);
});
