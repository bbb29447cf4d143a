// The fleet's store on a real PostgreSQL (a throwaway cluster, test/support/postgres.ts), no
// VMs: migrations applied once by hosts starting together, slot claims that hold maxRunners
// and each host's capacity under concurrency, the poller lock and its takeover, dead hosts
// reaped by one survivor, the same records as the SQLite store (a contract both pass), and
// several daemons (fake launcher, fake GitHub) sharing one database: fleet-wide limits, one
// poller, a dead daemon's runners deregistered and its share placed elsewhere, a PostgreSQL
// restart survived.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Registry } from "prom-client";
import { PostgresStore, PG_MIGRATIONS } from "../../src/store/postgres.js";
import { StateStore } from "../../src/store/index.js";
import type { Store } from "../../src/store/types.js";
import { Daemon, type DaemonLogger } from "../../src/pool/daemon.js";
import { createGitHubAccess } from "../../src/github/app-auth.js";
import { startPostgres, type TestPostgres } from "../support/postgres.js";
import { startFakeGitHub, type FakeGitHub } from "../support/fake-github.js";
import { FakeLauncher } from "../support/fake-launcher.js";
import { poolSpec } from "../support/pool-spec.js";
import { waitFor } from "../support/civm-cli.js";
import type { PoolSpec } from "../../src/pool/types.js";

let pg: TestPostgres;
let dbs = 0;
before(async () => {
  pg = await startPostgres();
});
after(async () => {
  await pg?.stop();
});

async function freshDb(): Promise<string> {
  return pg.createDatabase(`t${process.pid}_${++dbs}`);
}

test("three hosts starting at once on an empty database apply the migrations once", async () => {
  const url = await freshDb();
  const stores = await Promise.all(["a", "b", "c"].map((host) => PostgresStore.open(url, { host })));
  try {
    assert.deepEqual(
      stores.map((s) => s.applied).sort(),
      [0, 0, PG_MIGRATIONS.length],
      "one host applied every migration, the others found the schema current",
    );
    const rows = await pg.query<{ version: number; applied_by: string }>(url.split("/").pop()!, "SELECT version, applied_by FROM civm.schema_migrations ORDER BY version");
    assert.deepEqual(rows.map((r) => r.version), PG_MIGRATIONS.map((_, i) => i + 1));
    assert.equal(new Set(rows.map((r) => r.applied_by)).size, 1, "by one host");
    assert.equal(await stores[0]!.schemaVersion(), PG_MIGRATIONS.length);
  } finally {
    await Promise.all(stores.map((s) => s.close()));
  }
  // A newer schema than this civm knows is refused with a message naming the database, not the password.
  const s = await PostgresStore.open(url.replace("civm@", "civm:hunter2@"), { host: "x", migrations: PG_MIGRATIONS.slice(0, 0) }).then(
    () => undefined,
    (e: Error) => e,
  );
  assert.match(String(s?.message), /schema version 1, newer than this civm knows \(0\)/);
  assert.doesNotMatch(String(s?.message), /hunter2/);
});

