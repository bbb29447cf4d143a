// The `civm serve` reconciler: for each pool it computes what should run (plan.ts), starts
// runner VMs through a VmLauncher (VmRun in production, a fake in unit tests) with a fresh
// single-use JIT config each, follows their state (starting → idle → busy → finished) from
// webhooks (server/) and the runners API, deregisters runners when their VM ends, backs off
// after failed boots, polls queued jobs (lost webhooks), and cleans up after a crash.
// Clock, logger, metrics registry, GitHub access and launcher are injected.
import { randomBytes } from "node:crypto";
import { Counter, Gauge, type Registry } from "prom-client";
import type { JsonValue } from "../config/types.js";
import { messageOf } from "../errors/index.js";
import type { GitHubAccess } from "../github/app-auth.js";
import { listQueuedJobs, targetRepositories } from "../github/jobs.js";
import type { RunnerTarget } from "../github/registration-token.js";
import { deleteRunner, generateJitConfig, getRunner, listRunners, type RunnerInfo } from "../github/runners.js";
import type { StateStore, VmRecord } from "../store/index.js";
import { registrationLabels } from "./labels.js";
import { backoffState, DEFAULT_BACKOFF, matchPool, planPool, planShutdown, type BackoffOptions, type RunnerView, type StopReason } from "./plan.js";
import type { PoolSpec } from "./types.js";

/** pino-compatible subset: structured fields first, then the message. */
export interface DaemonLogger {
  info(fields: Record<string, unknown>, msg: string): void;
  warn(fields: Record<string, unknown>, msg: string): void;
  error(fields: Record<string, unknown>, msg: string): void;
}

export interface LaunchRequest {
  /** 8 hex digits: the VM id (also the runner name's suffix). */
  id: string;
  /** Runner name `<runner.name>-<id>`. */
  name: string;
  pool: PoolSpec;
  /** instance.json's config: {"runner":"github","jitconfig":"...","pool":"..."}. */
  config: JsonValue;
  /** Values to redact from anything printed (the JIT config). */
  secrets: string[];
}

export interface LaunchOutcome {
  /** Why the VM ended (VmResult.reason: poweroff, timeout, stopped, qemu-failed, ...). */
  reason: string;
  exitCode: number;
  detail?: string | undefined;
}

export interface VmHandle {
  /** Ask the VM to stop (ACPI, then grace, then kill); force ends it now. */
  stop(force?: boolean): void;
  /** Settles once the VM has ended and its resources are released. */
  result: Promise<LaunchOutcome>;
}

/** What the daemon needs to run VMs; VmRunLauncher (launcher.ts) backs it in production. */
export interface VmLauncher {
  /** Identity of the image a new VM of the pool would boot now (image-change detection). */
  imageKey(pool: PoolSpec): Promise<string>;
  start(req: LaunchRequest): VmHandle;
  /** At start-up: end orphan QEMU processes and remove stale work dirs of a previous run. */
  reconcileLeftovers?(): Promise<void>;
}

export interface DaemonOptions {
  pools: readonly PoolSpec[];
  store: StateStore;
  access: GitHubAccess;
  launcher: VmLauncher;
  logger: DaemonLogger;
  registry: Registry;
  now?: () => number;
  /** Between polls of queued jobs and runners (ms). */
  pollIntervalMs: number;
  /** SIGTERM: how long to wait for busy runners (ms). */
  shutdownTimeoutMs: number;
  /** Local passes (no GitHub list calls unless VMs are starting) this often (ms; default 5000). */
  tickMs?: number;
  /** A VM whose runner is not online after this long is stopped and counted a failure (default 10 min). */
  registrationTimeoutMs?: number;
  backoff?: BackoffOptions;
}

const RUNNER_NAME_SUFFIX = /-[0-9a-f]{8}$/;

interface Live {
  handle: VmHandle;
  pool: string;
  stopReason?: StopReason | "registration-timeout";
}

function targetKey(t: RunnerTarget): string {
  return (t.kind === "org" ? `org:${t.org}` : `repo:${t.owner}/${t.repo}`).toLowerCase();
}

