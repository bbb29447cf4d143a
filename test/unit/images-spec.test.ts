import { withGuestAgent } from "../../src/images/build.js";
import { cacheKeyFor } from "../../src/images/cache-key.js";
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import YAML from "yaml";
import { ConfigError } from "../../src/errors/index.js";
import { loadImageSpecs, resolveBuildOrder, type LoadImageOptions } from "../../src/images/spec.js";
import { hostDebianMirror, parseDeb822, parseOneLine } from "../../src/images/mirror.js";
import { repoRoot, tempDir } from "../support/paths.js";
import { imageByName, specLoadError } from "../support/image-specs.js";

// Never contacted: spec loading only records the mirror.
const MIRROR = "http://mirror.test.invalid/debian";
const OPTS: LoadImageOptions = { defaultMirror: MIRROR };

/** A temp folder with files/motd and files/etc-dir/, and the spec written as NAME. */
function setup(name: string, content: unknown): { file: string; dir: string } {
  const dir = tempDir("civm-images-");
  mkdirSync(join(dir, "files", "etc-dir"), { recursive: true });
  writeFileSync(join(dir, "files", "motd"), "hello\n");
  writeFileSync(join(dir, "files", "etc-dir", "a.conf"), "a=1\n");
  writeFileSync(join(dir, "setup.sh"), "#!/bin/sh\necho setup\n");
  const file = join(dir, name);
  const text = typeof content === "string" ? content : name.endsWith(".json") ? JSON.stringify(content, null, 2) : YAML.stringify(content);
  writeFileSync(file, text);
  return { file, dir };
}

function configError(file: string, opts: LoadImageOptions = OPTS): Promise<string> {
  return specLoadError(file, opts);
}

const byName = imageByName;

test("a valid spec loads with defaults, parents first, and every action form", async () => {
  const { file, dir } = setup("images.yaml", [
    { name: "child", parent: "base", packages: ["git"], flatten: true, actions: [{ provision: "setup.sh" }, { provision: "apt-get update" }] },
    {
      name: "base",
      packages: ["curl", "curl", "jq=1.6-2.1"],
      actions: [
        { run: "echo hi", comment: "say hi" },
        { copy: { src: "files/motd", dest: "/etc/motd", mode: "0644" } },
        { copy: { src: "files/etc-dir", dest: "/etc/thing/" } },
        { write: { path: "/etc/x.conf", content: "x\n", mode: "600" } },
        { mkdir: "/opt/tools" },
        { mkdir: { path: "/opt/other", mode: "0o750" } },
        { symlink: { target: "/usr/bin/python3", path: "/usr/local/bin/python" } },
        { "append-line": { file: "/etc/sysctl.conf", line: "vm.swappiness = 10" } },
        { "set-hostname": "runner-1" },
        { "enable-service": "ssh" },
        { "enable-service": "fstrim.timer" },
        { provision: { inline: "echo in the vm" } },
      ],
    },
  ]);
  const loaded = await loadImageSpecs(file, OPTS);
  assert.equal(loaded.file, file);
  assert.equal(loaded.baseDir, dir);
  assert.deepEqual(
    loaded.images.map((i) => i.name),
    ["base", "child"],
  );
  const base = byName(loaded.images, "base");
  assert.equal(base.suite, "bookworm");
  assert.equal(base.mirror, MIRROR);
  assert.equal(base.sizeBytes, 4 * 1024 ** 3);
  assert.equal(base.format, "qcow2");
  assert.equal(base.kernel, "linux-image-amd64");
  assert.equal(base.flatten, false);
  assert.deepEqual(base.packages, ["curl", "jq=1.6-2.1"]);
  assert.deepEqual(base.actions[0], { kind: "run", command: "echo hi", comment: "say hi" });
  assert.deepEqual(base.actions[1], { kind: "copy", src: "files/motd", srcPath: join(dir, "files", "motd"), dest: "/etc/motd", mode: 0o644 });
  assert.deepEqual(base.actions[2], { kind: "copy", src: "files/etc-dir", srcPath: join(dir, "files", "etc-dir"), dest: "/etc/thing/" });
  assert.deepEqual(base.actions[3], { kind: "write", path: "/etc/x.conf", content: "x\n", mode: 0o600 });
  assert.deepEqual(base.actions[4], { kind: "mkdir", path: "/opt/tools" });
  assert.deepEqual(base.actions[5], { kind: "mkdir", path: "/opt/other", mode: 0o750 });
  assert.deepEqual(base.actions[8], { kind: "set-hostname", hostname: "runner-1" });
  assert.deepEqual(base.actions[9], { kind: "enable-service", unit: "ssh.service" });
  assert.deepEqual(base.actions[10], { kind: "enable-service", unit: "fstrim.timer" });
  assert.deepEqual(base.actions[11], { kind: "provision", inline: "echo in the vm" });
  assert.deepEqual(base.source, { file, baseDir: dir, index: 1, lvh: false, builtin: false });

  const child = byName(loaded.images, "child");
  assert.equal(child.parent, "base");
  assert.equal(child.kernel, undefined);
  assert.equal(child.suite, "bookworm", "inherited");
  assert.equal(child.mirror, MIRROR, "inherited");
  assert.equal(child.sizeBytes, base.sizeBytes, "inherited");
  assert.equal(child.flatten, true);
  assert.deepEqual(child.actions, [
    { kind: "provision", script: { src: "setup.sh", srcPath: join(dir, "setup.sh") } },
    { kind: "provision", inline: "apt-get update" },
  ]);

  assert.deepEqual(
    resolveBuildOrder(loaded, "child").map((i) => i.name),
    ["base", "child"],
  );
  assert.deepEqual(
    resolveBuildOrder(loaded, "base").map((i) => i.name),
    ["base"],
  );
});

