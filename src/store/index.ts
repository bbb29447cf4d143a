// The `civm serve` state of one host: one SQLite database (better-sqlite3, WAL) in the state
// dir, the default store (a fleet shares PostgreSQL instead: postgres.ts; both implement
// Store, types.ts). Everything the daemon must know after a crash lives here: pool
// overrides, every runner VM it started (recorded before the VM is), jobs seen through
// webhooks or the poll, webhook deliveries (for de-duplication) and the host itself. Schema
// changes are numbered migrations applied in order inside a transaction; PRAGMA
// user_version holds the number applied.
import { createRequire } from "node:module";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import type Sqlite from "better-sqlite3";
import { CivmError } from "../errors/index.js";
import { decideClaim } from "./claim.js";
import { JOB_STATUS_ORDER, opt, toHost, toJob, toPool, toVm, type Row } from "./rows.js";
import type { ClaimRequest, ClaimResult, HostInfo, HostRecord, HostState, JobRecord, JobStatus, NewVm, PoolState, Store, VmFilter, VmRecord, VmTransitionListener, WebhookOutcome, WebhookRecord } from "./types.js";

export const STORE_FILE = "serve.db";

export * from "./types.js";
export { decideClaim, type ClaimFacts } from "./claim.js";

/** Migration n (1-based) brings the schema from version n-1 to n. Never edit a released one. */
export const MIGRATIONS: readonly string[] = [
  `CREATE TABLE pools (
     name TEXT PRIMARY KEY,
     paused INTEGER NOT NULL DEFAULT 0,
     min_runners_override INTEGER,
     failures INTEGER NOT NULL DEFAULT 0,
     last_failure_at INTEGER
   );
   CREATE TABLE vms (
     id TEXT PRIMARY KEY,
     pool TEXT NOT NULL,
     name TEXT NOT NULL UNIQUE,
     state TEXT NOT NULL CHECK (state IN ('starting','idle','busy','finished')),
     github_runner_id INTEGER,
     image_key TEXT NOT NULL,
     created_at INTEGER NOT NULL,
     started_at INTEGER,
     idle_since INTEGER,
     finished_at INTEGER,
     job_id INTEGER,
     exit_reason TEXT
   );
   CREATE INDEX vms_pool_state ON vms (pool, state);
   CREATE TABLE jobs (
     id INTEGER PRIMARY KEY,
     labels TEXT NOT NULL,
     status TEXT NOT NULL CHECK (status IN ('queued','in_progress','completed')),
     pool TEXT,
     repository TEXT,
     runner_name TEXT,
     queued_at INTEGER,
     started_at INTEGER,
     completed_at INTEGER,
     conclusion TEXT
   );
   CREATE INDEX jobs_status ON jobs (status);
   CREATE TABLE deliveries (
     id TEXT PRIMARY KEY,
     event TEXT NOT NULL,
     action TEXT,
     received_at INTEGER NOT NULL
   );`,
  // 2: the pool settings a VM was started with (a reload that changes them replaces idle runners).
  `ALTER TABLE vms ADD COLUMN config_key TEXT;`,
  // 3: when a VM became busy (job duration metric); completed jobs are pruned by age.
  `ALTER TABLE vms ADD COLUMN busy_since INTEGER;
   CREATE INDEX jobs_completed_at ON jobs (completed_at);
   CREATE INDEX deliveries_received_at ON deliveries (received_at);`,
  // 4: a delivery's job and body digest: a signed body replayed under a new delivery id is a
  // duplicate too.
  `ALTER TABLE deliveries ADD COLUMN job_id INTEGER;
   ALTER TABLE deliveries ADD COLUMN digest TEXT;
   CREATE UNIQUE INDEX deliveries_job_action_digest ON deliveries (job_id, action, digest) WHERE job_id IS NOT NULL AND digest IS NOT NULL;`,
  // 5: hosts (one here; a fleet's in PostgreSQL), the host of each VM and what it takes of
  // the host's capacity, and whether its host is stopping it (then it is no kept runner).
  `ALTER TABLE vms ADD COLUMN host TEXT;
   ALTER TABLE vms ADD COLUMN cpus INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE vms ADD COLUMN ram_bytes INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE vms ADD COLUMN stopping TEXT;
   CREATE TABLE hosts (
     id TEXT PRIMARY KEY,
     address TEXT NOT NULL,
     cpus INTEGER NOT NULL,
     ram_bytes INTEGER NOT NULL,
     pools TEXT NOT NULL,
     state TEXT NOT NULL CHECK (state IN ('active','draining','stopped','dead')),
     version TEXT NOT NULL,
     started_at INTEGER NOT NULL,
     heartbeat_at INTEGER NOT NULL,
     polls TEXT NOT NULL DEFAULT '[]',
     dead_at INTEGER,
     dead_by TEXT
   );`,
];

