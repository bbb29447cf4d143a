// The `civm serve` reconciler: for each pool it computes what should run (plan.ts), starts
// runner VMs through a VmLauncher (VmRun in production, a fake in unit tests) with a fresh
// single-use JIT config (or a registration token) each, follows their state (starting → idle
// → busy → finished) from webhooks (server/) and the runners API, deregisters runners when
// their VM ends, backs off after failed boots, polls queued jobs (lost webhooks), cleans up
// after a crash, takes new pools on a reload, drains on request and prunes old state hourly.
// Clock, logger, metrics registry, GitHub access, launcher and store are injected. With a
// shared store (PostgreSQL) the same loop is one host of a fleet (fleet.ts: heartbeats, dead
// hosts, the store's outages): demand and pool limits are fleet-wide, runners are placed by
// claiming a slot in a transaction, and each GitHub target is polled by one host.
import { createHash, randomBytes } from "node:crypto";
import { Counter, Gauge, type Registry } from "prom-client";
import type { JsonValue } from "../config/types.js";
import { messageOf } from "../errors/index.js";
import type { GitHubAccess } from "../github/app-auth.js";
import { listQueuedJobs, targetRepositories } from "../github/jobs.js";
import type { RunnerTarget } from "../github/registration-token.js";
import { createRegistrationToken, deleteRunner, generateJitConfig, getRunner, listRunners, registrationUrl, runnerGroupName, type RunnerInfo } from "../github/runners.js";
import type { Store, VmRecord, VmState } from "../store/types.js";
import { FleetMember, LOCAL_HOST, type HostOptions } from "./fleet.js";
import { registrationLabels } from "./labels.js";
import { TargetSchedule, nextPollDelay, DEFAULT_REPO_LIST_TTL_MS, type TargetHealth } from "./github-poll.js";
import { observeVmTransition, serveMetrics } from "./metrics.js";
import { JobRouter, routable } from "./routing.js";
import { backoffState, DEFAULT_BACKOFF, planPool, planShutdown, type BackoffOptions, type RunnerView, type StopReason } from "./plan.js";
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
  /**
   * instance.json's config: {"runner":"github","jitconfig":"...","pool":"..."}, or for
   * registration "token" {"runner":"github","token","repo" (URL),"runner_name","labels",
   * "runnergroup"?,"pool"} (the guest agent's config.sh path).
   */
  config: JsonValue;
  /** Values to redact from anything printed (the JIT config or registration token). */
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
  store: Store;
  /** This host: id, capacity, heartbeat and dead-host timing (default: one host, no capacity limit). */
  host?: HostOptions;
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
  /** The GitHub API URL (registration URLs for config.sh derive from it); default https://api.github.com. */
  apiUrl?: string;
  /** Called once when a drain asked to exit has no VM left. */
  onDrained?: () => void;
  /** Finished VMs, completed jobs and webhook deliveries older than this are pruned (ms; default 7 days). */
  retentionMs?: number;
  /** Pruning runs at start and this often (ms; default 1 h). */
  pruneIntervalMs?: number;
  /** Runs with each pruning, in the background (console log retention); a failure is a warning. */
  pruneLogs?: () => Promise<void>;
  /** civm's version (the hosts table shows it). */
  version?: string;
  /** Job → pool (shared with the webhook server); default: one of its own on `registry`. */
  router?: JobRouter;
  /** A pass waits this long for the targets' GitHub work before it tends the pools (ms; default 2000). */
  targetWaitMs?: number;
  /** GitHub failing or rate-limiting a target this long makes it "degraded" (ms; default 5 min). */
  githubDegradedAfterMs?: number;
  /** An organization's repository list is read again after this long (ms; default 10 min). */
  repoListTtlMs?: number;
  /** Share of the rate limit polling leaves for JIT configs and deregistration (default 0.1; see budgetReserve). */
  budgetReserveShare?: number;
}

/** What a reload may change besides the pools (daemonSettings() in reload.ts makes them from a config). */
export type DaemonReloadOptions = { access?: GitHubAccess } & Partial<Pick<DaemonOptions, "pollIntervalMs" | "shutdownTimeoutMs" | "retentionMs" | "githubDegradedAfterMs" | "repoListTtlMs" | "budgetReserveShare">>;

/** After the forced stop at the shutdown timeout, VMs' exit handling gets this long (ms). */
export const SHUTDOWN_FORCE_MARGIN_MS = 5000;

export const DEFAULT_RETENTION_MS = 7 * 24 * 3600_000;
const DEFAULT_PRUNE_INTERVAL_MS = 3600_000;

/** What a reload changed in the pools. */
export interface PoolChanges {
  added: string[];
  /** Draining: idle runners stop, busy ones finish, then the pool is gone. */
  removed: string[];
  /** Settings that differ; replaceIdle: idle runners are replaced (VM or registration settings changed). */
  changed: { name: string; fields: string[]; replaceIdle: boolean }[];
  unchanged: string[];
}

export type DaemonState = "serving" | "draining" | "drained" | "stopping";

export interface DaemonStatus {
  state: DaemonState;
  /** This host's id; false while the store cannot be reached (nothing new starts). */
  host: string;
  store: { kind: string; reachable: boolean; unreachableSince: string | null };
  /** A drain asked the daemon to exit once no VM is left. */
  exitWhenDrained: boolean;
  drainingSince: number | null;
  /** VMs this process runs, by state. */
  runners: { starting: number; idle: number; busy: number };
  /** Pools a reload removed that still have runners. */
  removingPools: string[];
}

const RUNNER_NAME_SUFFIX = /-[0-9a-f]{8}$/;

interface Live {
  handle: VmHandle;
  pool: string;
  /** The pool's settings when the VM started (its runner is registered with these). */
  spec: PoolSpec;
  stopReason?: StopReason | "registration-timeout" | "host-dead";
  /** What the store said last (it may become unreachable): exit handling works from this. */
  record: VmRecord;
}

/** Hash of what a runner VM is started with besides the image: replaced when it changes. */
export function poolConfigKey(p: PoolSpec): string {
  const { imagePullPolicy: _ignored, ...runner } = p.runner;
  return createHash("sha256").update(JSON.stringify({ runner, vm: p.vm })).digest("hex").slice(0, 16);
}

