// The reconciler loop against the fake GitHub with a fake VM launcher and a fake clock.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Registry } from "prom-client";
import { StateStore } from "../../src/store/index.js";
import { createGitHubAccess } from "../../src/github/app-auth.js";
import { Daemon, type DaemonLogger } from "../../src/pool/daemon.js";
import type { PoolSpec } from "../../src/pool/types.js";
import { startFakeGitHub, type FakeGitHub } from "../support/fake-github.js";
import { poolSpec } from "../support/pool-spec.js";
import { waitFor } from "../support/civm-cli.js";
import { FakeLauncher, type FakeVm } from "../support/fake-launcher.js";

const pool = poolSpec;

const quietLogger = (): DaemonLogger & { lines: { level: string; fields: Record<string, unknown>; msg: string }[] } => {
  const lines: { level: string; fields: Record<string, unknown>; msg: string }[] = [];
  const at = (level: string) => (fields: Record<string, unknown>, msg: string) => void lines.push({ level, fields, msg });
  return { lines, info: at("info"), warn: at("warn"), error: at("error") };
};

async function setup(t: { after: (fn: () => Promise<void> | void) => void }, pools: PoolSpec[] = [pool()], store = new StateStore(":memory:"), tickMs?: number) {
  const gh: FakeGitHub = await startFakeGitHub();
  t.after(() => gh.close());
  let clock = 1_000_000;
  const launcher = new FakeLauncher();
  const logger = quietLogger();
  const registry = new Registry();
  const access = createGitHubAccess({ kind: "token", token: gh.validToken }, { baseUrl: gh.url, throttle: false, retries: 0, warn: () => {} });
  const daemon = new Daemon({ pools, store, access, launcher, logger, registry, now: () => clock, pollIntervalMs: 60_000, shutdownTimeoutMs: 2_000, registrationTimeoutMs: 300_000, apiUrl: gh.url, tickMs });
  const settle = () => daemon.settled();
  return { gh, store, launcher, logger, registry, daemon, settle, advance: (ms: number) => (clock += ms), now: () => clock };
}

test("minRunners boot with a fresh JIT config each; online → idle; a queued job starts another, capped by maxRunners", async (t) => {
  const { gh, store, launcher, daemon, advance, registry } = await setup(t);
  await daemon.recover();
  assert.equal(launcher.reconciled, 1);
  await daemon.pass();
  assert.equal(launcher.vms.length, 1);
  const [first] = launcher.vms;
  const req = first!.req;
  assert.match(req.name, /^civm-linux-[0-9a-f]{8}$/);
  assert.equal(req.name, `civm-linux-${req.id}`);
  const cfg = req.config as { runner: string; jitconfig: string; pool: string };
  assert.equal(cfg.runner, "github");
  assert.equal(cfg.pool, "linux");
  const ghRunner = gh.runner(req.name)!;
  assert.equal(cfg.jitconfig, ghRunner.encodedJitConfig);
  assert.deepEqual(req.secrets, [cfg.jitconfig]);
  assert.deepEqual(ghRunner.labels, ["self-hosted", "linux", "x64"]);
  assert.equal(store.vm(req.id)?.state, "starting");
  assert.equal(store.vm(req.id)?.githubRunnerId, ghRunner.id);

  // Still starting (runner offline): nothing more starts.
  advance(5_000);
  await daemon.pass();
  assert.equal(launcher.vms.length, 1);
  gh.setRunner(req.name, { status: "online" });
  advance(5_000);
  await daemon.pass();
  assert.equal(store.vm(req.id)?.state, "idle");

  for (let i = 0; i < 5; i++) store.upsertJob({ id: 100 + i, labels: ["linux"], status: "queued", at: 1, pool: "linux", repository: "rust-lang-ci/rust" });
  await daemon.pass();
  assert.equal(launcher.vms.length, 3, "maxRunners caps VMs");
  const names = new Set(launcher.vms.map((v) => v.req.name));
  assert.equal(names.size, 3);
  assert.equal(new Set(launcher.vms.map((v) => (v.req.config as { jitconfig: string }).jitconfig)).size, 3, "a fresh JIT config per VM");
  assert.match(await registry.metrics(), /civm_pool_desired_runners\{pool="linux"\} 3/);
  assert.match(await registry.metrics(), /civm_pool_queued_jobs\{pool="linux"\} 5/);
});