let driver: (new (file: string) => Sqlite.Database) | undefined;
function openDatabase(file: string): Sqlite.Database {
  // Loaded on first use: a native module, needed only by the daemon.
  driver ??= createRequire(import.meta.url)("better-sqlite3") as new (file: string) => Sqlite.Database;
  return new driver(file);
}

export class StateStore implements Store {
  readonly kind = "sqlite" as const;
  readonly file: string;
  private readonly db: Sqlite.Database;
  /** Told about every VM state change, wherever it happens (the daemon's metrics). Errors are ignored. */
  onVmTransition: VmTransitionListener | undefined;

  /** Opens (creating if needed) `<stateDir>/serve.db` and applies pending migrations; ":memory:" for tests. */
  constructor(stateDir: string | ":memory:", opts: { migrations?: readonly string[] } = {}) {
    if (stateDir === ":memory:") this.file = ":memory:";
    else {
      mkdirSync(stateDir, { recursive: true, mode: 0o700 });
      this.file = join(stateDir, STORE_FILE);
    }
    this.db = openDatabase(this.file);
    this.db.pragma("journal_mode = WAL");
    this.db.pragma("synchronous = NORMAL");
    this.db.pragma("foreign_keys = ON");
    this.migrate(opts.migrations ?? MIGRATIONS);
  }

  get where(): string {
    return this.file;
  }

  get schemaVersion(): number {
    return this.db.pragma("user_version", { simple: true }) as number;
  }

