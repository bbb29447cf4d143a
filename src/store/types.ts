// The state store's records and its interface. Two implementations: StateStore (SQLite,
// better-sqlite3, one host; synchronous, the default) and PostgresStore (node-postgres, a
// fleet of hosts sharing one database; asynchronous). Callers `await` every call, so one
// daemon serves both. Types only; the claim rule is in claim.ts.

export type Awaitable<T> = T | Promise<T>;

export type VmState = "starting" | "idle" | "busy" | "finished";
export type JobStatus = "queued" | "in_progress" | "completed";

export interface PoolState {
  name: string;
  paused: boolean;
  /** Set through the API; overrides the config's minRunners until cleared. */
  minRunnersOverride: number | undefined;
  /** Consecutive VM boot/registration failures (reset by a success). */
  failures: number;
  lastFailureAt: number | undefined;
}

export interface VmRecord {
  id: string;
  pool: string;
  /** Runner name registered with GitHub: `<runner.name>-<id>`. */
  name: string;
  state: VmState;
  githubRunnerId: number | undefined;
  imageKey: string;
  /** Hash of the pool settings the VM started with (undefined for VMs of older civm versions). */
  configKey: string | undefined;
  createdAt: number;
  startedAt: number | undefined;
  idleSince: number | undefined;
  finishedAt: number | undefined;
  /** When the VM became busy (undefined before it did, and for VMs of older civm versions). */
  busySince: number | undefined;
  jobId: number | undefined;
  exitReason: string | undefined;
  /** The host that runs it (undefined: a VM of a civm from before hosts were recorded). */
  host: string | undefined;
  /** What it takes of its host's capacity (0 for VMs of older civm versions). */
  cpus: number;
  ramBytes: number;
  /** Set when its host decided to stop it (it no longer counts as a kept runner). */
  stopping: string | undefined;
}

export interface JobRecord {
  id: number;
  labels: string[];
  status: JobStatus;
  pool: string | undefined;
  repository: string | undefined;
  runnerName: string | undefined;
  queuedAt: number | undefined;
  startedAt: number | undefined;
  completedAt: number | undefined;
  conclusion: string | undefined;
}

export type HostState = "active" | "draining" | "stopped" | "dead";

/** A host as it registers itself (civm serve at start, and with every heartbeat). */
export interface HostInfo {
  id: string;
  /** Where its API answers (informative: civm hosts shows it). */
  address: string;
  /** Capacity for runner VMs. */
  cpus: number;
  ramBytes: number;
  /** Names of the pools it serves. */
  pools: string[];
  version: string;
}

export interface HostRecord extends HostInfo {
  state: HostState;
  startedAt: number;
  /** Its last heartbeat and how long ago that was, both by the database's clock (ms). */
  heartbeatAt: number;
  heartbeatAgeMs: number;
  /** GitHub targets it polls for the fleet (it holds their poller lock). */
  polls: string[];
  /** Declared dead: when and by which host. */
  deadAt: number | undefined;
  deadBy: string | undefined;
  /** Its live VMs and what they take. */
  vms: { starting: number; idle: number; busy: number };
  usedCpus: number;
  usedRamBytes: number;
}

export interface NewVm {
  id: string;
  pool: string;
  name: string;
  imageKey: string;
  configKey?: string | undefined;
  createdAt: number;
  host?: string | undefined;
  cpus?: number;
  ramBytes?: number;
}

/** One attempt to place a runner VM of a pool on this host (claim.ts decides). */
export interface ClaimRequest {
  vm: NewVm & { host: string; cpus: number; ramBytes: number };
  host: string;
  /** The pool's limits from the config (the store adds the API override and pause). */
  minRunners: number;
  maxRunners: number;
  /** This host has seen the pool short of runners this long (ms): past the grace it claims even when other hosts are less loaded. */
  waitedMs: number;
  graceMs: number;
  /** Hosts whose heartbeat is older than this do not count as candidates (ms). */
  deadAfterMs: number;
}

export type ClaimResult =
  | { claimed: true; vm: VmRecord }
  | { claimed: false; reason: "full" | "satisfied" | "paused" | "no-capacity" | "not-active" | "other-host" };

/** What a workflow_job delivery says, recorded with its delivery id in one transaction. */
export interface WebhookRecord {
  delivery: { id: string; event: string; action?: string; jobId?: number; digest?: string };
  at: number;
  /** Absent for deliveries that are not about a job (recorded for de-duplication only). */
  job?: {
    id: number;
    labels: readonly string[];
    status: JobStatus;
    pool?: string;
    repository?: string;
    runnerName?: string;
    conclusion?: string;
  };
}

