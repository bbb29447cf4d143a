import { test } from "node:test";
import assert from "node:assert/strict";
import {
  backoffDelay,
  backoffState,
  desiredRunners,
  matchPool,
  planPool,
  planShutdown,
  queuedByPool,
  type PoolView,
  type RunnerView,
} from "../../src/pool/plan.js";
import { labelsMatch, normalizeLabels, registrationLabels } from "../../src/pool/labels.js";

test("desiredRunners = min(maxRunners, minRunners + demand)", () => {
  const table: [number, number, number, number][] = [
    // min, max, demand, desired
    [0, 10, 0, 0],
    [2, 10, 0, 2],
    [2, 10, 1, 3],
    [2, 4, 5, 4],
    [0, 0, 3, 0],
    [1, 3, -2, 1],
  ];
  for (const [min, max, demand, want] of table) assert.equal(desiredRunners({ minRunners: min, maxRunners: max }, demand), want, `min ${min} max ${max} demand ${demand}`);
});

test("job → pool: pool labels ⊇ job labels, case-insensitive, self-hosted implied, most specific wins", () => {
  const pools = [
    { name: "big", labels: ["linux", "x64", "big", "gpu"] },
    { name: "linux", labels: ["Linux", "X64"] },
    { name: "arm", labels: ["self-hosted", "linux", "arm64"] },
  ];
  const table: [string[], string | undefined][] = [
    [["self-hosted", "linux"], "linux"],
    [["SELF-HOSTED", "LINUX", "x64"], "linux"],
    [["linux", "gpu"], "big"],
    [["arm64"], "arm"],
    [["self-hosted"], "linux"],
    [["windows"], undefined],
    [["ubuntu-latest"], undefined],
    [[], "linux"],
  ];
  for (const [labels, want] of table) assert.equal(matchPool(pools, labels)?.name, want, JSON.stringify(labels));
  assert.deepEqual(normalizeLabels(["Linux", " x64 ", "linux"]), ["linux", "self-hosted", "x64"]);
  assert.equal(labelsMatch(["a"], ["A", "Self-Hosted"]), true);
  assert.deepEqual(registrationLabels(["linux"]), ["self-hosted", "linux"]);
  assert.deepEqual(registrationLabels(["Self-Hosted", "linux"]), ["Self-Hosted", "linux"]);
});

test("queuedByPool counts queued jobs only, per matching pool", () => {
  const pools = [{ name: "a", labels: ["linux"] }, { name: "b", labels: ["arm"] }];
  const jobs = [
    { labels: ["linux"], status: "queued" as const },
    { labels: ["linux"], status: "in_progress" as const },
    { labels: ["arm"], status: "queued" as const },
    { labels: ["arm"], status: "queued" as const },
    { labels: ["windows"], status: "queued" as const },
  ];
  assert.deepEqual([...queuedByPool(pools, jobs)], [["a", 1], ["b", 2]]);
});

const NOW = 1_000_000;
function pool(over: Partial<PoolView> = {}): PoolView {
  return { name: "p", minRunners: 2, maxRunners: 5, idleTimeoutSeconds: 60, paused: false, imageKey: "img-1", ...over };
}
function r(id: string, state: RunnerView["state"], idleForS?: number, imageKey = "img-1"): RunnerView {
  const v: RunnerView = { id, state, imageKey };
  if (idleForS !== undefined) v.idleSince = NOW - idleForS * 1000;
  return v;
}