test("a wake while a pass runs is not lost: the loop runs again at once instead of sleeping a tick", async (t) => {
  const { launcher, daemon } = await setup(t, [pool()], new StateStore(":memory:"), 600_000);
  let release!: () => void;
  launcher.gate = new Promise<void>((r) => (release = r));
  await daemon.start();
  t.after(() => daemon.shutdown());
  await waitFor(() => launcher.imageKeyCalls >= 1, 10_000, "the first pass to ask for the image");
  assert.equal(daemon.loopPasses, 0, "the first pass is held open");
  daemon.wake(); // a webhook arrives mid-pass
  launcher.gate = undefined;
  release();
  // The tick is 600 s: a second pass within 10 s comes only from the remembered wake.
  await waitFor(() => daemon.loopPasses >= 2, 10_000, "a second pass (the wake was lost until the next tick)");
  assert.equal(launcher.imageKeyCalls, 2);
});

test("busy from the runners API; a busy runner is never stopped; its VM exit deregisters the runner and the pool returns to minRunners", async (t) => {
  const { gh, store, launcher, daemon, advance, settle } = await setup(t, [pool({ minRunners: 1, idleTimeoutSeconds: 0 })]);
  await daemon.pass();
  const a = launcher.vms[0]!;
  gh.setRunner(a.req.name, { status: "online" });
  advance(1000);
  await daemon.pass({ poll: true });
  assert.equal(store.vm(a.req.id)?.state, "idle");
  // A job arrives and GitHub gives it to runner a.
  store.upsertJob({ id: 7, labels: ["linux"], status: "queued", at: 1, pool: "linux", repository: "rust-lang-ci/rust" });
  gh.setRunner(a.req.name, { busy: true });
  advance(1000);
  await daemon.pass({ poll: true });
  assert.equal(store.vm(a.req.id)?.state, "busy");
  // The job list on GitHub is empty, so the poll closes job 7 as not queued: desired = 1 + busy 1.
  assert.equal(launcher.vms.length, 2);
  const b = launcher.vms[1]!;
  // Pausing stops idle/starting-none... the busy one is untouched.
  store.setPaused("linux", true);
  gh.setRunner(b.req.name, { status: "online" });
  advance(1000);
  await daemon.pass({ poll: true });
  assert.equal(a.stopped, 0, "a busy runner was asked to stop");
  assert.equal(b.stopped, 1, "the idle runner of a paused pool stops");
  await settle();
  assert.equal(store.vm(b.req.id)?.state, "finished");
  assert.equal(store.vm(b.req.id)?.exitReason, "stopped:paused");
  assert.equal(gh.runner(b.req.name), undefined, "stopped runner deregistered");
  store.setPaused("linux", false);

  // The job ends; the ephemeral runner exits; GitHub (the fake) still lists it offline.
  gh.setRunner(a.req.name, { busy: false, status: "offline" });
  a.exit();
  await settle();
  assert.equal(store.vm(a.req.id)?.state, "finished");
  assert.equal(store.vm(a.req.id)?.exitReason, "poweroff");
  assert.equal(gh.runner(a.req.name), undefined, "runner deregistered after its VM exited");
  assert.ok(gh.requests.some((r) => r.method === "DELETE" && r.path.endsWith(`/runners/${store.vm(a.req.id)?.githubRunnerId}`)));
  advance(1000);
  await daemon.pass();
  assert.equal(store.vms({ live: true }).length, 1, "back to minRunners");
});