export interface WebhookOutcome {
  outcome: "duplicate" | "ignored" | "accepted";
  /** The job before this delivery, and the civm VM it names (if any). */
  before?: JobRecord | undefined;
  vm?: VmRecord | undefined;
}

/** A VM state change (markIdle, markBusy, markFinished): the record after it and the state before. */
export type VmTransitionListener = (vm: VmRecord, from: VmState) => void;

export interface VmFilter {
  pool?: string;
  live?: boolean;
  state?: VmState;
  /** Only this host's VMs (the SQLite store also counts VMs recorded before hosts were). */
  host?: string;
}

/** Everything civm serve keeps: pools, VMs, jobs, deliveries, hosts. */
export interface Store {
  readonly kind: "sqlite" | "postgres";
  /** For messages: the file, or the database (host, port, name; never a password). */
  readonly where: string;
  /** Told about every VM state change this process makes (the daemon's metrics). Errors are ignored. */
  onVmTransition: VmTransitionListener | undefined;

  pool(name: string): Awaitable<PoolState>;
  setPaused(name: string, paused: boolean): Awaitable<void>;
  setMinRunners(name: string, n: number | undefined): Awaitable<void>;
  recordFailure(name: string, at: number): Awaitable<PoolState>;
  forgetPool(name: string): Awaitable<void>;
  clearFailures(name: string): Awaitable<void>;

  /** Records a VM unconditionally (tests, tools); the daemon claims with claimVm. */
  insertVm(v: NewVm): Awaitable<VmRecord>;
  /** Places a VM in one transaction: the pool's limits hold for the fleet, the host stays within its capacity. */
  claimVm(req: ClaimRequest): Awaitable<ClaimResult>;
  vm(id: string): Awaitable<VmRecord | undefined>;
  vmByName(name: string): Awaitable<VmRecord | undefined>;
  vms(filter?: VmFilter): Awaitable<VmRecord[]>;
  setRunnerId(id: string, githubRunnerId: number): Awaitable<void>;
  markIdle(id: string, at: number): Awaitable<boolean>;
  markBusy(id: string, jobId: number | undefined, at: number): Awaitable<boolean>;
  markFinished(id: string, reason: string, at: number): Awaitable<boolean>;
  /** Its host is stopping it: it no longer counts as a kept runner of its pool. */
  markStopping(id: string, reason: string): Awaitable<void>;

  upsertJob(j: NonNullable<WebhookRecord["job"]> & { at: number }): Awaitable<JobRecord>;
  setJobPool(id: number, pool: string | undefined): Awaitable<void>;
  job(id: number): Awaitable<JobRecord | undefined>;
  jobs(filter?: { status?: JobStatus; pool?: string }): Awaitable<JobRecord[]>;

  knowsDelivery(d: { id: string; action?: string; jobId?: number; digest?: string }): Awaitable<boolean>;
  /** The delivery and what it says about its job (and the VM it names) in one transaction. */
  recordWebhook(w: WebhookRecord): Awaitable<WebhookOutcome>;

  /** Forgets finished VMs, completed jobs and deliveries from before `before` (ms epoch). */
  prune(before: number): Awaitable<{ vms: number; jobs: number; deliveries: number }>;

  /** Registers (or re-registers) this host as active; heartbeat keeps it so. */
  registerHost(h: HostInfo): Awaitable<void>;
  /** Updates this host's heartbeat (and info); its record afterwards (state "dead" if another host declared it so). */
  heartbeat(h: HostInfo, polls: string[]): Awaitable<HostRecord | undefined>;
  setHostState(id: string, state: HostState): Awaitable<void>;
  hosts(): Awaitable<HostRecord[]>;
  /**
   * Hosts (other than `by`) whose heartbeat is older than deadAfterMs are declared dead and
   * their live VMs finished ("host-dead"); each dead host is taken by one survivor only.
   */
  reapDeadHosts(by: string, deadAfterMs: number, at: number): Awaitable<{ host: string; vms: VmRecord[] }[]>;
  /**
   * The GitHub targets (keys) whose poller this host is: it holds each one's lock until it
   * closes or loses its connection; keys not asked for again are released.
   */
  lead(keys: readonly string[]): Awaitable<Set<string>>;
  /** Called when another host records something that needs a pass here (a job, a freed slot). */
  onWake(cb: () => void): void;
  /** A cheap round trip: throws while the store is unreachable. */
  ping(): Awaitable<void>;
  close(): Awaitable<void>;
}
