// The KVM probe: the boot sector itself (run for real under TCG), the decision rules
// (forced, no /dev/kvm, probe ok / hang / failure) with a fake QEMU, and the cache.
import { test } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  PROBE_EXIT_STATUS,
  detectAccel,
  parseQemuVersion,
  probeBootSector,
  qemuVersion,
  runProbe,
} from "../../src/host/kvm.js";
import { STATE_LAYOUT } from "../../src/host/paths.js";
import { ConfigError } from "../../src/errors/index.js";
import { which } from "../../src/exec/index.js";
import { tempDir } from "../support/paths.js";

const haveQemu = (await which("qemu-system-x86_64")) !== undefined;
const isRoot = process.getuid?.() === 0;

/** A fake qemu-system-x86_64: --version from ./version, the probe per ./kvm-mode and ./tcg-mode (ok|hang|fail). */
function fakeQemu(opts: { kvm?: string; tcg?: string; version?: string } = {}): { bin: string; dir: string; calls: () => string[] } {
  const dir = tempDir("civm-fake-qemu-");
  const bin = join(dir, "qemu-system-x86_64");
  writeFileSync(join(dir, "version"), (opts.version ?? "QEMU emulator version 8.2.2 (fake)").trimEnd() + "\n");
  writeFileSync(join(dir, "kvm-mode"), opts.kvm ?? "ok");
  writeFileSync(join(dir, "tcg-mode"), opts.tcg ?? "ok");
  writeFileSync(
    bin,
    `#!/bin/sh
d="\${0%/*}"
if [ "$1" = "--version" ]; then
  while IFS= read -r l; do echo "$l"; done <"$d/version"
  echo "Copyright (c) fake"
  exit 0
fi
echo "$*" >>"$d/calls"
case "$*" in *"-accel kvm"*) read -r mode <"$d/kvm-mode" ;; *) read -r mode <"$d/tcg-mode" ;; esac
case "$mode" in
  ok) exit ${PROBE_EXIT_STATUS} ;;
  hang) exec sleep 60 ;;
  fail) echo "qemu-system-x86_64: failed to initialize kvm: Permission denied" >&2; exit 1 ;;
esac
exit 99
`,
    { mode: 0o755 },
  );
  const calls = (): string[] => (existsSync(join(dir, "calls")) ? readFileSync(join(dir, "calls"), "utf8").trim().split("\n") : []);
  return { bin, dir, calls };
}

/** A stand-in for /dev/kvm: any readable+writable file. */
function fakeKvmDevice(): string {
  const p = join(tempDir("civm-fake-kvm-"), "kvm");
  writeFileSync(p, "");
  return p;
}

test("probe boot sector: code at 0, 0x55AA at 510, loop count, out to 0xf4", () => {
  const s = probeBootSector();
  assert.equal(s.length, 512);
  assert.equal(s[510], 0x55);
  assert.equal(s[511], 0xaa);
  assert.deepEqual([...s.subarray(0, 2)], [0x66, 0xb9]); // mov ecx, imm32
  assert.equal(s.readUInt32LE(2), 10_000_000);
  assert.deepEqual([...s.subarray(6, 19)], [0x66, 0x49, 0x75, 0xfc, 0xba, 0xf4, 0x00, 0xb0, 0x10, 0xee, 0xf4, 0xeb, 0xfd]);
  assert.equal(probeBootSector(1).readUInt32LE(2), 1);
});

test("the probe guest itself works: under TCG it exits with status 33", { skip: !haveQemu && "qemu-system-x86_64 not installed" }, async (t) => {
  const r = await runProbe({ accel: "tcg", timeoutMs: 30_000 });
  t.diagnostic(`TCG probe (10M-iteration loop): ${r.ms} ms`);
  assert.equal(r.timedOut, false, r.stderr);
  assert.equal(r.status, PROBE_EXIT_STATUS, r.stderr);
  const bare = await runProbe({ accel: "tcg", timeoutMs: 30_000, iterations: 1 });
  t.diagnostic(`TCG probe (1 iteration): ${bare.ms} ms`);
  assert.equal(bare.status, PROBE_EXIT_STATUS, bare.stderr);
});

test("parseQemuVersion", () => {
  assert.deepEqual(parseQemuVersion("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"), {
    major: 7,
    minor: 2,
    micro: 22,
    text: "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)",
  });
  assert.deepEqual(parseQemuVersion("QEMU emulator version 6.1.0\n"), { major: 6, minor: 1, micro: 0, text: "QEMU emulator version 6.1.0" });
  assert.equal(parseQemuVersion("QEMU emulator version 9.0").micro, 0);
  assert.throws(() => parseQemuVersion("something else"), /cannot parse the QEMU version/);
});