test("sizes, formats and suite are read as written; sizes round up to whole MiB", async () => {
  const { file } = setup("images.json", [
    { name: "a", size: "80G", format: "vhd", compress: "zstd", suite: "trixie", mirror: "http://other.test.invalid/debian/", kernel: "linux-image-cloud-amd64" },
    { name: "b", size: "512M", format: "raw" },
    { name: "c", size: 1_000_000_000 },
  ]);
  const { images } = await loadImageSpecs(file, OPTS);
  const a = byName(images, "a");
  assert.equal(a.sizeBytes, 80 * 1024 ** 3);
  assert.equal(a.format, "vhd");
  assert.equal(a.compress, "zstd");
  assert.equal(a.suite, "trixie");
  assert.equal(a.mirror, "http://other.test.invalid/debian");
  assert.equal(a.kernel, "linux-image-cloud-amd64");
  assert.equal(byName(images, "b").sizeBytes, 512 * 1024 ** 2);
  assert.equal(byName(images, "c").sizeBytes, 954 * 1024 ** 2);
});

test("an unknown action names the file, image and field and suggests the closest action", async () => {
  const { file } = setup("images.json", [{ name: "base", actions: [{ run: "true" }, { cpy: { src: "files/motd", dest: "/etc/motd" } }] }]);
  const msg = await configError(file);
  assert.match(msg, new RegExp(`^${escape(file)}: image "base" \\(#1\\): field "actions\\[1\\]": unknown action "cpy"; did you mean "copy"\\?`));
  assert.match(msg, /The actions are run, copy, write, mkdir, symlink, append-line, set-hostname, enable-service, provision, install-kernel\./);
});

test("action aliases are suggested (shell -> run) and two actions in one item are refused", async () => {
  const { file } = setup("images.yaml", [{ name: "base", actions: [{ shell: "true" }, { run: "a", write: { path: "/x", content: "" } }, {}] }]);
  const msg = await configError(file);
  assert.match(msg, /field "actions\[0\]": unknown action "shell"; did you mean "run"\?/);
  assert.match(msg, /field "actions\[1\]": has several actions \("run", "write"\); write each as its own list item/);
  assert.match(msg, /field "actions\[2\]": has no action/);
});

