import { test } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, copyFileSync, mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ConfigError } from "../../src/errors/index.js";
import { loadInstances, selectInstance, type LoadedInstances } from "../../src/config/index.js";
import { repoRoot, tempDir } from "../support/paths.js";

const G = 1024 ** 3;
const IMAGE_REL = "../images/ubuntu/build/ubuntu-amd64.qcow2";
const fixtures = join(repoRoot, "test", "fixtures", "instances");

/** A temp tree: ROOT/run/<name> (the instances file) and ROOT/images/ubuntu/build/ubuntu-amd64.qcow2. */
function setup(name: string, content?: unknown): { file: string; root: string; image: string } {
  const root = tempDir();
  mkdirSync(join(root, "run"));
  mkdirSync(join(root, "images", "ubuntu", "build"), { recursive: true });
  const image = join(root, "images", "ubuntu", "build", "ubuntu-amd64.qcow2");
  writeFileSync(image, "");
  const file = join(root, "run", name);
  if (content === undefined) copyFileSync(join(fixtures, name), file);
  else writeFileSync(file, typeof content === "string" ? content : JSON.stringify(content, null, 2));
  return { file, root, image };
}

function base(extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { name: "vm-1", image: IMAGE_REL, ...extra };
}

async function configError(file: string): Promise<string> {
  try {
    await loadInstances(file);
  } catch (e) {
    assert.ok(e instanceof ConfigError, `a ConfigError, got ${String(e)}`);
    assert.equal(e.exitCode, 2);
    return e.message;
  }
  assert.fail("expected loadInstances to fail");
}

test("seed 001 as published: duplicate names are reported with both indexes", async () => {
  const { file } = setup("seed-001.json");
  assert.equal(
    await configError(file),
    `${file}: instances #1 and #2 are both named "vm-1"; names must be unique because "civm run NAME" picks an instance by name, so rename one of them.`,
  );
});

