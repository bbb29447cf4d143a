// Pure scaling decisions for runner pools: no clock, no I/O; the reconciler feeds them what
// it knows and performs what they return. Table-tested in test/unit/pool-plan.test.ts.
import { labelsMatch, normalizeLabels } from "./labels.js";

export type RunnerState = "starting" | "idle" | "busy" | "finished";
export type JobStatus = "queued" | "in_progress" | "completed";

export interface RunnerView {
  id: string;
  state: RunnerState;
  /** Identity of the image the VM booted (stored image's key or the disk's path+mtime). */
  imageKey: string;
  /** ms epoch when it became idle (undefined unless idle). */
  idleSince?: number;
  /** Hash of the pool settings the VM was started with (VM size, runner registration); undefined: unknown. */
  configKey?: string;
}

export interface PoolView {
  name: string;
  minRunners: number;
  maxRunners: number;
  idleTimeoutSeconds: number;
  paused: boolean;
  /** The image a new VM of this pool would boot now. */
  imageKey: string;
  /** Hash of the settings a new VM would start with; runners with another one are replaced. */
  configKey?: string;
}

export type StopReason = "idle-timeout" | "image-change" | "config-change" | "paused" | "shutdown" | "drain" | "pool-removed";

export interface PoolPlan {
  desired: number;
  /** VMs to start now (0 while backing off). */
  start: number;
  /** Idle (or, on shutdown, starting) runners to stop; never a busy one. */
  stop: { id: string; reason: StopReason }[];
}

/**
 * ARC's rule: minRunners idle runners on top of demand, capped by maxRunners. `demand` is the
 * jobs this pool has to serve: queued ones plus those running on its (busy) runners, so that
 * minRunners stay idle while jobs run.
 */
export function desiredRunners(pool: { minRunners: number; maxRunners: number }, demand: number): number {
  return Math.max(0, Math.min(pool.maxRunners, pool.minRunners + Math.max(0, demand)));
}

/**
 * Among pools that may serve a job's repository (routing.ts picks those first), the one
 * whose labels (case-insensitive, "self-hosted" implied) include all the job's labels. Several match: the one with the fewest labels (the most
 * specific), then the first in the config. undefined: no pool serves it.
 */
export function matchPool<P extends { name: string; labels: readonly string[] }>(pools: readonly P[], jobLabels: readonly string[]): P | undefined {
  let best: P | undefined;
  let bestSize = Infinity;
  for (const p of pools) {
    if (!labelsMatch(p.labels, jobLabels)) continue;
    const size = normalizeLabels(p.labels).length;
    if (size < bestSize) {
      best = p;
      bestSize = size;
    }
  }
  return best;
}

/** Queued jobs per pool name (jobs no pool serves are left out). */
export function queuedByPool(
  pools: readonly { name: string; labels: readonly string[] }[],
  jobs: readonly { labels: readonly string[]; status: JobStatus }[],
): Map<string, number> {
  const out = new Map<string, number>(pools.map((p) => [p.name, 0]));
  for (const j of jobs) {
    if (j.status !== "queued") continue;
    const p = matchPool(pools, j.labels);
    if (p) out.set(p.name, (out.get(p.name) ?? 0) + 1);
  }
  return out;
}

export interface PlanInput {
  pool: PoolView;
  /** Jobs waiting for this pool. */
  queued: number;
  /** The pool's runners (finished ones are ignored). */
  runners: readonly RunnerView[];
  now: number;
  /** From backoffState(): while now < retryAt, nothing new starts. */
  retryAt?: number;
}

/**
 * One pass for one pool. Busy runners are never stopped. Idle runners on an old image (or
 * started with settings the pool no longer has) are replaced at once; idle runners above desired stop once idle for idleTimeout, longest idle
 * first; a paused pool starts nothing and stops its idle runners.
 */
export function planPool(input: PlanInput): PoolPlan {
  const { pool, now } = input;
  const live = input.runners.filter((r) => r.state !== "finished");
  const busy = live.filter((r) => r.state === "busy").length;
  const stop: PoolPlan["stop"] = [];
  if (pool.paused) {
    for (const r of live) if (r.state === "idle") stop.push({ id: r.id, reason: "paused" });
    return { desired: 0, start: 0, stop };
  }
  const desired = desiredRunners(pool, input.queued + busy);
  for (const r of live) {
    if (r.state !== "idle") continue;
    if (r.imageKey !== pool.imageKey) stop.push({ id: r.id, reason: "image-change" });
    else if (r.configKey !== undefined && pool.configKey !== undefined && r.configKey !== pool.configKey) stop.push({ id: r.id, reason: "config-change" });
  }
  const stopping = new Set(stop.map((s) => s.id));
  const kept = live.filter((r) => !stopping.has(r.id));
  const surplus = kept.length - desired;
  if (surplus > 0) {
    const expired = kept
      .filter((r) => r.state === "idle" && r.idleSince !== undefined && now - r.idleSince >= pool.idleTimeoutSeconds * 1000)
      .sort((a, b) => (a.idleSince ?? 0) - (b.idleSince ?? 0) || (a.id < b.id ? -1 : 1))
      .slice(0, surplus);
    for (const r of expired) stop.push({ id: r.id, reason: "idle-timeout" });
  }
  const backingOff = input.retryAt !== undefined && now < input.retryAt;
  // Runners being stopped still hold a VM until they exit: maxRunners caps VMs, not runners kept.
  const room = pool.maxRunners - live.length;
  const start = backingOff ? 0 : Math.max(0, Math.min(desired - kept.length, room));
  return { desired, start, stop };
}

/** SIGTERM, drain, a pool removed by a reload: stop everything not busy; busy runners finish their job. */
export function planShutdown(runners: readonly RunnerView[], reason: StopReason = "shutdown"): { stop: { id: string; reason: StopReason }[]; waitFor: string[] } {
  const live = runners.filter((r) => r.state !== "finished");
  return {
    stop: live.filter((r) => r.state !== "busy").map((r) => ({ id: r.id, reason })),
    waitFor: live.filter((r) => r.state === "busy").map((r) => r.id),
  };
}

export interface BackoffOptions {
  baseMs: number;
  maxMs: number;
  /** Consecutive failures after which the pool is degraded. */
  degradedAfter: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { baseMs: 5_000, maxMs: 5 * 60_000, degradedAfter: 3 };

/** Delay before the next attempt after `failures` consecutive failures: base·2^(n-1), capped. */
export function backoffDelay(failures: number, opts: BackoffOptions = DEFAULT_BACKOFF): number {
  if (failures <= 0) return 0;
  return Math.min(opts.maxMs, opts.baseMs * 2 ** Math.min(failures - 1, 30));
}

export type PoolHealth = "active" | "paused" | "degraded";

/** When a pool may start VMs again and how it is reported, from its failure record. */
export function backoffState(
  rec: { failures: number; lastFailureAt?: number; paused?: boolean },
  opts: BackoffOptions = DEFAULT_BACKOFF,
): { retryAt: number | undefined; health: PoolHealth } {
  const retryAt = rec.failures > 0 && rec.lastFailureAt !== undefined ? rec.lastFailureAt + backoffDelay(rec.failures, opts) : undefined;
  const health: PoolHealth = rec.paused ? "paused" : rec.failures >= opts.degradedAfter ? "degraded" : "active";
  return { retryAt, health };
}
