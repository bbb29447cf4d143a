// Database rows → records, shared by both stores (SQLite gives 0/1 for booleans, PostgreSQL
// true/false; both give numbers: the PostgreSQL store parses int8 as a number).
import type { HostRecord, HostState, JobRecord, JobStatus, PoolState, VmRecord, VmState } from "./types.js";

export interface Row {
  [k: string]: unknown;
}

export function opt<T>(v: unknown): T | undefined {
  return v === null || v === undefined ? undefined : (v as T);
}

function num(v: unknown): number {
  return typeof v === "string" ? Number(v) : (v as number);
}

function optNum(v: unknown): number | undefined {
  return v === null || v === undefined ? undefined : num(v);
}

export function toPool(name: string, row: Row | undefined): PoolState {
  if (!row) return { name, paused: false, minRunnersOverride: undefined, failures: 0, lastFailureAt: undefined };
  return {
    name,
    paused: row.paused === 1 || row.paused === true,
    minRunnersOverride: optNum(row.min_runners_override),
    failures: num(row.failures),
    lastFailureAt: optNum(row.last_failure_at),
  };
}

export function toVm(row: Row): VmRecord {
  return {
    id: row.id as string,
    pool: row.pool as string,
    name: row.name as string,
    state: row.state as VmState,
    githubRunnerId: optNum(row.github_runner_id),
    imageKey: row.image_key as string,
    configKey: opt<string>(row.config_key),
    createdAt: num(row.created_at),
    startedAt: optNum(row.started_at),
    idleSince: optNum(row.idle_since),
    finishedAt: optNum(row.finished_at),
    busySince: optNum(row.busy_since),
    jobId: optNum(row.job_id),
    exitReason: opt<string>(row.exit_reason),
    host: opt<string>(row.host),
    cpus: num(row.cpus ?? 0),
    ramBytes: num(row.ram_bytes ?? 0),
    stopping: opt<string>(row.stopping),
  };
}

export function toJob(row: Row): JobRecord {
  return {
    id: num(row.id),
    labels: JSON.parse(row.labels as string) as string[],
    status: row.status as JobStatus,
    pool: opt<string>(row.pool),
    repository: opt<string>(row.repository),
    runnerName: opt<string>(row.runner_name),
    queuedAt: optNum(row.queued_at),
    startedAt: optNum(row.started_at),
    completedAt: optNum(row.completed_at),
    conclusion: opt<string>(row.conclusion),
  };
}

/** A hosts row joined with its VM counts (columns starting, idle, busy, used_cpus, used_ram, age_ms). */
export function toHost(row: Row): HostRecord {
  return {
    id: row.id as string,
    address: row.address as string,
    cpus: num(row.cpus),
    ramBytes: num(row.ram_bytes),
    pools: JSON.parse(row.pools as string) as string[],
    version: row.version as string,
    state: row.state as HostState,
    startedAt: num(row.started_at),
    heartbeatAt: num(row.heartbeat_at),
    heartbeatAgeMs: Math.max(0, num(row.age_ms)),
    polls: JSON.parse(row.polls as string) as string[],
    deadAt: optNum(row.dead_at),
    deadBy: opt<string>(row.dead_by),
    vms: { starting: num(row.starting ?? 0), idle: num(row.idle ?? 0), busy: num(row.busy ?? 0) },
    usedCpus: num(row.used_cpus ?? 0),
    usedRamBytes: num(row.used_ram ?? 0),
  };
}

export const JOB_STATUS_ORDER: Record<JobStatus, number> = { queued: 0, in_progress: 1, completed: 2 };
