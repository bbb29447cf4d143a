// civm run end to end on real QEMU (TCG) with the tiny guest.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync, existsSync, mkdirSync, readFileSync, symlinkSync, statSync } from "node:fs";
import { join } from "node:path";
import { createServer } from "node:net";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { civmEnv, runCivm, startCivm, waitFor, leftovers, qemuStarts, qemuProcessesOf, consoleLogOf, type CivmEnv } from "../support/civm-cli.js";
import { startFakeGitHub } from "../support/fake-github.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

function writeInstances(e: CivmEnv, instances: Record<string, unknown>[]): string {
  const file = join(e.root, "instances.json");
  writeFileSync(file, JSON.stringify(instances, null, 2));
  return file;
}

function tiny(name: string, config: Record<string, unknown>, over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    name,
    image: guest.disk,
    "cpu-cores": 1,
    ram: "256M",
    "timeout-seconds": 120,
    kernel: guest.kernel,
    initrd: guest.initrd,
    cmdline: "console=ttyS0 panic=-1 quiet",
    config,
    ...over,
  };
}

function assertClean(e: CivmEnv): void {
  assert.deepEqual(leftovers(e), [], "work dirs or registry entries were left behind");
  assert.deepEqual(qemuProcessesOf(e), [], "a QEMU process was left running");
}

test("a guest that powers off: config pre-processed, disc ejected and removed, work dir gone, exit 0", async () => {
  const e = civmEnv({ CIVM_TEST_SECRET: "s3cr3t-value-42" });
  writeFileSync(join(e.root, "token.txt"), "from-a-file\n");
  writeInstances(e, [
    tiny("vm-1", { tiny: "poweroff", token: "${{ env:CIVM_TEST_SECRET }}", nested: { list: ["a-${{file:token.txt}}-b"] } }),
  ]);
  const r = await runCivm(["run", "vm-1"], e);
  assert.equal(r.code, 0, r.stderr);
  // The guest printed its instance.json: the resolved values are secrets, redacted on disk too.
  const consoleText = consoleLogOf(r.stderr);
  assert.match(consoleText, /"token": ?"\*\*\*"/);
  assert.match(consoleText, /a-\*\*\*-b/);
  assert.doesNotMatch(consoleText, /s3cr3t-value-42|from-a-file/, "a resolved secret reached the console log");
  assert.match(r.stderr, /medium removed \(confirmed by query-block\)/);
  assert.match(r.stderr, /vm-1: poweroff after [\d.]+ s \(exit 0\)/);
  assert.doesNotMatch(r.stderr, /s3cr3t-value-42/, "a resolved secret was printed by civm");
  assert.equal(qemuStarts(e), 1);
  assertClean(e);
});

test("the console is streamed to stdout with --console; --keep keeps the work dir", async () => {
  const e = civmEnv();
  writeInstances(e, [tiny("vm-keep", { tiny: "poweroff" })]);
  const r = await runCivm(["run", "vm-keep", "--console", "--keep"], e);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /tiny-guest: instance\.json:/);
  const m = /work dir kept: (\S+)/.exec(r.stderr);
  assert.ok(m, r.stderr);
  assert.ok(existsSync(join(m[1]!, "disk.qcow2")));
  assert.ok(existsSync(join(m[1]!, "config.iso")));
});

test("timeout: a guest that never powers off is stopped, cleaned up, exit 3", async () => {
  const e = civmEnv();
  writeInstances(e, [tiny("vm-hang", { tiny: "hang" }, { "timeout-seconds": 10 })]);
  const r = await runCivm(["run", "vm-hang", "--grace", "2"], e);
  assert.equal(r.code, 3, r.stderr);
  assert.match(r.stderr, /vm-hang: timeout after/);
  assertClean(e);
});

test("timeout with a guest that honours the ACPI power button still reports timeout", async () => {
  const e = civmEnv();
  // The timeout may fire before the guest listens for the button (a slow boot): civm
  // presses it again every 5 s during the grace period, so the guest still powers off.
  writeInstances(e, [tiny("vm-acpi", { tiny: "acpi" }, { "timeout-seconds": 8 })]);
  const r = await runCivm(["run", "vm-acpi", "--grace", "90"], e);
  assert.equal(r.code, 3, r.stderr);
  assert.match(consoleLogOf(r.stderr), /acpi power button pressed/);
  const secs = Number(/timeout after ([\d.]+) s/.exec(r.stderr)?.[1]);
  assert.ok(secs < 90, `the guest powered off on ACPI, so the grace period should not have run out (${secs} s)`);
  assertClean(e);
});