test("an idle runner above desired stops after idleTimeout (never before); never one GitHub says is busy", async (t) => {
  const { gh, store, launcher, daemon, advance, settle } = await setup(t, [pool({ minRunners: 0, idleTimeoutSeconds: 60 })]);
  await daemon.pass(); // the first pass polls GitHub (no queued jobs there)
  store.upsertJob({ id: 1, labels: ["x64"], status: "queued", at: 1, pool: "linux", repository: "rust-lang-ci/rust" });
  store.upsertJob({ id: 2, labels: ["x64"], status: "queued", at: 1, pool: "linux", repository: "rust-lang-ci/rust" });
  await daemon.pass();
  assert.equal(launcher.vms.length, 2);
  for (const v of launcher.vms) gh.setRunner(v.req.name, { status: "online" });
  // The jobs are cancelled: webhook completed.
  store.upsertJob({ id: 1, labels: ["x64"], status: "completed", at: 2 });
  store.upsertJob({ id: 2, labels: ["x64"], status: "completed", at: 2 });
  advance(1000);
  await daemon.pass();
  assert.deepEqual(launcher.vms.map((v) => v.stopped), [0, 0]);
  advance(30_000);
  await daemon.pass();
  assert.deepEqual(launcher.vms.map((v) => v.stopped), [0, 0], "stopped before idleTimeout");
  // GitHub just assigned runner 0 a job (no webhook yet): it must not be stopped.
  gh.setRunner(launcher.vms[0]!.req.name, { busy: true });
  advance(31_000);
  await daemon.pass();
  assert.deepEqual(launcher.vms.map((v) => v.stopped), [0, 1]);
  await settle();
  assert.equal(store.vm(launcher.vms[0]!.req.id)?.state, "busy");
  assert.equal(store.vm(launcher.vms[1]!.req.id)?.exitReason, "stopped:idle-timeout");
});

test("failed boots back off (5 s, 10 s, ...) and mark the pool degraded; an online runner clears it", async (t) => {
  const { gh, store, launcher, daemon, advance, settle, registry } = await setup(t);
  await daemon.pass();
  launcher.vms[0]!.exit({ reason: "qemu-failed", exitCode: 4, detail: "no kernel" });
  await settle();
  assert.equal(store.pool("linux").failures, 1);
  assert.equal(store.vm(launcher.vms[0]!.req.id)?.exitReason, "qemu-failed");
  assert.equal(gh.state.runners.size, 0, "the never-online runner was deregistered");
  await daemon.pass();
  assert.equal(launcher.vms.length, 1, "backing off");
  advance(5_000);
  await daemon.pass();
  assert.equal(launcher.vms.length, 2);
  launcher.vms[1]!.exit({ reason: "qemu-failed", exitCode: 4 });
  await settle();
  advance(10_000);
  await daemon.pass();
  launcher.vms[2]!.exit({ reason: "reboot", exitCode: 6 });
  await settle();
  assert.equal(store.pool("linux").failures, 3);
  advance(19_000);
  await daemon.pass();
  assert.equal(launcher.vms.length, 3, "still backing off (20 s)");
  assert.match(await registry.metrics(), /civm_pool_degraded\{pool="linux"\} 1/);
  advance(1_000);
  await daemon.pass();
  assert.equal(launcher.vms.length, 4);
  gh.setRunner(launcher.vms[3]!.req.name, { status: "online" });
  advance(1_000);
  await daemon.pass();
  assert.equal(store.pool("linux").failures, 0);
});

test("JIT config failure counts as a failure and starts nothing", async (t) => {
  const { gh, store, launcher, daemon } = await setup(t);
  gh.respondWith(/generate-jitconfig$/, 500, undefined, { times: 1 });
  await daemon.pass();
  assert.equal(launcher.vms.length, 0);
  assert.equal(store.pool("linux").failures, 1);
  assert.equal(store.vms({ live: true }).length, 0);
});

test("the poll finds a queued job whose webhook was lost", async (t) => {
  const { gh, store, launcher, daemon, advance } = await setup(t, [pool({ minRunners: 0 })]);
  await daemon.pass();
  assert.equal(launcher.vms.length, 0);
  const job = gh.addJob({ repository: "rust-lang-ci/rust", labels: ["self-hosted", "linux"] });
  advance(10_000);
  await daemon.pass();
  assert.equal(launcher.vms.length, 0, "not polled before pollInterval");
  advance(50_000);
  await daemon.pass();
  assert.equal(store.job(job.id)?.status, "queued");
  assert.equal(store.job(job.id)?.pool, "linux");
  assert.equal(launcher.vms.length, 1);
});

