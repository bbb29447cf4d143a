// The mmdebstrap command line and hook scripts, checked without running mmdebstrap (the e2e
// test test/e2e/images-rootfs.test.ts runs them for real).
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { actionHook, describeAction, includedPackages, initramfsScript, planHooks, BASE_PACKAGES } from "../../src/images/rootfs.js";
import { shq } from "../../src/images/shell.js";
import type { ImageSpec } from "../../src/images/types.js";
import { tempDir } from "../support/paths.js";

function spec(over: Partial<ImageSpec> = {}): ImageSpec {
  return {
    name: "base",
    suite: "bookworm",
    mirror: "http://mirror.test.invalid/debian",
    packages: ["curl", "systemd-sysv"],
    sizeBytes: 4 * 1024 ** 3,
    format: "qcow2",
    kernel: "linux-image-amd64",
    flatten: false,
    actions: [
      { kind: "run", command: "echo 'quoted' \"twice\" $HOME" },
      { kind: "provision", inline: "echo later" },
      { kind: "write", path: "/etc/it's here", content: "x\n", mode: 0o600 },
      { kind: "set-hostname", hostname: "runner.example" },
    ],
    source: { file: "images.yaml", baseDir: "/abs", index: 0, lvh: false, builtin: false },
    ...over,
  };
}

test("mmdebstrap gets minbase, the base packages, the kernel and the spec's packages once each", () => {
  const plan = planHooks(spec(), "/work/hooks");
  assert.deepEqual(plan.args.slice(0, 3), ["--mode=root", "--variant=minbase", "--format=directory"]);
  const include = plan.args.find((a) => a.startsWith("--include="));
  assert.equal(include, `--include=${[...BASE_PACKAGES, "linux-image-amd64", "curl"].join(",")}`);
  assert.deepEqual(includedPackages(spec({ kernel: "linux-image-cloud-amd64", packages: [] })).slice(-1), ["linux-image-cloud-amd64"]);
  for (const p of ["systemd-sysv", "udev", "initramfs-tools", "grub-pc-bin", "grub2-common"]) assert.ok(BASE_PACKAGES.includes(p), p);
  assert.ok(!BASE_PACKAGES.includes("grub-pc"), "grub-pc would ask debconf questions");
});

test("each action but provision becomes one customize hook, in order, between base and finish", () => {
  const plan = planHooks(spec(), "/work/hooks");
  const customize = plan.args.filter((a) => a.startsWith("--customize-hook="));
  assert.deepEqual(customize, [
    `--customize-hook=sh /work/hooks/20-base.sh "$1"`,
    `--customize-hook=sh /work/hooks/50-action-001.sh "$1"`,
    `--customize-hook=sh /work/hooks/50-action-003.sh "$1"`,
    `--customize-hook=sh /work/hooks/50-action-004.sh "$1"`,
    `--customize-hook=sh /work/hooks/90-finish.sh "$1"`,
  ]);
  assert.ok(plan.args.includes(`--essential-hook=sh /work/hooks/10-initramfs.sh "$1"`));
  const write = plan.files.find((f) => f.name === "50-action-003.sh");
  assert.deepEqual(write?.data, { "50-action-003.content": "x\n" });
  assert.match(write?.text ?? "", /civm-hook: begin 2 3\/4 write \/etc\/it'\\''s here/);
});

test("with an apt cache, .deb files are synced in at setup and out before the actions", () => {
  const plan = planHooks(spec(), "/work/hooks", "/var/cache/civm-debs");
  const i = (s: string) => plan.args.findIndex((a) => a.includes(s));
  assert.ok(plan.args.includes("--skip=essential/unlink"));
  assert.ok(i("sync-in /var/cache/civm-debs /var/cache/apt/archives/") > 0);
  assert.ok(i("sync-out /var/cache/apt/archives /var/cache/civm-debs") > i("20-base.sh"));
  assert.ok(i("sync-out") < i("50-action-001.sh"));
  const noted: string[] = [];
  const spaced = planHooks(spec(), "/work/hooks", "/with space", (l) => noted.push(l));
  assert.ok(!spaced.args.some((a) => a.includes("sync-")));
  assert.match(noted[0] ?? "", /contains spaces/);
});

test("run hooks pass the command as one quoted word to sh -e -c inside the chroot", () => {
  const h = actionHook({ kind: "run", command: "echo 'quoted' \"twice\" $HOME" }, 0, 1, "/hooks");
  assert.ok(h);
  assert.ok(h.text.includes(`in_root /bin/sh -e -c ${shq("echo 'quoted' \"twice\" $HOME")}`));
  assert.match(h.text, /chroot "\$root" \/usr\/bin\/env -i HOME=\/root/);
  assert.equal(actionHook({ kind: "provision", inline: "x" }, 0, 1, "/hooks"), undefined);
});

test("every hook script is valid sh (sh -n)", () => {
  const dir = tempDir("civm-hooks-");
  mkdirSync(join(dir, "hooks"));
  const s = spec({
    actions: [
      { kind: "run", command: "echo 'a' && true" },
      { kind: "copy", src: "files/x y", srcPath: "/abs/files/x y", dest: "/etc/x/", mode: 0o755 },
      { kind: "write", path: "/etc/a b", content: "it's\n$x\n" },
      { kind: "mkdir", path: "/opt/a", mode: 0o700 },
      { kind: "symlink", target: "/opt/a", path: "/opt/b" },
      { kind: "append-line", file: "/etc/sysctl.conf", line: "a = 'b'" },
      { kind: "set-hostname", hostname: "h.example" },
      { kind: "enable-service", unit: "ssh.service" },
    ],
  });
  const plan = planHooks(s, join(dir, "hooks"), "/cache");
  for (const f of plan.files) {
    const path = join(dir, "hooks", f.name);
    writeFileSync(path, f.text);
    execFileSync("sh", ["-n", path]);
  }
  assert.equal(plan.files.length, 3 + 8 + 1);
  const init = initramfsScript(["virtio_blk", "ext4"]);
  writeFileSync(join(dir, "init.sh"), init);
  execFileSync("sh", ["-n", join(dir, "init.sh")]);
  assert.match(init, /MODULES=list/);
  assert.match(init, /manual_add_modules virtio_blk ext4/);
  assert.ok(readFileSync(join(dir, "hooks", "20-base.sh"), "utf8").includes("LABEL=civm-root"));
});

test("actions are described in one short line", () => {
  assert.equal(describeAction({ kind: "copy", src: "a", srcPath: "/a", dest: "/b" }), "copy a to /b");
  assert.equal(describeAction({ kind: "run", command: "x".repeat(100) }), `run ${"x".repeat(57)}...`);
  assert.equal(describeAction({ kind: "provision", script: { src: "s.sh", srcPath: "/s.sh" } }), "provision s.sh");
});
