import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadImageSpecs } from "../../src/images/spec.js";
import { isLvhForm, translateLvhImage } from "../../src/images/lvh.js";
import { repoRoot, tempDir } from "../support/paths.js";
import { specLoadError } from "../support/image-specs.js";

const OPTS = { defaultMirror: "http://mirror.test.invalid/debian" };
const fixtures = join(repoRoot, "test", "fixtures", "images");

function configError(file: string): Promise<string> {
  return specLoadError(file, OPTS);
}

test("the lvh base image example (as lvh writes it) loads and translates", async () => {
  const file = join(repoRoot, "examples", "lvh-base-images.json");
  const loaded = await loadImageSpecs(file, OPTS);
  assert.equal(loaded.images.length, 1);
  const base = loaded.images[0];
  assert.ok(base);
  assert.equal(base.name, "base", "lvh's file name base.qcow2 becomes the image name base");
  assert.equal(base.source.lvh, true);
  assert.equal(base.format, "qcow2");
  assert.equal(base.kernel, "linux-image-amd64");
  assert.ok(base.packages.includes("bpftool") && base.packages.includes("systemd-resolved"));
  assert.deepEqual(base.actions, [
    { kind: "run", command: "passwd -d root", comment: "disable password for root" },
    { kind: "run", command: "rm /lib/systemd/system/*.timer", comment: "disable systemd timers" },
    { kind: "append-line", file: "/etc/systemd/system.conf", line: "DefaultLimitNOFILE=65535" },
    { kind: "append-line", file: "/etc/sysctl.conf", line: "fs.inotify.max_user_watches = 524288" },
    { kind: "append-line", file: "/etc/sysctl.conf", line: "fs.inotify.max_user_instances = 512" },
    {
      kind: "copy",
      src: "70-systemd-shell-extra.sh",
      srcPath: join(repoRoot, "examples", "70-systemd-shell-extra.sh"),
      dest: "/etc/profile.d/70-systemd-shell-extra.sh",
      comment: "systemd workaround: copy /etc/profile.d/70-systemd-shell-extra.sh without unset variables",
    },
  ]);
});

test("every lvh op civm supports translates to one civm action", async () => {
  const dir = tempDir("civm-lvh-");
  writeFileSync(join(dir, "env.sh"), "export A=1\n");
  const file = join(dir, "images.json");
  writeFileSync(
    file,
    JSON.stringify([
      { name: "base.qcow2", image_size: "8G", packages: ["curl"], actions: [{ type: "set-hostname", op: { Hostname: "lvh" } }] },
      {
        name: "kind.qcow2",
        parent: "base.qcow2",
        image_size: "20G",
        packages: ["jq"],
        actions: [
          { type: "copy-in", op: { LocalPath: "env.sh", RemoteDir: "/etc/profile.d" } },
          { type: "upload", op: { File: "env.sh", Dest: "/etc/profile.d/path.sh" } },
          { type: "mkdir", op: { Dir: "/opt/x" } },
          { type: "link", op: { Target: "/opt/x", Link: "/x" } },
          { type: "chmod", op: { Permissions: "0755", File: "/etc/profile.d/path.sh" } },
          { type: "run-command", op: { Cmd: "true" }, comment: "c" },
        ],
      },
    ]),
  );
  const { images } = await loadImageSpecs(file, OPTS);
  assert.deepEqual(
    images.map((i) => [i.name, i.parent, i.sizeBytes / 1024 ** 3]),
    [
      ["base", undefined, 8],
      ["kind", "base", 20],
    ],
  );
  assert.deepEqual(images[0]?.actions, [{ kind: "set-hostname", hostname: "lvh" }]);
  assert.deepEqual(images[1]?.actions, [
    { kind: "copy", src: "env.sh", srcPath: join(dir, "env.sh"), dest: "/etc/profile.d/" },
    { kind: "copy", src: "env.sh", srcPath: join(dir, "env.sh"), dest: "/etc/profile.d/path.sh" },
    { kind: "mkdir", path: "/opt/x" },
    { kind: "symlink", target: "/opt/x", path: "/x" },
    { kind: "run", command: "chmod 0755 /etc/profile.d/path.sh" },
    { kind: "run", command: "true", comment: "c" },
  ]);
});