test("the poll gives a job only to a pool of its repository's organization (same labels in two orgs); jobs no pool covers are ignored and counted", async (t) => {
  const a = pool({ name: "a-linux", minRunners: 0, runner: { ...pool().runner, namePrefix: "civm-a", target: { kind: "org", org: "org-a" }, labels: ["linux"] } });
  const b = pool({ name: "b-linux", index: 1, minRunners: 0, runner: { ...pool().runner, namePrefix: "civm-b", target: { kind: "org", org: "org-b" }, labels: ["linux"] } });
  const sec = pool({ name: "a-secure", index: 2, minRunners: 0, runner: { ...pool().runner, namePrefix: "civm-s", target: { kind: "org", org: "org-a" }, labels: ["linux", "secure"], groupId: 5 } });
  const s = await setup(t, [a, b, sec]);
  const { gh, store, launcher, daemon, registry } = s;
  for (const o of ["org-a", "org-b"]) gh.state.orgs.add(o);
  for (const r of ["org-a/web", "org-a/api", "org-b/app", "org-b/docs"]) gh.state.repos.add(r);
  gh.addRunnerGroup("org-a", { id: 5, visibility: "selected", repositories: ["org-a/api"] });
  const jb = gh.addJob({ repository: "org-b/app", labels: ["self-hosted", "linux"] });
  const jb2 = gh.addJob({ repository: "org-b/docs", labels: ["self-hosted", "linux"] });
  const js = gh.addJob({ repository: "org-a/api", labels: ["linux", "secure"] });
  const jx = gh.addJob({ repository: "org-a/web", labels: ["linux", "secure"] });
  const jw = gh.addJob({ repository: "org-b/app", labels: ["windows"] });
  await daemon.pass({ poll: true });
  assert.equal(store.job(jb.id)?.pool, "b-linux");
  assert.equal(store.job(jb2.id)?.pool, "b-linux");
  assert.equal(store.job(js.id)?.pool, "a-secure");
  assert.equal(store.job(jx.id), undefined, "outside the runner group: no demand");
  assert.equal(store.job(jw.id), undefined);
  const started = (p: string) => launcher.vms.filter((v) => v.req.pool.name === p).length;
  assert.deepEqual([started("a-linux"), started("b-linux"), started("a-secure")], [0, 2, 1], "org B's demand starts org B's runners, none in org A's pool");
  // The next poll sees the same ignored jobs again: each is counted once.
  await daemon.pass({ poll: true });
  const m = await registry.metrics();
  assert.match(m, /civm_jobs_ignored_total\{reason="repository_not_in_runner_group"\} 1\n/);
  assert.match(m, /civm_jobs_ignored_total\{reason="no_pool_for_labels"\} 1\n/);
});

test("start-up: leftovers of a crashed run are finished; their offline runners are deleted on the next pass; other runners are left alone", async (t) => {
  const store = new StateStore(":memory:");
  const { gh, launcher, daemon, advance } = await setup(t, [pool({ minRunners: 0 })], store);
  // What a crashed civm left: a live VM record and its registration.
  store.insertVm({ id: "0badc0de", pool: "linux", name: "civm-linux-0badc0de", imageKey: "img-1", createdAt: 1 });
  const jit = (name: string) => fetch(`${gh.url}/repos/rust-lang-ci/rust/actions/runners/generate-jitconfig`, { method: "POST", headers: { authorization: `token ${gh.validToken}` }, body: JSON.stringify({ name, runner_group_id: 1, labels: ["linux"] }) });
  await jit("civm-linux-0badc0de");
  await jit("civm-linux-deadbeef"); // matches the prefix, but civm has no record of it
  await jit("someone-elses-runner");
  await daemon.recover();
  assert.equal(store.vm("0badc0de")?.state, "finished");
  assert.equal(store.vm("0badc0de")?.exitReason, "civm-restarted");
  await daemon.pass({ poll: true });
  assert.ok(gh.runner("civm-linux-0badc0de"), "marked, not deleted yet");
  advance(1000);
  await daemon.pass({ poll: true });
  assert.equal(gh.runner("civm-linux-0badc0de"), undefined, "stale runner deleted");
  assert.ok(gh.runner("civm-linux-deadbeef"), "a runner civm did not create is kept");
  assert.ok(gh.runner("someone-elses-runner"));
  assert.equal(launcher.vms.length, 0);
});