test("concurrent claims from 20 hosts: maxRunners holds for the fleet, no host beyond its capacity, minRunners met", async () => {
  const url = await freshDb();
  const stores = await Promise.all(Array.from({ length: 5 }, (_, i) => PostgresStore.open(url, { host: `s${i}` })));
  try {
    const hosts = Array.from({ length: 20 }, (_, i) => ({ id: `h${String(i).padStart(2, "0")}`, address: "", cpus: 2, ramBytes: 4 * 2 ** 30, pools: ["p"], version: "t" }));
    for (const h of hosts) await stores[0]!.registerHost(h);
    // 30 queued jobs, maxRunners 25: 20 hosts × 2 cpus = 40 slots, the pool caps at 25.
    for (let j = 1; j <= 30; j++) await stores[0]!.upsertJob({ id: j, labels: ["x"], status: "queued", at: 1, pool: "p" });
    let n = 0;
    const attempts = hosts.flatMap((h, i) =>
      Array.from({ length: 4 }, () => {
        const id = `v${String(n++).padStart(7, "0")}`;
        return Promise.resolve(
          stores[i % stores.length]!.claimVm({
            vm: { id, pool: "p", name: `r-${id}`, imageKey: "k", createdAt: 1, host: h.id, cpus: 1, ramBytes: 1 * 2 ** 30 },
            host: h.id,
            minRunners: 0,
            maxRunners: 25,
            waitedMs: 1e9,
            graceMs: 0,
            deadAfterMs: 60_000,
          }),
        );
      }),
    );
    const results = await Promise.all(attempts);
    const claimed = results.filter((r) => r.claimed);
    assert.equal(claimed.length, 25, `claims: ${JSON.stringify(results.filter((r) => !r.claimed).map((r) => (r.claimed ? "" : r.reason)))}`);
    const live = await stores[0]!.vms({ live: true });
    assert.equal(live.length, 25);
    const perHost = new Map<string, number>();
    for (const v of live) perHost.set(v.host!, (perHost.get(v.host!) ?? 0) + 1);
    assert.ok([...perHost.values()].every((c) => c <= 2), `each host within 2 cpus: ${JSON.stringify([...perHost])}`);
    // Stopping ones are not kept: the next claim replaces one even at the same count.
    await stores[1]!.markStopping(live[0]!.id, "idle-timeout");
    await stores[1]!.markFinished(live[0]!.id, "stopped:idle-timeout", 2);
    const again = await stores[2]!.claimVm({ vm: { id: "vlast", pool: "p", name: "r-vlast", imageKey: "k", createdAt: 3, host: live[0]!.host!, cpus: 1, ramBytes: 1 * 2 ** 30 }, host: live[0]!.host!, minRunners: 0, maxRunners: 25, waitedMs: 1e9, graceMs: 0, deadAfterMs: 60_000 });
    assert.equal(again.claimed, true);
    // Paused: nothing; a draining host: nothing.
    await stores[0]!.setPaused("p", true);
    const paused = await stores[0]!.claimVm({ vm: { id: "vp", pool: "p", name: "r-vp", imageKey: "k", createdAt: 3, host: "h00", cpus: 1, ramBytes: 1 }, host: "h00", minRunners: 0, maxRunners: 99, waitedMs: 1e9, graceMs: 0, deadAfterMs: 60_000 });
    assert.deepEqual(paused, { claimed: false, reason: "paused" });
  } finally {
    await Promise.all(stores.map((s) => s.close()));
  }
});

test("placement prefers the least loaded hosts; a host further down claims after the grace", async () => {
  const url = await freshDb();
  const s = await PostgresStore.open(url, { host: "t" });
  try {
    for (const id of ["a", "b"]) await s.registerHost({ id, address: "", cpus: 4, ramBytes: 8 * 2 ** 30, pools: ["p"], version: "t" });
    await s.insertVm({ id: "x1", pool: "other", name: "o-x1", imageKey: "k", createdAt: 1, host: "a", cpus: 2, ramBytes: 1 * 2 ** 30 });
    await s.upsertJob({ id: 1, labels: [], status: "queued", at: 1, pool: "p" });
    const claim = (host: string, waitedMs: number) => s.claimVm({ vm: { id: `v${host}${waitedMs}`, pool: "p", name: `r-${host}${waitedMs}`, imageKey: "k", createdAt: 2, host, cpus: 1, ramBytes: 1 * 2 ** 30 }, host, minRunners: 0, maxRunners: 5, waitedMs, graceMs: 5000, deadAfterMs: 60_000 });
    assert.deepEqual(await claim("a", 0), { claimed: false, reason: "other-host" }, "a is half full, b is empty: b first");
    assert.equal((await claim("a", 6000)).claimed, true, "past the grace a claims anyway");
    assert.deepEqual(await claim("b", 0), { claimed: false, reason: "satisfied" });
  } finally {
    await s.close();
  }
});

test("one poller per target: the lock is held by one host; when its connection ends another takes over", async () => {
  const url = await freshDb();
  const [a, b] = await Promise.all([PostgresStore.open(url, { host: "a" }), PostgresStore.open(url, { host: "b" })]);
  try {
    assert.deepEqual([...(await a.lead(["repo:o/r", "org:x"]))].sort(), ["org:x", "repo:o/r"]);
    assert.deepEqual([...(await b.lead(["repo:o/r", "org:x"]))], []);
    assert.deepEqual([...(await a.lead(["repo:o/r"]))], ["repo:o/r"], "a target no longer asked for is released");
    assert.deepEqual([...(await b.lead(["repo:o/r", "org:x"]))], ["org:x"]);
    await a.close();
    await waitFor(async () => (await b.lead(["repo:o/r", "org:x"])).has("repo:o/r"), 10_000, "b to take over repo:o/r");
  } finally {
    await a.close();
    await b.close();
  }
});

