import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { createRequire } from "node:module";
import { MIGRATIONS, STORE_FILE, StateStore } from "../../src/store/index.js";
import { tempDir } from "../support/paths.js";

test("a new store is created in the state dir at the latest schema; reopening keeps the data", () => {
  const dir = join(tempDir(), "state");
  const s = new StateStore(dir);
  assert.equal(s.schemaVersion, MIGRATIONS.length);
  assert.ok(existsSync(join(dir, STORE_FILE)));
  assert.equal(statSync(dir).mode & 0o777, 0o700);
  s.setPaused("default", true);
  s.insertVm({ id: "0000000a", pool: "default", name: "runner-0000000a", imageKey: "k1", createdAt: 1 });
  s.close();
  const again = new StateStore(dir);
  assert.equal(again.pool("default").paused, true);
  assert.equal(again.vm("0000000a")?.state, "starting");
  again.close();
});

test("migrations run in order, once each; a newer schema is refused", () => {
  const dir = tempDir();
  const v1 = new StateStore(dir, { migrations: ["CREATE TABLE a (x INTEGER)"] });
  assert.equal(v1.schemaVersion, 1);
  v1.close();
  const v2 = new StateStore(dir, { migrations: ["CREATE TABLE a (x INTEGER)", "ALTER TABLE a ADD COLUMN y TEXT"] });
  assert.equal(v2.schemaVersion, 2);
  v2.close();
  assert.throws(() => new StateStore(dir, { migrations: ["CREATE TABLE a (x INTEGER)"] }), /schema version 2, newer than this civm knows \(1\)/);
});

test("a failed migration leaves the previous version intact", () => {
  const dir = tempDir();
  new StateStore(dir, { migrations: ["CREATE TABLE a (x INTEGER)"] }).close();
  assert.throws(() => new StateStore(dir, { migrations: ["CREATE TABLE a (x INTEGER)", "CREATE TABLE b (y INTEGER); SELECT nope FROM nowhere"] }));
  const s = new StateStore(dir, { migrations: ["CREATE TABLE a (x INTEGER)"] });
  assert.equal(s.schemaVersion, 1);
  s.close();
});

test("pool state: defaults, pause, minRunners override, failures", () => {
  const s = new StateStore(":memory:");
  assert.deepEqual(s.pool("p"), { name: "p", paused: false, minRunnersOverride: undefined, failures: 0, lastFailureAt: undefined });
  s.setPaused("p", true);
  s.setMinRunners("p", 3);
  assert.deepEqual(s.pool("p"), { name: "p", paused: true, minRunnersOverride: 3, failures: 0, lastFailureAt: undefined });
  s.setMinRunners("p", undefined);
  s.setPaused("p", false);
  assert.equal(s.recordFailure("p", 10).failures, 1);
  assert.deepEqual(s.recordFailure("p", 20), { name: "p", paused: false, minRunnersOverride: undefined, failures: 2, lastFailureAt: 20 });
  s.clearFailures("p");
  assert.equal(s.pool("p").failures, 0);
});

test("VM lifecycle: starting → idle → busy → finished; transitions only move forward", () => {
  const s = new StateStore(":memory:");
  s.insertVm({ id: "a1", pool: "p", name: "r-a1", imageKey: "k", configKey: "c1", createdAt: 100 });
  s.insertVm({ id: "b2", pool: "q", name: "r-b2", imageKey: "k", createdAt: 200 });
  assert.throws(() => s.insertVm({ id: "c3", pool: "p", name: "r-a1", imageKey: "k", createdAt: 300 }), /UNIQUE/);
  s.setRunnerId("a1", 42);
  assert.equal(s.markIdle("a1", 110), true);
  assert.equal(s.markIdle("a1", 111), false);
  assert.equal(s.markBusy("a1", 7001, 120), true);
  assert.equal(s.markIdle("a1", 130), false, "busy never goes back to idle");
  assert.equal(s.markFinished("a1", "poweroff", 140), true);
  assert.equal(s.markFinished("a1", "timeout", 150), false, "the first exit reason wins");
  assert.equal(s.markBusy("a1", 1, 160), false);
  assert.deepEqual(s.vm("a1"), {
    id: "a1", pool: "p", name: "r-a1", state: "finished", githubRunnerId: 42, imageKey: "k", configKey: "c1",
    createdAt: 100, startedAt: 110, idleSince: undefined, finishedAt: 140, busySince: 120, jobId: 7001, exitReason: "poweroff",
    host: undefined, cpus: 0, ramBytes: 0, stopping: undefined,
  });
  assert.equal(s.vmByName("r-b2")?.id, "b2");
  assert.equal(s.vm("b2")?.configKey, undefined, "no config key recorded");
  assert.deepEqual(s.vms().map((v) => v.id), ["a1", "b2"]);
  assert.deepEqual(s.vms({ live: true }).map((v) => v.id), ["b2"]);
  assert.deepEqual(s.vms({ pool: "p" }).map((v) => v.id), ["a1"]);
  assert.deepEqual(s.vms({ state: "starting" }).map((v) => v.id), ["b2"]);
  assert.equal(s.pruneFinished(141), 1);
  assert.equal(s.vm("a1"), undefined);
});