test("shutdown: idle runners stop, busy ones are waited for (then ended after the timeout), all deregistered", async (t) => {
  const { gh, store, launcher, daemon, advance } = await setup(t, [pool({ minRunners: 2 })]);
  await daemon.pass();
  const [a, b] = launcher.vms as [FakeVm, FakeVm];
  for (const v of [a, b]) gh.setRunner(v.req.name, { status: "online" });
  gh.setRunner(a.req.name, { busy: true });
  advance(1000);
  await daemon.pass({ poll: true });
  assert.equal(store.vm(a.req.id)?.state, "busy");
  assert.equal(launcher.vms.length, 3, "minRunners 2 idle on top of the busy one");
  const down = daemon.shutdown();
  await waitFor(() => b.stopped > 0 && launcher.vms[2]!.stopped > 0, 10_000, "the idle and the starting runner to be stopped");
  assert.equal(b.stopped, 1);
  assert.equal(launcher.vms[2]!.stopped, 1, "a starting runner stops too");
  assert.equal(a.stopped, 0, "busy runner left to finish");
  gh.setRunner(a.req.name, { busy: false, status: "offline" });
  a.exit();
  await down;
  assert.equal(store.vms({ live: true }).length, 0);
  assert.equal(gh.state.runners.size, 0);
  await daemon.pass();
  assert.equal(launcher.vms.length, 3, "nothing starts after shutdown");
});

test("shutdown timeout ends busy runners by force", async (t) => {
  const { gh, store, launcher, daemon, advance } = await setup(t, [pool({ minRunners: 1 })]);
  await daemon.pass();
  const a = launcher.vms[0]!;
  gh.setRunner(a.req.name, { status: "online", busy: true });
  advance(1000);
  await daemon.pass({ poll: true });
  launcher.stopEnds = false;
  const t0 = Date.now();
  await daemon.shutdown();
  assert.ok(Date.now() - t0 >= 1900, "waited for the shutdown timeout");
  assert.equal(a.forced, true);
  assert.equal(store.vm(a.req.id)?.exitReason, "stopped:shutdown");
});

/** Brings every starting VM online through the fake and runs a polling pass. */
async function online(s: { gh: FakeGitHub; launcher: FakeLauncher; daemon: Daemon; advance: (ms: number) => number }) {
  for (const v of s.launcher.running()) if (s.gh.runner(v.req.name)) s.gh.setRunner(v.req.name, { status: "online" });
  s.advance(1000);
  await s.daemon.pass({ poll: true });
}