test("a host that stopped heartbeating is declared dead by one survivor, its live VMs finished", async () => {
  const url = await freshDb();
  const [a, b, c] = (await Promise.all(["a", "b", "c"].map((host) => PostgresStore.open(url, { host })))) as [PostgresStore, PostgresStore, PostgresStore];
  try {
    for (const id of ["a", "b", "c", "gone"]) await a.registerHost({ id, address: "", cpus: 4, ramBytes: 1 * 2 ** 30, pools: ["p"], version: "t" });
    await a.insertVm({ id: "g1", pool: "p", name: "r-g1", imageKey: "k", createdAt: 1, host: "gone" });
    await a.insertVm({ id: "g2", pool: "p", name: "r-g2", imageKey: "k", createdAt: 1, host: "gone" });
    await a.markFinished("g2", "poweroff", 5);
    await a.insertVm({ id: "a1", pool: "p", name: "r-a1", imageKey: "k", createdAt: 1, host: "a" });
    await new Promise((r) => setTimeout(r, 400));
    for (const s of [a, b, c]) await s.heartbeat({ id: s === a ? "a" : s === b ? "b" : "c", address: "", cpus: 4, ramBytes: 1 * 2 ** 30, pools: ["p"], version: "t" }, []);
    const reaped = (await Promise.all([a.reapDeadHosts("a", 300, 10), b.reapDeadHosts("b", 300, 10), c.reapDeadHosts("c", 300, 10)])).flat();
    assert.equal(reaped.length, 1, "one survivor reaps it");
    assert.equal(reaped[0]!.host, "gone");
    assert.deepEqual(reaped[0]!.vms.map((v) => [v.id, v.state, v.exitReason]), [["g1", "finished", "host-dead"]]);
    const gone = (await a.hosts()).find((h) => h.id === "gone")!;
    assert.equal(gone.state, "dead");
    assert.ok(gone.deadBy && ["a", "b", "c"].includes(gone.deadBy));
    assert.equal((await a.vm("a1"))?.state, "starting", "a live host's VM is untouched");
    // The dead host's heartbeat is not renewed: it learns it was declared dead and re-registers.
    assert.equal((await a.heartbeat({ id: "gone", address: "", cpus: 4, ramBytes: 1, pools: [], version: "t" }, []))?.state, "dead");
    await a.registerHost({ id: "gone", address: "", cpus: 4, ramBytes: 1, pools: [], version: "t" });
    assert.equal((await a.hosts()).find((h) => h.id === "gone")?.state, "active");
  } finally {
    await Promise.all([a, b, c].map((s) => s.close()));
  }
});