test("planPool: scaling table", () => {
  const cases: { name: string; pool?: Partial<PoolView>; queued: number; runners: RunnerView[]; retryAt?: number; desired: number; start: number; stop: string[] }[] = [
    { name: "empty pool boots minRunners", queued: 0, runners: [], desired: 2, start: 2, stop: [] },
    { name: "starting ones count", queued: 0, runners: [r("a", "starting"), r("b", "starting")], desired: 2, start: 0, stop: [] },
    { name: "a queued job adds one on top", queued: 1, runners: [r("a", "idle", 1), r("b", "idle", 1)], desired: 3, start: 1, stop: [] },
    { name: "busy runners are demand: min idle stays on top", queued: 0, runners: [r("a", "busy"), r("b", "idle", 1)], desired: 3, start: 1, stop: [] },
    { name: "capped by maxRunners", queued: 10, runners: [r("a", "busy")], desired: 5, start: 4, stop: [] },
    { name: "finished runners are ignored", queued: 0, runners: [r("a", "finished"), r("b", "finished")], desired: 2, start: 2, stop: [] },
    { name: "surplus idle past idleTimeout stop, longest idle first", queued: 0, runners: [r("a", "idle", 61), r("b", "idle", 300), r("c", "idle", 70), r("d", "idle", 5)], desired: 2, start: 0, stop: ["b:idle-timeout", "c:idle-timeout"] },
    { name: "surplus idle not yet timed out stay", queued: 0, runners: [r("a", "idle", 10), r("b", "idle", 10), r("c", "idle", 10)], desired: 2, start: 0, stop: [] },
    { name: "scale-down never stops busy ones", pool: { minRunners: 0 }, queued: 0, runners: [r("a", "busy"), r("b", "busy"), r("c", "idle", 999)], desired: 2, start: 0, stop: ["c:idle-timeout"] },
    { name: "scale-down never stops starting ones", pool: { minRunners: 0 }, queued: 0, runners: [r("a", "starting")], desired: 0, start: 0, stop: [] },
    { name: "image change: idle replaced, busy finish", queued: 0, runners: [r("a", "idle", 1, "img-0"), r("b", "busy", undefined, "img-0"), r("c", "idle", 1)], desired: 3, start: 1, stop: ["a:image-change"] },
    { name: "image change at maxRunners: replacements wait for the old VMs to exit", pool: { maxRunners: 2 }, queued: 0, runners: [r("a", "idle", 1, "img-0"), r("b", "idle", 1, "img-0")], desired: 2, start: 0, stop: ["a:image-change", "b:image-change"] },
    { name: "paused: nothing starts, idle stop, busy finish", pool: { paused: true }, queued: 3, runners: [r("a", "idle", 1), r("b", "busy"), r("c", "starting")], desired: 0, start: 0, stop: ["a:paused"] },
    { name: "backing off: no starts, stops still happen", pool: { minRunners: 0 }, queued: 1, runners: [r("a", "idle", 1, "old")], retryAt: NOW + 1, desired: 1, start: 0, stop: ["a:image-change"] },
    { name: "backoff over", queued: 0, runners: [], retryAt: NOW, desired: 2, start: 2, stop: [] },
  ];
  for (const c of cases) {
    const input = { pool: pool(c.pool), queued: c.queued, runners: c.runners, now: NOW, ...(c.retryAt !== undefined ? { retryAt: c.retryAt } : {}) };
    const plan = planPool(input);
    assert.deepEqual(
      { desired: plan.desired, start: plan.start, stop: plan.stop.map((s) => `${s.id}:${s.reason}`) },
      { desired: c.desired, start: c.start, stop: c.stop },
      c.name,
    );
  }
});

test("planShutdown stops all but busy runners and waits for those", () => {
  const plan = planShutdown([r("a", "idle", 1), r("b", "busy"), r("c", "starting"), r("d", "finished")]);
  assert.deepEqual(plan.stop.map((s) => s.id), ["a", "c"]);
  assert.deepEqual(plan.waitFor, ["b"]);
});

test("backoff doubles up to a cap; a pool is degraded after repeated failures", () => {
  const opts = { baseMs: 1000, maxMs: 10_000, degradedAfter: 3 };
  assert.deepEqual([0, 1, 2, 3, 4, 5, 50].map((n) => backoffDelay(n, opts)), [0, 1000, 2000, 4000, 8000, 10_000, 10_000]);
  assert.deepEqual(backoffState({ failures: 0 }, opts), { retryAt: undefined, health: "active" });
  assert.deepEqual(backoffState({ failures: 2, lastFailureAt: 100 }, opts), { retryAt: 2100, health: "active" });
  assert.deepEqual(backoffState({ failures: 3, lastFailureAt: 100 }, opts), { retryAt: 4100, health: "degraded" });
  assert.deepEqual(backoffState({ failures: 3, lastFailureAt: 100, paused: true }, opts), { retryAt: 4100, health: "paused" });
});