  private migrate(migrations: readonly string[]): void {
    const current = this.schemaVersion;
    if (current > migrations.length) {
      throw new CivmError("host", `${this.file} has schema version ${current}, newer than this civm knows (${migrations.length}); run a newer civm or move the file away.`);
    }
    migrations.slice(current).forEach((sql, i) => {
      const version = current + i + 1;
      this.db.transaction(() => {
        this.db.exec(sql);
        this.db.pragma(`user_version = ${version}`);
      })();
    });
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  // ---- pools ------------------------------------------------------------------------------

  pool(name: string): PoolState {
    return toPool(name, this.db.prepare("SELECT * FROM pools WHERE name = ?").get(name) as Row | undefined);
  }

  private ensurePool(name: string): void {
    this.db.prepare("INSERT OR IGNORE INTO pools (name) VALUES (?)").run(name);
  }

  setPaused(name: string, paused: boolean): void {
    this.ensurePool(name);
    this.db.prepare("UPDATE pools SET paused = ? WHERE name = ?").run(paused ? 1 : 0, name);
  }

  /** undefined clears the override (back to the config's minRunners). */
  setMinRunners(name: string, n: number | undefined): void {
    this.ensurePool(name);
    this.db.prepare("UPDATE pools SET min_runners_override = ? WHERE name = ?").run(n ?? null, name);
  }

  recordFailure(name: string, at: number): PoolState {
    this.ensurePool(name);
    this.db.prepare("UPDATE pools SET failures = failures + 1, last_failure_at = ? WHERE name = ?").run(at, name);
    return this.pool(name);
  }

  /** A pool removed from the config is gone: forget its overrides and failures. */
  forgetPool(name: string): void {
    this.db.prepare("DELETE FROM pools WHERE name = ?").run(name);
  }

  clearFailures(name: string): void {
    this.ensurePool(name);
    this.db.prepare("UPDATE pools SET failures = 0, last_failure_at = NULL WHERE name = ?").run(name);
  }

  // ---- VMs / runners --------------------------------------------------------------------

  /** Records a VM before any of its resources exist; state "starting". */
  insertVm(v: NewVm): VmRecord {
    this.db
      .prepare("INSERT INTO vms (id, pool, name, state, image_key, config_key, created_at, host, cpus, ram_bytes) VALUES (?, ?, ?, 'starting', ?, ?, ?, ?, ?, ?)")
      .run(v.id, v.pool, v.name, v.imageKey, v.configKey ?? null, v.createdAt, v.host ?? null, v.cpus ?? 0, v.ramBytes ?? 0);
    return this.vm(v.id) as VmRecord;
  }

  /** The placement rule (claim.ts) on this host's own VMs, in one transaction. */
  claimVm(req: ClaimRequest): ClaimResult {
    return this.db.transaction((): ClaimResult => {
      const pool = this.pool(req.vm.pool);
      const c = this.db
        .prepare("SELECT COUNT(*) AS live, COUNT(*) FILTER (WHERE stopping IS NULL) AS kept, COUNT(*) FILTER (WHERE state = 'busy') AS busy FROM vms WHERE pool = ? AND state != 'finished'")
        .get(req.vm.pool) as { live: number; kept: number; busy: number };
      const queued = (this.db.prepare("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued' AND pool = ?").get(req.vm.pool) as { n: number }).n;
      const h = this.db.prepare("SELECT state, cpus, ram_bytes FROM hosts WHERE id = ?").get(req.host) as { state: HostState; cpus: number; ram_bytes: number } | undefined;
      const used = this.db.prepare("SELECT COALESCE(SUM(cpus), 0) AS cpus, COALESCE(SUM(ram_bytes), 0) AS ram FROM vms WHERE state != 'finished' AND (host = ? OR host IS NULL)").get(req.host) as { cpus: number; ram: number };
      const d = decideClaim({
        pool: { paused: pool.paused, minRunnersOverride: pool.minRunnersOverride, minRunners: req.minRunners, maxRunners: req.maxRunners },
        ...c,
        queued,
        host: { id: req.host, state: h?.state, cpus: h?.cpus ?? 0, ramBytes: h?.ram_bytes ?? 0, usedCpus: used.cpus, usedRamBytes: used.ram },
        others: [],
        vm: req.vm,
        waitedMs: req.waitedMs,
        graceMs: req.graceMs,
      });
      if (!d.claimed) return d;
      return { claimed: true, vm: this.insertVm(req.vm) };
    })();
  }

  vm(id: string): VmRecord | undefined {
    const row = this.db.prepare("SELECT * FROM vms WHERE id = ?").get(id) as Row | undefined;
    return row && toVm(row);
  }

  vmByName(name: string): VmRecord | undefined {
    const row = this.db.prepare("SELECT * FROM vms WHERE name = ?").get(name) as Row | undefined;
    return row && toVm(row);
  }

  /** VMs, oldest first; `live` leaves out finished ones. */
  vms(filter: VmFilter = {}): VmRecord[] {
    const where: string[] = [];
    const args: unknown[] = [];
    if (filter.pool !== undefined) (where.push("pool = ?"), args.push(filter.pool));
    // VMs recorded before hosts were are this host's (one host per SQLite store).
    if (filter.host !== undefined) (where.push("(host = ? OR host IS NULL)"), args.push(filter.host));
    if (filter.live) where.push("state != 'finished'");
    if (filter.state !== undefined) (where.push("state = ?"), args.push(filter.state));
    const sql = `SELECT * FROM vms${where.length ? ` WHERE ${where.join(" AND ")}` : ""} ORDER BY created_at, id`;
    return (this.db.prepare(sql).all(...args) as Row[]).map(toVm);
  }

  setRunnerId(id: string, githubRunnerId: number): void {
    this.db.prepare("UPDATE vms SET github_runner_id = ? WHERE id = ?").run(githubRunnerId, id);
  }

  /** starting → idle (VM up, runner registered). No effect on a VM already past it. */
  markIdle(id: string, at: number): boolean {
    return this.transition(id, () => this.db.prepare("UPDATE vms SET state = 'idle', started_at = COALESCE(started_at, ?), idle_since = ? WHERE id = ? AND state = 'starting'").run(at, at, id).changes === 1);
  }

  /** starting|idle → busy with a job. */
  markBusy(id: string, jobId: number | undefined, at: number): boolean {
    return this.transition(
      id,
      () =>
        this.db
          .prepare("UPDATE vms SET state = 'busy', started_at = COALESCE(started_at, ?), busy_since = COALESCE(busy_since, ?), idle_since = NULL, job_id = COALESCE(?, job_id) WHERE id = ? AND state IN ('starting','idle')")
          .run(at, at, jobId ?? null, id).changes === 1,
    );
  }

  /** Any state → finished, once; the first exit reason wins. */
  markFinished(id: string, reason: string, at: number): boolean {
    return this.transition(id, () => this.db.prepare("UPDATE vms SET state = 'finished', finished_at = ?, exit_reason = ?, idle_since = NULL WHERE id = ? AND state != 'finished'").run(at, reason, id).changes === 1);
  }

  markStopping(id: string, reason: string): void {
    this.db.prepare("UPDATE vms SET stopping = COALESCE(stopping, ?) WHERE id = ?").run(reason, id);
  }

  /** Runs a state-changing update; when it changed the row, tells the listener. */
  private transition(id: string, update: () => boolean): boolean {
    const listener = this.onVmTransition;
    const from = listener ? this.vm(id)?.state : undefined;
    const changed = update();
    if (changed && listener && from !== undefined) {
      const after = this.vm(id);
      try {
        if (after) listener(after, from);
      } catch {
        // a metrics listener never breaks a state change
      }
    }
    return changed;
  }

  /** Forgets finished VMs that ended before `before` (ms epoch); returns how many. Live VMs are never touched. */
  pruneFinished(before: number): number {
    return this.db.prepare("DELETE FROM vms WHERE state = 'finished' AND finished_at IS NOT NULL AND finished_at < ?").run(before).changes;
  }

  // ---- jobs -------------------------------------------------------------------------------

  /**
   * Records what a webhook or the poll says about a job. Status only moves forward
   * (deliveries arrive out of order); timestamps and fields fill in but are not overwritten.
   */
  upsertJob(j: {
    id: number;
    labels: readonly string[];
    status: JobStatus;
    at: number;
    pool?: string;
    repository?: string;
    runnerName?: string;
    conclusion?: string;
  }): JobRecord {
    const old = this.job(j.id);
    const status = old && JOB_STATUS_ORDER[old.status] > JOB_STATUS_ORDER[j.status] ? old.status : j.status;
    const stamp = (s: JobStatus, prev: number | undefined) => prev ?? (j.status === s ? j.at : null);
    this.db
      .prepare(
        `INSERT INTO jobs (id, labels, status, pool, repository, runner_name, queued_at, started_at, completed_at, conclusion)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (id) DO UPDATE SET status = excluded.status,
           pool = COALESCE(jobs.pool, excluded.pool), repository = COALESCE(jobs.repository, excluded.repository),
           runner_name = COALESCE(excluded.runner_name, jobs.runner_name),
           queued_at = excluded.queued_at, started_at = excluded.started_at, completed_at = excluded.completed_at,
           conclusion = COALESCE(excluded.conclusion, jobs.conclusion)`,
      )
      .run(
        j.id,
        JSON.stringify(old?.labels.length ? old.labels : j.labels),
        status,
        j.pool ?? null,
        j.repository ?? null,
        j.runnerName ?? null,
        stamp("queued", old?.queuedAt),
        stamp("in_progress", old?.startedAt),
        stamp("completed", old?.completedAt),
        j.conclusion ?? null,
      );
    return this.job(j.id) as JobRecord;
  }

  /** Moves a job to another pool (undefined: none serves it), e.g. after a config reload. */
  setJobPool(id: number, pool: string | undefined): void {
    this.db.prepare("UPDATE jobs SET pool = ? WHERE id = ?").run(pool ?? null, id);
  }

  job(id: number): JobRecord | undefined {
    const row = this.db.prepare("SELECT * FROM jobs WHERE id = ?").get(id) as Row | undefined;
    return row && toJob(row);
  }

  /** Forgets completed jobs that completed before `before` (ms epoch); queued and running ones stay. */
  pruneJobs(before: number): number {
    return this.db.prepare("DELETE FROM jobs WHERE status = 'completed' AND completed_at IS NOT NULL AND completed_at < ?").run(before).changes;
  }

  jobs(filter: { status?: JobStatus; pool?: string } = {}): JobRecord[] {
    const where: string[] = [];
    const args: unknown[] = [];
    if (filter.status !== undefined) (where.push("status = ?"), args.push(filter.status));
    if (filter.pool !== undefined) (where.push("pool = ?"), args.push(filter.pool));
    const sql = `SELECT * FROM jobs${where.length ? ` WHERE ${where.join(" AND ")}` : ""} ORDER BY id`;
    return (this.db.prepare(sql).all(...args) as Row[]).map(toJob);
  }

  // ---- webhook deliveries -------------------------------------------------------------------

  /**
   * true the first time a delivery is seen; false for a redelivery (same id) or a replay (the
   * same job, action and body digest under another id). Call it in the transaction that
   * records what the delivery says, so a failure in between records neither.
   */
  recordDelivery(d: { id: string; event: string; action?: string; at: number; jobId?: number; digest?: string }): boolean {
    return (
      this.db
        .prepare("INSERT OR IGNORE INTO deliveries (id, event, action, received_at, job_id, digest) VALUES (?, ?, ?, ?, ?, ?)")
        .run(d.id, d.event, d.action ?? null, d.at, d.jobId ?? null, d.digest ?? null).changes === 1
    );
  }

  /** Whether recordDelivery would answer false (a cheap check before any work). */
  knowsDelivery(d: { id: string; action?: string; jobId?: number; digest?: string }): boolean {
    if (this.db.prepare("SELECT 1 FROM deliveries WHERE id = ?").get(d.id)) return true;
    if (d.jobId === undefined || d.digest === undefined) return false;
    return this.db.prepare("SELECT 1 FROM deliveries WHERE job_id = ? AND action IS ? AND digest = ?").get(d.jobId, d.action ?? null, d.digest) !== undefined;
  }

  /**
   * Forgets deliveries received before `before` (GitHub redelivers within days, not weeks):
   * a delivery id stays known, and a redelivery of it a duplicate, until then.
   */
  pruneDeliveries(before: number): number {
    return this.db.prepare("DELETE FROM deliveries WHERE received_at < ?").run(before).changes;
  }

  recordWebhook(w: WebhookRecord): WebhookOutcome {
    return this.db.transaction((): WebhookOutcome => {
      if (!this.recordDelivery({ ...w.delivery, at: w.at })) return { outcome: "duplicate" };
      const j = w.job;
      if (!j) return { outcome: "ignored" };
      const before = this.job(j.id);
      const vm = j.runnerName ? this.vmByName(j.runnerName) : undefined;
      // Not a job for any pool, not one already followed, not on a civm runner: not ours.
      if (j.pool === undefined && !before && !vm) return { outcome: "ignored" };
      this.upsertJob({ ...j, at: w.at });
      if (vm && j.status === "in_progress") this.markBusy(vm.id, j.id, w.at);
      return { outcome: "accepted", before, vm };
    })();
  }

  prune(before: number): { vms: number; jobs: number; deliveries: number } {
    return this.db.transaction(() => ({ vms: this.pruneFinished(before), jobs: this.pruneJobs(before), deliveries: this.pruneDeliveries(before) }))();
  }

  /** Runs `fn` in one transaction. */
  transaction<T>(fn: () => T): T {
    return this.db.transaction(fn)();
  }

  // ---- the host --------------------------------------------------------------------------
  // One host per SQLite store: it is registered so `civm hosts` and the API look the same as
  // a fleet's; nothing here is shared, so there is no one else to declare dead or out-poll.

  registerHost(h: HostInfo): void {
    const now = Date.now();
    this.db
      .prepare(
        `INSERT INTO hosts (id, address, cpus, ram_bytes, pools, state, version, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, 'active', ?, ?, ?)
         ON CONFLICT (id) DO UPDATE SET address = excluded.address, cpus = excluded.cpus, ram_bytes = excluded.ram_bytes, pools = excluded.pools,
           state = 'active', version = excluded.version, started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, dead_at = NULL, dead_by = NULL`,
      )
      .run(h.id, h.address, h.cpus, h.ramBytes, JSON.stringify(h.pools), h.version, now, now);
  }

  heartbeat(h: HostInfo, polls: string[]): HostRecord | undefined {
    this.db.prepare("UPDATE hosts SET heartbeat_at = ?, address = ?, cpus = ?, ram_bytes = ?, pools = ?, polls = ? WHERE id = ?").run(Date.now(), h.address, h.cpus, h.ramBytes, JSON.stringify(h.pools), JSON.stringify(polls), h.id);
    return this.hosts().find((x) => x.id === h.id);
  }

  setHostState(id: string, state: HostState): void {
    this.db.prepare("UPDATE hosts SET state = ? WHERE id = ?").run(state, id);
  }

  hosts(): HostRecord[] {
    const rows = this.db
      .prepare(
        `SELECT h.*, ? - h.heartbeat_at AS age_ms,
           (SELECT COUNT(*) FROM vms v WHERE v.state = 'starting' AND (v.host = h.id OR v.host IS NULL)) AS starting,
           (SELECT COUNT(*) FROM vms v WHERE v.state = 'idle' AND (v.host = h.id OR v.host IS NULL)) AS idle,
           (SELECT COUNT(*) FROM vms v WHERE v.state = 'busy' AND (v.host = h.id OR v.host IS NULL)) AS busy,
           (SELECT COALESCE(SUM(cpus), 0) FROM vms v WHERE v.state != 'finished' AND (v.host = h.id OR v.host IS NULL)) AS used_cpus,
           (SELECT COALESCE(SUM(ram_bytes), 0) FROM vms v WHERE v.state != 'finished' AND (v.host = h.id OR v.host IS NULL)) AS used_ram
         FROM hosts h ORDER BY h.id`,
      )
      .all(Date.now()) as Row[];
    return rows.map(toHost);
  }

  reapDeadHosts(): { host: string; vms: VmRecord[] }[] {
    return [];
  }

  lead(keys: readonly string[]): Set<string> {
    return new Set(keys);
  }

  onWake(): void {}

  ping(): void {
    this.db.prepare("SELECT 1").get();
  }
}