test("SIGTERM while the guest boots: QEMU ends and nothing is left behind", async () => {
  const e = civmEnv();
  writeInstances(e, [tiny("vm-sig", { tiny: "hang" })]);
  const p = startCivm(["run", "vm-sig", "--grace", "2"], e);
  await waitFor(() => /running \(pid \d+/.test(p.stderrSoFar()), 30_000, "QEMU to run");
  p.child.kill("SIGTERM");
  const r = await p.done;
  assert.equal(r.code, 5, r.stderr);
  assert.match(r.stderr, /vm-sig: signal after/);
  assertClean(e);
});

test("a second signal forces QEMU to end at once", async () => {
  const e = civmEnv();
  writeInstances(e, [tiny("vm-sig2", { tiny: "hang" })]);
  const p = startCivm(["run", "vm-sig2", "--grace", "600"], e);
  await waitFor(() => /running \(pid \d+/.test(p.stderrSoFar()), 30_000, "QEMU to run");
  p.child.kill("SIGINT");
  await new Promise((r) => setTimeout(r, 300));
  p.child.kill("SIGINT");
  const r = await p.done;
  assert.equal(r.code, 5, r.stderr);
  assertClean(e);
});

test("a guest reboot ends the run with its own exit code", async () => {
  const e = civmEnv();
  writeInstances(e, [tiny("vm-reboot", { tiny: "reboot" })]);
  const r = await runCivm(["run", "vm-reboot"], e);
  assert.equal(r.code, 6, r.stderr);
  assert.match(r.stderr, /vm-reboot: reboot after/);
  assertClean(e);
});

test("QEMU killed under civm: reported with its status and the console tail, exit 4, cleaned up", async () => {
  const e = civmEnv();
  writeInstances(e, [tiny("vm-crash", { tiny: "hang" })]);
  const p = startCivm(["run", "vm-crash"], e);
  await waitFor(() => /running \(pid \d+/.test(p.stderrSoFar()), 30_000, "QEMU to run");
  await waitFor(() => /hanging/.test(consoleLogOf(p.stderrSoFar())), 60_000, "the guest to boot");
  const pid = Number(/running \(pid (\d+)/.exec(p.stderrSoFar())![1]);
  process.kill(pid, "SIGKILL");
  const r = await p.done;
  assert.equal(r.code, 4, r.stderr);
  assert.match(r.stderr, /QEMU exited on SIGKILL without a guest power-off/);
  assert.match(r.stderr, /console \(tail\)[\s\S]*tiny-guest: hanging/);
  assertClean(e);
});

test("QEMU that fails to start: its stderr is shown, exit 4, cleaned up", async () => {
  const e = civmEnv();
  writeInstances(e, [tiny("vm-bad", { tiny: "poweroff" }, { "qemu-args": ["-device", "no-such-device-xyz"] })]);
  const r = await runCivm(["run", "vm-bad"], e);
  assert.equal(r.code, 4, r.stderr);
  assert.match(r.stderr, /no-such-device-xyz/);
  assertClean(e);
});

test("civm ls lists a running VM and cleans up a stale entry", async () => {
  const e = civmEnv();
  writeInstances(e, [tiny("vm-ls", { tiny: "hang" }, { "ssh-port": 20000 + Math.floor(Math.random() * 20000) })]);
  // A stale entry from a civm that died long ago.
  mkdirSync(join(e.stateDir, "registry"), { recursive: true });
  mkdirSync(join(e.stateDir, "vms", "old-dead"), { recursive: true });
  writeFileSync(join(e.stateDir, "registry", "dead.json"), JSON.stringify({ id: "dead", name: "old", ownerPid: 999999, qemuPid: 999998, startedAt: new Date().toISOString(), workDir: join(e.stateDir, "vms", "old-dead"), consoleLog: "/dev/null", keep: false }));
  const p = startCivm(["run", "vm-ls", "--grace", "1"], e);
  await waitFor(() => /running \(pid \d+/.test(p.stderrSoFar()), 30_000, "QEMU to run");
  const ls = await runCivm(["ls"], e);
  assert.equal(ls.code, 0, ls.stderr);
  assert.match(ls.stdout, /^NAME\s+ID\s+PID\s+SSH\s+AGE/m);
  assert.match(ls.stdout, /vm-ls\s+\w+\s+\d+\s+127\.0\.0\.1:\d+\s+\d+s/);
  assert.doesNotMatch(ls.stdout, /\bold\b/);
  assert.equal(existsSync(join(e.stateDir, "vms", "old-dead")), false, "stale work dir not removed");
  const json = JSON.parse((await runCivm(["ls", "--json"], e)).stdout) as { name: string }[];
  assert.deepEqual(json.map((j) => j.name), ["vm-ls"]);
  p.child.kill("SIGTERM");
  await p.done;
  assert.equal((await runCivm(["ls"], e)).stdout.trim().split("\n").length, 1, "only the header should remain");
  assertClean(e);
});

test("an orphaned QEMU (its civm killed with -9) is ended and its work dir removed by the next start", async () => {
  const e = civmEnv();
  writeInstances(e, [tiny("vm-orphan", { tiny: "hang" })]);
  const p = startCivm(["run", "vm-orphan"], e);
  await waitFor(() => /running \(pid \d+/.test(p.stderrSoFar()), 30_000, "QEMU to run");
  p.child.kill("SIGKILL");
  await p.done;
  assert.equal(qemuProcessesOf(e).length, 1, "QEMU should survive its civm's SIGKILL");
  const ls = await runCivm(["ls"], e);
  assert.equal(ls.code, 0);
  assertClean(e);
});

test("ssh-port already taken: clear error, exit 8, no QEMU started", async () => {
  const e = civmEnv();
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", () => r()));
  const port = (srv.address() as { port: number }).port;
  writeInstances(e, [tiny("vm-port", { tiny: "poweroff" }, { "ssh-port": port })]);
  const r = await runCivm(["run", "vm-port"], e);
  srv.close();
  assert.equal(r.code, 8, r.stderr);
  assert.match(r.stderr, new RegExp(`127\\.0\\.0\\.1:${port}/tcp is already in use`));
  assert.equal(qemuStarts(e), 0);
  assertClean(e);
});

test("gha-install-token: fetched from GitHub before boot and delivered to the guest", async () => {
  const gh = await startFakeGitHub();
  try {
    const e = civmEnv({ GITHUB_TOKEN: gh.validToken, GITHUB_API_URL: gh.url });
    writeInstances(e, [tiny("vm-gh", { tiny: "poweroff", repo: "rust-lang-ci/rust", token: "${{ gha-install-token:rust-lang-ci/rust }}" })]);
    const r = await runCivm(["run", "vm-gh"], e);
    assert.equal(r.code, 0, r.stderr);
    const req = gh.requests.find((q) => q.path.endsWith("/registration-token"));
    assert.ok(req, "no registration-token request reached the fake GitHub");
    assert.equal(req.method, "POST");
    assert.equal(req.path, "/repos/rust-lang-ci/rust/actions/runners/registration-token");
    assert.match(String(req.headers.authorization), new RegExp(`^(token|Bearer) ${gh.validToken}$`));
    // The guest printed the token it got; on disk it is redacted.
    assert.match(consoleLogOf(r.stderr), /"token": ?"\*\*\*"/);
    assert.doesNotMatch(consoleLogOf(r.stderr), new RegExp(gh.registrationToken));
    assert.doesNotMatch(r.stderr, new RegExp(gh.registrationToken));
  } finally {
    await gh.close();
  }
});

for (const [what, setup, pattern] of [
  ["401", (gh: Awaited<ReturnType<typeof startFakeGitHub>>, e: CivmEnv) => { e.env.GITHUB_TOKEN = "wrong-token-xyz"; void gh; }, /401/],
  ["404", (_gh: Awaited<ReturnType<typeof startFakeGitHub>>, e: CivmEnv) => { writeInstances(e, [tiny("vm-gh", { token: "${{ gha-install-token:nobody/nothing }}" })]); }, /not found/],
] as const) {
  test(`gha-install-token ${what}: aborts before boot with a clear message and leaves nothing`, async () => {
    const gh = await startFakeGitHub();
    try {
      const e = civmEnv({ GITHUB_TOKEN: gh.validToken, GITHUB_API_URL: gh.url });
      writeInstances(e, [tiny("vm-gh", { token: "${{ gha-install-token:rust-lang-ci/rust }}" })]);
      setup(gh, e);
      const r = await runCivm(["run", "vm-gh"], e);
      assert.equal(r.code, 7, r.stderr);
      assert.match(r.stderr, pattern);
      assert.doesNotMatch(r.stderr, /wrong-token-xyz/);
      assert.doesNotMatch(r.stderr, /at .*\.js:\d+/, "a stack trace was printed");
      assert.equal(qemuStarts(e), 0);
      assertClean(e);
    } finally {
      await gh.close();
    }
  });
}

test("KVM probe: without CIVM_ACCEL civm probes, and falls back to TCG with one warning when KVM is unusable", async () => {
  const e = civmEnv();
  delete e.env.CIVM_ACCEL;
  writeInstances(e, [tiny("vm-probe", { tiny: "poweroff" })]);
  const r = await runCivm(["run", "vm-probe"], e);
  assert.equal(r.code, 0, r.stderr);
  const warnings = r.stderr.match(/KVM is not usable/g) ?? [];
  const starts = readFileSync(e.qemuStartsFile, "utf8");
  if (/accel=tcg/.test(starts.split("\n").filter((l) => l.includes("-S")).join("\n"))) assert.equal(warnings.length, 1, r.stderr);
  else assert.equal(warnings.length, 0, r.stderr);
  if (existsSync("/dev/kvm")) {
    // A probe ran: its answer is cached in the state dir.
    const cache = JSON.parse(readFileSync(join(e.stateDir, "host-cache.json"), "utf8")) as { accel?: { accel?: string } };
    assert.match(String(cache.accel?.accel), /^(kvm|tcg)$/, "the probe result is cached in the state dir");
  } else {
    // No device, nothing to probe: TCG with a warning that says so, and nothing cached.
    assert.match(r.stderr, /KVM is not usable \([^)]*\/dev\/kvm/);
    const cacheFile = join(e.stateDir, "host-cache.json");
    const cached = existsSync(cacheFile) ? (JSON.parse(readFileSync(cacheFile, "utf8")) as { accel?: unknown }).accel : undefined;
    assert.equal(cached, undefined, "no probe ran, so no probe result may be cached");
  }
});

test("an error inside civm after the work dir exists (no ISO tool) still releases everything", async () => {
  const e = civmEnv();
  // Only QEMU's tools on PATH: the config drive cannot be written.
  const bin = join(e.root, "onlyqemu");
  mkdirSync(bin);
  for (const tool of ["qemu-img"]) symlinkSync(`/usr/bin/${tool}`, join(bin, tool));
  e.env.PATH = `${e.shimDir}:${bin}`;
  writeInstances(e, [tiny("vm-err", { tiny: "poweroff" })]);
  const r = await runCivm(["run", "vm-err"], e);
  assert.equal(r.code, 8, r.stderr);
  assert.match(r.stderr, /Neither xorriso nor genisoimage is installed[\s\S]*apt-get install -y xorriso/);
  assert.equal(qemuStarts(e), 0);
  assertClean(e);
});

test("console log: written by civm at 0600 in a logs dir of at most 0750, a printed secret is *** on disk and on --console", async () => {
  const e = civmEnv({ CIVM_TEST_SECRET: "console-secret-9f3a7c" });
  // An existing, too open logs dir is tightened.
  mkdirSync(e.logsDir, { recursive: true, mode: 0o777 });
  writeInstances(e, [tiny("vm-log", { tiny: "poweroff", token: "${{ env:CIVM_TEST_SECRET }}" })]);
  const r = await runCivm(["run", "vm-log", "--console"], e);
  assert.equal(r.code, 0, r.stderr);
  const m = /console log: (\S+\.log)/.exec(r.stderr);
  assert.ok(m, r.stderr);
  assert.equal(statSync(m[1]!).mode & 0o777, 0o600, "console log mode");
  assert.equal(statSync(e.logsDir).mode & 0o027, 0, `logs dir mode ${(statSync(e.logsDir).mode & 0o777).toString(8)} allows more than 0750`);
  const text = readFileSync(m[1]!, "utf8");
  assert.match(text, /tiny-guest: instance\.json:/, "the guest's output is in the log");
  assert.match(text, /"token": ?"\*\*\*"/);
  assert.doesNotMatch(text, /console-secret-9f3a7c/);
  assert.match(r.stdout, /"token": ?"\*\*\*"/, "--console gets the same redacted text");
  assert.doesNotMatch(r.stdout, /console-secret-9f3a7c/);
  // QEMU never opens the log: its argv names no file in the logs dir.
  assert.doesNotMatch(readFileSync(e.qemuStartsFile, "utf8"), new RegExp(e.logsDir));
  assertClean(e);
});

test("firmware boot of a disk without a bootloader ends at once with no-boot, exit 9", async () => {
  const e = civmEnv();
  const disk = join(e.root, "blank.raw");
  writeFileSync(disk, Buffer.alloc(1024 * 1024));
  writeInstances(e, [{ name: "vm-noboot", image: disk, "cpu-cores": 1, ram: "128M", "timeout-seconds": 120, "firmware-boot": true, config: {} }]);
  const t0 = Date.now();
  const r = await runCivm(["run", "vm-noboot", "--grace", "60"], e);
  const secs = (Date.now() - t0) / 1000;
  assert.equal(r.code, 9, r.stderr);
  assert.match(r.stderr, /vm-noboot: no-boot after/);
  assert.match(r.stderr, /found nothing to boot \("No bootable device\."\).*has no bootloader/);
  assert.match(consoleLogOf(r.stderr), /No bootable device\./);
  // SeaBIOS would retry for 60 s and the timeout is 120 s: neither was waited for.
  assert.ok(secs < 30, `no-boot took ${secs} s`);
  assertClean(e);
});
