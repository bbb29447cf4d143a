// Dev VMs end to end on civm-runner (real QEMU, TCG): civm run --image --detach, wait, exec
// (output and exit codes), host folders over 9p (read-write and :ro), a port forward to a
// service in the guest, keys not passwords, logs, stop and --timeout leaving nothing behind,
// a foreground ad-hoc VM stopped by Ctrl-C, and bad input refused before anything starts.
// VM names are unique per run: other test files use the same shared store at the same time.
import { test, before, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { freePort } from "../support/net.js";
import { civmEnv, runCivm, startCivm, waitFor, qemuStarts, type CivmEnv } from "../support/civm-cli.js";
import { ensureRunnerImage, runnerEnv, uniqueName, leftoversNamed, RUNNER_IMAGE } from "../support/runner-image.js";
import { entryOf, isSupervisor, logFiles, tracesOf } from "../support/dev-vm.js";

before(async () => {
  await ensureRunnerImage();
});

function env(t: TestContext): CivmEnv {
  const e = runnerEnv();
  t.after(() => rmSync(e.root, { recursive: true, force: true }));
  return e;
}

function tail(text: string, n = 40): string {
  return text.split("\n").slice(-n).join("\n");
}

function consoleOf(e: CivmEnv, name: string): string {
  const entry = entryOf(e, name);
  return entry && existsSync(entry.consoleLog) ? readFileSync(entry.consoleLog, "utf8") : "(no console log)";
}

/** Always stop what a test started, even when an assertion failed midway. */
function stopAfter(t: TestContext, e: CivmEnv, name: string): void {
  t.after(async () => {
    if (entryOf(e, name)) await runCivm(["stop", "--force", name], e, { cwd: "/" }); // e.root may be gone: hooks run in order
  });
}

test("detached dev VM on civm-runner: run --detach, wait, exec (output, exit codes), /host rw and :ro, a port forward, keys not passwords, logs, stop leaves nothing", async (t) => {
  const e = env(t);
  const name = uniqueName("dv-main");
  const rw = join(e.root, "src");
  const ro = join(e.root, "data");
  mkdirSync(rw);
  chmodSync(rw, 0o777); // QEMU runs as civm-qemu: a rw share must be writable by it
  mkdirSync(ro);
  writeFileSync(join(rw, "from-host.txt"), "written on the host\n");
  writeFileSync(join(ro, "ro-file.txt"), "read-only share\n");
  const webPort = await freePort();
  stopAfter(t, e, name);

  const started = Date.now();
  const run = await runCivm(["run", "--image", RUNNER_IMAGE, "--name", name, "--detach", "--mem", "1G", "--host-mount", rw, "--host-mount", `${ro}:data:ro`, "-p", `${webPort}:8000`], e);
  const detachMs = Date.now() - started;
  assert.equal(run.code, 0, run.stderr);
  assert.equal(run.stdout.trim(), name, "civm run --detach prints the VM's name on stdout");
  t.diagnostic(`civm run --detach returned in ${(detachMs / 1000).toFixed(1)} s`);
  const entry = entryOf(e, name);
  assert.ok(entry, "no registry entry for the detached VM");
  assert.equal(entry.state, "running");
  assert.ok(isSupervisor(entry.ownerPid), `the owner ${entry.ownerPid} is not a civm supervisor`);
  const key = entry.meta?.dev?.ssh.key;
  assert.ok(key && existsSync(key), "the VM's private key is not in its work dir");
  assert.ok(key.startsWith(entry.workDir + "/"), `the key ${key} is outside the work dir ${entry.workDir}`);
  const sshPort = entry.meta!.dev!.ssh.port;

  const ls = await runCivm(["ls"], e);
  assert.match(ls.stdout, new RegExp(`^${name}\\s+${entry.id}\\s+${entry.qemuPid}\\s+127\\.0\\.0\\.1:${sshPort}\\s`, "m"));

  // A second VM with the same name is refused while the first runs (nothing started).
  const dup = await runCivm(["run", "--image", RUNNER_IMAGE, "--name", name, "--detach"], e);
  assert.equal(dup.code, 2, dup.stderr);
  assert.match(dup.stderr, new RegExp(`a VM named "${name}" is already running`));

  // Too short a wait: exit 3 with the console's tail.
  const early = await runCivm(["wait", name, "--timeout", "1"], e);
  assert.equal(early.code, 3, early.stderr);
  assert.match(early.stderr, new RegExp(`civm: error: ${name}: not ready after 1\\.0 s`));
  assert.match(early.stderr, /--- console .* \(tail\) ---/);

  const w = await runCivm(["wait", name, "--timeout", "600", "--json"], e);
  assert.equal(w.code, 0, `${w.stderr}\nconsole:\n${tail(consoleOf(e, name))}`);
  const waited = JSON.parse(w.stdout) as { name: string; state: string; waitedMs: number };
  assert.deepEqual([waited.name, waited.state, typeof waited.waitedMs], [name, "ready", "number"]);
  t.diagnostic(`run --detach to wait returning: ${((Date.now() - started) / 1000).toFixed(1)} s`);

  await t.test("exec: output and exit code 0", async () => {
    const r = await runCivm(["exec", name, "--", "sh", "-c", "echo out-$((6*7)); echo err-line >&2"], e);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, "out-42\n");
    assert.equal(r.stderr, "err-line\n");
    const t0 = Date.now();
    const tr = await runCivm(["exec", name, "--", "true"], e);
    assert.equal(tr.code, 0, tr.stderr);
    t.diagnostic(`civm exec -- true: ${Date.now() - t0} ms`);
  });

  await t.test("exec: a non-zero exit code propagates, with the output", async () => {
    const r = await runCivm(["exec", name, "--", "echo partial; exit 7"], e);
    assert.equal(r.code, 7, r.stderr);
    assert.equal(r.stdout, "partial\n");
    const w2 = await runCivm(["exec", "-w", "/tmp", name, "--", "pwd"], e);
    assert.equal(w2.stdout, "/tmp\n");
  });

  await t.test("host folders: the first is /host (read-write both ways), :ro refuses writes", async () => {
    const r = await runCivm(["exec", name, "--", "cat /host/from-host.txt && echo from-guest > /host/guest.txt && cat /host-data/ro-file.txt"], e);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, "written on the host\nread-only share\n");
    assert.equal(readFileSync(join(rw, "guest.txt"), "utf8"), "from-guest\n", "a file written under /host did not appear on the host");
    const denied = await runCivm(["exec", name, "--", "echo x > /host-data/nope.txt"], e);
    assert.notEqual(denied.code, 0, "writing to a :ro mount succeeded");
    assert.match(denied.stderr, /Read-only file system/);
    assert.equal(existsSync(join(ro, "nope.txt")), false);
    const mounts = await runCivm(["exec", name, "--", "grep ' 9p ' /proc/mounts"], e);
    assert.match(mounts.stdout, /^host_mount \/host 9p rw,/m);
    assert.match(mounts.stdout, /^data \/host-data 9p ro,/m);
  });

  await t.test("a port forward reaches a service started in the guest", async () => {
    const start = await runCivm(["exec", name, "--", "mkdir -p /srv/web && echo served-by-guest > /srv/web/index.html && cd /srv/web && (setsid python3 -m http.server 8000 >/dev/null 2>&1 &)"], e);
    assert.equal(start.code, 0, start.stderr);
    let body = "";
    for (let i = 0; i < 60 && !body; i++) {
      // A ref'd timer, not AbortSignal.timeout (unref'd): while the forward accepts but the
      // guest's server is not up yet, nothing else keeps the event loop alive, and the test
      // runner would cancel the test.
      const ac = new AbortController();
      const timer = setTimeout(() => ac.abort(), 5000);
      try {
        const res = await fetch(`http://127.0.0.1:${webPort}/index.html`, { signal: ac.signal });
        if (res.ok) body = await res.text();
      } catch {
        await sleep(500);
      } finally {
        clearTimeout(timer);
      }
    }
    assert.equal(body, "served-by-guest\n");
  });

  await t.test("SSH: a password login is refused (sshd has PasswordAuthentication no); the VM's key works", async () => {
    const base = ["-F", "/dev/null", "-p", String(sshPort), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"];
    const pw = spawnSync("ssh", [...base, "-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "PubkeyAuthentication=no", "root@127.0.0.1", "true"], { encoding: "utf8", timeout: 60_000 });
    assert.equal(pw.status, 255, `a password login was not refused: ${pw.stderr}`);
    assert.match(pw.stderr, /Permission denied \(publickey\)/);
    const withKey = spawnSync("ssh", [...base, "-i", key, "-o", "IdentitiesOnly=yes", "runner@127.0.0.1", "id -un"], { encoding: "utf8", timeout: 60_000 });
    assert.equal(withKey.status, 0, withKey.stderr);
    assert.equal(withKey.stdout, "runner\n", "the key is installed for runner too");
    const cfg = await runCivm(["exec", name, "--", "sshd -T | grep -Ei '^(passwordauthentication|kbdinteractiveauthentication) '"], e);
    assert.match(cfg.stdout, /^passwordauthentication no$/m);
    assert.match(cfg.stdout, /^kbdinteractiveauthentication no$/m);
  });

  await t.test("civm ssh runs a command (or prints its ssh command line)", async () => {
    const r = await runCivm(["ssh", name, "--", "hostname"], e);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, "civm-runner\n");
    const p = await runCivm(["ssh", "--print", name], e);
    assert.match(p.stdout, new RegExp(`^ssh -F /dev/null -i ${key.replace(/[.]/g, "\\.")} -p ${sshPort} .* root@127\\.0\\.0\\.1\\n$`));
  });

  await t.test("civm logs prints the console", async () => {
    const r = await runCivm(["logs", name], e);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /civm-agent: ready/);
    const sup = await runCivm(["logs", "--supervisor", name], e);
    assert.match(sup.stdout, new RegExp(`supervisor \\(pid ${entry.ownerPid}\\) for ${name}`));
  });

  // logs -f follows until the VM ends.
  const follow = startCivm(["logs", "-f", name], e);
  t.after(() => {
    if (follow.child.exitCode === null) follow.child.kill("SIGKILL");
  });
  await sleep(500);
  const s0 = Date.now();
  const stop = await runCivm(["stop", name, "--json"], e);
  assert.equal(stop.code, 0, stop.stderr);
  assert.match(stop.stderr, new RegExp(`${name}: stopped and removed`));
  assert.deepEqual((JSON.parse(stop.stdout) as { name: string }[]).map((x) => x.name), [name], "civm stop --json: an array of the stopped VMs");
  t.diagnostic(`civm stop: ${((Date.now() - s0) / 1000).toFixed(1)} s`);
  assert.deepEqual(tracesOf(e, name, entry.ownerPid), [], "civm stop left something behind");
  const followed = await Promise.race([follow.done, sleep(15_000).then(() => undefined)]);
  assert.ok(followed, "civm logs -f did not end with the VM");
  assert.equal(followed.code, 0, followed.stderr);
  assert.match(followed.stdout, /civm-agent: ready/);
  assert.equal(existsSync(entry.workDir), false, "the work dir (and the key in it) is still there");
  assert.equal(existsSync(key), false);
  const after = await runCivm(["ls"], e);
  assert.doesNotMatch(after.stdout, new RegExp(name));
  const gone = await runCivm(["exec", name, "--", "true"], e);
  assert.equal(gone.code, 2);
  assert.match(gone.stderr, new RegExp(`no running VM named "${name}"`));
  // The console log outlives the VM and civm logs still finds it.
  const logs = await runCivm(["logs", name], e);
  assert.equal(logs.code, 0, logs.stderr);
  assert.match(logs.stdout, /civm-agent: ready/);
});