test("qemuVersion runs --version (fake and, if installed, real)", async () => {
  const f = fakeQemu({ version: "QEMU emulator version 6.1.1 (fake)" });
  const v = await qemuVersion(f.bin);
  assert.deepEqual([v.major, v.minor, v.micro], [6, 1, 1]);
  if (haveQemu) assert.ok((await qemuVersion()).major >= 1);
  await assert.rejects(qemuVersion("/nonexistent/qemu"), /not installed/);
});

test("CIVM_ACCEL forces the accelerator without probing; a bad value is a ConfigError", async () => {
  const f = fakeQemu({ kvm: "hang" });
  const stateDir = tempDir();
  for (const v of ["kvm", "tcg", "TCG"] as const) {
    const r = await detectAccel({ stateDir, qemuBinary: f.bin, env: { CIVM_ACCEL: v }, kvmDevice: "/nonexistent/kvm" });
    assert.equal(r.accel, v.toLowerCase());
    assert.match(r.reason, /forced by CIVM_ACCEL/);
    assert.equal(r.cached, false);
  }
  await assert.rejects(detectAccel({ stateDir, qemuBinary: f.bin, env: { CIVM_ACCEL: "xen" } }), (e: unknown) => e instanceof ConfigError && /CIVM_ACCEL must be/.test(e.message));
  assert.deepEqual(f.calls(), []);
  // "auto" means: decide as usual
  const r = await detectAccel({ stateDir, qemuBinary: f.bin, env: { CIVM_ACCEL: "auto" }, kvmDevice: "/nonexistent/kvm" });
  assert.equal(r.accel, "tcg");
});

test("no /dev/kvm: TCG, no probe", async () => {
  const f = fakeQemu();
  const r = await detectAccel({ stateDir: tempDir(), qemuBinary: f.bin, env: {}, kvmDevice: "/nonexistent/kvm" });
  assert.equal(r.accel, "tcg");
  assert.match(r.reason, /\/nonexistent\/kvm does not exist/);
  assert.deepEqual(f.calls(), []);
});

test("/dev/kvm not readable+writable: TCG", { skip: isRoot && "root can open anything" }, async () => {
  const f = fakeQemu();
  const dev = fakeKvmDevice();
  chmodSync(dev, 0o400);
  const r = await detectAccel({ stateDir: tempDir(), qemuBinary: f.bin, env: {}, kvmDevice: dev });
  assert.equal(r.accel, "tcg");
  assert.match(r.reason, /not readable and writable/);
});

test("probe exits 33: KVM, cached for the next call, other cache entries kept", async () => {
  const f = fakeQemu();
  const dev = fakeKvmDevice();
  const stateDir = tempDir();
  const cacheFile = join(stateDir, STATE_LAYOUT.hostCache);
  writeFileSync(cacheFile, JSON.stringify({ somethingElse: { keep: true } }));
  const r1 = await detectAccel({ stateDir, qemuBinary: f.bin, env: {}, kvmDevice: dev });
  assert.equal(r1.accel, "kvm");
  assert.equal(r1.cached, false);
  assert.match(r1.reason, /KVM probe boot finished in/);
  assert.equal(f.calls().length, 1);
  assert.match(f.calls()[0] ?? "", /-accel kvm -machine pc -nodefaults -display none -no-user-config -device isa-debug-exit,iobase=0xf4,iosize=0x04 -drive file=.*,format=raw,if=ide -m 16/);

  const r2 = await detectAccel({ stateDir, qemuBinary: f.bin, env: {}, kvmDevice: dev });
  assert.deepEqual({ ...r2, probedAt: undefined }, { ...r1, cached: true, probedAt: undefined });
  assert.equal(r2.probedAt, r1.probedAt);
  assert.equal(f.calls().length, 1, "second call must not probe");

  const cache = JSON.parse(readFileSync(cacheFile, "utf8"));
  assert.deepEqual(cache.somethingElse, { keep: true });
  assert.equal(cache.accel.accel, "kvm");
  const key = JSON.parse(cache.accel.key);
  assert.equal(key.qemu, f.bin);
  assert.equal(typeof key.size, "number", "keyed by the binary's size");
  assert.equal(typeof key.mtime, "number", "and mtime, not by running qemu --version");
  assert.equal(typeof key.kernel, "string");
  assert.equal(typeof key.kvmCtime, "number");
});