test("jobs: status only moves forward, timestamps fill in from out-of-order deliveries", () => {
  const s = new StateStore(":memory:");
  s.upsertJob({ id: 5, labels: ["self-hosted", "linux"], status: "queued", at: 1, repository: "o/r" });
  s.upsertJob({ id: 5, labels: [], status: "completed", at: 9, conclusion: "success", runnerName: "r-a1" });
  const late = s.upsertJob({ id: 5, labels: ["x"], status: "in_progress", at: 5, pool: "p" });
  assert.deepEqual(late, {
    id: 5, labels: ["self-hosted", "linux"], status: "completed", pool: "p", repository: "o/r", runnerName: "r-a1",
    queuedAt: 1, startedAt: 5, completedAt: 9, conclusion: "success",
  });
  s.upsertJob({ id: 6, labels: ["linux"], status: "queued", at: 2, pool: "p" });
  s.upsertJob({ id: 7, labels: ["arm"], status: "queued", at: 3, pool: "q" });
  assert.deepEqual(s.jobs({ status: "queued" }).map((j) => j.id), [6, 7]);
  assert.deepEqual(s.jobs({ status: "queued", pool: "p" }).map((j) => j.id), [6]);
});

test("webhook deliveries are recorded once; a redelivery is recognized", () => {
  const s = new StateStore(":memory:");
  assert.equal(s.recordDelivery({ id: "d-1", event: "workflow_job", action: "queued", at: 1 }), true);
  assert.equal(s.recordDelivery({ id: "d-1", event: "workflow_job", action: "queued", at: 2 }), false);
  assert.equal(s.recordDelivery({ id: "d-2", event: "ping", at: 3 }), true);
  assert.equal(s.pruneDeliveries(3), 1);
  assert.equal(s.recordDelivery({ id: "d-1", event: "workflow_job", at: 4 }), true);
});

test("VM transitions are reported once each with the state before; a failing listener changes nothing", () => {
  const s = new StateStore(":memory:");
  const seen: string[] = [];
  s.onVmTransition = (vm, from) => void seen.push(`${vm.id}:${from}→${vm.state}@${vm.finishedAt ?? vm.idleSince ?? vm.busySince}`);
  s.insertVm({ id: "a1", pool: "p", name: "r-a1", imageKey: "k", createdAt: 100 });
  s.markIdle("a1", 110);
  s.markIdle("a1", 111);
  s.markBusy("a1", 7, 120);
  s.markBusy("a1", 7, 121);
  s.markFinished("a1", "poweroff", 140);
  s.markFinished("a1", "timeout", 150);
  assert.deepEqual(seen, ["a1:starting→idle@110", "a1:idle→busy@120", "a1:busy→finished@140"]);
  s.onVmTransition = () => {
    throw new Error("listener bug");
  };
  s.insertVm({ id: "b2", pool: "p", name: "r-b2", imageKey: "k", createdAt: 200 });
  assert.equal(s.markBusy("b2", undefined, 210), true);
  assert.equal(s.vm("b2")?.busySince, 210);
});