test("a missing parent is named, with the closest image", async () => {
  const { file } = setup("images.json", [{ name: "base" }, { name: "child", parent: "bsae" }]);
  const msg = await configError(file);
  assert.match(msg, new RegExp(`^${escape(file)}: image "child" \\(#2\\): field "parent": no image named "bsae" in ${escape(file)}`));
  assert.match(msg, /did you mean "base"\?/);
});

test("a parent cycle is named, with every image in it", async () => {
  const { file } = setup("images.json", [{ name: "root" }, { name: "a", parent: "c" }, { name: "b", parent: "a" }, { name: "c", parent: "b" }]);
  const msg = await configError(file);
  assert.match(msg, new RegExp(`^${escape(file)}: images "a" \\(#2\\), "c" \\(#4\\), "b" \\(#3\\): field "parent" forms a cycle: "a" -> "c" -> "b" -> "a"`));
  assert.equal(msg.split("\n").length, 1, "the cycle is reported once");
});

test("an image that is its own parent is refused", async () => {
  const { file } = setup("images.json", [{ name: "a", parent: "a" }]);
  assert.match(await configError(file), /image "a" \(#1\): field "parent": an image cannot be its own parent/);
});

test("duplicate names are reported with both indexes", async () => {
  const { file } = setup("images.json", [{ name: "base" }, { name: "other" }, { name: "base" }]);
  assert.equal(
    await configError(file),
    `${file}: images #1 and #3 are both named "base"; names must be unique because "civm image build NAME" and "parent" pick an image by name, so rename one of them.`,
  );
});

test("a copy source that does not exist is named with the folder it was resolved against", async () => {
  const { file, dir } = setup("images.yaml", [{ name: "base", actions: [{ run: "true" }, { run: "true" }, { copy: { src: "files/nope.conf", dest: "/etc/nope.conf" } }] }]);
  const msg = await configError(file);
  assert.equal(
    msg,
    `${file}: image "base" (#1): field "actions[2].copy.src": the file or folder ${join(dir, "files", "nope.conf")} does not exist (relative paths start from the spec file's folder, ${dir}); fix the path or create it.`,
  );
});

test("a provision script that does not exist is refused; inline shell is not a path", async () => {
  const { file } = setup("images.yaml", [{ name: "base", actions: [{ provision: "scripts/missing.sh" }, { provision: "echo hello world" }] }]);
  const msg = await configError(file);
  assert.match(msg, /image "base" \(#1\): field "actions\[0\]\.provision": the script .*scripts\/missing\.sh does not exist/);
  assert.equal(msg.split("\n").length, 1);
});

test("a bad size names the field and the value", async () => {
  const { file } = setup("images.yaml", [{ name: "base", size: "4X" }, { name: "tiny", size: "1M" }, { name: "huge", size: "3T" }]);
  const msg = await configError(file);
  assert.match(msg, new RegExp(`^${escape(file)}: image "base" \\(#1\\): field "size": "4X" is not a size; write `, "m"));
  assert.match(msg, /image "tiny" \(#2\): field "size": "1M" is too small for a disk image; use at least 64M/);
  assert.match(msg, /image "huge" \(#3\): field "size": "3T" is too large: the image's MBR partition table addresses at most 2T/);
});

test("every problem in the file is reported at once", async () => {
  const { file } = setup("images.yaml", [
    { name: "base", pakages: ["curl"], format: "vmdk", actions: [{ copy: { src: "files/motd" } }, { write: { path: "etc/x", content: "x" } }] },
    { name: "bad name!", actions: [{ "append-line": { file: "/etc/x", line: "a\nb" } }, { mkdir: { path: "/x", mode: 755 } }] },
    { name: "k", packages: ["ok", "Not A Package"], "enable-service": "x" },
  ]);
  const lines = (await configError(file)).split("\n");
  const expect = [
    /image "base" \(#1\): field "pakages": unknown key; did you mean "packages"\?/,
    /image "base" \(#1\): field "format": must be "qcow2" \(default\), "raw" or "vhd"/,
    /image "base" \(#1\): field "actions\[0\]\.copy\.dest": missing: must be an absolute path in the image/,
    /image "base" \(#1\): field "actions\[1\]\.write\.path": must be an absolute path in the image, starting with "\/"/,
    /image "bad name!" \(#2\): field "name": must be made only of letters, digits/,
    /image "bad name!" \(#2\): field "actions\[0\]\.append-line\.line": must be a single line/,
    /image "bad name!" \(#2\): field "actions\[1\]\.mkdir\.mode": must be an octal permission mode written as a string, e\.g\. "0755"/,
    /image "k" \(#3\): field "packages\[1\]": must be a Debian package name/,
    /image "k" \(#3\): field "enable-service": unknown key/,
  ];
  for (const re of expect) assert.ok(lines.some((l) => re.test(l)), `a line matching ${re}:\n${lines.join("\n")}`);
  assert.equal(lines.length, expect.length, lines.join("\n"));
});

test("children may not set suite, mirror or kernel; root images may not set flatten", async () => {
  const { file } = setup("images.yaml", [
    { name: "base", flatten: true },
    { name: "child", parent: "base", kernel: "linux-image-rt-amd64", suite: "trixie" },
  ]);
  const msg = await configError(file);
  assert.match(msg, /image "base" \(#1\): field "flatten": only applies to images with a "parent"/);
  assert.match(msg, /image "child" \(#2\): field "suite": only root images \(without "parent"\) take "suite"/);
  assert.match(msg, /image "child" \(#2\): field "kernel": only root images/);
});

test("a child cannot be smaller than its parent", async () => {
  const { file } = setup("images.yaml", [{ name: "base", size: "8G" }, { name: "child", parent: "base", size: "4G" }]);
  assert.match(await configError(file), /image "child" \(#2\): field "size": 4G is smaller than its parent "base" \(8G\)/);
});

test("the file must be a list", async () => {
  const { file } = setup("images.json", { name: "base" });
  assert.match(await configError(file), /the file must contain a list of images .* but it contains an object\./);
});

test("resolveBuildOrder names the images when the name is unknown", async () => {
  const { file } = setup("images.json", [{ name: "base" }, { name: "runner", parent: "base" }]);
  const loaded = await loadImageSpecs(file, OPTS);
  assert.throws(
    () => resolveBuildOrder(loaded, "runer"),
    (e: unknown) => e instanceof ConfigError && /no image named "runer"; the images are "base", "runner"\. Did you mean "runner"\?/.test(e.message),
  );
});

test("a parent missing from the file is found among the built-in images", async () => {
  const { file } = setup("images.yaml", [{ name: "mine", parent: "civm-runner", packages: ["git"] }]);
  const loaded = await loadImageSpecs(file, OPTS);
  assert.deepEqual(
    loaded.images.map((i) => i.name),
    ["civm-runner", "mine"],
  );
  const runner = byName(loaded.images, "civm-runner");
  assert.equal(runner.source.builtin, true);
  assert.equal(runner.source.file, join(repoRoot, "images", "civm-runner.yaml"));
  assert.equal(byName(loaded.images, "mine").mirror, runner.mirror);
  const noBuiltins = await configError(file, { ...OPTS, builtins: false });
  assert.match(noBuiltins, /field "parent": no image named "civm-runner"/);
});

test("the built-in civm-runner spec loads", async () => {
  const loaded = await loadImageSpecs(join(repoRoot, "images", "civm-runner.yaml"), OPTS);
  const runner = byName(loaded.images, "civm-runner");
  assert.equal(runner.parent, undefined);
  assert.equal(runner.suite, "bookworm");
  for (const p of ["openssh-server", "jq", "cloud-guest-utils", "eject", "sudo", "systemd-resolved", "dbus"]) assert.ok(runner.packages.includes(p), p);
  // The guest agent is not in the spec: the builder puts it into every root image.
  const agent = withGuestAgent(runner);
  const copy = agent.actions[0];
  assert.ok(copy && copy.kind === "copy");
  assert.equal(copy.srcPath, join(repoRoot, "guest"));
  assert.ok(agent.actions[1]?.kind === "run" && /install\.sh \//.test(agent.actions[1].command));
  assert.deepEqual(agent.actions.slice(2), runner.actions);
  for (const p of ["jq", "eject", "cloud-guest-utils"]) assert.ok(agent.packages.includes(p), p);
});

test("the built-in civm-runner-arm64 is civm-runner for arm64 (YAML's merge key): same packages and actions, Debian's arm64 kernel, its own key", async () => {
  const loaded = await loadImageSpecs(join(repoRoot, "images", "civm-runner.yaml"), OPTS);
  const x86 = byName(loaded.images, "civm-runner");
  const arm = byName(loaded.images, "civm-runner-arm64");
  assert.equal(x86.arch, undefined);
  assert.equal(arm.arch, "arm64");
  assert.equal(arm.kernel, "linux-image-arm64");
  assert.equal(arm.parent, undefined);
  assert.deepEqual(arm.packages, x86.packages);
  assert.deepEqual(arm.actions, x86.actions);
  assert.equal(arm.sizeBytes, x86.sizeBytes);
  assert.equal(arm.format, x86.format);
  const keys = [await cacheKeyFor(x86, { agentVersion: "9" }), await cacheKeyFor(arm, { agentVersion: "9" })];
  assert.notEqual(keys[0], keys[1]);
});

test("the examples load: the Rust-CI-like runner (child of civm-gha, seed 000's files/ and scripts/ as copy and provision)", async () => {
  const loaded = await loadImageSpecs(join(repoRoot, "examples", "rust-ci-runner.yaml"), OPTS);
  assert.deepEqual(
    resolveBuildOrder(loaded, "rust-ci-runner").map((i) => i.name),
    ["civm-runner", "civm-gha", "rust-ci-runner"],
  );
  const rust = byName(loaded.images, "rust-ci-runner");
  assert.ok(rust.packages.includes("cmake"));
  assert.ok(rust.actions.some((a) => a.kind === "copy" && a.src === "rust-ci/files" && a.dest === "/tmp/packer-files"));
  assert.ok(rust.actions.some((a) => a.kind === "provision" && a.script?.src === "rust-ci/scripts/10-toolchain.sh"));
});

test("the host's apt mirror is read from one-line and deb822 sources", () => {
  const deb822 = parseDeb822(
    `Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
`,
    "debian.sources",
  );
  assert.equal(deb822.length, 2);
  assert.equal(hostDebianMirror([...deb822].reverse()), "http://deb.debian.org/debian");
  const oneLine = parseOneLine(
    `# comment
deb-src http://src.test.invalid/debian bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://mirror.test.invalid/debian/ bookworm main contrib
deb http://security.test.invalid/debian-security bookworm-security main
`,
    "sources.list",
  );
  assert.equal(hostDebianMirror(oneLine), "http://mirror.test.invalid/debian");
  assert.equal(hostDebianMirror([]), undefined);
  const disabled = parseDeb822("Types: deb\nURIs: http://x.test.invalid/debian\nSuites: bookworm\nEnabled: no\n", "x.sources");
  assert.deepEqual(disabled, []);
});

test("without a mirror in the spec nor on the host, a root image is refused clearly", async () => {
  // Only meaningful where the host's apt has no Debian mirror; elsewhere the host's is used.
  const { file } = setup("images.yaml", [{ name: "base" }]);
  if (hostDebianMirror() === undefined) {
    assert.match(await configError(file, {}), /field "mirror": none set, and the host's apt has no Debian mirror configured/);
  } else {
    const { images } = await loadImageSpecs(file);
    assert.equal(byName(images, "base").mirror, hostDebianMirror());
  }
});

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

test("snapshot: true is kept; another value is refused with the field's meaning", async () => {
  const { file } = setup("images.json", [{ name: "snap", snapshot: true }, { name: "plain" }]);
  const { images } = await loadImageSpecs(file, OPTS);
  assert.deepEqual(images.map((i) => i.snapshot), [true, undefined]);
  const bad = setup("images.json", [{ name: "snap", snapshot: "yes" }]);
  assert.match(await configError(bad.file), /"snapshot".*must be true \(civm image build also makes the image's memory snapshot/);
});
