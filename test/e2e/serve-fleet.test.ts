// Three `civm serve` processes on this machine, one fleet on a throwaway PostgreSQL
// (test/support/postgres.ts), real QEMU (TCG) with the tiny guest and the fake GitHub:
// - started at once on an empty database: the migrations are applied once;
// - minRunners holds for the fleet (not per host); webhooks go to one daemon only, and every
//   job is served exactly once; maxRunners holds for the fleet and each host stays within its
//   capacity at every sample;
// - kill -9 of the daemon that polls GitHub (with a runner VM): within the dead-host time its
//   runner is deregistered, its share placed on the others, and another host polls;
// - PostgreSQL restarted while jobs are queued: no daemon crashes, no job is lost or served
//   twice; the killed daemon, started again, cleans up after itself and rejoins.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { civmEnv, leftovers, qemuProcessesOf, runCivm } from "../support/civm-cli.js";
import { sendWebhook, startFakeGitHub, workflowJobPayload } from "../support/fake-github.js";
import { freePort } from "../support/net.js";
import { logLines, REPO, SECRET, serveConfig, startHub, startServe, TOKEN, type Serve } from "../support/serve-harness.js";
import { startPostgres, type TestPostgres } from "../support/postgres.js";
import { PG_MIGRATIONS } from "../../src/store/postgres.js";
import type { ApiHost } from "../../src/server/index.js";

let guest: TinyGuest;
let pg: TestPostgres;
before(async () => {
  guest = await buildTinyGuest();
  pg = await startPostgres();
});
after(async () => {
  await pg?.stop();
});

const HOSTS = ["host-a", "host-b", "host-c"];
const DEAD_AFTER = 8;