test("an unsupported lvh op is a clear error naming the type and what civm supports", async () => {
  const dir = tempDir("civm-lvh-");
  const file = join(dir, "images.json");
  copyFileSync(join(fixtures, "lvh-unsupported.json"), file);
  const msg = await configError(file);
  const lines = msg.split("\n");
  assert.equal(lines.length, 2, msg);
  assert.match(
    lines[0] as string,
    new RegExp(
      `^${escape(file)}: image "kernel.qcow2" \\(#1\\): field "actions\\[1\\]\\.type": lvh action type "install-kernel" is not supported by civm: lvh's form installs a kernel folder lvh built; civm installs a kernel from its store: build it with civm kernel build NAME .* \\{"install-kernel": "NAME"\\}`,
    ),
  );
  assert.match(lines[0] as string, /civm translates the lvh types run-command, copy-in, upload, set-hostname, mkdir, append-line, link, chmod/);
  assert.match(lines[1] as string, /field "actions\[2\]\.type": lvh action type "run-comand" is not supported by civm; did you mean "run-command"\?/);
});

test("lvh op keys are checked, and later problems name the lvh field", async () => {
  const dir = tempDir("civm-lvh-");
  const file = join(dir, "images.json");
  writeFileSync(
    file,
    JSON.stringify([
      {
        name: "base.qcow2",
        packages: [],
        actions: [
          { type: "run-command", op: { Command: "true" } },
          { type: "upload", op: { File: "missing.sh", Dest: "/etc/x" } },
          { type: "mkdir", op: { Dir: "relative/dir" } },
        ],
      },
    ]),
  );
  const msg = await configError(file);
  assert.match(msg, /image "base\.qcow2" \(#1\): field "actions\[0\]\.op\.Command": unknown key for lvh type "run-command"; it takes "Cmd"\./);
  assert.match(msg, /field "actions\[0\]\.op\.Cmd": missing; lvh type "run-command" needs "Cmd"/);
  // The first pass stops at lvh-level problems; fix them and the civm-level checks name lvh fields.
  writeFileSync(
    file,
    JSON.stringify([
      {
        name: "base.qcow2",
        image_size: "4Q",
        packages: [],
        actions: [
          { type: "upload", op: { File: "missing.sh", Dest: "/etc/x" } },
          { type: "mkdir", op: { Dir: "relative/dir" } },
        ],
      },
    ]),
  );
  const msg2 = await configError(file);
  assert.match(msg2, /image "base\.qcow2" \(#1\): field "image_size": "4Q" is not a size/);
  assert.match(msg2, /field "actions\[0\]\.op\.File": the file or folder .*missing\.sh does not exist/);
  assert.match(msg2, /field "actions\[1\]\.op\.Dir": must be an absolute path in the image/);
});

test("lvh detection: image_size or type/op actions; civm's own form is not lvh", () => {
  assert.equal(isLvhForm([{ name: "a", image_size: "8G" }]), true);
  assert.equal(isLvhForm([{ name: "a", actions: [{ type: "run-command", op: { Cmd: "x" } }] }]), true);
  assert.equal(isLvhForm([{ name: "a", actions: [{ run: "x" }] }]), false);
  assert.equal(isLvhForm([{ name: "a", packages: ["x"] }]), false);
  const t = translateLvhImage({ name: "x.qcow2", surprise: 1 });
  assert.equal(t.image, undefined);
  assert.match(t.problems[0] as string, /field "surprise": unknown key in an lvh image; lvh images take name, parent, image_size, packages, actions\./);
});

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
