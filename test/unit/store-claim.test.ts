// The placement rule (src/store/claim.ts), pure: pool limits for the fleet, the host's state
// and capacity, the least loaded hosts first, the grace.
import { test } from "node:test";
import assert from "node:assert/strict";
import { decideClaim, type ClaimFacts } from "../../src/store/claim.js";

const G = 1024 ** 3;
function facts(over: Partial<ClaimFacts> = {}): ClaimFacts {
  return {
    pool: { paused: false, minRunnersOverride: undefined, minRunners: 1, maxRunners: 4 },
    live: 0,
    kept: 0,
    busy: 0,
    queued: 0,
    host: { id: "b", state: "active", cpus: 4, ramBytes: 8 * G, usedCpus: 0, usedRamBytes: 0 },
    others: [],
    vm: { cpus: 2, ramBytes: 2 * G },
    waitedMs: 0,
    graceMs: 10_000,
    ...over,
  };
}

test("pool limits hold for the fleet: maxRunners, desired (minRunners idle on top of queued and busy), pause, override", () => {
  assert.deepEqual(decideClaim(facts()), { claimed: true });
  assert.deepEqual(decideClaim(facts({ live: 1, kept: 1 })), { claimed: false, reason: "satisfied" }, "minRunners 1 met by another host's runner");
  assert.deepEqual(decideClaim(facts({ live: 2, kept: 1, busy: 1, queued: 1 })), { claimed: true }, "1 queued + 1 busy + 1 idle wanted, 1 kept");
  assert.deepEqual(decideClaim(facts({ live: 4, kept: 3, queued: 9 })), { claimed: false, reason: "full" }, "a stopping runner still holds its VM");
  assert.deepEqual(decideClaim(facts({ live: 2, kept: 1, queued: 0 })), { claimed: false, reason: "satisfied" }, "one kept + one being stopped");
  assert.deepEqual(decideClaim(facts({ live: 1, kept: 0, queued: 0 })), { claimed: true }, "the stopping one's replacement");
  assert.deepEqual(decideClaim(facts({ pool: { paused: true, minRunnersOverride: undefined, minRunners: 1, maxRunners: 4 } })), { claimed: false, reason: "paused" });
  assert.deepEqual(decideClaim(facts({ live: 1, kept: 1, pool: { paused: false, minRunnersOverride: 3, minRunners: 1, maxRunners: 4 } })), { claimed: true });
  assert.deepEqual(decideClaim(facts({ live: 3, kept: 3, pool: { paused: false, minRunnersOverride: 9, minRunners: 1, maxRunners: 3 } })), { claimed: false, reason: "full" });
});

test("the host: active and within its cpus and memory", () => {
  assert.deepEqual(decideClaim(facts({ host: { id: "b", state: "draining", cpus: 4, ramBytes: 8 * G, usedCpus: 0, usedRamBytes: 0 } })), { claimed: false, reason: "not-active" });
  assert.deepEqual(decideClaim(facts({ host: { id: "b", state: undefined, cpus: 4, ramBytes: 8 * G, usedCpus: 0, usedRamBytes: 0 } })), { claimed: false, reason: "not-active" });
  assert.deepEqual(decideClaim(facts({ host: { id: "b", state: "active", cpus: 4, ramBytes: 8 * G, usedCpus: 3, usedRamBytes: 0 } })), { claimed: false, reason: "no-capacity" });
  assert.deepEqual(decideClaim(facts({ host: { id: "b", state: "active", cpus: 4, ramBytes: 8 * G, usedCpus: 2, usedRamBytes: 7 * G } })), { claimed: false, reason: "no-capacity" });
  assert.deepEqual(decideClaim(facts({ host: { id: "b", state: "active", cpus: 4, ramBytes: 8 * G, usedCpus: 2, usedRamBytes: 6 * G } })), { claimed: true });
});

test("the least loaded hosts with room take the missing runners first; past the grace any host claims", () => {
  const idle = (id: string, usedCpus = 0) => ({ id, cpus: 4, ramBytes: 8 * G, usedCpus, usedRamBytes: 0 });
  const busyHost = { id: "b", state: "active" as const, cpus: 4, ramBytes: 8 * G, usedCpus: 2, usedRamBytes: 0 };
  assert.deepEqual(decideClaim(facts({ host: busyHost, others: [idle("c")] })), { claimed: false, reason: "other-host" }, "one runner missing, c is emptier");
  assert.deepEqual(decideClaim(facts({ host: busyHost, others: [idle("c")], queued: 1 })), { claimed: true }, "two missing: c and b one each");
  assert.deepEqual(decideClaim(facts({ host: busyHost, others: [idle("c", 4)] })), { claimed: true }, "c is full: not ahead");
  assert.deepEqual(decideClaim(facts({ host: busyHost, others: [idle("c")], waitedMs: 10_000 })), { claimed: true }, "the grace is over");
  assert.deepEqual(decideClaim(facts({ others: [idle("a")] })), { claimed: false, reason: "other-host" }, "equal load: the lower id first");
  assert.deepEqual(decideClaim(facts({ others: [idle("c")] })), { claimed: true });
});