test("pruning: only finished VMs and completed jobs older than the cut-off; live and open ones stay", () => {
  const s = new StateStore(":memory:");
  s.insertVm({ id: "old", pool: "p", name: "r-old", imageKey: "k", createdAt: 1 });
  s.markFinished("old", "poweroff", 10);
  s.insertVm({ id: "new", pool: "p", name: "r-new", imageKey: "k", createdAt: 1 });
  s.markFinished("new", "poweroff", 100);
  s.insertVm({ id: "busy", pool: "p", name: "r-busy", imageKey: "k", createdAt: 1 });
  s.markBusy("busy", 3, 2);
  s.insertVm({ id: "idle", pool: "p", name: "r-idle", imageKey: "k", createdAt: 1 });
  assert.equal(s.pruneFinished(50), 1);
  assert.deepEqual(s.vms().map((v) => v.id).sort(), ["busy", "idle", "new"]);
  s.upsertJob({ id: 1, labels: [], status: "completed", at: 10 });
  s.upsertJob({ id: 2, labels: [], status: "completed", at: 100 });
  s.upsertJob({ id: 3, labels: [], status: "queued", at: 1 });
  s.upsertJob({ id: 4, labels: [], status: "in_progress", at: 1 });
  assert.equal(s.pruneJobs(50), 1);
  assert.deepEqual(s.jobs().map((j) => j.id), [2, 3, 4]);
});

test("a version-2 store migrates to 3 keeping its VMs (busySince unknown)", () => {
  const dir = tempDir();
  new StateStore(dir, { migrations: MIGRATIONS.slice(0, 2) }).close();
  // A VM as a version-2 civm wrote it.
  const Db = createRequire(import.meta.url)("better-sqlite3") as new (f: string) => { prepare(s: string): { run(...a: unknown[]): unknown }; close(): void };
  const raw = new Db(join(dir, STORE_FILE));
  raw.prepare("INSERT INTO vms (id, pool, name, state, image_key, created_at) VALUES ('a1', 'p', 'r-a1', 'starting', 'k', 1)").run();
  raw.close();
  const v3 = new StateStore(dir);
  assert.equal(v3.schemaVersion, MIGRATIONS.length);
  assert.equal(v3.vm("a1")?.busySince, undefined);
  assert.equal(v3.markBusy("a1", 1, 5), true);
  assert.equal(v3.vm("a1")?.busySince, 5);
  v3.close();
});

test("transaction rolls back together", () => {
  const s = new StateStore(":memory:");
  assert.throws(() =>
    s.transaction(() => {
      s.setPaused("p", true);
      throw new Error("boom");
    }),
  );
  assert.equal(s.pool("p").paused, false);
});

test("deliveries: the same job, action and body digest under a new id is a duplicate; a version-3 store migrates keeping its delivery ids", () => {
  const dir = tempDir();
  new StateStore(dir, { migrations: MIGRATIONS.slice(0, 3) }).close();
  // A delivery as a version-3 civm wrote it (its recordDelivery knew no job or digest).
  const Db = createRequire(import.meta.url)("better-sqlite3") as new (f: string) => { prepare(sql: string): { run(...a: unknown[]): unknown }; close(): void };
  const raw = new Db(join(dir, STORE_FILE));
  raw.prepare("INSERT INTO deliveries (id, event, action, received_at) VALUES (?, ?, ?, ?)").run("old", "workflow_job", "queued", 1);
  raw.close();
  const s = new StateStore(dir);
  assert.equal(s.knowsDelivery({ id: "old" }), true, "ids recorded before the migration are still known");
  const d = { event: "workflow_job", action: "queued", jobId: 7, digest: "ab".repeat(32), at: 2 };
  assert.equal(s.knowsDelivery({ ...d, id: "d-1" }), false);
  assert.equal(s.recordDelivery({ ...d, id: "d-1" }), true);
  assert.equal(s.knowsDelivery({ ...d, id: "d-2" }), true);
  assert.equal(s.recordDelivery({ ...d, id: "d-2" }), false, "a replay under another id");
  assert.equal(s.recordDelivery({ ...d, id: "d-3", action: "completed" }), true, "another action of the same job");
  assert.equal(s.recordDelivery({ ...d, id: "d-4", digest: "cd".repeat(32) }), true, "another body");
  assert.equal(s.recordDelivery({ id: "p-1", event: "ping", at: 3, digest: "ef".repeat(32) }), true);
  assert.equal(s.recordDelivery({ id: "p-2", event: "ping", at: 3, digest: "ef".repeat(32) }), true, "no job: the delivery id alone decides");
  s.close();
});