test("civm serve fleet: three daemons on one PostgreSQL: migrations once, fleet-wide min/max and capacity, each job once; kill -9 of the poller; a PostgreSQL restart", { timeout: 900_000 }, async (t) => {
  const url = await pg.createDatabase("fleet");
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const ports = await Promise.all(HOSTS.map(() => freePort()));
  let webhookTo = 0; // the daemon GitHub (and the hub) sends webhooks to
  const hub = await startHub(gh, () => `http://127.0.0.1:${ports[webhookTo]}/webhook`, { offlineAfterMs: 6_000 });
  t.after(() => hub.close());
  const config = (i: number) => ({
    ...serveConfig({ port: ports[i]!, gh, hub, image: guest.disk, pollInterval: 5, pools: [{ minRunners: 2, maxRunners: 3, idleTimeout: 0 }] }),
    store: url,
    // Two 1-cpu runner VMs fit on a host.
    fleet: { hostId: HOSTS[i], cpus: 2, ram: "2G", heartbeat: 1, deadAfter: DEAD_AFTER, placementGrace: 3 },
  });
  // Started together on the empty database.
  const daemons: Serve[] = HOSTS.map((_, i) => startServe({ port: ports[i]!, config: config(i) }));
  t.after(() => {
    for (const d of daemons) if (d.child.exitCode === null) d.child.kill("SIGKILL");
    for (const d of daemons) for (const pid of qemuProcessesOf(d.e)) process.kill(pid, "SIGKILL");
  });
  for (const d of daemons) await d.poll(async () => (await fetch(`${d.base}/healthz`).then((r) => r.ok).catch(() => false)), 60_000, "civm serve to listen");
  const applied = daemons.map((d) => Number(logLines(d.stdout()).find((l) => l.msg === "fleet store open")?.migrationsApplied));
  assert.deepEqual([...applied].sort(), [0, 0, PG_MIGRATIONS.length], `migrations applied by each daemon: ${applied.join(", ")}`);
  assert.equal((await pg.query("fleet", "SELECT version FROM civm.schema_migrations")).length, PG_MIGRATIONS.length);

  // Samples what the fleet runs: the API's fleet-wide counts, each host's QEMU processes.
  const alive = new Set(daemons);
  const violations: string[] = [];
  let maxFleet = 0;
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      const d = [...alive][0];
      const pool = d ? await d.pools().then((p) => p[0]).catch(() => undefined) : undefined;
      if (pool) {
        const n = pool.starting + pool.idle + pool.busy;
        maxFleet = Math.max(maxFleet, n);
        if (n > 3) violations.push(`fleet runs ${n} runner VMs (maxRunners 3)`);
      }
      for (const x of alive) {
        const q = qemuProcessesOf(x.e).length;
        if (q > 2) violations.push(`${x.e.root} runs ${q} QEMU processes (capacity 2)`);
      }
      await new Promise((r) => setTimeout(r, 250));
    }
  })();
  t.after(() => {
    sampling = false;
  });
  const a = daemons[0]!;
  const hosts = (d: Serve = a) => d.api<ApiHost[]>("/api/hosts");
  const fleetVms = async (d: Serve = a) => (await d.liveVms()).length;

  // --- minRunners for the fleet ------------------------------------------------------------
  await a.poll(async () => (await a.liveVms()).filter((v) => v.state === "idle").length === 2, 240_000, "two idle runners in the fleet");
  await new Promise((r) => setTimeout(r, 3000));
  assert.equal(await fleetVms(), 2, "minRunners 2 for the fleet, not per host");
  const h = await hosts();
  assert.deepEqual(h.map((x) => [x.id, x.state]), HOSTS.map((id) => [id, "active"]));
  assert.equal(h.filter((x) => x.polls.length > 0).length, 1, `one host polls: ${JSON.stringify(h.map((x) => [x.id, x.polls]))}`);
  assert.ok(h.every((x) => x.usedCpus <= 2));

  // --- jobs through one daemon's webhook -------------------------------------------------------
  const jobs = [1, 2, 3, 4].map((i) => gh.addJob({ id: 7000 + i, runId: 900 + i, repository: REPO, labels: ["self-hosted", "tiny"] }));
  for (const j of jobs) {
    const r = await sendWebhook(`${a.base}/webhook`, { secret: SECRET, payload: await workflowJobPayload("queued", { id: j.id, runId: j.runId, labels: j.labels, repository: REPO }) });
    assert.equal(r.status, 202, r.body);
  }
  await a.poll(() => jobs.every((j) => j.status === "completed"), 400_000, "the four jobs to complete");
  const served = (id: number) => hub.events.filter((e) => e.startsWith(`job ${id} `));
  for (const j of jobs) assert.equal(served(j.id).length, 1, `job ${j.id} served once: ${served(j.id).join("; ")}`);
  assert.ok(maxFleet >= 3, `the fleet used maxRunners (${maxFleet})`);
  const startedOn = new Set((await a.allVms()).map((v) => v.host));
  assert.ok(startedOn.size >= 2, `runners were placed on several hosts: ${[...startedOn].join(", ")}`);

  // --- kill -9 of the poller, with a runner on it --------------------------------------------------
  // minRunners 3: with placement by load, each host runs one idle runner.
  const scale = await runCivm(["pools", "scale", "tiny", "3", "--api-url", a.base], { ...a.e, env: { ...a.e.env, CIVM_API_TOKEN: TOKEN } });
  assert.equal(scale.code, 0, scale.stderr);
  await a.poll(async () => (await hosts()).every((x) => x.vms.idle === 1), 240_000, "one idle runner on each host");
  const pollerId = (await hosts()).find((x) => x.polls.length > 0)!.id;
  const vi = HOSTS.indexOf(pollerId);
  const victim = daemons[vi]!;
  const victimRunners = (await a.liveVms()).filter((v) => v.host === pollerId).map((v) => v.name);
  assert.equal(victimRunners.length, 1);
  const survivors = daemons.filter((d) => d !== victim);
  webhookTo = HOSTS.indexOf(HOSTS.find((_, i) => i !== vi)!);
  const s0 = survivors[0]!;
  victim.child.kill("SIGKILL");
  await victim.done;
  alive.delete(victim);
  const killedAt = Date.now();
  await s0.poll(async () => (await hosts(s0)).find((x) => x.id === pollerId)?.state === "dead", (DEAD_AFTER + 15) * 1000, "the killed host to be declared dead");
  await s0.poll(() => victimRunners.every((n) => gh.runner(n) === undefined), 15_000, "its runner to be deregistered");
  const deregisteredAfter = (Date.now() - killedAt) / 1000;
  assert.ok(deregisteredAfter < DEAD_AFTER + 15, `deregistered ${deregisteredAfter} s after the kill`);
  await s0.poll(async () => (await hosts(s0)).some((x) => x.id !== pollerId && x.polls.length > 0), 30_000, "another host to poll");
  // Its share placed elsewhere: three idle runners again, on the two survivors.
  await s0.poll(async () => (await s0.liveVms()).filter((v) => v.state === "idle").length === 3, 240_000, "three idle runners on the survivors");
  const byHost = (await hosts(s0)).filter((x) => x.id !== pollerId).map((x) => x.vms.idle + x.vms.starting + x.vms.busy);
  assert.deepEqual(byHost.sort(), [1, 2]);
  assert.ok((await s0.allVms()).some((v) => victimRunners.includes(v.name) && v.exitReason === "host-dead"));

  // --- PostgreSQL restarted with jobs queued ----------------------------------------------------
  await runCivm(["pools", "scale", "tiny", "reset", "--api-url", s0.base], { ...s0.e, env: { ...s0.e.env, CIVM_API_TOKEN: TOKEN } });
  const more = [5, 6].map((i) => gh.addJob({ id: 7000 + i, runId: 900 + i, repository: REPO, labels: ["self-hosted", "tiny"] }));
  const restart = pg.restart({ downMs: 6000 });
  // Deliveries while the database is down fail (500: GitHub would redeliver); the poll finds the jobs.
  await new Promise((r) => setTimeout(r, 500));
  for (const j of more) await sendWebhook(`${s0.base}/webhook`, { secret: SECRET, payload: await workflowJobPayload("queued", { id: j.id, runId: j.runId, labels: j.labels, repository: REPO }) }).catch(() => undefined);
  await restart;
  await s0.poll(() => [...jobs, ...more].every((j) => j.status === "completed"), 400_000, "the jobs queued around the restart to complete");
  for (const j of [...jobs, ...more]) assert.equal(served(j.id).length, 1, `job ${j.id} served once: ${served(j.id).join("; ")}`);
  const storeLines = (d: Serve) => logLines(d.stdout()).filter((l) => /state store/.test(String(l.msg)) || l.level === "error").map((l) => `${String(l.time)} ${String(l.level)} ${String(l.msg)} ${String(l.err ?? "")}`);
  for (const d of survivors) {
    assert.equal(d.child.exitCode, null, "no daemon crashed");
    // Reconnection backs off (1 s doubling to 30 s): within a minute it uses the store again.
    await d.poll(async () => (await d.api<{ store: { reachable: boolean } }>("/api/status")).store.reachable, 60_000, `${d.base} to use the store again:\n${storeLines(d).join("\n")}`);
    // A daemon whose calls all fell into the outage noticed it, and reconnected.
    const lost = logLines(d.stdout()).some((l) => String(l.msg).startsWith("the state store is unreachable"));
    if (lost) assert.ok(logLines(d.stdout()).some((l) => l.msg === "the state store is back: reconciling"), `${d.base} reconnected:\n${storeLines(d).join("\n")}`);
  }
  assert.ok(survivors.some((d) => logLines(d.stdout()).some((l) => l.msg === "the state store is back: reconciling")), `a daemon noticed the outage:\n${survivors.map((d) => storeLines(d).join("\n")).join("\n--\n")}`);

  // --- the killed daemon comes back: its orphans ended, it rejoins -------------------------------
  const back = startServe({ e: victim.e, port: ports[vi]!, config: config(vi), configFile: victim.configFile });
  daemons[vi] = back;
  alive.add(back);
  await back.poll(async () => (await fetch(`${back.base}/healthz`).then((r) => r.ok).catch(() => false)), 60_000, "the restarted daemon to listen");
  await back.poll(async () => (await hosts(back).catch(() => [])).find((x) => x.id === pollerId)?.state === "active", 60_000, "the host to rejoin");
  await back.poll(() => qemuProcessesOf(back.e).length <= 2 && !leftovers(back.e).some((l) => victimRunners.some((n) => l.includes(n.slice(-8)))), 60_000, "its orphan VM to be cleaned up");

  sampling = false;
  await sampler;
  assert.deepEqual(violations, [], "maxRunners and capacity held at every sample");
  for (const d of daemons) {
    const r = await d.stop();
    assert.equal(r.code, 0, `${r.stderr}\n${d.stdout().slice(-3000)}`);
    assert.deepEqual(qemuProcessesOf(d.e), []);
    assert.deepEqual(leftovers(d.e), []);
  }
  assert.deepEqual((await pg.query<{ state: string }>("fleet", "SELECT state FROM civm.hosts ORDER BY id")).map((r) => r.state), ["stopped", "stopped", "stopped"]);
});
