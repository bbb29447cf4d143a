// Image builder stage 1 end to end, with the real tools and the host apt's Debian mirror:
// mmdebstrap builds a small root tree (test/fixtures/images/rootfs-small.yaml), assembleDisk
// turns it into a partitioned disk, and the disk is read back without mounting anything
// (sfdisk --json, debugfs/e2fsck on "FILE?offset=1048576"). The root tree is cached under
// .cache/test/images-rootfs/KEY (KEY covers the spec, the base packages and the initrd
// modules); CIVM_TEST_REBUILD=1 forces mmdebstrap to run. Measured on 2 cores: about 30 s
// for the tree with the .deb cache warm, ~40 s cold; assembling the disk takes ~5 s.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { ConfigError } from "../../src/errors/index.js";
import { loadImageSpecs } from "../../src/images/spec.js";
import { cacheKeyFor } from "../../src/images/cache-key.js";
import { BASE_PACKAGES, INITRAMFS_MODULES, buildRootTree, removeTree, type RootfsProgress } from "../../src/images/rootfs.js";
import { assembleDisk, DISK_LAYOUT } from "../../src/images/disk.js";
import type { ImageSpec } from "../../src/images/types.js";
import { repoRoot, tempDir, testCacheDir } from "../support/paths.js";

const fixtures = join(repoRoot, "test", "fixtures", "images");
const aptCacheDir = join(testCacheDir, "apt-archives");
const isRoot = typeof process.getuid === "function" && process.getuid() === 0;
const hasTools = ["mmdebstrap", "mke2fs", "debugfs", "sfdisk", "qemu-img", "dpkg-query"].every((p) => {
  try {
    execFileSync("sh", ["-c", `command -v ${p}`], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
});
const skip = !isRoot ? "needs root (mmdebstrap --mode=root, chroot)" : !hasTools ? "needs mmdebstrap, e2fsprogs, fdisk and qemu-utils" : false;

let spec: ImageSpec;
let tree: string;
let provision: { index: number }[] = [];
let rootfsSeconds: number | undefined;

function debugfs(image: string, request: string): string {
  return execFileSync("debugfs", ["-R", request, `${image}?offset=${DISK_LAYOUT.partitionStartBytes}`], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
}

before(async () => {
  if (skip) return;
  const loaded = await loadImageSpecs(join(fixtures, "rootfs-small.yaml"));
  spec = loaded.images[0] as ImageSpec;
  const inputs = [await cacheKeyFor(spec), ...BASE_PACKAGES, "|", ...INITRAMFS_MODULES].join("\n");
  const key = createHash("sha256").update(inputs).digest("hex").slice(0, 16);
  const workDir = join(testCacheDir, "images-rootfs", key);
  tree = join(workDir, "rootfs");
  const done = join(workDir, "complete.json");
  if (existsSync(done) && !process.env.CIVM_TEST_REBUILD) {
    const saved = JSON.parse(readFileSync(done, "utf8")) as { provision: { index: number }[] };
    provision = saved.provision;
    return;
  }
  rmSync(done, { force: true });
  mkdirSync(workDir, { recursive: true });
  mkdirSync(aptCacheDir, { recursive: true });
  const steps: RootfsProgress[] = [];
  const result = await buildRootTree({ spec, workDir, aptCacheDir, onProgress: (p) => steps.push(p) });
  rootfsSeconds = result.seconds;
  provision = result.provision;
  const seen = new Set(steps.map((s) => s.step));
  for (const step of ["update", "download", "install", "customize", "done"] as const) assert.ok(seen.has(step), `progress step ${step}`);
  assert.ok(steps.some((s) => s.step === "customize" && /action 2\/4: set-hostname civm-e2e/.test(s.message)));
  assert.ok(result.packages["systemd-sysv"] && result.packages["linux-image-amd64"] && result.packages["grub-pc-bin"]);
  assert.ok(!result.packages["grub-pc"], "grub-pc (debconf prompts) is not installed");
  assert.match(result.kernelRelease ?? "", /-amd64$/);
  writeFileSync(done, JSON.stringify({ seconds: result.seconds, provision: result.provision, at: new Date().toISOString() }));
});

test("a small root image: MBR + bootable ext4 partition at 1 MiB holding the tree and the actions' effects", { skip }, async (t) => {
  if (rootfsSeconds !== undefined) t.diagnostic(`mmdebstrap root tree: ${rootfsSeconds.toFixed(1)} s`);
  else t.diagnostic(`root tree from the cache: ${tree}`);
  assert.deepEqual(provision.map((p) => p.index), [3], "provision actions are handed back, not run");
  const out = tempDir("civm-img-e2e-");
  t.after(() => rmSync(out, { recursive: true, force: true }));
  const disk = join(out, "small.raw");
  const started = Date.now();
  const r = await assembleDisk({ tree, output: disk, sizeBytes: spec.sizeBytes, format: "raw" });
  t.diagnostic(`disk assembly (raw): ${((Date.now() - started) / 1000).toFixed(1)} s`);
  assert.equal(r.disk, disk);
  assert.equal(statSync(disk).size, 1024 ** 3);
  assert.ok(statSync(disk).blocks * 512 < 1024 ** 3, "the raw file is sparse");
  assert.deepEqual(readdirSync(out).sort(), ["initrd.img", "small.raw", "vmlinuz"], "no partial files left");
  assert.ok(statSync(join(out, "vmlinuz")).size > 1_000_000);
  assert.ok(statSync(join(out, "initrd.img")).size > 1_000_000);
  assert.ok(statSync(join(out, "initrd.img")).size < 20_000_000, "a small (MODULES=list) initrd");
  assert.ok(r.packages["systemd-sysv"]);

  const table = JSON.parse(execFileSync("sfdisk", ["--json", disk], { encoding: "utf8" })) as {
    partitiontable: { label: string; partitions: { start: number; size: number; type: string; bootable?: boolean }[] };
  };
  assert.equal(table.partitiontable.label, "dos");
  assert.deepEqual(table.partitiontable.partitions, [{ node: `${disk}1`, start: 2048, size: (1024 ** 3 - 1024 ** 2) / 512, type: "83", bootable: true }]);

  const fs = `${disk}?offset=${DISK_LAYOUT.partitionStartBytes}`;
  execFileSync("e2fsck", ["-fn", fs], { stdio: "ignore" }); // throws unless clean
  const super_ = execFileSync("dumpe2fs", ["-h", fs], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
  assert.match(super_, /Filesystem volume name:\s+civm-root/);
  assert.match(super_, /Filesystem features:.*extent/);

  assert.equal(debugfs(disk, "cat /etc/hostname"), "civm-e2e\n");
  assert.match(debugfs(disk, "cat /etc/hosts"), /^127\.0\.1\.1\tcivm-e2e$/m);
  assert.equal(debugfs(disk, "cat /etc/civm-e2e"), "written by civm's image builder\n");
  const st = debugfs(disk, "stat /etc/civm-e2e");
  assert.match(st, /Type: regular\s+Mode:\s+0640/);
  assert.match(st, /User:\s+0\s+Group:\s+0/);
  assert.match(debugfs(disk, "cat /etc/fstab"), /^LABEL=civm-root\s+\/\s+ext4\s/m);
  assert.match(debugfs(disk, "ls /root"), /rootfs-small\.yaml/);
  assert.match(debugfs(disk, "stat /usr/bin/mount"), /Mode:\s+04755/, "setuid bits survive mke2fs -d");
  assert.match(debugfs(disk, "stat /bin"), /Type: symlink/, "merged-/usr symlinks survive");
  assert.match(debugfs(disk, "stat /dev/null"), /Type: character special/, "device nodes survive");
  assert.match(debugfs(disk, "cat /etc/initramfs-tools/conf.d/civm.conf"), /MODULES=list/);
  assert.equal(debugfs(disk, "stat /etc/resolv.conf").trim(), "", "the host's resolv.conf is not left in the image");
  assert.doesNotMatch(debugfs(disk, "ls /etc/dpkg/dpkg.cfg.d"), /civm-build/, "the build-only dpkg setting is gone");
});

test("qcow2 and fixed VHD outputs have the right format and virtual size", { skip }, async (t) => {
  const out = tempDir("civm-img-e2e-");
  t.after(() => rmSync(out, { recursive: true, force: true }));
  for (const format of ["qcow2", "vhd"] as const) {
    const disk = join(out, `small.${format}`);
    const started = Date.now();
    await assembleDisk({ tree, output: disk, sizeBytes: 1024 ** 3 + 1, format, kernelPath: join(out, "k"), initrdPath: join(out, "i") });
    t.diagnostic(`disk assembly (${format}): ${((Date.now() - started) / 1000).toFixed(1)} s`);
    // 1G + 1 byte rounds up to a whole MiB.
    const size = 1024 ** 3 + 1024 ** 2;
    if (format === "qcow2") {
      const info = JSON.parse(execFileSync("qemu-img", ["info", "--output=json", disk], { encoding: "utf8" })) as { format: string; "virtual-size": number };
      assert.equal(info.format, "qcow2");
      assert.equal(info["virtual-size"], size);
    } else {
      // A fixed VHD is the raw data plus a 512-byte footer (qemu-img cannot probe it: no header).
      assert.equal(statSync(disk).size, size + 512);
      const footer = readFileSync(disk).subarray(-512);
      assert.equal(footer.subarray(0, 8).toString("latin1"), "conectix");
      assert.equal(footer.readBigUInt64BE(40), BigInt(size), "original size");
      assert.equal(footer.readBigUInt64BE(48), BigInt(size), "current size: a whole number of MiB");
      assert.equal(footer.readUInt32BE(60), 2, "disk type 2: fixed");
      const info = JSON.parse(execFileSync("qemu-img", ["info", "-f", "vpc", "--output=json", disk], { encoding: "utf8" })) as { "virtual-size": number };
      assert.equal(info["virtual-size"], size);
    }
  }
  assert.deepEqual(readdirSync(out).sort(), ["i", "k", "small.qcow2", "small.vhd"]);
});

test("a disk too small for the tree is a ConfigError naming the size, and leaves nothing", { skip }, async (t) => {
  const out = tempDir("civm-img-e2e-");
  t.after(() => rmSync(out, { recursive: true, force: true }));
  await assert.rejects(
    assembleDisk({ tree, output: join(out, "x.qcow2"), sizeBytes: 256 * 1024 ** 2, format: "qcow2", label: "images.yaml: image \"small\" (#1)" }),
    (e: unknown) => e instanceof ConfigError && /^images\.yaml: image "small" \(#1\): field "size": 256M is too small: the root tree needs about/.test(e.message),
  );
  assert.deepEqual(readdirSync(out), []);
});

test("an unknown package fails with mmdebstrap's complaint as a ConfigError, and leaves no tree", { skip }, async (t) => {
  const { images } = await loadImageSpecs(join(fixtures, "rootfs-bad-package.yaml"));
  const bad = images[0] as ImageSpec;
  const workDir = tempDir("civm-img-e2e-");
  t.after(async () => {
    await removeTree(join(workDir, "rootfs"));
    rmSync(workDir, { recursive: true, force: true });
  });
  mkdirSync(aptCacheDir, { recursive: true });
  const started = Date.now();
  await assert.rejects(buildRootTree({ spec: bad, workDir, aptCacheDir }), (e: unknown) => {
    assert.ok(e instanceof ConfigError, `a ConfigError, got ${String(e)}`);
    assert.match(e.message, /rootfs-bad-package\.yaml: image "bad-package" \(#1\): field "packages": package "civm-no-such-package-e2e" not found in Debian bookworm/);
    assert.match(e.message, /E: Unable to locate package civm-no-such-package-e2e/);
    return true;
  });
  t.diagnostic(`failed after ${((Date.now() - started) / 1000).toFixed(1)} s`);
  assert.equal(existsSync(join(workDir, "rootfs")), false);
});

test("a build killed with SIGKILL while mmdebstrap works in the tree leaves no mount behind", { skip, timeout: 300_000 }, async (t) => {
  const { spawn, spawnSync } = await import("node:child_process");
  const { civmEnv } = await import("../support/civm-cli.js");
  const { civmBin } = await import("../support/paths.js");
  const env = civmEnv();
  const child = spawn(civmBin, ["image", "build", "small", "-f", join(fixtures, "rootfs-small.yaml"), "--quiet"], { env: env.env, detached: true, stdio: "ignore" });
  const killAll = () => {
    try {
      process.kill(-child.pid!, "SIGKILL");
    } catch {
      /* already gone */
    }
  };
  t.after(() => {
    killAll();
    rmSync(env.root, { recursive: true, force: true });
  });
  // dpkg's status file fills up while mmdebstrap installs the essential packages inside the
  // tree, i.e. with /proc, /sys and /dev bind-mounted: the moment a crash used to leak them.
  const deadline = Date.now() + 240_000;
  let status: string | undefined;
  let exited: number | null | undefined;
  child.on("exit", (code) => (exited = code));
  while (!status && exited === undefined && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 250));
    // The state dir appears only once civm has started; find's complaints until then are noise.
    if (!existsSync(env.stateDir)) continue;
    const found = spawnSync("find", [env.stateDir, "-path", "*/rootfs/var/lib/dpkg/status", "-size", "+0"], { encoding: "utf8" });
    status = found.stdout.trim().split("\n")[0] || undefined;
  }
  assert.ok(status, exited !== undefined ? `the build ended (exit ${exited}) before mmdebstrap installed packages` : "mmdebstrap never got to installing packages");
  killAll();
  await new Promise((r) => setTimeout(r, 1000));
  const mounts = readFileSync("/proc/self/mountinfo", "utf8").split("\n").filter((l) => l.includes(env.root));
  assert.deepEqual(mounts, [], "no mount under the build's work dir after the kill");
  const tree = status.slice(0, status.indexOf("/rootfs/") + "/rootfs".length);
  await removeTree(tree); // refuses while anything is mounted inside
  assert.equal(existsSync(tree), false);
});