export class Daemon {
  private readonly now: () => number;
  private readonly log: DaemonLogger;
  private readonly live = new Map<string, Live>();
  private readonly exits = new Set<Promise<void>>();
  /** Exit handlers that are running (their VM has ended). */
  private readonly exitedSoFar = new Set<Promise<void>>();
  /** Runners civm created that looked stale on the last pass: runner id → first seen. */
  private readonly staleMarks = new Map<number, number>();
  private nextPollAt = 0;
  private draining = false;
  private stopped = false;
  private wakeUp: (() => void) | undefined;
  private loopDone: Promise<void> | undefined;
  private readonly backoff: BackoffOptions;
  private readonly metrics: { runners: Gauge; desired: Gauge; starts: Counter; exits: Counter; health: Gauge };

  constructor(private readonly opts: DaemonOptions) {
    this.now = opts.now ?? Date.now;
    this.log = opts.logger;
    this.backoff = opts.backoff ?? DEFAULT_BACKOFF;
    const registers = [opts.registry];
    this.metrics = {
      runners: new Gauge({ name: "civm_pool_runners", help: "Runner VMs by pool and state", labelNames: ["pool", "state"], registers }),
      desired: new Gauge({ name: "civm_pool_desired_runners", help: "Runner VMs the pool should have", labelNames: ["pool"], registers }),
      health: new Gauge({ name: "civm_pool_degraded", help: "1 when the pool is degraded (repeated boot failures)", labelNames: ["pool"], registers }),
      starts: new Counter({ name: "civm_vm_starts_total", help: "Runner VM starts by pool and result", labelNames: ["pool", "result"], registers }),
      exits: new Counter({ name: "civm_vm_exits_total", help: "Runner VM exits by pool and reason", labelNames: ["pool", "reason"], registers }),
    };
  }

  /** Webhook or API changed something: run a pass soon. */
  wake(): void {
    this.wakeUp?.();
  }

  /** Start-up reconciliation, then the loop (in the background). */
  async start(): Promise<void> {
    await this.recover();
    this.loopDone = this.loop();
  }