test("reload: an added pool starts, a removed one drains (idle stop, busy finish, then gone), a changed VM setting replaces idle runners only", async (t) => {
  const arm = pool({ name: "arm", minRunners: 2, runner: { ...pool().runner, namePrefix: "civm-arm", labels: ["arm64"] } });
  const linux = pool({ minRunners: 2 });
  const s = await setup(t, [linux, arm]);
  const { gh, store, launcher, daemon, advance, settle, logger } = s;
  await daemon.pass();
  await online(s);
  const byPool = (p: string) => launcher.vms.filter((v) => v.req.pool.name === p);
  const [la, lb] = byPool("linux") as [FakeVm, FakeVm];
  const [aa, ab] = byPool("arm") as [FakeVm, FakeVm];
  gh.setRunner(la.req.name, { busy: true });
  gh.setRunner(aa.req.name, { busy: true });
  await online(s);
  assert.equal(store.vm(la.req.id)?.state, "busy");
  assert.equal(store.vm(lb.req.id)?.state, "idle");
  store.setPaused("arm", true);
  store.upsertJob({ id: 55, labels: ["gpu"], status: "queued", at: 1, repository: "rust-lang-ci/rust" });
  const started = launcher.vms.length;

  const gpu = pool({ name: "gpu", index: 1, minRunners: 1, runner: { ...pool().runner, namePrefix: "civm-gpu", labels: ["gpu"] } });
  const linux2 = pool({ minRunners: 2, vm: { ...linux.vm, cpus: 2 } });
  const changes = await daemon.reload([linux2, gpu]);
  assert.deepEqual(changes, { added: ["gpu"], removed: ["arm"], changed: [{ name: "linux", fields: ["vm.cpus"], replaceIdle: true }], unchanged: [] });
  assert.equal(store.job(55)?.pool, "gpu", "a queued job is matched to the new pools");
  assert.deepEqual(daemon.currentPools().map((p) => p.name), ["linux", "gpu"]);
  assert.deepEqual(daemon.removingPools().map((p) => p.name), ["arm"]);
  advance(1000);
  await daemon.pass();
  await settle();
  assert.equal(la.stopped + aa.stopped, 0, "busy runners are never stopped");
  assert.equal(store.vm(lb.req.id)?.exitReason, "stopped:config-change");
  assert.equal(store.vm(ab.req.id)?.exitReason, "stopped:pool-removed");
  assert.equal(gh.runner(ab.req.name), undefined, "the removed pool's idle runner is deregistered");
  advance(1000);
  await daemon.pass(); // the stopped runner's slot is free now
  const fresh = launcher.vms.slice(started);
  assert.equal(fresh.filter((v) => v.req.pool.name === "gpu").length, 2, "the new pool: minRunners 1 + the queued job");
  const newLinux = fresh.filter((v) => v.req.pool.name === "linux");
  assert.ok(newLinux.length >= 1 && newLinux.every((v) => v.req.pool.vm.cpus === 2), "replacements start with the new settings");
  assert.equal(fresh.filter((v) => v.req.pool.name === "arm").length, 0, "nothing starts in a removed pool");
  assert.deepEqual(daemon.removingPools().map((p) => p.name), ["arm"], "still there while its busy runner works");

  // The busy runners finish on their old settings; the removed pool is then gone.
  for (const v of [la, aa]) gh.setRunner(v.req.name, { busy: false, status: "offline" });
  la.exit();
  aa.exit();
  await settle();
  assert.equal(gh.runner(aa.req.name), undefined, "deregistered with the settings it started with");
  advance(1000);
  await daemon.pass();
  assert.deepEqual(daemon.removingPools(), []);
  assert.equal(store.pool("arm").paused, false, "the removed pool's state is forgotten");
  assert.ok(logger.lines.some((l) => l.msg.includes("removed pool has no runners left") && l.fields.pool === "arm"));
});

test("reload: min/max/idleTimeout changes apply without replacing runners; re-adding a pool being removed keeps it", async (t) => {
  const s = await setup(t, [pool({ minRunners: 1 })]);
  const { store, launcher, daemon, advance } = s;
  await daemon.pass();
  await online(s);
  const first = launcher.vms[0]!;
  const changes = await daemon.reload([pool({ minRunners: 2, maxRunners: 5, idleTimeoutSeconds: 10 })]);
  assert.deepEqual(changes.changed, [{ name: "linux", fields: ["maxRunners", "minRunners", "idleTimeoutSeconds"], replaceIdle: false }]);
  advance(1000);
  await daemon.pass();
  assert.equal(first.stopped, 0);
  assert.equal(launcher.vms.length, 2, "minRunners 2 applies");
  assert.equal(store.vm(first.req.id)?.state, "idle");
  await daemon.reload([]);
  assert.deepEqual(daemon.removingPools().map((p) => p.name), ["linux"]);
  const back = await daemon.reload([pool({ minRunners: 2, maxRunners: 5, idleTimeoutSeconds: 10 })]);
  assert.deepEqual(back.added, ["linux"]);
  assert.deepEqual(daemon.removingPools(), []);
  advance(1000);
  await daemon.pass();
  assert.equal(first.stopped, 0, "a pool re-added before it was gone keeps its runners");
});

