// Console/supervisor log retention (src/host/log-retention.ts): by age, by total size,
// a running VM's log kept, other files never touched.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readdirSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pruneLogs, parseKeepDays, parseMaxBytes } from "../../src/host/log-retention.js";
import { Registry } from "../../src/vm/registry.js";
import { ConfigError } from "../../src/errors/index.js";
import { tempDir } from "../support/paths.js";

const DAY = 86400_000;
const NOW = Date.parse("2026-12-01T12:00:00Z");

function setupDirs(): { logsDir: string; stateDir: string } {
  const root = tempDir();
  const logsDir = join(root, "logs");
  const stateDir = join(root, "state");
  mkdirSync(logsDir);
  mkdirSync(stateDir);
  return { logsDir, stateDir };
}

/** A file `ageDays` old (mtime) of `bytes` bytes. */
function file(dir: string, name: string, ageDays: number, bytes = 100): string {
  const p = join(dir, name);
  writeFileSync(p, Buffer.alloc(bytes, 0x61));
  const t = (NOW - ageDays * DAY) / 1000;
  utimesSync(p, t, t);
  return p;
}

test("by age: civm's logs older than keepDays go, newer ones and foreign files stay", async () => {
  const d = setupDirs();
  file(d.logsDir, "vm-1-20261101-120000-0000000a.log", 30);
  file(d.logsDir, "dev-x-20261101-120000-0000000b.supervisor.log", 30);
  file(d.logsDir, "vm-1-20261130-120000-0000000c.log", 1);
  // Not civm's VM logs: an image build log, a user's file, a name without an id.
  file(d.logsDir, "image-build-base-20261101-120000.log", 30);
  file(d.logsDir, "notes.txt", 30);
  file(d.logsDir, "vm-1-20261101-120000.log", 30);
  const r = await pruneLogs({ ...d, retention: { keepDays: 14, maxBytes: 0 }, now: NOW });
  assert.deepEqual(r.deleted.map((p) => p.slice(d.logsDir.length + 1)).sort(), ["dev-x-20261101-120000-0000000b.supervisor.log", "vm-1-20261101-120000-0000000a.log"]);
  assert.deepEqual(readdirSync(d.logsDir).sort(), ["image-build-base-20261101-120000.log", "notes.txt", "vm-1-20261101-120000.log", "vm-1-20261130-120000-0000000c.log"]);
  assert.equal(r.freedBytes, 200);
});

test("by total bytes: the oldest go first until the rest fits", async () => {
  const d = setupDirs();
  file(d.logsDir, "a-20261125-000000-00000001.log", 6, 400);
  file(d.logsDir, "b-20261126-000000-00000002.log", 5, 400);
  file(d.logsDir, "c-20261127-000000-00000003.log", 4, 400);
  file(d.logsDir, "d-20261128-000000-00000004.log", 3, 400);
  const r = await pruneLogs({ ...d, retention: { keepDays: 0, maxBytes: 1000 }, now: NOW });
  assert.deepEqual(readdirSync(d.logsDir).sort(), ["c-20261127-000000-00000003.log", "d-20261128-000000-00000004.log"]);
  assert.equal(r.keptBytes, 800);
});

test("a VM in the registry keeps its logs, however old and whatever the budget", async () => {
  const d = setupDirs();
  const live = file(d.logsDir, "vm-live-20261001-000000-feedbeef.log", 60, 5000);
  const sup = file(d.logsDir, "vm-live-20261001-000000-feedbeef.supervisor.log", 60, 10);
  file(d.logsDir, "vm-old-20261001-000000-00000001.log", 60, 10);
  await new Registry(d.stateDir).put({ id: "feedbeef", name: "vm-live", ownerPid: process.pid, qemuPid: undefined, sshPort: undefined, sshBind: undefined, startedAt: new Date(NOW).toISOString(), workDir: "/nowhere", consoleLog: live, keep: false });
  const r = await pruneLogs({ ...d, retention: { keepDays: 7, maxBytes: 100 }, now: NOW });
  assert.ok(existsSync(live) && existsSync(sup), "a registered VM's logs were deleted");
  assert.deepEqual(r.deleted.map((p) => p.slice(d.logsDir.length + 1)), ["vm-old-20261001-000000-00000001.log"]);
});

test("nothing to do: no logs dir, or everything within the limits", async () => {
  const d = setupDirs();
  assert.deepEqual((await pruneLogs({ logsDir: join(d.logsDir, "missing"), stateDir: d.stateDir, retention: { keepDays: 1, maxBytes: 1 }, now: NOW })).deleted, []);
  file(d.logsDir, "vm-20261130-000000-00000001.log", 1);
  assert.deepEqual((await pruneLogs({ ...d, retention: { keepDays: 14, maxBytes: 1024 }, now: NOW })).deleted, []);
});

test("settings: whole days and sizes; a bad value names where it came from and the fix", () => {
  assert.equal(parseKeepDays("7", "--logs-keep-days"), 7);
  assert.equal(parseKeepDays(0, "x"), 0);
  assert.equal(parseMaxBytes("2G", "--logs-max-bytes"), 2 * 1024 ** 3);
  assert.equal(parseMaxBytes("0", "--logs-max-bytes"), 0);
  assert.throws(() => parseKeepDays("1.5", "--logs-keep-days (or CIVM_LOGS_KEEP_DAYS)"), (e: Error) => e instanceof ConfigError && /^--logs-keep-days \(or CIVM_LOGS_KEEP_DAYS\) must be a whole number of days .*not "1\.5"; e\.g\. 14\.$/.test(e.message));
  assert.throws(() => parseMaxBytes("-5M", "--logs-max-bytes"), (e: Error) => e instanceof ConfigError && /^--logs-max-bytes must be a size such as 500M or 2G .*not "-5M"\.$/.test(e.message));
});
