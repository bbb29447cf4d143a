// The registry is a file anyone with access to the state dir can edit: the path check, the
// process identity check and reconcile's refusal, against real processes and folders.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { existsSync, mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Registry, assess, isQemuOf, isOwnerVerified, procIdentity, startTimeOf, workDirProblem, type RegistryEntry } from "../../src/vm/registry.js";
import { reconcile } from "../../src/vm/reconcile.js";
import { tempDir } from "../support/paths.js";

function state(): { stateDir: string; vms: string } {
  const stateDir = join(tempDir(), "state");
  const vms = join(stateDir, "vms");
  mkdirSync(vms, { recursive: true });
  return { stateDir, vms };
}

/** A live process whose command line names `workDir` (as a QEMU of that VM would). */
async function victim(workDir: string): Promise<ChildProcess & { pid: number }> {
  // Its own process group: the test ends sh and its sleep together.
  const p = spawn("sh", ["-c", "sleep 600; true", workDir], { stdio: "ignore", detached: true });
  for (let i = 0; i < 50 && !procIdentity(p.pid!)?.cmdlineSha256; i++) await sleep(20);
  return p as ChildProcess & { pid: number };
}

const alive = (p: ChildProcess) => p.exitCode === null && p.signalCode === null;

function entry(over: Partial<RegistryEntry> & Pick<RegistryEntry, "workDir">): RegistryEntry {
  return { id: "a1b2c3d4", name: "vm", ownerPid: 999999, qemuPid: undefined, sshPort: undefined, sshBind: undefined, startedAt: new Date().toISOString(), consoleLog: "/dev/null", keep: false, ...over };
}

test("workDirProblem: only <state>/vms/<name>-<id>, by real path", () => {
  const { stateDir, vms } = state();
  const ok = { name: "vm", id: "a1b2c3d4" };
  assert.equal(workDirProblem({ ...ok, workDir: join(vms, "vm-a1b2c3d4") }, stateDir), undefined);
  mkdirSync(join(vms, "vm-a1b2c3d4"));
  assert.equal(workDirProblem({ ...ok, workDir: join(vms, "vm-a1b2c3d4") }, stateDir), undefined);
  const outside = join(tempDir(), "vm-a1b2c3d4");
  mkdirSync(outside);
  assert.match(workDirProblem({ ...ok, workDir: outside }, stateDir) ?? "", /is not inside .*state\/vms/);
  assert.match(workDirProblem({ ...ok, workDir: join(vms, "..", "..", "vm-a1b2c3d4") }, stateDir) ?? "", /is not inside/);
  assert.match(workDirProblem({ ...ok, workDir: join(vms, "other-a1b2c3d4") }, stateDir) ?? "", /is not named <name>-<id> \(vm-a1b2c3d4\)/);
  assert.match(workDirProblem({ ...ok, workDir: "state/vms/vm-a1b2c3d4" }, stateDir) ?? "", /not an absolute path/);
  assert.match(workDirProblem({ ...ok, workDir: join(vms, "sub", "vm-a1b2c3d4") }, stateDir) ?? "", /is not inside/);
  // A symlink inside vms that leads out: its folder resolves elsewhere.
  symlinkSync(join(outside, ".."), join(vms, "escape"));
  assert.match(workDirProblem({ ...ok, workDir: join(vms, "escape", "vm-a1b2c3d4") }, stateDir) ?? "", /is not inside .*resolves to/);
  // The work dir itself a symlink: not a directory civm made.
  const { stateDir: s2, vms: v2 } = state();
  symlinkSync(outside, join(v2, "vm-a1b2c3d4"));
  assert.match(workDirProblem({ ...ok, workDir: join(v2, "vm-a1b2c3d4") }, s2) ?? "", /is not a directory/);
  // A state dir reached through a symlink is the same state dir.
  const { stateDir: s3, vms: v3 } = state();
  const linked = join(tempDir(), "state-link");
  symlinkSync(s3, linked);
  mkdirSync(join(v3, "vm-a1b2c3d4"));
  assert.equal(workDirProblem({ ...ok, workDir: join(v3, "vm-a1b2c3d4") }, linked), undefined);
});