// The same calls against both stores give the same records (a contract each implementation passes).
for (const kind of ["sqlite", "postgres"] as const) {
  test(`store contract (${kind}): jobs only move forward, deliveries de-duplicate, transitions tell the listener, prune`, async () => {
    const s: Store = kind === "sqlite" ? new StateStore(":memory:") : await PostgresStore.open(await freshDb(), { host: "t" });
    try {
      const seen: string[] = [];
      s.onVmTransition = (vm, from) => void seen.push(`${vm.id}:${from}->${vm.state}`);
      await s.insertVm({ id: "a1", pool: "p", name: "r-a1", imageKey: "k", configKey: "c", createdAt: 100, host: "h", cpus: 2, ramBytes: 1024 });
      assert.equal(await s.markIdle("a1", 110), true);
      assert.equal(await s.markIdle("a1", 111), false);
      const w = (id: string, action: "queued" | "in_progress" | "completed", at: number, extra: Record<string, unknown> = {}) =>
        s.recordWebhook({ delivery: { id, event: "workflow_job", action, jobId: 7, digest: `d-${id}` }, at, job: { id: 7, labels: ["x"], status: action, pool: "p", repository: "o/r", ...extra } });
      assert.equal((await w("d1", "queued", 120)).outcome, "accepted");
      assert.equal((await w("d1", "queued", 121)).outcome, "duplicate");
      const busy = await w("d2", "in_progress", 130, { runnerName: "r-a1" });
      assert.equal(busy.outcome, "accepted");
      assert.equal(busy.vm?.id, "a1");
      assert.equal(busy.before?.status, "queued");
      assert.equal((await w("d3", "queued", 140)).outcome, "accepted", "a late queued delivery");
      const job = await s.job(7);
      assert.equal(job?.status, "in_progress", "status never moves back");
      assert.equal(job?.queuedAt, 120);
      assert.equal(job?.startedAt, 130);
      assert.equal(job?.runnerName, "r-a1");
      const vm = await s.vm("a1");
      assert.equal(vm?.state, "busy");
      assert.equal(vm?.jobId, 7);
      assert.equal(vm?.host, "h");
      assert.equal(vm?.cpus, 2);
      assert.equal(await s.markFinished("a1", "poweroff", 150), true);
      assert.deepEqual(seen, ["a1:starting->idle", "a1:idle->busy", "a1:busy->finished"]);
      const ignored = await s.recordWebhook({ delivery: { id: "d9", event: "workflow_job", action: "queued", jobId: 8, digest: "x" }, at: 1, job: { id: 8, labels: [], status: "queued" } });
      assert.equal(ignored.outcome, "ignored");
      assert.equal(await s.knowsDelivery({ id: "d9" }), true);
      assert.equal(await s.knowsDelivery({ id: "other", action: "queued", jobId: 7, digest: "d-d1" }), true, "a replay under another id");
      await w("d4", "completed", 160);
      assert.deepEqual(await s.prune(1000), { vms: 1, jobs: 1, deliveries: 5 });
    } finally {
      await s.close();
    }
  });
}

// ---- several daemons on one database (fake launcher, fake GitHub) ------------------------------

const quiet = (): DaemonLogger & { lines: { level: string; msg: string; fields: Record<string, unknown> }[] } => {
  const lines: { level: string; msg: string; fields: Record<string, unknown> }[] = [];
  const at = (level: string) => (fields: Record<string, unknown>, msg: string) => void lines.push({ level, msg, fields });
  return { lines, info: at("info"), warn: at("warn"), error: at("error") };
};

interface Member {
  id: string;
  store: PostgresStore;
  launcher: FakeLauncher;
  daemon: Daemon;
  log: ReturnType<typeof quiet>;
}

async function member(url: string, gh: FakeGitHub, id: string, pools: PoolSpec[], cpus: number): Promise<Member> {
  const store = await PostgresStore.open(url, { host: id });
  const launcher = new FakeLauncher();
  const log = quiet();
  const access = createGitHubAccess({ kind: "token", token: gh.validToken }, { baseUrl: gh.url, throttle: false, retries: 0, warn: () => {} });
  const daemon = new Daemon({
    pools,
    store,
    host: { id, address: `http://${id}`, cpus, ramBytes: 64 * 2 ** 30, heartbeatMs: 200, deadAfterMs: 1500, placementGraceMs: 500 },
    access,
    launcher,
    logger: log,
    registry: new Registry(),
    pollIntervalMs: 1000,
    shutdownTimeoutMs: 2000,
    tickMs: 200,
    apiUrl: gh.url,
  });
  await daemon.start();
  return { id, store, launcher, daemon, log };
}

/** The fake GitHub sets each started runner online (its VM booted). */
function bootAll(gh: FakeGitHub, members: Member[]): void {
  for (const m of members) for (const v of m.launcher.running()) if (gh.runner(v.req.name)?.status === "offline") gh.setRunner(v.req.name, { status: "online" });
}