test("an image rebuilt in the store (new image key) replaces idle runners; a busy one finishes on the old image", async (t) => {
  const s = await setup(t, [pool({ minRunners: 2 })]);
  const { gh, store, launcher, daemon, advance, settle } = s;
  await daemon.pass();
  await online(s);
  const [a, b] = launcher.vms as [FakeVm, FakeVm];
  gh.setRunner(a.req.name, { busy: true });
  await online(s);
  const before = launcher.vms.length;
  launcher.key = "img-2";
  advance(1000);
  await daemon.pass();
  await settle();
  assert.equal(a.stopped, 0, "the busy runner keeps its old image");
  assert.equal(store.vm(b.req.id)?.exitReason, "stopped:image-change");
  advance(1000);
  await daemon.pass();
  const fresh = launcher.vms.slice(before).map((v) => store.vm(v.req.id)!);
  assert.ok(fresh.length >= 1 && fresh.every((v) => v.imageKey === "img-2"));
  assert.equal(store.vm(a.req.id)?.imageKey, "img-1");
});

test("drain: nothing new starts, idle and starting runners stop, busy ones finish; drained; undrain takes work again; exit once drained if asked", async (t) => {
  let drained = 0;
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  let clock = 1_000_000;
  const launcher = new FakeLauncher();
  const store = new StateStore(":memory:");
  const access = createGitHubAccess({ kind: "token", token: gh.validToken }, { baseUrl: gh.url, throttle: false, retries: 0, warn: () => {} });
  const daemon = new Daemon({ pools: [pool({ minRunners: 2 })], store, access, launcher, logger: quietLogger(), registry: new Registry(), now: () => clock, pollIntervalMs: 60_000, shutdownTimeoutMs: 2_000, onDrained: () => drained++ });
  const s = { gh, launcher, daemon, advance: (ms: number) => (clock += ms) };
  await daemon.pass();
  await online(s);
  const [a, b] = launcher.vms as [FakeVm, FakeVm];
  gh.setRunner(a.req.name, { busy: true });
  await online(s);
  const c = launcher.vms[2]!; // starting: minRunners 2 idle on top of the busy one
  assert.equal(store.vm(c.req.id)?.state, "starting");
  assert.equal((await daemon.status()).state, "serving");

  const st = (await daemon.drain());
  assert.equal(st.state, "draining");
  assert.equal(st.exitWhenDrained, false);
  store.upsertJob({ id: 9, labels: ["linux"], status: "queued", at: 1, pool: "linux", repository: "rust-lang-ci/rust" });
  s.advance(1000);
  await daemon.pass();
  await daemon.settled();
  assert.equal(a.stopped, 0, "busy runner finishes");
  assert.equal(store.vm(b.req.id)?.exitReason, "stopped:drain");
  assert.equal(store.vm(c.req.id)?.exitReason, "stopped:drain");
  assert.equal(launcher.vms.length, 3, "nothing new starts while draining, queued job or not");
  assert.deepEqual((await daemon.status()).runners, { starting: 0, idle: 0, busy: 1 });
  assert.equal((await daemon.status()).state, "draining");

  gh.setRunner(a.req.name, { busy: false, status: "offline" });
  a.exit();
  await daemon.settled();
  s.advance(1000);
  await daemon.pass();
  assert.equal((await daemon.status()).state, "drained");
  assert.equal(drained, 0, "not asked to exit: keeps serving");
  assert.equal((await daemon.undrain()).state, "serving");
  await daemon.pass();
  assert.equal(launcher.vms.length, 6, "undrained: minRunners 2 + the queued job");

  // Drain again, this time asking to exit once drained.
  const st2 = (await daemon.drain({ exitWhenDrained: true }));
  assert.equal(st2.exitWhenDrained, true);
  await daemon.pass();
  await daemon.settled();
  await daemon.pass();
  assert.equal((await daemon.status()).state, "drained");
  assert.equal(drained, 1);
  await daemon.pass();
  assert.equal(drained, 1, "onDrained is called once");
  assert.equal((await daemon.undrain()).state, "drained", "too late to cancel once exiting");
});

