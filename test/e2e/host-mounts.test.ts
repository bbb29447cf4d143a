// --host-mount's 9p security model on real QEMU (TCG) with the tiny guest: guest root cannot
// plant setuid-root files or device nodes in a host folder (mapped-xattr), files the host
// wrote keep their owner and mode in the guest, what the guest writes is readable on the
// host; :passthrough is warned about at every start.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, chownSync, lstatSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { civmEnv, leftovers, qemuProcessesOf, runCivm, type CivmEnv } from "../support/civm-cli.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

/** A host folder QEMU can write whatever user it runs as (root, or an unprivileged one). */
function sharedDir(e: CivmEnv, name: string): string {
  const d = join(e.root, name);
  mkdirSync(d);
  chmodSync(d, 0o777);
  chmodSync(e.root, 0o755); // QEMU's user must reach it
  return d;
}

/** Boots the tiny guest with the mounts; it runs tiny-script.sh of each share and powers off. */
function bootWithMounts(e: CivmEnv, mounts: string[]) {
  return runCivm([
    "run", "--image", guest.disk, "--kernel", guest.kernel, "--initrd", guest.initrd, "--append", "tiny.mode=mounts",
    "--cpus", "1", "--mem", "256M", "--timeout", "120", "--console", ...mounts.flatMap((m) => ["--host-mount", m]),
  ], e);
}

/** `tiny-guest: script: ` lines of the console. */
function scriptOutput(stdout: string): string[] {
  return stdout.replace(/\r/g, "").split("\n").flatMap((l) => {
    const m = /tiny-guest: script: (.*)$/.exec(l);
    return m ? [m[1]!] : [];
  });
}

const GUEST_SCRIPT = `
echo "pre $(stat -c '%u %g %a' pre-existing.txt) $(cat pre-existing.txt)"
cat pre-existing.txt > built.txt && echo built >> built.txt
touch suid && chown 0:0 suid && chmod 4755 suid && echo "suid $(stat -c '%u %g %a' suid)"
mknod devnode c 1 3 && echo "devnode $(stat -c '%F %t,%T' devnode)"
mkdir made-dir && echo "made-dir $(stat -c '%a' made-dir)"
touch /host-ro/x 2>/dev/null && echo "ro writable" || echo "ro refused"
`;

test("rw --host-mount (mapped-xattr): setuid and mknod stay in the guest's view, the host gets plain 0644 files; host files keep owner and mode in the guest; :ro refuses writes", async () => {
  const e = civmEnv();
  const rw = sharedDir(e, "rw");
  const ro = sharedDir(e, "ro");
  writeFileSync(join(rw, "tiny-script.sh"), GUEST_SCRIPT);
  writeFileSync(join(rw, "pre-existing.txt"), "edited-on-host\n");
  chownSync(join(rw, "pre-existing.txt"), 1234, 5678);
  chmodSync(join(rw, "pre-existing.txt"), 0o644); // readable by QEMU's unprivileged user

  const r = await bootWithMounts(e, [rw, `${ro}:ro`]);
  assert.equal(r.code, 0, r.stderr);
  assert.doesNotMatch(r.stderr, /passthrough/);
  const out = scriptOutput(r.stdout);
  // The guest sees the host file's owner and mode (no xattrs yet) and its content.
  assert.ok(out.includes("pre 1234 5678 644 edited-on-host"), out.join("\n"));
  // In the guest, root's chown/chmod/mknod appear to work (kept in xattrs) ...
  assert.ok(out.includes("suid 0 0 4755"), out.join("\n"));
  assert.ok(out.includes("devnode character special file 1,3"), out.join("\n"));
  assert.ok(out.includes("made-dir 755"), out.join("\n"));
  assert.ok(out.includes("ro refused"), out.join("\n"));

  // ... on the host they are plain files: no setuid/setgid bit, no device node.
  const suid = lstatSync(join(rw, "suid"));
  assert.ok(suid.isFile());
  assert.equal(suid.mode & 0o7777, 0o644, `suid is ${(suid.mode & 0o7777).toString(8)} on the host`);
  const dev = lstatSync(join(rw, "devnode"));
  assert.ok(dev.isFile() && !dev.isCharacterDevice() && !dev.isBlockDevice(), "mknod made a device node on the host");
  assert.equal(dev.mode & 0o7777, 0o644);
  assert.equal(lstatSync(join(rw, "made-dir")).mode & 0o7777, 0o755);
  // What the guest built is readable on the host; the host file is untouched.
  assert.equal(readFileSync(join(rw, "built.txt"), "utf8"), "edited-on-host\nbuilt\n");
  const pre = lstatSync(join(rw, "pre-existing.txt"));
  assert.deepEqual([pre.uid, pre.gid, pre.mode & 0o7777], [1234, 5678, 0o644]);
  assert.deepEqual(leftovers(e), []);
  assert.deepEqual(qemuProcessesOf(e), []);
});

test(":passthrough is warned about at every start and still mounts the folder", async () => {
  const e = civmEnv();
  const dir = sharedDir(e, "pt");
  // QEMU runs unprivileged, so passthrough cannot give a new file the guest's owner: the
  // guest reads the folder and edits existing files (docs/security.md).
  writeFileSync(join(dir, "from-host.txt"), "host\n", { mode: 0o666 });
  chmodSync(join(dir, "from-host.txt"), 0o666);
  writeFileSync(join(dir, "tiny-script.sh"), "cat from-host.txt && echo guest-was-here >> from-host.txt && echo wrote\n");
  for (let i = 0; i < 2; i++) {
    const r = await bootWithMounts(e, [`${dir}:passthrough`]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /civm: warning: --host-mount .*\/pt \(tag host_mount\) is :passthrough: guest root can create setuid-root files and device nodes/);
    assert.ok(scriptOutput(r.stdout).includes("wrote"), r.stdout);
  }
  assert.equal(readFileSync(join(dir, "from-host.txt"), "utf8"), "host\nguest-was-here\nguest-was-here\n");
});