test("startTimeOf reads field 22 of /proc/<pid>/stat (a command name with spaces and parentheses does not shift it)", async () => {
  const self = startTimeOf(process.pid);
  assert.ok(self !== undefined && self > 0);
  // comm is the executable's file name: "a) b (c" through a symlink.
  const odd = join(tempDir(), "a) b (c");
  symlinkSync(execFileSync("sh", ["-c", "command -v sleep"], { encoding: "utf8" }).trim(), odd);
  const p = spawn(odd, ["600"], { stdio: "ignore" });
  try {
    await sleep(200);
    const t = startTimeOf(p.pid!);
    assert.ok(t !== undefined && t >= self, `start time ${t} of a child should be >= ours ${self}`);
    assert.equal(startTimeOf(p.pid!), t, "stable");
    assert.match(readFileSync(`/proc/${p.pid}/stat`, "utf8"), /\(a\) b \(c\)/);
  } finally {
    p.kill("SIGKILL");
  }
  assert.equal(startTimeOf(2 ** 22 + 7), undefined);
});

test("a QEMU pid is trusted only with the recorded start time and command line", async (t) => {
  const { vms } = state();
  const workDir = join(vms, "vm-a1b2c3d4");
  const p = await victim(workDir);
  t.after(() => process.kill(-p.pid, "SIGKILL"));
  const real = procIdentity(p.pid)!;
  assert.ok(real.cmdlineSha256);
  const base = entry({ workDir, qemuPid: p.pid });
  // The real one: owner gone, QEMU ours → orphaned (may be signalled).
  assert.equal(isQemuOf({ ...base, qemu: real }), true);
  assert.deepEqual(assess({ ...base, qemu: real }), { state: "orphaned" });
  // Start time only (QMP not yet answered): the command line must name the work dir.
  assert.equal(isQemuOf({ ...base, qemu: { startTime: real.startTime } }), true);
  // A different start time: the pid names the work dir, so it is refused, not "gone".
  const wrongStart = assess({ ...base, qemu: { ...real, startTime: real.startTime + 1 } });
  assert.equal(wrongStart.state, "refused");
  assert.match((wrongStart as { reason: string }).reason, new RegExp(`QEMU pid ${p.pid} names the work dir but started at tick ${real.startTime}, not the recorded ${real.startTime + 1}`));
  assert.equal(isQemuOf({ ...base, qemu: { ...real, startTime: real.startTime + 1 } }), false);
  // The same start time with another command line.
  const wrongCmd = assess({ ...base, qemu: { ...real, cmdlineSha256: "0".repeat(64) } });
  assert.match((wrongCmd as { reason: string }).reason, /started at the recorded time but runs a different command line/);
  // The old check (command line names the work dir) alone is no longer enough: older entries are refused.
  const legacy = assess(base);
  assert.equal(legacy.state, "refused");
  assert.match((legacy as { reason: string }).reason, /no recorded start time \(written by an older civm\)/);
  // A reused pid that is plainly someone else: QEMU is gone.
  assert.deepEqual(assess({ ...entry({ workDir: join(vms, "vm-ffffffff"), id: "ffffffff" }), qemuPid: p.pid, qemu: { ...real, startTime: real.startTime + 1 } }), { state: "stale" });
  assert.ok(alive(p));
});