test("cache: expires after 24 h; a new QEMU binary, /dev/kvm ctime or corrupt file means a new probe", async () => {
  const f = fakeQemu();
  const dev = fakeKvmDevice();
  const stateDir = tempDir();
  const base = Date.now();
  const at = (ms: number) => () => base + ms;
  await detectAccel({ stateDir, qemuBinary: f.bin, env: {}, kvmDevice: dev, now: at(0) });
  assert.equal((await detectAccel({ stateDir, qemuBinary: f.bin, env: {}, kvmDevice: dev, now: at(23 * 3600_000) })).cached, true);
  assert.equal(f.calls().length, 1);
  assert.equal((await detectAccel({ stateDir, qemuBinary: f.bin, env: {}, kvmDevice: dev, now: at(25 * 3600_000) })).cached, false);
  assert.equal(f.calls().length, 2);

  // An upgraded QEMU: a different binary (size and mtime) at the same path.
  await new Promise((r) => setTimeout(r, 20));
  writeFileSync(f.bin, readFileSync(f.bin, "utf8") + "# upgraded\n");
  assert.equal((await detectAccel({ stateDir, qemuBinary: f.bin, env: {}, kvmDevice: dev, now: at(25 * 3600_000) })).cached, false);
  assert.equal(f.calls().length, 3);

  await new Promise((r) => setTimeout(r, 20));
  chmodSync(dev, 0o666); // changes the ctime, like a reloaded kvm module recreating /dev/kvm
  assert.equal((await detectAccel({ stateDir, qemuBinary: f.bin, env: {}, kvmDevice: dev, now: at(25 * 3600_000) })).cached, false);
  assert.equal(f.calls().length, 4);

  for (const junk of ["{not json", "[]", JSON.stringify({ accel: { key: 1 } }), ""]) {
    writeFileSync(join(stateDir, STATE_LAYOUT.hostCache), junk);
    const r = await detectAccel({ stateDir, qemuBinary: f.bin, env: {}, kvmDevice: dev });
    assert.equal(r.accel, "kvm");
    assert.equal(r.cached, false);
  }
  assert.equal(f.calls().length, 8);
  assert.equal((await detectAccel({ stateDir, qemuBinary: f.bin, env: {}, kvmDevice: dev })).cached, true);
});

test("a hanging KVM probe is killed at the timeout: TCG with the nested-virtualisation reason", async () => {
  const f = fakeQemu({ kvm: "hang" });
  const t0 = Date.now();
  const r = await detectAccel({ stateDir: tempDir(), qemuBinary: f.bin, env: {}, kvmDevice: fakeKvmDevice() });
  const took = Date.now() - t0;
  assert.equal(r.accel, "tcg");
  assert.equal(r.reason, "KVM probe boot did not finish within 4 s (nested virtualisation?)");
  assert.ok(took >= 3900 && took < 6000, `took ${took} ms`);

  const short = await detectAccel({ stateDir: tempDir(), qemuBinary: f.bin, env: {}, kvmDevice: fakeKvmDevice(), timeoutMs: 300 });
  assert.equal(short.reason, "KVM probe boot did not finish within 300 ms (nested virtualisation?)");
});

test("a failing KVM probe: TCG, with QEMU's message; failing under TCG too blames QEMU", async () => {
  const f = fakeQemu({ kvm: "fail" });
  const r = await detectAccel({ stateDir: tempDir(), qemuBinary: f.bin, env: {}, kvmDevice: fakeKvmDevice() });
  assert.equal(r.accel, "tcg");
  assert.equal(r.reason, "KVM probe boot failed (exit status 1: qemu-system-x86_64: failed to initialize kvm: Permission denied)");
  assert.match(f.calls()[1] ?? "", /-accel tcg/, "a TCG probe tells KVM trouble from QEMU trouble");

  const g = fakeQemu({ kvm: "fail", tcg: "fail" });
  const r2 = await detectAccel({ stateDir: tempDir(), qemuBinary: g.bin, env: {}, kvmDevice: fakeKvmDevice() });
  assert.equal(r2.accel, "tcg");
  assert.match(r2.reason, /fails under KVM and TCG alike .*QEMU itself may be broken/);
});

test("this host, for real: a decision, then the same one from the cache", { skip: !haveQemu && "qemu-system-x86_64 not installed" }, async (t) => {
  const stateDir = tempDir();
  const env = { ...process.env };
  delete env.CIVM_ACCEL;
  const t0 = performance.now();
  const r1 = await detectAccel({ stateDir, env });
  const ms1 = Math.round(performance.now() - t0);
  const t1 = performance.now();
  const r2 = await detectAccel({ stateDir, env });
  const ms2 = Math.round(performance.now() - t1);
  t.diagnostic(`${r1.accel}: ${r1.reason} (${ms1} ms; cached lookup ${ms2} ms)`);
  assert.ok(r1.accel === "kvm" || r1.accel === "tcg");
  assert.equal(r2.accel, r1.accel);
  assert.equal(r2.reason, r1.reason);
  if (existsSync("/dev/kvm") && !r1.reason.includes("not readable")) assert.equal(r2.cached, true);
});