test("three daemons on one database: fleet-wide maxRunners, each host within capacity, one poller; a dead daemon's runners are deregistered and its share placed elsewhere; a PostgreSQL restart is survived", { timeout: 120_000 }, async (t) => {
  const url = await freshDb();
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const pool = poolSpec({ minRunners: 1, maxRunners: 4, idleTimeoutSeconds: 600 });
  const members = await Promise.all(["h1", "h2", "h3"].map((id) => member(url, gh, id, [pool], 2)));
  const alive = new Set(members);
  t.after(async () => {
    for (const m of alive) await m.daemon.shutdown().catch(() => {});
    for (const m of members) await m.store.close();
  });
  const running = () => members.flatMap((m) => m.launcher.running());
  let maxSeen = 0;
  const sampler = setInterval(() => {
    maxSeen = Math.max(maxSeen, running().length);
    for (const m of members) assert.ok(m.launcher.running().length <= 2, `${m.id} within its capacity of 2 VMs`);
  }, 20);
  t.after(() => clearInterval(sampler));

  // minRunners 1 for the fleet: exactly one VM, not one per host.
  await waitFor(() => running().length === 1, 10_000, "one runner for the fleet");
  bootAll(gh, members);
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(running().length, 1, "still one: minRunners holds fleet-wide");
  // One host polls the repository.
  const pollers = () => members.filter((m) => m.log.lines.some((l) => l.msg === "this host polls the target for the fleet")).map((m) => m.id);
  assert.equal(pollers().length, 1, `one poller: ${pollers().join(", ")}`);

  // Six queued jobs through the store (as a webhook on any host records them): maxRunners 4.
  for (let j = 1; j <= 6; j++) {
    gh.addJob({ id: 100 + j, repository: "rust-lang-ci/rust", labels: ["linux"] });
    await members[0]!.store.upsertJob({ id: 100 + j, labels: ["linux"], status: "queued", at: Date.now(), pool: "linux", repository: "rust-lang-ci/rust" });
  }
  await members[0]!.store.setPaused("linux", false); // NOTIFY: every host looks now
  await waitFor(() => running().length === 4, 10_000, "four runners (maxRunners) across the fleet");
  bootAll(gh, members);
  await new Promise((r) => setTimeout(r, 1000));
  assert.equal(maxSeen, 4, "never more than maxRunners");
  assert.ok(members.filter((m) => m.launcher.running().length > 0).length >= 2, "spread over hosts");

  // A dead host: its loop and heartbeat stop, its connections drop (as kill -9 does).
  const victim = members.find((m) => m.launcher.running().length > 0 && pollers().includes(m.id)) ?? members.find((m) => m.launcher.running().length > 0)!;
  const wasPoller = pollers().includes(victim.id);
  const victimRunners = victim.launcher.running().map((v) => v.req.name);
  alive.delete(victim);
  (victim.daemon as unknown as { stopping: boolean }).stopping = true;
  clearInterval((victim.daemon.fleet as unknown as { timer: NodeJS.Timeout }).timer);
  await victim.store.close();
  for (const v of victim.launcher.running()) v.done = true; // its VMs are gone with the host
  const survivors = members.filter((m) => m !== victim);
  await waitFor(async () => (await survivors[0]!.store.hosts()).find((h) => h.id === victim.id)?.state === "dead", 10_000, "the victim declared dead");
  await waitFor(() => victimRunners.every((n) => gh.runner(n) === undefined), 10_000, "the dead host's runners deregistered");
  await waitFor(() => survivors.reduce((n, m) => n + m.launcher.running().length, 0) === 4, 10_000, "its share placed on the survivors");
  if (wasPoller) await waitFor(() => survivors.some((m) => m.log.lines.some((l) => l.msg === "this host polls the target for the fleet")), 10_000, "another host to take over the poll");

  // PostgreSQL restarts: no crash, running runners kept, nothing new starts meanwhile, then reconciled.
  bootAll(gh, survivors);
  const before = survivors.flatMap((m) => m.launcher.running().map((v) => v.req.id)).sort();
  const [one] = survivors[0]!.launcher.running();
  await pg.restart({ downMs: 1500 });
  await waitFor(() => survivors.every((m) => m.log.lines.some((l) => l.msg === "the state store is back: reconciling")), 30_000, "both survivors to reconnect");
  assert.ok(survivors.every((m) => m.log.lines.some((l) => l.msg.startsWith("the state store is unreachable"))), "each noticed the outage");
  assert.deepEqual(survivors.flatMap((m) => m.launcher.running().map((v) => v.req.id)).sort(), before, "the same VMs run");
  // A VM ending after the restart is recorded and replaced (the fleet still has 6 jobs queued).
  one!.exit();
  await waitFor(async () => (await survivors[1]!.store.vm(one!.req.id))?.state === "finished", 10_000, "the exit recorded");
  await waitFor(() => survivors.reduce((n, m) => n + m.launcher.running().length, 0) === 4, 10_000, "replaced");
  assert.equal(maxSeen, 4, "never more than maxRunners at any sample");
  clearInterval(sampler);
});