test("seed 002 as published: duplicate names are reported too", async () => {
  const { file } = setup("seed-002.json");
  assert.match(await configError(file), /instances #1 and #2 are both named "vm-1"/);
});

test("three instances sharing a name are all listed", async () => {
  const { file } = setup("i.json", [base(), base(), base({ name: "ok" }), base()]);
  assert.match(await configError(file), /instances #1, #2 and #4 are all named "vm-1"; .* so rename all but one\.$/);
});

test("seed 001 fixed loads with the file's values and absolute paths", async () => {
  const { file, image, root } = setup("seed-001-fixed.json");
  const loaded = await loadInstances(file);
  assert.equal(loaded.file, file);
  assert.equal(loaded.baseDir, join(root, "run"));
  assert.deepEqual(
    loaded.instances.map((i) => i.name),
    ["vm-1", "vm-2"],
  );
  const vm1 = selectInstance(loaded, "vm-1");
  assert.deepEqual(vm1, {
    name: "vm-1",
    image,
    imageRef: "../images/ubuntu/build/ubuntu-amd64.qcow2",
    firmwareBoot: false,
    cpus: 4,
    ramBytes: 4 * G,
    rootDiskBytes: 80 * G,
    timeoutSeconds: 14400,
    sshPort: 2201,
    config: { repo: "rust-lang-ci/rust", token: "${{ gha-install-token:rust-lang-ci/rust }}", "whitelisted-event": "push" },
    kernel: undefined,
    initrd: undefined,
    cmdline: undefined,
    machine: "pc",
    qemuArgs: [],
    network: { mode: "restricted", allow: [] },
    source: { file, index: 0, baseDir: join(root, "run") },
  });
  const vm2 = selectInstance(loaded, "vm-2");
  assert.equal(vm2.cpus, 2);
  assert.equal(vm2.ramBytes, 2 * G);
  assert.equal(vm2.rootDiskBytes, 20 * G);
  assert.equal(vm2.sshPort, 2202);
  assert.equal(vm2.source.index, 1);
});

test("the YAML form of seed 001 loads the same instances", async () => {
  const json = await loadInstances(setup("seed-001-fixed.json").file);
  const { file } = setup("seed-001-fixed.yaml");
  const yaml = await loadInstances(file);
  const strip = (l: LoadedInstances) => l.instances.map(({ source: _s, image: _i, ...rest }) => rest);
  assert.deepEqual(strip(yaml), strip(json));
});

test("seed 002 (minimal keys) gets the defaults", async () => {
  const { file, image } = setup("seed-002-fixed.json");
  const vm = selectInstance(await loadInstances(file), "vm-2");
  assert.equal(vm.image, image);
  assert.equal(vm.cpus, 2);
  assert.equal(vm.ramBytes, 2 * G);
  assert.equal(vm.rootDiskBytes, undefined);
  assert.equal(vm.timeoutSeconds, 14400);
  assert.equal(vm.sshPort, undefined);
  assert.deepEqual(vm.config, { repo: "rust-lang-ci/rust", token: "FOOBAR" });
  assert.equal(vm.machine, "pc");
  assert.deepEqual(vm.qemuArgs, []);
  assert.equal(vm.kernel, undefined);
});

test("defaults when only name and image are given", async () => {
  const { file } = setup("i.json", [base()]);
  const [vm] = (await loadInstances(file)).instances;
  assert.ok(vm);
  assert.equal(vm.timeoutSeconds, 3600);
  assert.deepEqual(vm.config, {});
});

test("optional keys: kernel boot, machine, qemu-args, sizes as numbers", async () => {
  const { file, root } = setup("i.json", [
    base({ kernel: "vmlinuz", initrd: "initrd.img", cmdline: "console=ttyS0", machine: "microvm", "qemu-args": ["-device", "virtio-rng-pci"], ram: 536870912 }),
  ]);
  writeFileSync(join(root, "run", "vmlinuz"), "");
  writeFileSync(join(root, "run", "initrd.img"), "");
  const vm = selectInstance(await loadInstances(file), "vm-1");
  assert.equal(vm.kernel, join(root, "run", "vmlinuz"));
  assert.equal(vm.initrd, join(root, "run", "initrd.img"));
  assert.equal(vm.cmdline, "console=ttyS0");
  assert.equal(vm.machine, "microvm");
  assert.deepEqual(vm.qemuArgs, ["-device", "virtio-rng-pci"]);
  assert.equal(vm.ramBytes, 512 * 1024 ** 2);
});

test("an image reached through a symlink, or by absolute path, is fine", async () => {
  const { file, root, image } = setup("i.json", []);
  const absolute = join(root, "images", "..", "images", "ubuntu", "build", "ubuntu-amd64.qcow2");
  writeFileSync(file, JSON.stringify([base({ image: "link.qcow2" }), base({ name: "abs", image: absolute })]));
  symlinkSync(image, join(root, "run", "link.qcow2"));
  const loaded = await loadInstances(file);
  assert.equal(selectInstance(loaded, "vm-1").image, join(root, "run", "link.qcow2"));
  assert.equal(selectInstance(loaded, "abs").image, image);
});

test("selectInstance with an unknown name lists the names and suggests one", async () => {
  const loaded = await loadInstances(setup("seed-001-fixed.json").file);
  assert.throws(
    () => selectInstance(loaded, "vm1"),
    (e: Error) => {
      assert.ok(e instanceof ConfigError);
      assert.equal(e.message, `${loaded.file}: no instance named "vm1"; the file defines "vm-1", "vm-2". Did you mean "vm-1"?`);
      return true;
    },
  );
  assert.throws(() => selectInstance(loaded, "windows"), (e: Error) => e.message.endsWith('the file defines "vm-1", "vm-2".'));
  assert.throws(
    () => selectInstance({ ...loaded, instances: [] }, "vm-1"),
    (e: Error) => e.message.endsWith("the file defines no instances; add one."),
  );
});

test("unknown keys get a suggestion", async () => {
  const { file } = setup("i.json", [base(), base({ name: "vm-2", "cpu-core": 4, timeout: 60, sshport: 22, frobnicate: true })]);
  const lines = (await configError(file)).split("\n");
  assert.deepEqual(lines, [
    `${file}: instance "vm-2" (#2): unknown key "cpu-core"; did you mean "cpu-cores"?`,
    `${file}: instance "vm-2" (#2): unknown key "timeout"; did you mean "timeout-seconds"?`,
    `${file}: instance "vm-2" (#2): unknown key "sshport"; did you mean "ssh-port"?`,
    `${file}: instance "vm-2" (#2): unknown key "frobnicate"; the known keys are name, image, cpu-cores, ram, root-disk, timeout-seconds, ssh-port, config, kernel, initrd, cmdline, machine, qemu-args, firmware-boot, network, arch.`,
  ]);
});

test("missing image file is an error naming the path", async () => {
  const { file, root } = setup("i.json", [base({ image: "nope.qcow2" })]);
  assert.equal(
    await configError(file),
    `${file}: instance "vm-1" (#1): "image" ${join(root, "run", "nope.qcow2")} does not exist; fix the path (relative paths start from the instances file's folder) or create the file first.`,
  );
});

test("unusable image: a dangling symlink, a directory, (as non-root) an unreadable file", async () => {
  const { file, root } = setup("i.json", [base({ image: "dangling" }), base({ name: "vm-2", image: "." }), base({ name: "vm-3", image: "secret.qcow2" })]);
  symlinkSync(join(root, "gone.qcow2"), join(root, "run", "dangling"));
  writeFileSync(join(root, "run", "secret.qcow2"), "");
  chmodSync(join(root, "run", "secret.qcow2"), 0o000);
  const lines = (await configError(file)).split("\n");
  assert.equal(lines[0], `${file}: instance "vm-1" (#1): "image" ${join(root, "run", "dangling")} is a symbolic link to a file that does not exist; fix the path (relative paths start from the instances file's folder) or create the file first.`);
  assert.equal(lines[1], `${file}: instance "vm-2" (#2): "image" ${join(root, "run")} is a directory; it must be a file.`);
  const isRoot = process.getuid?.() === 0;
  if (isRoot) {
    assert.equal(lines.length, 2, "root can read a mode-000 file");
  } else {
    assert.match(lines[2] ?? "", /instance "vm-3" \(#3\): "image" .*secret\.qcow2 is not readable by this user \(permission denied\)/);
  }
});

test("missing kernel and initrd/cmdline without kernel", async () => {
  const { file, root } = setup("i.json", [base({ kernel: "vmlinuz" }), base({ name: "vm-2", initrd: "x", cmdline: "quiet" })]);
  assert.deepEqual((await configError(file)).split("\n"), [
    `${file}: instance "vm-1" (#1): "kernel" ${join(root, "run", "vmlinuz")} does not exist; fix the path (relative paths start from the instances file's folder) or create the file first.`,
    `${file}: instance "vm-2" (#2): "initrd" only applies to direct kernel boot: set "kernel" to the kernel image to boot, or remove "initrd".`,
    `${file}: instance "vm-2" (#2): "cmdline" only applies to direct kernel boot: set "kernel" to the kernel image to boot, or remove "cmdline".`,
  ]);
});

test("checkFiles: false skips the file checks", async () => {
  const { file } = setup("i.json", [base({ image: "nope.qcow2" })]);
  const loaded = await loadInstances(file, { checkFiles: false });
  assert.equal(loaded.instances.length, 1);
});

test("bad sizes quote the value and say the accepted forms", async () => {
  const { file } = setup("i.json", [base({ ram: "4X" }), base({ name: "vm-2", "root-disk": "0G" }), base({ name: "vm-3", ram: "1.1K" }), base({ name: "vm-4", ram: 4096 }), base({ name: "vm-5", ram: true })]);
  const lines = (await configError(file)).split("\n");
  assert.equal(lines.length, 5);
  assert.equal(
    lines[0],
    `${file}: instance "vm-1" (#1): "ram": "4X" is not a size; write a whole number of bytes or a number with a K, M, G or T suffix (optionally followed by "iB" or "B"), e.g. "512M", "4G", "80GiB"; units are binary (1G = 1024M).`,
  );
  assert.match(lines[1] ?? "", /instance "vm-2" \(#2\): "root-disk": "0G" is zero; write a whole number of bytes/);
  assert.match(lines[2] ?? "", /instance "vm-3" \(#3\): "ram": "1\.1K" is not a whole number of bytes; write/);
  assert.match(lines[3] ?? "", /instance "vm-4" \(#4\): "ram" is only 4096 bytes, too little to boot; a size without a suffix is in bytes, so write e\.g\. "2G" or "512M"\.$/);
  assert.match(lines[4] ?? "", /instance "vm-5" \(#5\): "ram" must be a size: a whole number of bytes .* \(got a boolean\)\.$/);
});

test("non-positive and non-integer numbers", async () => {
  const { file } = setup("i.json", [base({ "cpu-cores": 0, "timeout-seconds": -5 }), base({ name: "vm-2", "cpu-cores": 1.5, "timeout-seconds": "60" })]);
  assert.deepEqual((await configError(file)).split("\n"), [
    `${file}: instance "vm-1" (#1): "cpu-cores" must be a whole number of CPU cores, at least 1, e.g. 4 (got a whole number).`,
    `${file}: instance "vm-1" (#1): "timeout-seconds" must be a whole number of seconds from 1 to 2147483 seconds (about 24.8 days, the longest a timer can wait) (got -5).`,
    `${file}: instance "vm-2" (#2): "cpu-cores" must be a whole number of CPU cores, at least 1, e.g. 4 (got a number).`,
    `${file}: instance "vm-2" (#2): "timeout-seconds" must be a whole number of seconds from 1 to 2147483 seconds (about 24.8 days, the longest a timer can wait), e.g. 3600 (got "60").`,
  ]);
});

test("ports out of range quote the port", async () => {
  const { file } = setup("i.json", [base({ "ssh-port": 70000 }), base({ name: "vm-2", "ssh-port": 0 }), base({ name: "vm-3", "ssh-port": "2201" })]);
  assert.deepEqual((await configError(file)).split("\n"), [
    `${file}: instance "vm-1" (#1): "ssh-port" must be a TCP port number from 1 to 65535, e.g. 2201 (got 70000).`,
    `${file}: instance "vm-2" (#2): "ssh-port" must be a TCP port number from 1 to 65535, e.g. 2201 (got 0).`,
    `${file}: instance "vm-3" (#3): "ssh-port" must be a TCP port number from 1 to 65535, e.g. 2201 (got "2201").`,
  ]);
});

test("names, missing keys, machine, qemu-args, entries that are not objects", async () => {
  const { file } = setup("i.json", [
    { image: IMAGE_REL },
    base({ name: "my vm" }),
    "vm-3",
    base({ name: "vm-4", machine: "virtio", "qemu-args": "-nographic" }),
    { name: "vm-5" },
  ]);
  assert.deepEqual((await configError(file)).split("\n"), [
    `${file}: instance #1: missing key "name": add a unique "name", e.g. "vm-1"; "civm run NAME" picks the instance by it.`,
    `${file}: instance "my vm" (#2): "name" must be a name made only of letters, digits, ".", "_" and "-", e.g. "vm-1" (got "my vm").`,
    `${file}: instance #3: must be an object with "name", "image" and other keys, but it is a string.`,
    `${file}: instance "vm-4" (#4): "machine" must be one of "pc", "q35" or "microvm" (x86_64), or "virt" (arm64) (got a string).`,
    `${file}: instance "vm-4" (#4): "qemu-args" must be a list of strings, e.g. ["-device", "virtio-rng-pci"] (got a string).`,
    `${file}: instance "vm-5" (#5): missing key "image": add "image" with the path of the base disk image (relative paths start from the instances file's folder).`,
  ]);
});

test("every problem across instances is collected into one error", async () => {
  const { file } = setup("i.json", [base({ "cpu-core": 2 }), base({ name: "vm-2", ram: "lots" }), base({ name: "vm-2", image: "missing" })]);
  const lines = (await configError(file)).split("\n");
  assert.equal(lines.length, 4);
  assert.match(lines[0] ?? "", /#1\): unknown key "cpu-core"/);
  assert.match(lines[1] ?? "", /#2\): "ram": "lots" is not a size/);
  assert.match(lines[2] ?? "", /#3\): "image" .*missing does not exist/);
  assert.match(lines[3] ?? "", /instances #2 and #3 are both named "vm-2"/);
});

test("messages never contain config values or other non-quotable values", async () => {
  const secret = "ghp_SuperSecretValue1234";
  const { file } = setup("i.json", [
    base({ config: { token: secret }, "cpu-cores": secret, machine: secret, "qemu-args": [secret, 1], kernel: 7, cmdline: secret, mystery: secret }),
  ]);
  const msg = await configError(file);
  assert.ok(!msg.includes(secret), msg);
  assert.match(msg, /"cpu-cores" must be .* \(got a string\)/);
  assert.match(msg, /unknown key "mystery"/);
});

test("wrong top-level type: must be a list", async () => {
  for (const [content, kind] of [[{ name: "vm-1", image: IMAGE_REL }, "an object"], ['"vm-1"', "a string"], ["null", "nothing (null or an empty file)"]] as const) {
    const { file } = setup("i.json", content);
    assert.equal(
      await configError(file),
      `${file}: the file must contain a list of instance objects ([{"name": ..., "image": ...}, ...]), but it contains ${kind}.`,
    );
  }
});

test("an empty YAML file is not a list", async () => {
  const { file } = setup("i.yaml", "# nothing yet\n");
  assert.match(await configError(file), /must contain a list of instance objects .* but it contains nothing \(null or an empty file\)\.$/);
});

test("malformed JSON and YAML report line and column", async () => {
  const json = setup("i.json", '[\n  {"name": "vm-1",\n   "image": "x" "ram": "4G"}\n]');
  assert.equal(await configError(json.file), `${json.file}:3:17: expected "," or "}" after a value in an object, but found "\\""`);
  const yaml = setup("i.yaml", "- name: vm-1\n  image: x\n ram: 4G\n");
  assert.equal(await configError(yaml.file), `${yaml.file}:3:1: Sequence item without - indicator`);
});

test("an unreadable instances file names the file and reason", async () => {
  const root = tempDir();
  assert.equal(await configError(join(root, "instances.json")), `${join(root, "instances.json")}: cannot read the file: no such file or directory`);
});

test("checks across keys (ram, kernel options) run unless a key has the wrong type", async () => {
  // A value of the wrong kind hides them: the fix for it comes first.
  const { file } = setup("instances.json", [base({ ram: "1K", "cpu-cores": 1.5, cmdline: "quiet" })]);
  const msg = await configError(file);
  assert.match(msg, /"cpu-cores" must be a whole number/);
  assert.doesNotMatch(msg, /too little to boot|only applies to direct kernel boot/);
  // A value of the right kind out of range, or an unknown key, does not.
  const other = setup("instances.json", [base({ ram: "1K", "cpu-cores": 0, cmdline: "quiet", cpus: 2 })]);
  const lines = (await configError(other.file)).split("\n").map((l) => l.replace(/^.*\(#1\): /, ""));
  assert.equal(lines.length, 4);
  assert.match(lines[0]!, /^"cpu-cores" must be a whole number/);
  assert.match(lines[1]!, /^unknown key "cpus"; did you mean "cpu-cores"\?/);
  assert.match(lines[2]!, /^"cmdline" only applies to direct kernel boot/);
  assert.match(lines[3]!, /^"ram" is only 1024 bytes, too little to boot/);
});

test('a name of "." or ".." is refused with a message of its own', async () => {
  const { file } = setup("i.json", [base({ name: ".." }), base({ name: "." })]);
  assert.deepEqual((await configError(file)).split("\n"), [
    `${file}: instance ".." (#1): "name" cannot be "." or ".." (it names the VM's work and log files); use e.g. "vm-1".`,
    `${file}: instance "." (#2): "name" cannot be "." or ".." (it names the VM's work and log files); use e.g. "vm-1".`,
  ]);
});

test("timeout-seconds past the timer limit (2^31-1 ms) is refused with the value and the range; the limit itself loads", async () => {
  const { file } = setup("instances.json", [base({ "timeout-seconds": 99999999 }), base({ name: "vm-2", "timeout-seconds": 2147484 }), base({ name: "vm-3", "timeout-seconds": -5 })]);
  const msg = await configError(file);
  assert.match(msg, /instance "vm-1" \(#1\): "timeout-seconds" must be a whole number of seconds from 1 to 2147483 seconds \(about 24\.8 days, the longest a timer can wait\) \(got 99999999\)\./);
  assert.match(msg, /instance "vm-2" \(#2\): "timeout-seconds" .*\(got 2147484\)/);
  assert.match(msg, /instance "vm-3" \(#3\): "timeout-seconds" .*\(got -5\)/);
  const ok = setup("instances.json", [base({ "timeout-seconds": 2147483 })]);
  assert.equal((await loadInstances(ok.file)).instances[0]!.timeoutSeconds, 2147483);
});
