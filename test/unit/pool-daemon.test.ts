// The reconciler loop against the fake GitHub with a fake VM launcher and a fake clock.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Registry } from "prom-client";
import { StateStore } from "../../src/store/index.js";
import { createGitHubAccess } from "../../src/github/app-auth.js";
import { Daemon, type LaunchOutcome, type LaunchRequest, type VmHandle, type VmLauncher, type DaemonLogger } from "../../src/pool/daemon.js";
import type { PoolSpec } from "../../src/pool/types.js";
import { startFakeGitHub, type FakeGitHub } from "../support/fake-github.js";

interface FakeVm {
  req: LaunchRequest;
  stopped: number;
  forced: boolean;
  exit(o?: Partial<LaunchOutcome>): void;
  done: boolean;
}

class FakeLauncher implements VmLauncher {
  vms: FakeVm[] = [];
  key = "img-1";
  reconciled = 0;
  /** true: stop() ends the VM at once (a guest that honours ACPI). */
  stopEnds = true;
  async imageKey(): Promise<string> {
    return this.key;
  }
  async reconcileLeftovers(): Promise<void> {
    this.reconciled++;
  }
  start(req: LaunchRequest): VmHandle {
    let resolve!: (o: LaunchOutcome) => void;
    const result = new Promise<LaunchOutcome>((r) => (resolve = r));
    const vm: FakeVm = {
      req,
      stopped: 0,
      forced: false,
      done: false,
      exit: (o = {}) => {
        if (vm.done) return;
        vm.done = true;
        resolve({ reason: "poweroff", exitCode: 0, ...o });
      },
    };
    this.vms.push(vm);
    return {
      result,
      stop: (force = false) => {
        vm.stopped++;
        vm.forced ||= force;
        if (this.stopEnds || force) vm.exit({ reason: "stopped", exitCode: 5 });
      },
    };
  }
  running(): FakeVm[] {
    return this.vms.filter((v) => !v.done);
  }
}

function pool(over: Partial<PoolSpec> = {}): PoolSpec {
  return {
    name: "linux",
    index: 0,
    maxRunners: 3,
    minRunners: 1,
    runner: {
      namePrefix: "civm-linux",
      image: { ref: "runner", kind: "stored" },
      imagePullPolicy: "IfNotPresent",
      target: { kind: "repo", owner: "rust-lang-ci", repo: "rust" },
      labels: ["linux", "x64"],
      groupId: 1,
      registration: "jit",
      workFolder: "_work",
    },
    vm: { cpus: 1, ramBytes: 256 << 20, rootDiskBytes: undefined, timeoutSeconds: 600, cmdline: undefined },
    idleTimeoutSeconds: 60,
    ...over,
  };
}

const quietLogger = (): DaemonLogger & { lines: { level: string; fields: Record<string, unknown>; msg: string }[] } => {
  const lines: { level: string; fields: Record<string, unknown>; msg: string }[] = [];
  const at = (level: string) => (fields: Record<string, unknown>, msg: string) => void lines.push({ level, fields, msg });
  return { lines, info: at("info"), warn: at("warn"), error: at("error") };
};

async function setup(t: { after: (fn: () => Promise<void> | void) => void }, pools: PoolSpec[] = [pool()], store = new StateStore(":memory:")) {
  const gh: FakeGitHub = await startFakeGitHub();
  t.after(() => gh.close());
  let clock = 1_000_000;
  const launcher = new FakeLauncher();
  const logger = quietLogger();
  const registry = new Registry();
  const access = createGitHubAccess({ kind: "token", token: gh.validToken }, { baseUrl: gh.url, throttle: false, retries: 0, warn: () => {} });
  const daemon = new Daemon({ pools, store, access, launcher, logger, registry, now: () => clock, pollIntervalMs: 60_000, shutdownTimeoutMs: 2_000, registrationTimeoutMs: 300_000 });
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
  await new Promise((r) => setTimeout(r, 300));
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