test("--timeout: the supervisor powers the VM off (ACPI, grace, kill) and leaves nothing behind", async (t) => {
  const e = env(t);
  const name = uniqueName("dv-timeout");
  stopAfter(t, e, name);
  const run = await runCivm(["run", "--image", RUNNER_IMAGE, "--name", name, "--detach", "--mem", "1G", "--timeout", "3", "--grace", "2"], e);
  assert.equal(run.code, 0, run.stderr);
  const entry = entryOf(e, name);
  assert.ok(entry, "no registry entry");
  await waitFor(() => tracesOf(e, name, entry.ownerPid).length === 0, 60_000, "the timed-out VM to be cleaned up");
  assert.equal(existsSync(entry.workDir), false);
  const sup = readFileSync(entry.meta!.dev!.supervisorLog!, "utf8");
  assert.match(sup, /timeout \(3 s\): asking the guest to power off/);
  assert.match(sup, new RegExp(`${name}: timeout after [\\d.]+ s \\(exit 3\\)`));
  const ls = await runCivm(["ls"], e);
  assert.doesNotMatch(ls.stdout, new RegExp(name));
});

test("foreground ad-hoc VM (no --detach): exec works from another shell; Ctrl-C stops it and removes everything", async (t) => {
  const e = env(t);
  const name = uniqueName("dv-fg");
  const p = startCivm(["run", "--image", RUNNER_IMAGE, "--name", name, "--mem", "1G", "--grace", "5"], e);
  t.after(() => {
    if (p.child.exitCode === null) p.child.kill("SIGKILL");
  });
  await waitFor(() => /running \(pid \d+/.test(p.stderrSoFar()), 60_000, "QEMU to run");
  const entry = entryOf(e, name);
  assert.ok(entry);
  assert.equal(entry.ownerPid, p.child.pid, "the foreground civm owns its VM");
  // Too short a wait: exit 3 with the console's tail.
  const early = await runCivm(["wait", name, "--timeout", "1"], e);
  assert.equal(early.code, 3, early.stderr);
  assert.match(early.stderr, new RegExp(`civm: error: ${name}: not ready after 1\\.0 s`));
  assert.match(early.stderr, /--- console .* \(tail\) ---/);

  const w = await runCivm(["wait", name, "--timeout", "600"], e);
  assert.equal(w.code, 0, `${w.stderr}\n${tail(consoleOf(e, name))}`);
  const r = await runCivm(["exec", name, "--", "hostname"], e);
  assert.equal(r.stdout, "civm-runner\n", r.stderr);
  p.child.kill("SIGINT");
  const done = await p.done;
  assert.equal(done.code, 5, done.stderr);
  assert.match(done.stderr, new RegExp(`${name}: signal after`));
  assert.deepEqual(tracesOf(e, name, undefined), []);
});

test("bad input to civm run --image: each a clear error, exit 2 (8 for a port in use), nothing started", async (t) => {
  const e = env(t);
  const fresh = civmEnv();
  t.after(() => rmSync(fresh.root, { recursive: true, force: true }));
  const holder: Server = createServer();
  await new Promise<void>((r) => holder.listen(0, "127.0.0.1", r));
  t.after(() => holder.close());
  const busy = (holder.address() as { port: number }).port;
  const prefix = uniqueName("dv-bad");
  const cases: { what: string; env: CivmEnv; args: string[]; code: number; message: RegExp }[] = [
    { what: "a host mount that does not exist", env: e, args: ["--host-mount", join(e.root, "no-such-dir")], code: 2, message: /--host-mount: .*no-such-dir does not exist/ },
    { what: "a host mount that is a file", env: e, args: ["--host-mount", join(e.root, "a-file")], code: 2, message: /is not a folder/ },
    { what: "a port in use", env: e, args: ["-p", `${busy}:80`], code: 8, message: new RegExp(`127\\.0\\.0\\.1:${busy}/tcp is already in use`) },
    { what: "an SSH port in use", env: e, args: ["-p", `${busy}:22`], code: 8, message: /already in use/ },
    { what: "a malformed port", env: e, args: ["-p", "80:99999"], code: 2, message: /not a port/ },
    { what: "an unknown kernel", env: e, args: ["--kernel", "no-such-kernel"], code: 2, message: /no kernel named "no-such-kernel".*civm kernel add/ },
    { what: "a kernel file that is not there", env: e, args: ["--kernel", "./nope/bzImage"], code: 2, message: /--kernel \.\/nope\/bzImage: .* is not a file/ },
    { what: "a bad --mem", env: e, args: ["--mem", "lots"], code: 2, message: /--mem: "lots" is not a size/ },
    { what: "a bad name", env: e, args: ["--name", "Bad Name"], code: 2, message: /--name "Bad Name" is not valid/ },
  ];
  writeFileSync(join(e.root, "a-file"), "");
  for (const c of cases) {
    const name = `${prefix}-${cases.indexOf(c)}`;
    const args = c.args.includes("--name") ? c.args : [...c.args, "--name", name];
    for (const detach of [true, false]) {
      const r = await runCivm(["run", "--image", RUNNER_IMAGE, ...(detach ? ["--detach"] : []), ...args], c.env);
      assert.equal(r.code, c.code, `${c.what}${detach ? " (--detach)" : ""}: ${r.stderr}`);
      assert.match(r.stderr, /^civm: error: /m, c.what);
      assert.match(r.stderr, c.message, c.what);
      assert.doesNotMatch(r.stderr, /\n\s+at .+:\d+:\d+\)?\n/, "a stack trace was printed");
    }
  }
  // An image that is not there (also in a fresh state dir with no images at all).
  for (const en of [e, fresh]) {
    const r = await runCivm(["run", "--image", "no-such-image", "--detach", "--name", `${prefix}-img`], en);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /no stored image named no-such-image/);
    const p = await runCivm(["run", "--image", "./no/such.qcow2", "--name", `${prefix}-img`], en);
    assert.equal(p.code, 2, p.stderr);
    assert.match(p.stderr, /no\/such\.qcow2 does not exist/);
  }
  // Ad-hoc flags without --image, and both an instance name and --image.
  const noImage = await runCivm(["run", "--detach", "-p", "8080:80"], fresh);
  assert.equal(noImage.code, 2);
  assert.match(noImage.stderr, /--detach, -p are for ad-hoc VMs: add --image IMAGE/);
  const both = await runCivm(["run", "vm1", "--image", RUNNER_IMAGE], fresh);
  assert.equal(both.code, 2);
  assert.match(both.stderr, /either an instance NAME or --image/);
  assert.equal(qemuStarts(e) + qemuStarts(fresh), 0, "QEMU was started");
  assert.deepEqual(leftoversNamed(e, prefix), []);
  assert.deepEqual(logFiles(e).filter((f) => f.startsWith(prefix)), [], "a console or supervisor log was created: something was started");
  assert.equal(holder.listening, true);
});