  private async loop(): Promise<void> {
    while (!this.draining) {
      try {
        await this.pass();
      } catch (e) {
        this.log.error({ err: messageOf(e) }, "reconcile pass failed");
      }
      if (this.draining) break;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, this.opts.tickMs ?? 5000);
        this.wakeUp = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wakeUp = undefined;
    }
  }

  /**
   * After a crash: orphan QEMU and work dirs (launcher), VMs the store thinks are live but
   * no process runs (finished as "civm-restarted"); their runners become stale candidates.
   */
  async recover(): Promise<void> {
    await this.opts.launcher.reconcileLeftovers?.();
    for (const vm of this.opts.store.vms({ live: true })) {
      if (this.live.has(vm.id)) continue;
      this.opts.store.markFinished(vm.id, "civm-restarted", this.now());
      this.log.warn({ pool: vm.pool, vm: vm.id, runner: vm.name }, "VM of a previous civm run is gone; its runner will be removed if GitHub still lists it");
    }
  }

  private poolSpec(name: string): PoolSpec | undefined {
    return this.opts.pools.find((p) => p.name === name);
  }

  private targets(): { key: string; target: RunnerTarget; pools: PoolSpec[] }[] {
    const m = new Map<string, { key: string; target: RunnerTarget; pools: PoolSpec[] }>();
    for (const p of this.opts.pools) {
      const key = targetKey(p.runner.target);
      const e = m.get(key) ?? { key, target: p.runner.target, pools: [] };
      e.pools.push(p);
      m.set(key, e);
    }
    return [...m.values()];
  }

  /** One reconciliation pass. `poll` forces the GitHub poll (queued jobs, runners). */
  async pass(opts: { poll?: boolean } = {}): Promise<void> {
    if (this.draining) return;
    const now = this.now();
    const pollDue = opts.poll === true || now >= this.nextPollAt;
    if (pollDue) this.nextPollAt = now + this.opts.pollIntervalMs;
    for (const t of this.targets()) {
      const names = new Set(t.pools.map((p) => p.name));
      const starting = this.opts.store.vms({ live: true, state: "starting" }).some((v) => names.has(v.pool));
      try {
        if (pollDue || starting) await this.syncRunners(t.target, t.pools);
        if (pollDue) await this.pollJobs(t.target);
      } catch (e) {
        this.log.warn({ target: t.key, err: messageOf(e) }, "GitHub poll failed");
      }
    }
    for (const pool of this.opts.pools) {
      if (this.draining) return;
      await this.reconcilePool(pool);
    }
  }

  private async reconcilePool(pool: PoolSpec): Promise<void> {
    const { store } = this.opts;
    const now = this.now();
    const st = store.pool(pool.name);
    const vms = store.vms({ pool: pool.name, live: true });
    let imageKey: string;
    try {
      imageKey = await this.opts.launcher.imageKey(pool);
    } catch (e) {
      this.log.error({ pool: pool.name, err: messageOf(e) }, "pool image unavailable");
      store.recordFailure(pool.name, now);
      return;
    }
    const views: RunnerView[] = vms.map((v) => ({ id: v.id, state: v.state, imageKey: v.imageKey, ...(v.idleSince !== undefined ? { idleSince: v.idleSince } : {}) }));
    const { retryAt, health } = backoffState(st, this.backoff);
    const queued = store.jobs({ status: "queued", pool: pool.name }).length;
    const plan = planPool({
      pool: { name: pool.name, minRunners: st.minRunnersOverride ?? pool.minRunners, maxRunners: pool.maxRunners, idleTimeoutSeconds: pool.idleTimeoutSeconds, paused: st.paused, imageKey },
      queued,
      runners: views,
      now,
      ...(retryAt !== undefined ? { retryAt } : {}),
    });
    this.metrics.desired.set({ pool: pool.name }, plan.desired);
    this.metrics.health.set({ pool: pool.name }, health === "degraded" ? 1 : 0);
    for (const s of plan.stop) await this.stopVm(s.id, s.reason);
    for (let i = 0; i < plan.start; i++) {
      if (this.draining || !(await this.startVm(pool, imageKey))) break;
    }
    const after = store.vms({ pool: pool.name, live: true });
    for (const state of ["starting", "idle", "busy"] as const) this.metrics.runners.set({ pool: pool.name, state }, after.filter((v) => v.state === state).length);
  }

  private async startVm(pool: PoolSpec, imageKey: string): Promise<boolean> {
    const { store } = this.opts;
    const id = randomBytes(4).toString("hex");
    const name = `${pool.runner.namePrefix}-${id}`;
    const fields = { pool: pool.name, vm: id, runner: name };
    store.insertVm({ id, pool: pool.name, name, imageKey, createdAt: this.now() });
    let jit;
    try {
      const client = await this.opts.access.client(pool.runner.target);
      jit = await generateJitConfig(client, pool.runner.target, { name, runnerGroupId: pool.runner.groupId, labels: registrationLabels(pool.runner.labels), workFolder: pool.runner.workFolder });
    } catch (e) {
      store.markFinished(id, "jit-failed", this.now());
      const st = store.recordFailure(pool.name, this.now());
      this.metrics.starts.inc({ pool: pool.name, result: "jit-failed" });
      this.log.error({ ...fields, failures: st.failures, err: messageOf(e) }, "could not get a JIT runner config");
      return false;
    }
    store.setRunnerId(id, jit.runnerId);
    let handle: VmHandle;
    try {
      handle = this.opts.launcher.start({ id, name, pool, config: { runner: "github", jitconfig: jit.encodedJitConfig, pool: pool.name }, secrets: [jit.encodedJitConfig] });
    } catch (e) {
      handle = { stop: () => {}, result: Promise.reject(e) };
    }
    this.live.set(id, { handle, pool: pool.name });
    this.metrics.starts.inc({ pool: pool.name, result: "started" });
    this.log.info({ ...fields, runnerId: jit.runnerId }, "runner VM starting");
    let done: Promise<void> = Promise.resolve();
    done = handle.result
      .then(
        (o) => {
          this.exitedSoFar.add(done);
          return this.onExit(id, o);
        },
        (e: unknown) => {
          this.exitedSoFar.add(done);
          return this.onExit(id, { reason: "civm-failed", exitCode: 1, detail: messageOf(e) });
        },
      )
      .catch((e: unknown) => this.log.error({ ...fields, err: messageOf(e) }, "VM exit handling failed"));
    this.exits.add(done);
    void done.finally(() => {
      this.exits.delete(done);
      this.exitedSoFar.delete(done);
    });
    return true;
  }

  /** Stops an idle (or starting) runner's VM; asks GitHub first so a just-assigned runner is left alone. */
  private async stopVm(id: string, reason: StopReason | "registration-timeout"): Promise<void> {
    const l = this.live.get(id);
    const vm = this.opts.store.vm(id);
    if (!l || !vm || l.stopReason) return;
    if (vm.state === "busy") return;
    const pool = this.poolSpec(vm.pool);
    if (pool && vm.githubRunnerId !== undefined && vm.state === "idle") {
      try {
        const r = await getRunner(await this.opts.access.client(pool.runner.target), pool.runner.target, vm.githubRunnerId);
        if (r?.busy) {
          this.opts.store.markBusy(id, undefined, this.now());
          return;
        }
      } catch (e) {
        this.log.warn({ pool: vm.pool, vm: id, err: messageOf(e) }, "could not check the runner before stopping it; keeping it");
        return;
      }
    }
    l.stopReason = reason;
    this.log.info({ pool: vm.pool, vm: id, runner: vm.name, reason }, "stopping runner VM");
    l.handle.stop();
  }

  private async onExit(id: string, outcome: LaunchOutcome): Promise<void> {
    const { store } = this.opts;
    const l = this.live.get(id);
    this.live.delete(id);
    const vm = store.vm(id);
    if (!vm) return;
    const pool = this.poolSpec(vm.pool);
    const fields = { pool: vm.pool, vm: id, runner: vm.name, ...(vm.jobId !== undefined ? { job: vm.jobId } : {}) };
    const reason = l?.stopReason && l.stopReason !== "registration-timeout" ? `stopped:${l.stopReason}` : l?.stopReason ?? outcome.reason;
    const failed = vm.state === "starting" && (l?.stopReason === undefined || l.stopReason === "registration-timeout");
    if (failed) {
      const st = store.recordFailure(vm.pool, this.now());
      this.log.error({ ...fields, reason, failures: st.failures, ...(outcome.detail ? { detail: outcome.detail } : {}) }, "runner VM ended before its runner came online");
    }
    if (pool && vm.githubRunnerId !== undefined) await this.deregister(pool, vm);
    store.markFinished(id, reason, this.now());
    this.metrics.exits.inc({ pool: vm.pool, reason });
    this.log.info({ ...fields, reason, exitCode: outcome.exitCode }, "runner VM finished");
    this.wake();
  }

  private async deregister(pool: PoolSpec, vm: VmRecord): Promise<void> {
    if (vm.githubRunnerId === undefined) return;
    try {
      const client = await this.opts.access.client(pool.runner.target);
      const r = await getRunner(client, pool.runner.target, vm.githubRunnerId);
      if (r && (await deleteRunner(client, pool.runner.target, vm.githubRunnerId))) {
        this.log.info({ pool: pool.name, vm: vm.id, runner: vm.name, runnerId: vm.githubRunnerId }, "runner deregistered");
      }
    } catch (e) {
      // The stale-runner sweep retries on later passes.
      this.log.warn({ pool: pool.name, vm: vm.id, runner: vm.name, err: messageOf(e) }, "could not deregister the runner");
    }
  }

  /** Runner states from GitHub; stale registrations of civm's own runners are removed. */
  private async syncRunners(target: RunnerTarget, pools: PoolSpec[]): Promise<void> {
    const { store } = this.opts;
    const client = await this.opts.access.client(target);
    const runners = await listRunners(client, target);
    const byName = new Map<string, RunnerInfo>(runners.map((r) => [r.name, r]));
    const names = new Set(pools.map((p) => p.name));
    const now = this.now();
    for (const vm of store.vms({ live: true })) {
      if (!names.has(vm.pool)) continue;
      const r = byName.get(vm.name);
      if (r?.busy) store.markBusy(vm.id, undefined, now);
      else if (r?.status === "online" && vm.state === "starting") {
        store.markIdle(vm.id, now);
        store.clearFailures(vm.pool);
        this.log.info({ pool: vm.pool, vm: vm.id, runner: vm.name }, "runner online (idle)");
      } else if (vm.state === "starting" && now - vm.createdAt > (this.opts.registrationTimeoutMs ?? 600_000)) {
        await this.stopVm(vm.id, "registration-timeout");
      }
    }
    const seen = new Set<number>();
    for (const r of runners) {
      const rec = store.vmByName(r.name);
      // Only runners civm created: its name pattern, a pool prefix of this target, and a store record.
      const ours = rec && names.has(rec.pool) && RUNNER_NAME_SUFFIX.test(r.name) && pools.some((p) => r.name.startsWith(`${p.runner.namePrefix}-`));
      if (!ours || rec.state !== "finished" || this.live.has(rec.id) || r.busy || r.status !== "offline") continue;
      seen.add(r.id);
      if (!this.staleMarks.has(r.id)) {
        this.staleMarks.set(r.id, now);
        this.log.info({ pool: rec.pool, runner: r.name, runnerId: r.id }, "stale runner registration (no VM); removing it next pass if still offline");
        continue;
      }
      const p = this.poolSpec(rec.pool) as PoolSpec;
      if (await deleteRunner(client, p.runner.target, r.id)) this.log.info({ pool: rec.pool, runner: r.name, runnerId: r.id }, "stale runner deregistered");
    }
    for (const id of this.staleMarks.keys()) if (!seen.has(id)) this.staleMarks.delete(id);
  }

  /** Queued jobs from the API (a lost webhook); jobs the store has as queued but GitHub no longer does are closed. */
  private async pollJobs(target: RunnerTarget): Promise<void> {
    const { store } = this.opts;
    const started = this.now();
    const client = await this.opts.access.client(target);
    const repos = await targetRepositories(client, target);
    const queuedIds = new Set<number>();
    for (const repo of repos) {
      for (const j of await listQueuedJobs(client, repo)) {
        queuedIds.add(j.id);
        const pool = matchPool(this.opts.pools.map((p) => ({ name: p.name, labels: p.runner.labels })), j.labels)?.name;
        const old = store.job(j.id);
        store.upsertJob({ id: j.id, labels: j.labels, status: "queued", at: started, repository: j.repository, ...(pool ? { pool } : {}) });
        if (!old && pool) this.log.info({ pool, job: j.id, repository: j.repository }, "queued job found by polling");
      }
    }
    const repoSet = new Set(repos.map((r) => r.toLowerCase()));
    for (const j of store.jobs({ status: "queued" })) {
      if (queuedIds.has(j.id) || !j.repository || !repoSet.has(j.repository.toLowerCase())) continue;
      if ((j.queuedAt ?? 0) >= started) continue;
      store.upsertJob({ id: j.id, labels: j.labels, status: "completed", at: started, conclusion: "not-queued-on-github" });
    }
  }

  /** Resolves once the exit handling of every VM that has ended so far is done (tests). */
  async settled(): Promise<void> {
    await new Promise((r) => setImmediate(r));
    await Promise.allSettled([...this.exits].filter((p) => this.exitedSoFar.has(p)));
  }

  /** VMs this process runs now. */
  liveCount(): number {
    return this.live.size;
  }

  /**
   * SIGTERM: take no more work, stop idle and starting runners, wait for busy ones up to
   * shutdownTimeout, then end the rest; every runner is deregistered as its VM exits.
   */
  async shutdown(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.draining = true;
    this.wakeUp?.();
    await this.loopDone;
    const vms = this.opts.store.vms({ live: true }).filter((v) => this.live.has(v.id));
    const plan = planShutdown(vms.map((v) => ({ id: v.id, state: v.state, imageKey: v.imageKey })));
    this.log.info({ stopping: plan.stop.length, busy: plan.waitFor.length }, "shutting down: stopping idle runners, waiting for busy ones");
    for (const s of plan.stop) {
      const l = this.live.get(s.id);
      if (l && !l.stopReason) {
        l.stopReason = "shutdown";
        l.handle.stop();
      }
    }
    const deadline = Date.now() + this.opts.shutdownTimeoutMs;
    while (this.live.size > 0 && Date.now() < deadline) await Promise.race([...this.exits, new Promise((r) => setTimeout(r, 1000))]);
    if (this.live.size > 0) {
      this.log.warn({ vms: [...this.live.keys()] }, "shutdown timeout: ending busy runners");
      for (const l of this.live.values()) {
        l.stopReason ??= "shutdown";
        l.handle.stop(true);
      }
    }
    await Promise.allSettled([...this.exits]);
  }
}