test("the owner is checked by start time and command line, not by /civm|node/", async (t) => {
  const { vms } = state();
  const workDir = join(vms, "vm-a1b2c3d4");
  const owner = spawn(process.execPath, ["-e", "setTimeout(() => {}, 600000)", "civm"], { stdio: "ignore" });
  t.after(() => owner.kill("SIGKILL"));
  for (let i = 0; i < 50 && !procIdentity(owner.pid!)?.cmdlineSha256; i++) await sleep(20);
  const real = procIdentity(owner.pid!)!;
  const base = entry({ workDir, ownerPid: owner.pid! });
  assert.deepEqual(assess({ ...base, owner: real }), { state: "running" });
  assert.equal(isOwnerVerified({ ...base, owner: real }), true);
  // A node process with another start time is a reused pid, not the owner (the old check said "running").
  assert.deepEqual(assess({ ...base, owner: { ...real, startTime: real.startTime - 1 } }), { state: "stale" });
  assert.equal(isOwnerVerified({ ...base, owner: { ...real, startTime: real.startTime - 1 } }), false);
  assert.match((assess({ ...base, owner: { ...real, cmdlineSha256: "f".repeat(64) } }) as { reason: string }).reason, /owner pid .* different command line/);
  // Older entries with a live civm-looking owner: cannot tell, so refused (never signalled).
  assert.equal(assess(base).state, "refused");
  assert.equal(isOwnerVerified(base), false);
});

test("reconcile refuses tampered entries (work dir outside the state dir, a live pid that is not the recorded one) and leaves them and what they name alone", async (t) => {
  const { stateDir, vms } = state();
  const registry = new Registry(stateDir);
  // 1. A work dir outside <state>/vms, with a marker.
  const outside = join(tempDir(), "precious-a1b2c3d4");
  mkdirSync(outside);
  writeFileSync(join(outside, "marker"), "keep me");
  await registry.put(entry({ id: "a1b2c3d4", name: "precious", workDir: outside }));
  // 2. A live process naming a real work dir, with a start time that does not match.
  const workDir = join(vms, "vm-b1b2c3d4");
  mkdirSync(workDir);
  writeFileSync(join(workDir, "marker"), "keep me");
  const p = await victim(workDir);
  t.after(() => process.kill(-p.pid, "SIGKILL"));
  const real = procIdentity(p.pid)!;
  await registry.put(entry({ id: "b1b2c3d4", workDir, qemuPid: p.pid, qemu: { ...real, startTime: real.startTime + 7 }, owner: { startTime: 1 } }));
  // 3. An id that does not name its file (registry.remove deletes by id).
  await registry.put(entry({ id: "c1b2c3d4", workDir: join(vms, "vm-c1b2c3d4") }));
  const { rename } = await import("node:fs/promises");
  await rename(join(registry.dir, "c1b2c3d4.json"), join(registry.dir, "zzz.json"));
  // 4. A genuinely stale entry: removed as before.
  mkdirSync(join(vms, "old-d1b2c3d4"));
  await registry.put(entry({ id: "d1b2c3d4", name: "old", workDir: join(vms, "old-d1b2c3d4"), qemuPid: 999998 }));

  const lines: string[] = [];
  const r = await reconcile(registry, (l) => lines.push(l));
  assert.deepEqual(r.removed, ["d1b2c3d4"]);
  assert.deepEqual(r.killed, []);
  assert.deepEqual(r.refused.map((x) => x.id).sort(), ["a1b2c3d4", "b1b2c3d4", "c1b2c3d4"]);
  assert.equal(existsSync(join(outside, "marker")), true, "a work dir outside the state dir was deleted");
  assert.equal(existsSync(join(workDir, "marker")), true, "the work dir of a refused entry was deleted");
  assert.equal(existsSync(join(vms, "old-d1b2c3d4")), false, "a stale work dir was kept");
  for (const f of ["a1b2c3d4.json", "b1b2c3d4.json", "zzz.json"]) assert.equal(existsSync(join(registry.dir, f)), true, `${f} was removed`);
  await sleep(100);
  assert.ok(alive(p), "a process that is not the recorded QEMU was signalled");
  assert.ok(lines.some((l) => l.includes("a1b2c3d4.json") && /work dir ".*precious-a1b2c3d4" is not inside .*state\/vms; nothing it names was signalled or deleted/.test(l)), lines.join("\n"));
  assert.ok(lines.some((l) => l.includes("b1b2c3d4.json") && /not the VM's QEMU/.test(l)), lines.join("\n"));
  assert.ok(lines.some((l) => l.includes("zzz.json") && /does not match its file name/.test(l)), lines.join("\n"));
});