test("registration token mode: the VM gets a registration token, the URL and the exact runner name; the runner id is learnt by name; deregistered by name", async (t) => {
  const tokenPool = pool({ minRunners: 1, runner: { ...pool().runner, registration: "token" } });
  const s = await setup(t, [tokenPool]);
  const { gh, store, launcher, daemon, settle } = s;
  await daemon.pass();
  assert.equal(launcher.vms.length, 1);
  const req = launcher.vms[0]!.req;
  assert.equal(req.name, `civm-linux-${req.id}`);
  assert.deepEqual(req.config, {
    runner: "github",
    token: gh.registrationToken,
    repo: `${gh.url}/rust-lang-ci/rust`,
    runner_name: req.name,
    labels: ["self-hosted", "linux", "x64"],
    pool: "linux",
  });
  assert.deepEqual(req.secrets, [gh.registrationToken]);
  assert.equal(gh.state.issued["rust-lang-ci/rust"], 1);
  assert.ok(!gh.requests.some((r) => r.path.endsWith("generate-jitconfig")), "no JIT config in token mode");
  assert.equal(store.vm(req.id)?.githubRunnerId, undefined, "unknown until the runner registers");

  // config.sh in the guest registers the runner under the exact name.
  const id = gh.state.nextRunnerId++;
  gh.state.runners.set(id, { id, name: req.name, owner: "repo:rust-lang-ci/rust", os: "Linux", status: "online", busy: false, labels: ["self-hosted", "linux", "x64"], runnerGroupId: 1, workFolder: undefined, encodedJitConfig: undefined });
  s.advance(1000);
  await daemon.pass();
  assert.equal(store.vm(req.id)?.githubRunnerId, id);
  assert.equal(store.vm(req.id)?.state, "idle");

  launcher.vms[0]!.exit({ reason: "poweroff" });
  await settle();
  assert.equal(gh.runner(req.name), undefined, "deregistered");

  // A VM that ends before the daemon saw its runner: found by name in the runners list.
  await daemon.pass();
  const req2 = launcher.vms[1]!.req;
  const id2 = gh.state.nextRunnerId++;
  gh.state.runners.set(id2, { id: id2, name: req2.name, owner: "repo:rust-lang-ci/rust", os: "Linux", status: "offline", busy: false, labels: [], runnerGroupId: 1, workFolder: undefined, encodedJitConfig: undefined });
  launcher.vms[1]!.exit({ reason: "timeout" });
  await settle();
  assert.equal(gh.runner(req2.name), undefined, "deregistered by name");
  assert.equal(store.vm(req2.id)?.githubRunnerId, id2);
});

test("registration token mode: an org pool in another runner group passes the group's name (config.sh takes names); a token failure backs off", async (t) => {
  const orgPool = pool({ minRunners: 1, runner: { ...pool().runner, registration: "token", target: { kind: "org", org: "rust-lang-ci" }, groupId: 7 } });
  const s = await setup(t, [orgPool]);
  const { gh, store, launcher, daemon } = s;
  gh.respondWith(/\/orgs\/rust-lang-ci\/actions\/runner-groups\/7$/, 200, { id: 7, name: "big machines" }, { method: "GET" });
  gh.respondWith(/registration-token$/, 500, undefined, { times: 1 });
  await daemon.pass();
  assert.equal(launcher.vms.length, 0);
  assert.equal(store.pool("linux").failures, 1);
  assert.equal(store.vms()[0]?.exitReason, "token-failed");
  s.advance(5_000);
  await daemon.pass();
  const cfg = launcher.vms[0]!.req.config as Record<string, unknown>;
  assert.equal(cfg.runnergroup, "big machines");
  assert.equal(cfg.repo, `${gh.url}/rust-lang-ci`);
});

test("reload with new GitHub credentials: the daemon uses them from then on", async (t) => {
  const s = await setup(t, [pool({ minRunners: 1 })]);
  const { gh, store, launcher, daemon, advance } = s;
  gh.state.token = "ghp_rotatedToken0123456789"; // the old token is revoked
  await daemon.pass();
  assert.equal(launcher.vms.length, 0);
  assert.equal(store.pool("linux").failures, 1);
  const access = createGitHubAccess({ kind: "token", token: "ghp_rotatedToken0123456789" }, { baseUrl: gh.url, throttle: false, retries: 0, warn: () => {} });
  const changes = await daemon.reload([pool({ minRunners: 1 })], { access });
  assert.deepEqual(changes.unchanged, ["linux"]);
  advance(5_000);
  await daemon.pass();
  assert.equal(launcher.vms.length, 1);
  assert.ok(gh.runner(launcher.vms[0]!.req.name));
});
