// lvh's flags on real QEMU (TCG) with the tiny guest, which has neither civm's agent nor sshd
// nor a network configuration: an lvh image as far as civm can tell. --mem without a unit is
// MiB, --cpu/--cpu-kind/-p H:G:tcp reach QEMU, --daemonize detaches, --console-log-file and
// --serial-port carry the console, the first --host-mount is tagged host_mount, --ssh-key
// makes wait check SSH alone and say what is missing instead of only timing out.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { connect } from "node:net";
import { execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { civmEnv, leftovers, qemuProcessesOf, runCivm, waitFor } from "../support/civm-cli.js";
import { entryOf } from "../support/dev-vm.js";
import { freePort } from "../../src/dev/ssh.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

test("civm run --image with lvh's flags: units, aliases, -p H:G:tcp, host_mount, console file and serial port; wait --ssh-key says what is missing; stop leaves nothing", { timeout: 300_000 }, async () => {
  const e = civmEnv();
  chmodSync(e.root, 0o755);
  const share = join(e.root, "src");
  mkdirSync(share);
  chmodSync(share, 0o777);
  const key = join(e.root, "id_lvh");
  execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", key]);
  const consoleFile = join(e.root, "console.txt");
  const serial = await freePort("127.0.0.1");
  const fwd = await freePort("127.0.0.1");
  const name = "lvh-flags";
  const r = await runCivm([
    "run", "--image", guest.disk, "--kernel", guest.kernel, "--initrd", guest.initrd, "--append", "tiny.mode=acpi",
    "--mem", "256", "--cpu", "1", "--cpu-kind", "qemu64", "-p", `${fwd}:8080:tcp`, "--host-mount", share,
    "--daemonize", "--console-log-file", consoleFile, "--serial-port", String(serial),
    "--ssh-key", key, "--ssh-user", "manage", "--name", name, "--timeout", "240",
  ], e);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.trim(), name);
  try {
    // The serial port serves the console while the guest boots.
    let seen = "";
    const client = connect(serial, "127.0.0.1");
    client.on("data", (d) => (seen += d));
    client.on("error", () => {});
    // What QEMU was given.
    const [pid] = qemuProcessesOf(e);
    assert.ok(pid, "QEMU runs");
    const argv = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
    const after = (flag: string) => argv[argv.indexOf(flag) + 1];
    assert.equal(after("-m"), "256M", "--mem 256 is 256 MiB");
    assert.equal(after("-smp"), "1", "--cpu is --cpus");
    assert.equal(after("-cpu"), "qemu64", "--cpu-kind is -cpu");
    assert.ok(argv.some((a) => a.includes(`hostfwd=tcp:127.0.0.1:${fwd}-:8080`)), argv.join(" "));
    assert.ok(argv.some((a) => a.includes("mount_tag=host_mount")), "the first host mount is tagged host_mount");
    await waitFor(() => seen.includes("tiny-guest"), 120_000, "the tiny guest's lines on the serial port");
    client.destroy();
    await waitFor(() => existsSync(consoleFile) && readFileSync(consoleFile, "utf8").includes("tiny-guest: waiting for acpi"), 120_000, "the console in --console-log-file");
    const entry = entryOf(e, name);
    assert.equal(entry?.meta?.dev?.ssh.key, key);
    assert.equal(entry?.meta?.dev?.ssh.user, "manage");

    // No agent (--ssh-key): SSH alone, and while it fails wait says what it looks like.
    const w = await runCivm(["wait", name, "--timeout", "40"], e);
    assert.equal(w.code, 3, w.stderr);
    assert.match(w.stderr, /started with --ssh-key .*waiting for SSH alone/);
    assert.match(w.stderr, /still no SSH after .*does not answer on port 22: the guest has no network address .* or no sshd/);
    assert.match(w.stderr, /not ready after 40(\.0)? ?s: SSH to 127\.0\.0\.1:\d+ does not answer: QEMU accepts connections/);
  } finally {
    const s = await runCivm(["stop", name], e);
    assert.equal(s.code, 0, s.stderr);
  }
  await waitFor(() => qemuProcessesOf(e).length === 0 && leftovers(e).length === 0, 60_000, "nothing left");
  // The port is free again.
  await new Promise<void>((resolve, reject) => {
    const c = connect(serial, "127.0.0.1");
    c.on("connect", () => reject(new Error("the serial port still listens after stop")));
    c.on("error", () => resolve());
  });
});

test("civm run --mem 32 and a bad --cpu-kind are refused before anything starts", async () => {
  const e = civmEnv();
  for (const [flags, re] of [
    [["--mem", "32"], /--mem 32: a VM needs at least 64 MiB/],
    [["--cpu-kind", "max -S"], /--cpu-kind .* is not a QEMU CPU model/],
    [["--cpu", "2", "--cpus", "4"], /--cpu and --cpus are the same setting/],
  ] as const) {
    const r = await runCivm(["run", "--image", guest.disk, "--kernel", guest.kernel, "--initrd", guest.initrd, ...flags], e);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, re);
    assert.doesNotMatch(r.stderr, /at .*\.js:\d+/, "no stack trace");
  }
  assert.deepEqual(qemuProcessesOf(e), []);
});