/** Names of the settings that differ between two versions of a pool ("runner.labels", "vm.cpus", ...). */
export function poolFieldChanges(a: PoolSpec, b: PoolSpec): string[] {
  const out: string[] = [];
  for (const k of ["maxRunners", "minRunners", "idleTimeoutSeconds"] as const) if (a[k] !== b[k]) out.push(k);
  for (const group of ["runner", "vm"] as const) {
    const x = a[group] as Record<string, unknown>;
    const y = b[group] as Record<string, unknown>;
    for (const k of new Set([...Object.keys(x), ...Object.keys(y)])) if (JSON.stringify(x[k]) !== JSON.stringify(y[k])) out.push(`${group}.${k}`);
  }
  return out;
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
  /** Per target: poll schedule, rate limit, health. */
  private readonly github: TargetSchedule;
  private nextPruneAt = 0;
  /** SIGTERM: the loop ends. */
  private stopping = false;
  private stopped = false;
  /** Drain (API): no new runners, idle ones stop, busy ones finish; the loop goes on. */
  private drainState: { since: number; exitWhenDrained: boolean; drainedAt?: number; exitCalled?: boolean } | undefined;
  private pools: PoolSpec[];
  /** Pools a reload removed, until their last runner has finished. */
  private readonly retiring = new Map<string, PoolSpec>();
  private access: GitHubAccess;
  private readonly groupNames = new Map<string, string>();
  private wakeUp: (() => void) | undefined;
  /** A wake() that came while a pass ran: the loop runs again at once instead of sleeping a tick. */
  private wakePending = false;
  private passesDone = 0;
  private loopDone: Promise<void> | undefined;
  private readonly backoff: BackoffOptions;
  private readonly router: JobRouter;
  private readonly metrics: { runners: Gauge; desired: Gauge; queued: Gauge; starts: Counter; exits: Counter; health: Gauge };
  /** This host in the fleet (one host with SQLite): heartbeat, dead hosts, the store's reachability. */
  readonly fleet: FleetMember;
  /** GitHub targets this host polls (the fleet's poller for each). */
  private leading = new Set<string>();
  /** Per pool: since when this host has seen it short of runners without placing one (placement grace). */
  private readonly waitingSince = new Map<string, number>();

  constructor(private readonly opts: DaemonOptions) {
    this.now = opts.now ?? Date.now;
    this.log = opts.logger;
    this.pools = [...opts.pools];
    this.access = opts.access;
    this.backoff = opts.backoff ?? DEFAULT_BACKOFF;
    this.router = opts.router ?? new JobRouter({ registry: opts.registry, access: () => this.access, now: this.now, warn: (f, m) => this.log.warn(f, m) });
    this.github = new TargetSchedule(this.now, opts.githubDegradedAfterMs);
    const registers = [opts.registry];
    this.metrics = {
      runners: new Gauge({ name: "civm_pool_runners", help: "Runner VMs by pool and state", labelNames: ["pool", "state"], registers }),
      desired: new Gauge({ name: "civm_pool_desired_runners", help: "Runner VMs the pool should have", labelNames: ["pool"], registers }),
      queued: new Gauge({ name: "civm_pool_queued_jobs", help: "Jobs routed to the pool that GitHub still has queued", labelNames: ["pool"], registers }),
      health: new Gauge({ name: "civm_pool_degraded", help: "1 when the pool is degraded (repeated boot failures)", labelNames: ["pool"], registers }),
      starts: new Counter({ name: "civm_vm_starts_total", help: "Runner VM starts by pool and result", labelNames: ["pool", "result"], registers }),
      exits: new Counter({ name: "civm_vm_exits_total", help: "Runner VM exits by pool and reason", labelNames: ["pool", "reason"], registers }),
    };
    const timing = serveMetrics(opts.registry);
    opts.store.onVmTransition = (vm, from) => observeVmTransition(timing, opts.store, vm, from);
    this.fleet = new FleetMember(opts.store, opts.host ?? LOCAL_HOST(), {
      now: this.now,
      log: this.log,
      version: opts.version ?? "",
      hooks: {
        pools: () => this.pools.map((p) => p.name),
        polls: () => [...this.leading],
        draining: () => this.drainState !== undefined || this.stopping,
        declaredDead: () => this.declaredDead(),
        reaped: (_host, vms) => this.reaped(vms),
      },
    });
    if (this.fleet.shared) opts.store.onWake(() => this.wake());
  }

  /** This host's id in the fleet. */
  get hostId(): string {
    return this.fleet.id;
  }

  /** Another host declared this one dead (it finished our VMs' records, deregistered their runners): idle and starting ones stop, busy ones finish their job. */
  private async declaredDead(): Promise<void> {
    for (const [id, l] of this.live) {
      const rec = await this.opts.store.vm(id);
      if (rec?.state !== "finished" || l.stopReason) continue;
      if (l.record.state === "busy") {
        this.log.warn({ pool: l.pool, vm: id, runner: l.record.name }, "busy runner of this host was finished by another host; it carries on until its job ends");
        continue;
      }
      l.stopReason = "host-dead";
      this.log.warn({ pool: l.pool, vm: id, runner: l.record.name }, "stopping runner VM: another host deregistered it while this host was cut off");
      l.handle.stop();
    }
  }

  /** A dead host's VMs (finished by the store): their runners are deregistered from here. */
  private async reaped(vms: VmRecord[]): Promise<void> {
    for (const vm of vms) {
      const pool = this.poolSpec(vm.pool);
      if (pool) await this.deregister(pool, vm);
    }
    this.wake();
  }

  /**
   * Forgets finished VMs, completed jobs and webhook deliveries older than the retention
   * (live VMs, queued and running jobs, and deliveries inside the window stay: a redelivery
   * within it is still a duplicate). Runs at start and then hourly from the loop.
   */
  async prune(): Promise<{ vms: number; jobs: number; deliveries: number }> {
    const { store } = this.opts;
    const now = this.now();
    const before = now - (this.opts.retentionMs ?? DEFAULT_RETENTION_MS);
    this.nextPruneAt = now + (this.opts.pruneIntervalMs ?? DEFAULT_PRUNE_INTERVAL_MS);
    // Only finished VMs go: a VM this process runs is marked finished after it left `live`.
    const pruned = await store.prune(before);
    if (pruned.vms + pruned.jobs + pruned.deliveries > 0) this.log.info({ ...pruned, olderThan: new Date(before).toISOString() }, "pruned old state");
    return pruned;
  }

  /** Loop iterations finished (pass done, prune checked); tests wait on it instead of sleeping. */
  get loopPasses(): number {
    return this.passesDone;
  }

  /** Webhook or API changed something: run a pass soon. */
  wake(): void {
    if (this.wakeUp) this.wakeUp();
    else this.wakePending = true;
  }

  /**
   * Start-up reconciliation, then the loop (in the background). The reconciliation (a
   * previous run's VMs, tables, work dirs) runs to its end; when `signal` has aborted by
   * then, the loop does not start and start returns false (shutdown() then has nothing to stop).
   */
  async start(signal?: AbortSignal): Promise<boolean> {
    await this.recover();
    if (signal?.aborted || this.stopping) return false;
    await this.fleet.start();
    await this.pruneSafely();
    this.loopDone = this.loop();
    return true;
  }

  private async pruneSafely(): Promise<void> {
    try {
      await this.prune();
    } catch (e) {
      this.log.warn({ err: messageOf(e) }, "pruning old state failed; trying again next hour");
    }
    this.opts.pruneLogs?.().catch((e: unknown) => this.log.warn({ err: messageOf(e) }, "pruning old logs failed; trying again next hour"));
  }

  private async loop(): Promise<void> {
    while (!this.stopping) {
      // While the store is unreachable no pass runs: nothing new starts, running VMs carry on.
      if (await this.fleet.ensure()) {
        if (this.now() >= this.nextPruneAt) await this.pruneSafely();
        try {
          await this.pass();
        } catch (e) {
          this.log.error({ err: messageOf(e) }, "reconcile pass failed");
          await this.fleet.check(e);
        }
      }
      this.passesDone++;
      if (this.stopping) break;
      if (this.wakePending) {
        this.wakePending = false;
        continue;
      }
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
    for (const vm of await this.opts.store.vms({ live: true, host: this.hostId })) {
      if (this.live.has(vm.id)) continue;
      await this.opts.store.markFinished(vm.id, "civm-restarted", this.now());
      this.log.warn({ pool: vm.pool, vm: vm.id, runner: vm.name }, "VM of a previous civm run is gone; its runner will be removed if GitHub still lists it");
    }
  }

  private poolSpec(name: string): PoolSpec | undefined {
    return this.pools.find((p) => p.name === name) ?? this.retiring.get(name);
  }

  /** The settings a VM's runner was registered with (this process's launch, else the pool's now). */
  private vmSpec(vm: VmRecord): PoolSpec | undefined {
    return this.live.get(vm.id)?.spec ?? this.poolSpec(vm.pool);
  }

  private targets(): { key: string; target: RunnerTarget; pools: PoolSpec[] }[] {
    const m = new Map<string, { key: string; target: RunnerTarget; pools: PoolSpec[] }>();
    const specs = [...this.pools, ...this.retiring.values(), ...[...this.live.values()].map((l) => l.spec)];
    for (const p of specs) {
      const key = targetKey(p.runner.target);
      const e = m.get(key) ?? { key, target: p.runner.target, pools: [] };
      if (!e.pools.includes(p)) e.pools.push(p);
      m.set(key, e);
    }
    return [...m.values()];
  }

  /** The GitHub access in use (a reload may replace it). */
  get githubAccess(): GitHubAccess {
    return this.access;
  }

  /** The pools in use now (the API shows these). */
  currentPools(): readonly PoolSpec[] {
    return this.pools;
  }

  /** Pools a reload removed that still have runners. */
  removingPools(): readonly PoolSpec[] {
    return [...this.retiring.values()];
  }

  /**
   * Applies a new, already validated pool list (config reload). Added pools start on the
   * next pass; removed ones drain (idle runners stop, busy ones finish, then the pool is
   * gone); changed settings apply on the next pass, and runners started with another image
   * or other VM/registration settings are replaced once idle. `access`: new GitHub
   * credentials; the poll interval, shutdown timeout, retention and GitHub thresholds apply at once. Queued jobs are
   * matched to the new pools again.
   */
  async reload(pools: readonly PoolSpec[], o: DaemonReloadOptions = {}): Promise<PoolChanges> {
    const old = new Map(this.pools.map((p) => [p.name, p]));
    const next = new Set(pools.map((p) => p.name));
    const changes: PoolChanges = { added: [], removed: [], changed: [], unchanged: [] };
    for (const p of pools) {
      const o = old.get(p.name);
      if (!o) {
        changes.added.push(p.name);
        continue;
      }
      const fields = poolFieldChanges(o, p);
      if (fields.length === 0) changes.unchanged.push(p.name);
      else changes.changed.push({ name: p.name, fields, replaceIdle: poolConfigKey(o) !== poolConfigKey(p) });
    }
    for (const o of this.pools) {
      if (next.has(o.name)) continue;
      changes.removed.push(o.name);
      this.retiring.set(o.name, o);
    }
    for (const p of pools) this.retiring.delete(p.name);
    this.pools = [...pools];
    if (o.access) this.access = o.access;
    if (o.pollIntervalMs !== undefined && o.pollIntervalMs !== this.opts.pollIntervalMs) {
      this.opts.pollIntervalMs = o.pollIntervalMs;
      for (const k of this.github.keys()) {
        const st = this.github.state(k);
        st.nextPollAt = Math.min(st.nextPollAt, this.now() + o.pollIntervalMs);
      }
    }
    if (o.shutdownTimeoutMs !== undefined) this.opts.shutdownTimeoutMs = o.shutdownTimeoutMs;
    if (o.retentionMs !== undefined) this.opts.retentionMs = o.retentionMs;
    if (o.githubDegradedAfterMs !== undefined) this.github.degradedAfterMs = o.githubDegradedAfterMs;
    if (o.repoListTtlMs !== undefined) this.opts.repoListTtlMs = o.repoListTtlMs;
    if (o.budgetReserveShare !== undefined) this.opts.budgetReserveShare = o.budgetReserveShare;
    await this.rerouteQueued().catch((e: unknown) => this.log.warn({ err: messageOf(e) }, "could not match queued jobs to the new pools; the next poll does"));
    this.log.info({ added: changes.added, removed: changes.removed, changed: changes.changed.map((c) => `${c.name} (${c.fields.join(", ")})`) }, "pools reloaded");
    this.wake();
    return changes;
  }

  /** Queued jobs matched to the pools again (a reload): with what the router has cached; the next poll routes them again with fresh access. */
  private async rerouteQueued(): Promise<void> {
    const matchable = this.pools.map(routable);
    for (const j of await this.opts.store.jobs({ status: "queued" })) {
      const pool = this.router.routeCached(matchable, { repository: j.repository, labels: j.labels }).pool?.name;
      if (pool !== j.pool) await this.opts.store.setJobPool(j.id, pool);
    }
  }

  /** The host's state in the store follows drains (others place the fleet's runners elsewhere); best effort. */
  private setHostState(state: "active" | "draining"): void {
    void Promise.resolve()
      .then(() => this.opts.store.setHostState(this.hostId, state))
      .catch((e: unknown) => this.log.warn({ err: messageOf(e), state }, "could not record this host's state in the store; the next heartbeat after a reconnect does"));
  }

  /**
   * Stop taking work: no new runners, idle and starting ones stop, busy ones finish. The
   * server keeps answering. With `exitWhenDrained`, onDrained is called once no VM is left.
   * In a fleet the host is recorded as draining: the other hosts place the runners it had.
   */
  async drain(o: { exitWhenDrained?: boolean } = {}): Promise<DaemonStatus> {
    if (!this.drainState) {
      this.drainState = { since: this.now(), exitWhenDrained: o.exitWhenDrained === true };
      this.log.info({ exitWhenDrained: this.drainState.exitWhenDrained }, "draining: no new runners, idle ones stop, busy ones finish");
      this.setHostState("draining");
    } else if (o.exitWhenDrained && !this.drainState.exitWhenDrained) {
      this.drainState.exitWhenDrained = true;
      this.log.info({}, "draining: will exit once drained");
    }
    this.wake();
    return this.status();
  }

  /** Ends a drain: the pools take work again (unless the process is already exiting). */
  async undrain(): Promise<DaemonStatus> {
    if (this.drainState && !this.drainState.exitCalled) {
      this.drainState = undefined;
      this.log.info({}, "drain cancelled: taking work again");
      this.setHostState("active");
      this.wake();
    }
    return this.status();
  }

  /** This process's state and VMs (from what the store said last when it cannot be reached). */
  async status(): Promise<DaemonStatus> {
    let states: VmState[];
    try {
      if (!this.fleet.reachable) throw new Error("unreachable");
      states = (await this.opts.store.vms({ live: true, host: this.hostId })).filter((v) => this.live.has(v.id)).map((v) => v.state);
    } catch {
      states = [...this.live.values()].map((l) => l.record.state);
    }
    const n = (s: string) => states.filter((v) => v === s).length;
    const d = this.drainState;
    const state: DaemonState = this.stopping ? "stopping" : d ? (d.drainedAt !== undefined ? "drained" : "draining") : "serving";
    return {
      state,
      host: this.hostId,
      store: { kind: this.opts.store.kind, reachable: this.fleet.reachable, unreachableSince: this.fleet.unreachableSince !== undefined ? new Date(this.fleet.unreachableSince).toISOString() : null },
      exitWhenDrained: d?.exitWhenDrained ?? false,
      drainingSince: d?.since ?? null,
      runners: { starting: n("starting"), idle: n("idle"), busy: n("busy") },
      removingPools: [...this.retiring.keys()],
    };
  }

  /**
   * One reconciliation pass. `poll` forces the GitHub poll (queued jobs, runners). Each
   * target's GitHub work runs on its own (one at a time per target); the pass waits for it
   * at most `targetWaitMs`, so a slow, hanging or rate-limited target never holds up the
   * pools of another.
   */
  async pass(opts: { poll?: boolean } = {}): Promise<void> {
    if (this.stopping) return;
    const now = this.now();
    const targets = this.targets();
    this.github.retain(targets.map((t) => t.key));
    await this.fleet.ensureRegistered();
    await this.refreshLocal();
    // In a fleet one host polls each target (its runners and queued jobs) for all: the holder
    // of the target's lock in the store; when it dies the lock is free for another.
    const leading = await this.opts.store.lead(targets.map((t) => t.key));
    if (this.fleet.shared) {
      for (const k of leading) if (!this.leading.has(k)) this.log.info({ target: k, host: this.hostId }, "this host polls the target for the fleet");
      for (const k of this.leading) if (!leading.has(k)) this.log.info({ target: k, host: this.hostId }, "this host no longer polls the target");
    }
    this.leading = leading;
    const starting = await this.opts.store.vms({ live: true, state: "starting" });
    const work: Promise<void>[] = [];
    for (const t of targets) {
      const st = this.github.state(t.key);
      if (st.inFlight || !leading.has(t.key)) continue;
      const pollDue = opts.poll === true || now >= st.nextPollAt;
      const startingHere = starting.some((v) => this.targetOf(v) === t.key);
      // While GitHub rate-limits the target, no request is spent on it.
      if ((!pollDue && !startingHere) || this.github.limitedUntil(t.key) !== undefined) continue;
      const p = this.targetWork(t.key, t.target, t.pools, pollDue);
      st.inFlight = p;
      void p.finally(() => (st.inFlight = undefined));
      work.push(p);
    }
    await this.boundedWait(work);
    // The registration timeout holds even when GitHub cannot say whether the runner came
    // online (the runners list fails or is rate-limited), or another host polls the target
    // (it would have marked the runner idle): such a VM is stopped all the same.
    for (const vm of await this.opts.store.vms({ live: true, state: "starting", host: this.hostId })) {
      const k = this.targetOf(vm);
      if (k === undefined || (leading.has(k) && this.github.health(k).state === "ok") || this.now() - vm.createdAt <= (this.opts.registrationTimeoutMs ?? 600_000)) continue;
      await this.stopVm(vm.id, "registration-timeout");
    }
    // The pools of each target on their own too (JIT configs, runner checks before a stop
    // ask GitHub): a target whose calls hang keeps its pools' work in flight, at most one
    // at a time, while the other targets' pools are served on every pass.
    const byTarget = new Map<string, { retiring: PoolSpec[]; pools: PoolSpec[] }>();
    const group = (p: PoolSpec) => {
      const k = targetKey(p.runner.target);
      const g = byTarget.get(k) ?? { retiring: [], pools: [] };
      byTarget.set(k, g);
      return g;
    };
    for (const pool of this.retiring.values()) group(pool).retiring.push(pool);
    for (const pool of this.pools) group(pool).pools.push(pool);
    const poolWork: Promise<void>[] = [];
    for (const [k, g] of byTarget) {
      const st = this.github.state(k);
      if (st.poolsInFlight) continue;
      const p = (async () => {
        for (const pool of g.retiring) {
          if (this.stopping) return;
          await this.retirePool(pool);
        }
        for (const pool of g.pools) {
          if (this.stopping) return;
          if (this.drainState) await this.stopAllIdle(pool, "drain");
          else await this.reconcilePool(pool);
        }
      })()
        .catch(async (e: unknown) => {
          this.log.error({ target: k, err: messageOf(e) }, "reconcile pass failed");
          await this.fleet.check(e);
        })
        .finally(() => (st.poolsInFlight = undefined));
      st.poolsInFlight = p;
      poolWork.push(p);
    }
    await this.boundedWait(poolWork);
    if (this.stopping) return;
    this.checkDrained();
  }

  /** What the store says of this host's VMs, kept for when it cannot be reached. */
  private async refreshLocal(): Promise<void> {
    if (this.live.size === 0) return;
    for (const v of await this.opts.store.vms({ live: true, host: this.hostId })) {
      const l = this.live.get(v.id);
      if (l) l.record = v;
    }
  }

  /** Waits for `work` at most targetWaitMs; if it finishes later, the loop runs again at once (what it found is acted on). */
  private async boundedWait(work: Promise<void>[]): Promise<void> {
    if (work.length === 0) return;
    const all = Promise.allSettled(work);
    if (!(await untilOr(all, this.opts.targetWaitMs ?? 2000))) void all.then(() => this.wake());
  }

  /** Resolves once every target's GitHub and pool work under way has finished (tests, benchmarks). */
  async githubSettled(): Promise<void> {
    for (;;) {
      const busy = this.github.keys().flatMap((k) => [this.github.state(k).inFlight, this.github.state(k).poolsInFlight]).filter((p) => p !== undefined);
      if (busy.length === 0) return;
      await Promise.allSettled(busy);
    }
  }

  /** A target's GitHub work: runner states, and on a due poll its queued jobs; then its next poll is scheduled. */
  private async targetWork(key: string, target: RunnerTarget, pools: PoolSpec[], pollDue: boolean): Promise<void> {
    const st = this.github.state(key);
    const interval = this.opts.pollIntervalMs;
    if (pollDue) st.nextPollAt = this.now() + interval;
    try {
      const client = await this.access.client(target);
      const budget = client.civm.budget;
      this.github.setBudget(key, budget);
      const before = budget.counted;
      await this.syncRunners(key, target, pools);
      if (pollDue && !this.drainState && pools.some((p) => this.pools.includes(p))) await this.pollJobs(target, key);
      if (pollDue) {
        st.lastCost = budget.counted - before;
        // The budget's reset is wall-clock time.
        const delay = nextPollDelay({ intervalMs: interval, now: Date.now(), cost: st.lastCost, sharers: this.github.sharers(key), budget, ...(this.opts.budgetReserveShare !== undefined ? { reserveShare: this.opts.budgetReserveShare } : {}) });
        st.nextPollAt = this.now() + delay;
        if (delay > interval) this.log.info({ target: key, remaining: budget.remaining, nextPollInSeconds: Math.round(delay / 1000) }, "GitHub rate-limit budget low: polling this target less often");
      }
      this.github.succeeded(key);
    } catch (e) {
      this.github.failed(key, e);
      const until = this.github.limitedUntil(key);
      this.log.warn({ target: key, err: messageOf(e), ...(until !== undefined ? { rateLimitedUntil: new Date(until).toISOString() } : {}) }, until !== undefined ? "GitHub rate-limits this target: its poll and runner starts wait until the limit ends" : "GitHub poll failed");
    } finally {
      const b = this.github.budget(key);
      if (b?.remaining !== undefined) serveMetrics(this.opts.registry).githubRateLimit.set({ target: key }, b.remaining);
    }
  }

  /** GitHub's state per target (/healthz, the pools API): degraded once failing or rate-limited longer than githubDegradedAfterMs. */
  githubHealth(): { status: "ok" | "degraded"; targets: TargetHealth[] } {
    const targets = this.targets().map((t) => this.github.health(t.key));
    return { status: targets.some((t) => t.degraded) ? "degraded" : "ok", targets };
  }

  /** The pool's target's GitHub health. */
  poolGitHubHealth(pool: PoolSpec): TargetHealth {
    return this.github.health(targetKey(pool.runner.target));
  }

  private targetOf(vm: VmRecord): string | undefined {
    const spec = this.vmSpec(vm);
    return spec && targetKey(spec.runner.target);
  }

  /** Stops the pool's idle and starting runners (busy ones finish); returns how many VMs it still has. */
  private async stopAllIdle(pool: PoolSpec, reason: StopReason): Promise<number> {
    const vms = await this.opts.store.vms({ pool: pool.name, live: true, host: this.hostId });
    const plan = planShutdown(vms.map((v) => ({ id: v.id, state: v.state, imageKey: v.imageKey })), reason);
    for (const s of plan.stop) await this.stopVm(s.id, s.reason);
    this.metrics.desired.set({ pool: pool.name }, 0);
    this.metrics.queued.set({ pool: pool.name }, 0);
    for (const state of ["starting", "idle", "busy"] as const) this.metrics.runners.set({ pool: pool.name, state }, vms.filter((v) => v.state === state).length);
    return vms.length;
  }

  /** A pool a reload removed: drain it; once its last VM has ended, it is gone. */
  private async retirePool(pool: PoolSpec): Promise<void> {
    if ((await this.stopAllIdle(pool, "pool-removed")) > 0) return;
    this.retiring.delete(pool.name);
    // The pool's record is shared in a fleet: another host may still serve it.
    if (!this.fleet.shared) await this.opts.store.forgetPool(pool.name);
    for (const g of [this.metrics.desired, this.metrics.health]) g.remove({ pool: pool.name });
    for (const state of ["starting", "idle", "busy"]) this.metrics.runners.remove({ pool: pool.name, state });
    this.log.info({ pool: pool.name }, "removed pool has no runners left; it is gone");
  }

  private checkDrained(): void {
    const d = this.drainState;
    if (!d || this.live.size > 0) {
      if (d) delete d.drainedAt;
      return;
    }
    if (d.drainedAt === undefined) {
      d.drainedAt = this.now();
      this.log.info({ exitWhenDrained: d.exitWhenDrained }, d.exitWhenDrained ? "drained: no runner VM left; exiting" : "drained: no runner VM left; still serving the API");
    }
    if (d.exitWhenDrained && !d.exitCalled) {
      d.exitCalled = true;
      this.opts.onDrained?.();
    }
  }

  private async reconcilePool(pool: PoolSpec): Promise<void> {
    const { store } = this.opts;
    const now = this.now();
    const st = await store.pool(pool.name);
    // Fleet-wide: every host's VMs of the pool (one host: its own).
    const vms = await store.vms({ pool: pool.name, live: true });
    let imageKey: string;
    try {
      imageKey = await this.opts.launcher.imageKey(pool);
    } catch (e) {
      this.log.error({ pool: pool.name, err: messageOf(e) }, "pool image unavailable");
      await store.recordFailure(pool.name, now);
      return;
    }
    const configKey = poolConfigKey(pool);
    const views: RunnerView[] = vms.map((v) => ({
      id: v.id,
      state: v.state,
      imageKey: v.imageKey,
      ...(v.idleSince !== undefined ? { idleSince: v.idleSince } : {}),
      ...(v.configKey !== undefined ? { configKey: v.configKey } : {}),
    }));
    const { retryAt, health } = backoffState(st, this.backoff);
    const queued = (await store.jobs({ status: "queued", pool: pool.name })).length;
    const plan = planPool({
      pool: { name: pool.name, minRunners: Math.min(st.minRunnersOverride ?? pool.minRunners, pool.maxRunners), maxRunners: pool.maxRunners, idleTimeoutSeconds: pool.idleTimeoutSeconds, paused: st.paused, imageKey, configKey },
      queued,
      runners: views,
      now,
      ...(retryAt !== undefined ? { retryAt } : {}),
    });
    this.metrics.desired.set({ pool: pool.name }, plan.desired);
    this.metrics.queued.set({ pool: pool.name }, queued);
    this.metrics.health.set({ pool: pool.name }, health === "degraded" ? 1 : 0);
    // Only this host's VMs are stopped here; each host acts on its own share of the plan.
    for (const s of plan.stop) await this.stopVm(s.id, s.reason);
    const limited = plan.start > 0 ? this.github.limitedUntil(targetKey(pool.runner.target)) : undefined;
    if (plan.start === 0) this.waitingSince.delete(pool.name);
    else if (!this.waitingSince.has(pool.name)) this.waitingSince.set(pool.name, now);
    for (let i = 0; i < plan.start && limited === undefined; i++) {
      if (this.stopping || this.drainState || !(await this.startVm(pool, imageKey, configKey))) break;
    }
    // This host's runners (in a fleet each host exports its own: sum them across hosts).
    const after = await store.vms({ pool: pool.name, live: true, host: this.hostId });
    for (const state of ["starting", "idle", "busy"] as const) this.metrics.runners.set({ pool: pool.name, state }, after.filter((v) => v.state === state).length);
  }

  /**
   * Claims a slot for one runner VM of the pool (the store's transaction: the pool's limits
   * for the fleet, this host's capacity), then registers and starts it. false: nothing
   * started (no slot here, or it failed).
   */
  private async startVm(pool: PoolSpec, imageKey: string, configKey: string): Promise<boolean> {
    const { store } = this.opts;
    const id = randomBytes(4).toString("hex");
    const name = `${pool.runner.namePrefix}-${id}`;
    const fields = { pool: pool.name, vm: id, runner: name };
    const mode = pool.runner.registration;
    const now = this.now();
    const claim = await store.claimVm({
      vm: { id, pool: pool.name, name, imageKey, configKey, createdAt: now, host: this.hostId, cpus: pool.vm.cpus, ramBytes: pool.vm.ramBytes },
      host: this.hostId,
      minRunners: pool.minRunners,
      maxRunners: pool.maxRunners,
      waitedMs: now - (this.waitingSince.get(pool.name) ?? now),
      graceMs: this.fleet.shared ? this.fleet.placementGraceMs : 0,
      deadAfterMs: this.fleet.deadAfterMs,
    });
    if (!claim.claimed) {
      if (claim.reason === "no-capacity") this.log.info({ pool: pool.name, host: this.hostId, cpus: this.fleet.host.cpus, ramBytes: this.fleet.host.ramBytes }, "no room on this host for another runner VM of the pool");
      return false;
    }
    this.waitingSince.delete(pool.name);
    let reg: { config: JsonValue; secret: string; runnerId: number | undefined };
    try {
      reg = await this.registration(pool, name);
    } catch (e) {
      const what = mode === "token" ? "token-failed" : "jit-failed";
      await store.markFinished(id, what, this.now());
      const key = targetKey(pool.runner.target);
      this.github.failed(key, e);
      const until = this.github.limitedUntil(key);
      if (until !== undefined) {
        // GitHub's limit, not the pool's fault: no backoff, the pool waits for the limit.
        this.metrics.starts.inc({ pool: pool.name, result: what });
        this.log.warn({ ...fields, err: messageOf(e), rateLimitedUntil: new Date(until).toISOString() }, "GitHub rate-limits this target: no runner starts until the limit ends");
        return false;
      }
      const st = await store.recordFailure(pool.name, this.now());
      this.metrics.starts.inc({ pool: pool.name, result: what });
      this.log.error({ ...fields, failures: st.failures, err: messageOf(e) }, mode === "token" ? "could not get a runner registration token" : "could not get a JIT runner config");
      return false;
    }
    if (reg.runnerId !== undefined) await store.setRunnerId(id, reg.runnerId);
    const record: VmRecord = { ...claim.vm, githubRunnerId: reg.runnerId };
    if (this.stopping) {
      // SIGTERM came while GitHub answered: start nothing, give the registration back.
      await store.markFinished(id, "stopped:shutdown", this.now());
      void this.deregister(pool, record);
      return false;
    }
    let handle: VmHandle;
    try {
      handle = this.opts.launcher.start({ id, name, pool, config: reg.config, secrets: [reg.secret] });
    } catch (e) {
      handle = { stop: () => {}, result: Promise.reject(e) };
    }
    this.live.set(id, { handle, pool: pool.name, spec: pool, record });
    this.metrics.starts.inc({ pool: pool.name, result: "started" });
    this.log.info({ ...fields, registration: mode, ...(reg.runnerId !== undefined ? { runnerId: reg.runnerId } : {}) }, "runner VM starting");
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

  /**
   * What the guest registers with: a JIT config (the runner id is known at once), or a
   * registration token for config.sh with the exact runner name (its id is learnt from the
   * runners list once it has registered).
   */
  private async registration(pool: PoolSpec, name: string): Promise<{ config: JsonValue; secret: string; runnerId: number | undefined }> {
    const t = pool.runner.target;
    const client = await this.access.client(t);
    const labels = registrationLabels(pool.runner.labels);
    if (pool.runner.registration === "jit") {
      const jit = await generateJitConfig(client, t, { name, runnerGroupId: pool.runner.groupId, labels, workFolder: pool.runner.workFolder });
      return { config: { runner: "github", jitconfig: jit.encodedJitConfig, pool: pool.name }, secret: jit.encodedJitConfig, runnerId: jit.runnerId };
    }
    let group: string | undefined;
    if (t.kind === "org" && pool.runner.groupId !== 1) {
      const key = `${t.org.toLowerCase()}:${pool.runner.groupId}`;
      group = this.groupNames.get(key) ?? (await runnerGroupName(client, t.org, pool.runner.groupId));
      this.groupNames.set(key, group);
    }
    const { token } = await createRegistrationToken(client, t);
    const config = {
      runner: "github",
      token,
      repo: registrationUrl(this.opts.apiUrl ?? "https://api.github.com", t),
      runner_name: name,
      labels,
      ...(group !== undefined ? { runnergroup: group } : {}),
      pool: pool.name,
    };
    return { config, secret: token, runnerId: undefined };
  }

  /** Stops an idle (or starting) runner's VM; asks GitHub first so a just-assigned runner is left alone. */
  private async stopVm(id: string, reason: StopReason | "registration-timeout"): Promise<void> {
    const l = this.live.get(id);
    if (!l || l.stopReason) return;
    const vm = await this.opts.store.vm(id);
    if (!vm || l.stopReason) return;
    if (vm.state === "busy") return;
    const pool = l.spec;
    if (vm.githubRunnerId !== undefined && vm.state === "idle") {
      try {
        const r = await getRunner(await this.access.client(pool.runner.target), pool.runner.target, vm.githubRunnerId);
        if (r?.busy) {
          await this.opts.store.markBusy(id, undefined, this.now());
          return;
        }
      } catch (e) {
        this.log.warn({ pool: vm.pool, vm: id, err: messageOf(e) }, "could not check the runner before stopping it; keeping it");
        return;
      }
    }
    if (l.stopReason) return;
    l.stopReason = reason;
    // No longer a kept runner: the pool's next one may be placed (on any host) meanwhile.
    await this.opts.store.markStopping(id, reason);
    this.log.info({ pool: vm.pool, vm: id, runner: vm.name, reason }, "stopping runner VM");
    l.handle.stop();
  }

  /**
   * The VM has ended: its runner is deregistered and the end recorded. While the store
   * cannot be reached this works from the last record, and the end is written once it is
   * back (fleet.ts): the slot stays taken until then.
   */
  private async onExit(id: string, outcome: LaunchOutcome): Promise<void> {
    const { store } = this.opts;
    const l = this.live.get(id);
    this.live.delete(id);
    let vm: VmRecord | undefined;
    try {
      if (!this.fleet.reachable) throw new Error("the store is unreachable");
      vm = await store.vm(id);
    } catch (e) {
      vm = l?.record;
      await this.fleet.check(e);
    }
    if (!vm) return;
    const pool = l?.spec ?? this.poolSpec(vm.pool);
    const fields = { pool: vm.pool, vm: id, runner: vm.name, ...(vm.jobId !== undefined ? { job: vm.jobId } : {}) };
    const reason = l?.stopReason && l.stopReason !== "registration-timeout" ? `stopped:${l.stopReason}` : l?.stopReason ?? outcome.reason;
    const failed = vm.state === "starting" && (l?.stopReason === undefined || l.stopReason === "registration-timeout");
    if (failed) {
      const st = await Promise.resolve(store.recordFailure(vm.pool, this.now())).catch(() => undefined);
      this.log.error({ ...fields, reason, ...(st ? { failures: st.failures } : {}), ...(outcome.detail ? { detail: outcome.detail } : {}) }, "runner VM ended before its runner came online");
    }
    if (pool) await this.deregister(pool, vm);
    await this.fleet.finish(id, reason, this.now());
    this.metrics.exits.inc({ pool: vm.pool, reason });
    this.log.info({ ...fields, reason, exitCode: outcome.exitCode }, "runner VM finished");
    this.wake();
  }

  /** Removes the VM's runner if GitHub still lists it; a token-registered runner not yet seen is looked up by name. */
  private async deregister(pool: PoolSpec, vm: VmRecord): Promise<void> {
    if (vm.githubRunnerId === undefined && pool.runner.registration !== "token") return;
    try {
      const client = await this.access.client(pool.runner.target);
      let runnerId = vm.githubRunnerId;
      if (runnerId === undefined) {
        runnerId = (await listRunners(client, pool.runner.target)).find((r) => r.name === vm.name)?.id;
        if (runnerId === undefined) return;
        await Promise.resolve(this.opts.store.setRunnerId(vm.id, runnerId)).catch(() => {});
      }
      const r = await getRunner(client, pool.runner.target, runnerId);
      if (r && (await deleteRunner(client, pool.runner.target, runnerId))) {
        this.log.info({ pool: pool.name, vm: vm.id, runner: vm.name, runnerId }, "runner deregistered");
      }
    } catch (e) {
      // The stale-runner sweep retries on later passes.
      this.log.warn({ pool: pool.name, vm: vm.id, runner: vm.name, err: messageOf(e) }, "could not deregister the runner");
    }
  }

  /** Runner states from GitHub; stale registrations of civm's own runners are removed. */
  private async syncRunners(key: string, target: RunnerTarget, pools: PoolSpec[]): Promise<void> {
    const { store } = this.opts;
    const client = await this.access.client(target);
    const runners = await listRunners(client, target);
    const byName = new Map<string, RunnerInfo>(runners.map((r) => [r.name, r]));
    const names = new Set(pools.map((p) => p.name));
    const now = this.now();
    for (const vm of await store.vms({ live: true })) {
      if (this.targetOf(vm) !== key) continue;
      const r = byName.get(vm.name);
      // A runner registered with a token: its id is known once GitHub lists it.
      if (r && vm.githubRunnerId === undefined) await store.setRunnerId(vm.id, r.id);
      if (r?.busy) await store.markBusy(vm.id, undefined, now);
      else if (r?.status === "online" && vm.state === "starting") {
        await store.markIdle(vm.id, now);
        await store.clearFailures(vm.pool);
        this.log.info({ pool: vm.pool, vm: vm.id, runner: vm.name }, "runner online (idle)");
      } else if (vm.state === "starting" && now - vm.createdAt > (this.opts.registrationTimeoutMs ?? 600_000)) {
        await this.stopVm(vm.id, "registration-timeout");
      }
    }
    const seen = new Set<number>();
    for (const r of runners) {
      // Only offline runners civm created: its name pattern, a pool prefix of this target, and
      // a store record (looked up last: a fleet's poller lists many runners, most online).
      if (r.busy || r.status !== "offline" || !RUNNER_NAME_SUFFIX.test(r.name) || !pools.some((p) => r.name.startsWith(`${p.runner.namePrefix}-`))) continue;
      const rec = await store.vmByName(r.name);
      if (!rec || !names.has(rec.pool) || rec.state !== "finished" || this.live.has(rec.id)) continue;
      seen.add(r.id);
      if (!this.staleMarks.has(r.id)) {
        this.staleMarks.set(r.id, now);
        this.log.info({ pool: rec.pool, runner: r.name, runnerId: r.id }, "stale runner registration (no VM); removing it next pass if still offline");
        continue;
      }
      if (await deleteRunner(client, target, r.id)) this.log.info({ pool: rec.pool, runner: r.name, runnerId: r.id }, "stale runner deregistered");
    }
    for (const id of this.staleMarks.keys()) if (!seen.has(id)) this.staleMarks.delete(id);
  }

  /** Queued jobs from the API (a lost webhook); jobs the store has as queued but GitHub no longer does are closed. */
  private async pollJobs(target: RunnerTarget, key: string): Promise<void> {
    const { store } = this.opts;
    const started = this.now();
    const client = await this.access.client(target);
    // An organization's repository list changes rarely: read again after repoListTtlMs.
    const st = this.github.state(key);
    if (!st.repos || started - st.repos.at >= (this.opts.repoListTtlMs ?? DEFAULT_REPO_LIST_TTL_MS)) st.repos = { list: await targetRepositories(client, target), at: started };
    const repos = st.repos.list;
    const queuedIds = new Set<number>();
    const matchable = this.pools.map(routable);
    for (const repo of repos) {
      for (const j of await listQueuedJobs(client, repo)) {
        queuedIds.add(j.id);
        const route = await this.router.route(matchable, { repository: j.repository, labels: j.labels });
        const pool = route.pool?.name;
        const old = await store.job(j.id);
        if (route.ignored) {
          this.router.ignored(j.id, route.ignored);
          // A job recorded for a pool that no longer serves it (a reload, a runner group change) is no demand.
          if (old?.pool !== undefined && old.status === "queued") await store.setJobPool(j.id, undefined);
          if (!old) continue;
        }
        await store.upsertJob({ id: j.id, labels: j.labels, status: "queued", at: started, repository: j.repository, ...(pool ? { pool } : {}) });
        if (pool && old && old.pool !== pool && old.status === "queued") await store.setJobPool(j.id, pool);
        if (!old && pool) this.log.info({ pool, job: j.id, repository: j.repository }, "queued job found by polling");
      }
    }
    const repoSet = new Set(repos.map((r) => r.toLowerCase()));
    for (const j of await store.jobs({ status: "queued" })) {
      if (queuedIds.has(j.id) || !j.repository || !repoSet.has(j.repository.toLowerCase())) continue;
      if ((j.queuedAt ?? 0) >= started) continue;
      await store.upsertJob({ id: j.id, labels: j.labels, status: "completed", at: started, conclusion: "not-queued-on-github" });
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
   * Returns within shutdownTimeout + SHUTDOWN_FORCE_MARGIN_MS whatever GitHub does.
   */
  async shutdown(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.stopping = true;
    this.wakeUp?.();
    const deadline = Date.now() + this.opts.shutdownTimeoutMs;
    // A pass may be waiting on GitHub: it ends on its own (it checks `stopping`), but is not
    // waited for longer than a moment; VMs it might still start are refused (startVm).
    await untilOr(this.loopDone ?? Promise.resolve(), Math.min(2000, this.opts.shutdownTimeoutMs));
    // No more placements here (the rest of the fleet takes this host's share).
    if (this.fleet.reachable) await Promise.resolve(this.opts.store.setHostState(this.hostId, "draining")).catch(() => {});
    let vms: { id: string; state: VmState; imageKey: string }[];
    try {
      if (!this.fleet.reachable) throw new Error("the store is unreachable");
      vms = (await this.opts.store.vms({ live: true, host: this.hostId })).filter((v) => this.live.has(v.id));
    } catch {
      // What the store said last (a runner idle then may be busy now: it is stopped only if it was idle).
      vms = [...this.live].map(([id, l]) => ({ id, state: l.record.state, imageKey: l.record.imageKey }));
    }
    const plan = planShutdown(vms);
    this.log.info({ stopping: plan.stop.length, busy: plan.waitFor.length }, "shutting down: stopping idle runners, waiting for busy ones");
    for (const s of plan.stop) {
      const l = this.live.get(s.id);
      if (l && !l.stopReason) {
        l.stopReason = "shutdown";
        l.handle.stop();
      }
    }
    while (this.live.size > 0 && Date.now() < deadline) await Promise.race([...this.exits, new Promise((r) => setTimeout(r, Math.min(1000, Math.max(1, deadline - Date.now()))))]);
    if (this.live.size > 0) {
      this.log.warn({ vms: [...this.live.keys()] }, "shutdown timeout: ending busy runners");
      for (const l of this.live.values()) {
        l.stopReason ??= "shutdown";
        l.handle.stop(true);
      }
    }
    // Exit handling deregisters runners (GitHub): bounded, whatever GitHub does.
    const remaining = Math.max(0, deadline - Date.now()) + SHUTDOWN_FORCE_MARGIN_MS;
    if (!(await untilOr(Promise.allSettled([...this.exits]), remaining))) {
      this.log.warn({ vms: [...this.live.keys()] }, "shutdown: exit handling (runner deregistration) did not finish in time; leaving it to the next start's clean-up");
    }
    await untilOr(this.fleet.stop(), 5000);
  }
}

/** Waits for `p` at most `ms`; true when it settled in time. */
async function untilOr(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const done = await Promise.race([p.then(() => true, () => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)))]);
  clearTimeout(timer);
  return done;
}
