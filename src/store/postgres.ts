// The fleet's store: one PostgreSQL database shared by every host's `civm serve`
// (node-postgres). The same records as the SQLite store (types.ts) plus what a fleet needs:
// hosts with heartbeats by the database's clock, slot claims in transactions (the pool's row
// locked, then this host's: maxRunners and minRunners hold for the fleet, each host within
// its capacity), one poller per GitHub target (a session-level advisory lock held on a
// connection of its own; PostgreSQL drops it when that connection ends), dead-host reaping
// (FOR UPDATE SKIP LOCKED: one survivor per dead host) and LISTEN/NOTIFY so a job recorded
// by one host wakes the others. Tables live in the schema "civm"; migrations are numbered
// and applied under an advisory lock, so hosts starting together apply each once.
import { createHash } from "node:crypto";
import { createRequire } from "node:module";
import type pg from "pg";
import { CivmError, ExternalError, messageOf } from "../errors/index.js";
import { decideClaim } from "./claim.js";
import { toHost, toJob, toPool, toVm, type Row } from "./rows.js";
import type { ClaimRequest, ClaimResult, HostInfo, HostRecord, HostState, JobRecord, JobStatus, NewVm, PoolState, Store, VmFilter, VmRecord, VmTransitionListener, WebhookOutcome, WebhookRecord } from "./types.js";

/** Migration n (1-based) brings the schema from version n-1 to n. Never edit a released one. */
export const PG_MIGRATIONS: readonly string[] = [
  `CREATE TABLE pools (
     name TEXT PRIMARY KEY,
     paused BOOLEAN NOT NULL DEFAULT false,
     min_runners_override INTEGER,
     failures INTEGER NOT NULL DEFAULT 0,
     last_failure_at BIGINT
   );
   CREATE TABLE hosts (
     id TEXT PRIMARY KEY,
     address TEXT NOT NULL,
     cpus INTEGER NOT NULL,
     ram_bytes BIGINT NOT NULL,
     pools TEXT NOT NULL,
     state TEXT NOT NULL CHECK (state IN ('active','draining','stopped','dead')),
     version TEXT NOT NULL,
     started_at BIGINT NOT NULL,
     heartbeat_at BIGINT NOT NULL,
     polls TEXT NOT NULL DEFAULT '[]',
     dead_at BIGINT,
     dead_by TEXT
   );
   CREATE TABLE vms (
     id TEXT PRIMARY KEY,
     pool TEXT NOT NULL,
     host TEXT,
     name TEXT NOT NULL UNIQUE,
     state TEXT NOT NULL CHECK (state IN ('starting','idle','busy','finished')),
     github_runner_id BIGINT,
     image_key TEXT NOT NULL,
     config_key TEXT,
     cpus INTEGER NOT NULL DEFAULT 0,
     ram_bytes BIGINT NOT NULL DEFAULT 0,
     stopping TEXT,
     created_at BIGINT NOT NULL,
     started_at BIGINT,
     idle_since BIGINT,
     busy_since BIGINT,
     finished_at BIGINT,
     job_id BIGINT,
     exit_reason TEXT
   );
   CREATE INDEX vms_live_pool ON vms (pool) WHERE state <> 'finished';
   CREATE INDEX vms_live_host ON vms (host) WHERE state <> 'finished';
   CREATE INDEX vms_finished_at ON vms (finished_at) WHERE state = 'finished';
   CREATE TABLE jobs (
     id BIGINT PRIMARY KEY,
     labels TEXT NOT NULL,
     status TEXT NOT NULL CHECK (status IN ('queued','in_progress','completed')),
     pool TEXT,
     repository TEXT,
     runner_name TEXT,
     queued_at BIGINT,
     started_at BIGINT,
     completed_at BIGINT,
     conclusion TEXT
   );
   CREATE INDEX jobs_queued_pool ON jobs (pool) WHERE status = 'queued';
   CREATE INDEX jobs_completed_at ON jobs (completed_at);
   CREATE TABLE deliveries (
     id TEXT PRIMARY KEY,
     event TEXT NOT NULL,
     action TEXT,
     received_at BIGINT NOT NULL,
     job_id BIGINT,
     digest TEXT
   );
   CREATE INDEX deliveries_received_at ON deliveries (received_at);
   CREATE UNIQUE INDEX deliveries_job_action_digest ON deliveries (job_id, action, digest) WHERE job_id IS NOT NULL AND digest IS NOT NULL;`,
];

export const PG_SCHEMA = "civm";
/** The NOTIFY channel: something changed that other hosts' reconcilers should look at. */
export const WAKE_CHANNEL = "civm_wake";
/** Advisory lock ids: migrations, and one per GitHub target's poller (derived from its key). */
const MIGRATION_LOCK = lockId("civm:migrations");
/** The database's clock in ms: heartbeats and their age never depend on the hosts' clocks. */
const DB_NOW = "(extract(epoch from clock_timestamp()) * 1000)::bigint";
const RANK = (col: string) => `array_position(ARRAY['queued','in_progress','completed'], ${col})`;

/** A signed 64-bit advisory lock id from a name. */
export function lockId(name: string): string {
  return BigInt.asIntN(64, BigInt(`0x${createHash("sha256").update(name).digest("hex").slice(0, 16)}`)).toString();
}

/** A postgres:// URL without its password (for messages and logs). */
export function describeUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = "***";
    return u.toString();
  } catch {
    return "postgres://(unparsable URL)";
  }
}

type PgModule = typeof pg;
let driver: PgModule | undefined;
function loadPg(): PgModule {
  // Loaded on first use (only a fleet needs it), and not bundled: as better-sqlite3.
  driver ??= createRequire(import.meta.url)("pg") as PgModule;
  return driver;
}

interface Queryable {
  query(text: string, values?: unknown[]): Promise<pg.QueryResult>;
}

export interface PostgresStoreOptions {
  /** Names this host in application_name and the migrations table. */
  host?: string;
  migrations?: readonly string[];
  /** Connections in the pool (besides the session connection for locks and LISTEN); default 4. */
  poolSize?: number;
  /** A statement that takes longer fails (ms; default 15000). */
  queryTimeoutMs?: number;
  connectTimeoutMs?: number;
}

export class PostgresStore implements Store {
  readonly kind = "postgres" as const;
  readonly where: string;
  onVmTransition: VmTransitionListener | undefined;
  private readonly db: pg.Pool;
  private readonly clientConfig: pg.ClientConfig;
  private session: pg.Client | undefined;
  private sessionConnecting: Promise<pg.Client> | undefined;
  private readonly held = new Set<string>();
  private readonly wakeListeners: (() => void)[] = [];
  private closed = false;
  /** Migrations this process applied when it opened the store (0: the schema was up to date). */
  applied = 0;

  private constructor(
    readonly url: string,
    private readonly opts: PostgresStoreOptions,
  ) {
    const { Pool, types } = loadPg();
    this.where = describeUrl(url);
    // int8 (bigint) columns hold ms epochs and ids, all within 2^53: numbers, not strings.
    const parsers = { getTypeParser: (oid: number, format?: string) => (oid === 20 ? (v: string) => Number(v) : types.getTypeParser(oid, format as "text")) } as pg.CustomTypesConfig;
    this.clientConfig = {
      connectionString: url,
      types: parsers,
      options: `-c search_path=${PG_SCHEMA}`,
      application_name: `civm serve${opts.host ? ` ${opts.host}` : ""}`.slice(0, 63),
      query_timeout: opts.queryTimeoutMs ?? 15_000,
      connectionTimeoutMillis: opts.connectTimeoutMs ?? 5_000,
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
    };
    this.db = new Pool({ ...this.clientConfig, max: opts.poolSize ?? 4, idleTimeoutMillis: 30_000 });
    // An idle connection dropped by the server (a restart) must not crash the process: the
    // next query opens a new one.
    this.db.on("error", () => {});
  }

  /** Connects, applies pending migrations (one host at a time) and listens for wake-ups. */
  static async open(url: string, opts: PostgresStoreOptions = {}): Promise<PostgresStore> {
    const s = new PostgresStore(url, opts);
    try {
      s.applied = await s.migrate(opts.migrations ?? PG_MIGRATIONS);
    } catch (e) {
      await s.db.end().catch(() => {});
      if (e instanceof CivmError) throw e;
      throw new ExternalError(`cannot use the store ${s.where}: ${messageOf(e)}; check that PostgreSQL runs there, that the user may connect and create the schema "${PG_SCHEMA}" (GRANT CREATE ON DATABASE ...), and the password (PGPASSWORD or the URL).`, { cause: e });
    }
    return s;
  }

  /** Applies pending migrations in one transaction under an advisory lock; returns how many. */
  private async migrate(migrations: readonly string[]): Promise<number> {
    const c = await this.checkout();
    let failed: unknown;
    try {
      await c.query("BEGIN");
      // Hosts starting together queue here; each finds the schema as the first left it.
      await c.query("SELECT pg_advisory_xact_lock($1::bigint)", [MIGRATION_LOCK]);
      await c.query(`CREATE SCHEMA IF NOT EXISTS ${PG_SCHEMA}`);
      await c.query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), applied_by TEXT NOT NULL)");
      const current = Number((await c.query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")).rows[0].v);
      if (current > migrations.length) {
        throw new CivmError("host", `${this.where} has schema version ${current}, newer than this civm knows (${migrations.length}); run the newer civm on this host too.`);
      }
      for (let v = current + 1; v <= migrations.length; v++) {
        await c.query(migrations[v - 1]!);
        await c.query("INSERT INTO schema_migrations (version, applied_by) VALUES ($1, $2)", [v, this.opts.host ?? "?"]);
      }
      await c.query("COMMIT");
      return migrations.length - current;
    } catch (e) {
      failed = e;
      await c.query("ROLLBACK").catch(() => {});
      throw e;
    } finally {
      c.done(failed);
    }
  }

  /** Schema version (the highest migration applied). */
  async schemaVersion(): Promise<number> {
    return Number((await this.db.query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")).rows[0].v);
  }

  private async rows(sql: string, args: unknown[] = [], q: Queryable = this.db): Promise<Row[]> {
    return (await q.query(sql, args)).rows as Row[];
  }

  /** Runs `fn` in a transaction on one connection. */
  private async tx<T>(fn: (c: pg.PoolClient) => Promise<T>): Promise<T> {
    const c = await this.checkout();
    try {
      await c.query("BEGIN");
      const out = await fn(c);
      await c.query("COMMIT");
      c.done();
      return out;
    } catch (e) {
      await c.query("ROLLBACK").catch(() => {});
      // The connection may be broken (a server restart): it is not reused.
      c.done(e);
      throw e;
    }
  }

  /**
   * A pooled connection with an error listener while it is checked out: a connection the
   * server ends mid-transaction emits "error", which without a listener would crash the
   * process (the query itself fails too, and is handled by its caller).
   */
  private async checkout(): Promise<pg.PoolClient & { done(e?: unknown): void }> {
    const c = await this.db.connect();
    const ignore = () => {};
    c.on("error", ignore);
    return Object.assign(c, {
      done: (e?: unknown) => {
        c.off("error", ignore);
        c.release(e instanceof Error ? e : undefined);
      },
    });
  }

  private notify(q: Queryable = this.db): Promise<unknown> {
    return q.query("SELECT pg_notify($1, '')", [WAKE_CHANNEL]);
  }

  // ---- pools ------------------------------------------------------------------------------

  async pool(name: string): Promise<PoolState> {
    return toPool(name, (await this.rows("SELECT * FROM pools WHERE name = $1", [name]))[0]);
  }

  private ensurePool(name: string, q: Queryable = this.db): Promise<unknown> {
    return q.query("INSERT INTO pools (name) VALUES ($1) ON CONFLICT DO NOTHING", [name]);
  }

  async setPaused(name: string, paused: boolean): Promise<void> {
    await this.db.query("INSERT INTO pools (name, paused) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET paused = excluded.paused", [name, paused]);
    await this.notify();
  }

  async setMinRunners(name: string, n: number | undefined): Promise<void> {
    await this.db.query("INSERT INTO pools (name, min_runners_override) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET min_runners_override = excluded.min_runners_override", [name, n ?? null]);
    await this.notify();
  }

  async recordFailure(name: string, at: number): Promise<PoolState> {
    const r = await this.rows("INSERT INTO pools (name, failures, last_failure_at) VALUES ($1, 1, $2) ON CONFLICT (name) DO UPDATE SET failures = pools.failures + 1, last_failure_at = excluded.last_failure_at RETURNING *", [name, at]);
    return toPool(name, r[0]);
  }

  async forgetPool(name: string): Promise<void> {
    await this.db.query("DELETE FROM pools WHERE name = $1", [name]);
  }

  async clearFailures(name: string): Promise<void> {
    await this.db.query("UPDATE pools SET failures = 0, last_failure_at = NULL WHERE name = $1 AND failures <> 0", [name]);
  }

  // ---- VMs --------------------------------------------------------------------------------

  private async insert(v: NewVm, q: Queryable): Promise<VmRecord> {
    const r = await this.rows(
      "INSERT INTO vms (id, pool, name, state, image_key, config_key, created_at, host, cpus, ram_bytes) VALUES ($1, $2, $3, 'starting', $4, $5, $6, $7, $8, $9) RETURNING *",
      [v.id, v.pool, v.name, v.imageKey, v.configKey ?? null, v.createdAt, v.host ?? null, v.cpus ?? 0, v.ramBytes ?? 0],
      q,
    );
    return toVm(r[0]!);
  }

  insertVm(v: NewVm): Promise<VmRecord> {
    return this.insert(v, this.db);
  }

  /**
   * The pool's row, then this host's, locked for the transaction: claims for one pool are
   * serialized across the fleet, claims on one host too (pools of several targets are
   * reconciled at once); the rule itself is claim.ts.
   */
  claimVm(req: ClaimRequest): Promise<ClaimResult> {
    return this.tx(async (c): Promise<ClaimResult> => {
      await this.ensurePool(req.vm.pool, c);
      const pool = toPool(req.vm.pool, (await this.rows("SELECT * FROM pools WHERE name = $1 FOR UPDATE", [req.vm.pool], c))[0]);
      await c.query("SELECT 1 FROM hosts WHERE id = $1 FOR UPDATE", [req.host]);
      const f = (
        await this.rows(
          `SELECT COUNT(*) AS live, COUNT(*) FILTER (WHERE stopping IS NULL) AS kept, COUNT(*) FILTER (WHERE state = 'busy') AS busy,
             (SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND pool = $1) AS queued
           FROM vms WHERE pool = $1 AND state <> 'finished'`,
          [req.vm.pool],
          c,
        )
      )[0]!;
      const hosts = await this.rows(
        `SELECT h.id, h.state, h.cpus, h.ram_bytes, h.pools, ${DB_NOW} - h.heartbeat_at AS age_ms,
           COALESCE(SUM(v.cpus), 0) AS used_cpus, COALESCE(SUM(v.ram_bytes), 0) AS used_ram
         FROM hosts h LEFT JOIN vms v ON v.host = h.id AND v.state <> 'finished'
         WHERE h.id = $1 OR h.state = 'active'
         GROUP BY h.id`,
        [req.host],
        c,
      );
      const asHost = (h: Row) => ({ id: h.id as string, cpus: Number(h.cpus), ramBytes: Number(h.ram_bytes), usedCpus: Number(h.used_cpus), usedRamBytes: Number(h.used_ram) });
      const me = hosts.find((h) => h.id === req.host);
      const others = hosts.filter((h) => h.id !== req.host && Number(h.age_ms) < req.deadAfterMs && (JSON.parse(h.pools as string) as string[]).includes(req.vm.pool)).map(asHost);
      const d = decideClaim({
        pool: { paused: pool.paused, minRunnersOverride: pool.minRunnersOverride, minRunners: req.minRunners, maxRunners: req.maxRunners },
        live: Number(f.live),
        kept: Number(f.kept),
        busy: Number(f.busy),
        queued: Number(f.queued),
        host: me ? { ...asHost(me), state: me.state as HostState } : { id: req.host, state: undefined, cpus: 0, ramBytes: 0, usedCpus: 0, usedRamBytes: 0 },
        others,
        vm: req.vm,
        waitedMs: req.waitedMs,
        graceMs: req.graceMs,
      });
      if (!d.claimed) return d;
      return { claimed: true, vm: await this.insert(req.vm, c) };
    });
  }

  async vm(id: string): Promise<VmRecord | undefined> {
    const r = (await this.rows("SELECT * FROM vms WHERE id = $1", [id]))[0];
    return r && toVm(r);
  }

  async vmByName(name: string): Promise<VmRecord | undefined> {
    const r = (await this.rows("SELECT * FROM vms WHERE name = $1", [name]))[0];
    return r && toVm(r);
  }

  async vms(filter: VmFilter = {}): Promise<VmRecord[]> {
    const where: string[] = [];
    const args: unknown[] = [];
    const arg = (v: unknown) => (args.push(v), `$${args.length}`);
    if (filter.pool !== undefined) where.push(`pool = ${arg(filter.pool)}`);
    if (filter.host !== undefined) where.push(`host = ${arg(filter.host)}`);
    if (filter.live) where.push("state <> 'finished'");
    if (filter.state !== undefined) where.push(`state = ${arg(filter.state)}`);
    return (await this.rows(`SELECT * FROM vms${where.length ? ` WHERE ${where.join(" AND ")}` : ""} ORDER BY created_at, id`, args)).map(toVm);
  }

  async setRunnerId(id: string, githubRunnerId: number): Promise<void> {
    await this.db.query("UPDATE vms SET github_runner_id = $1 WHERE id = $2", [githubRunnerId, id]);
  }

  /** One guarded UPDATE that also returns the state before it; tells the listener when it changed the row. */
  private async transition(id: string, set: string, guard: string, args: unknown[], q: Queryable = this.db): Promise<boolean> {
    const r = await this.rows(
      `WITH old AS (SELECT id, state AS prev FROM vms WHERE id = $1 FOR UPDATE)
       UPDATE vms v SET ${set} FROM old WHERE v.id = old.id AND ${guard} RETURNING v.*, old.prev`,
      [id, ...args],
      q,
    );
    const row = r[0];
    if (!row) return false;
    const listener = this.onVmTransition;
    if (listener) {
      try {
        listener(toVm(row), row.prev as VmRecord["state"]);
      } catch {
        // a metrics listener never breaks a state change
      }
    }
    return true;
  }

  markIdle(id: string, at: number): Promise<boolean> {
    return this.transition(id, "state = 'idle', started_at = COALESCE(v.started_at, $2), idle_since = $2", "v.state = 'starting'", [at]);
  }

  markBusy(id: string, jobId: number | undefined, at: number, q?: Queryable): Promise<boolean> {
    return this.transition(id, "state = 'busy', started_at = COALESCE(v.started_at, $2), busy_since = COALESCE(v.busy_since, $2), idle_since = NULL, job_id = COALESCE($3, v.job_id)", "v.state IN ('starting','idle')", [at, jobId ?? null], q);
  }

  async markFinished(id: string, reason: string, at: number): Promise<boolean> {
    const changed = await this.transition(id, "state = 'finished', finished_at = $2, exit_reason = $3, idle_since = NULL", "v.state <> 'finished'", [at, reason]);
    // A slot is free: another host may place the pool's next runner.
    if (changed) await this.notify().catch(() => {});
    return changed;
  }

  async markStopping(id: string, reason: string): Promise<void> {
    await this.db.query("UPDATE vms SET stopping = COALESCE(stopping, $2) WHERE id = $1", [id, reason]);
  }

  // ---- jobs -------------------------------------------------------------------------------

  /** Status only moves forward, timestamps and fields fill in but are not overwritten: all in the statement (hosts record at once). */
  async upsertJob(j: NonNullable<WebhookRecord["job"]> & { at: number }, q: Queryable = this.db): Promise<JobRecord> {
    const r = await this.rows(
      `INSERT INTO jobs (id, labels, status, pool, repository, runner_name, queued_at, started_at, completed_at, conclusion)
       VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $3 = 'queued' THEN $7::bigint END, CASE WHEN $3 = 'in_progress' THEN $7::bigint END, CASE WHEN $3 = 'completed' THEN $7::bigint END, $8)
       ON CONFLICT (id) DO UPDATE SET
         labels = CASE WHEN jobs.labels = '[]' THEN excluded.labels ELSE jobs.labels END,
         status = CASE WHEN ${RANK("excluded.status")} > ${RANK("jobs.status")} THEN excluded.status ELSE jobs.status END,
         pool = COALESCE(jobs.pool, excluded.pool), repository = COALESCE(jobs.repository, excluded.repository),
         runner_name = COALESCE(excluded.runner_name, jobs.runner_name),
         queued_at = COALESCE(jobs.queued_at, excluded.queued_at), started_at = COALESCE(jobs.started_at, excluded.started_at),
         completed_at = COALESCE(jobs.completed_at, excluded.completed_at),
         conclusion = COALESCE(excluded.conclusion, jobs.conclusion)
       RETURNING *`,
      [j.id, JSON.stringify(j.labels), j.status, j.pool ?? null, j.repository ?? null, j.runnerName ?? null, j.at, j.conclusion ?? null],
      q,
    );
    return toJob(r[0]!);
  }

  async setJobPool(id: number, pool: string | undefined): Promise<void> {
    await this.db.query("UPDATE jobs SET pool = $1 WHERE id = $2", [pool ?? null, id]);
  }

  async job(id: number): Promise<JobRecord | undefined> {
    const r = (await this.rows("SELECT * FROM jobs WHERE id = $1", [id]))[0];
    return r && toJob(r);
  }

  async jobs(filter: { status?: JobStatus; pool?: string } = {}): Promise<JobRecord[]> {
    const where: string[] = [];
    const args: unknown[] = [];
    if (filter.status !== undefined) (args.push(filter.status), where.push(`status = $${args.length}`));
    if (filter.pool !== undefined) (args.push(filter.pool), where.push(`pool = $${args.length}`));
    return (await this.rows(`SELECT * FROM jobs${where.length ? ` WHERE ${where.join(" AND ")}` : ""} ORDER BY id`, args)).map(toJob);
  }

  // ---- webhook deliveries -------------------------------------------------------------------

  async knowsDelivery(d: { id: string; action?: string; jobId?: number; digest?: string }): Promise<boolean> {
    if ((await this.rows("SELECT 1 FROM deliveries WHERE id = $1", [d.id])).length) return true;
    if (d.jobId === undefined || d.digest === undefined) return false;
    return (await this.rows("SELECT 1 FROM deliveries WHERE job_id = $1 AND action IS NOT DISTINCT FROM $2 AND digest = $3", [d.jobId, d.action ?? null, d.digest])).length > 0;
  }

  async recordWebhook(w: WebhookRecord): Promise<WebhookOutcome> {
    const out = await this.tx(async (c): Promise<WebhookOutcome> => {
      const d = w.delivery;
      const ins = await c.query("INSERT INTO deliveries (id, event, action, received_at, job_id, digest) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING", [d.id, d.event, d.action ?? null, w.at, d.jobId ?? null, d.digest ?? null]);
      if (ins.rowCount !== 1) return { outcome: "duplicate" };
      const j = w.job;
      if (!j) return { outcome: "ignored" };
      const b = (await this.rows("SELECT * FROM jobs WHERE id = $1 FOR UPDATE", [j.id], c))[0];
      const before = b && toJob(b);
      const v = j.runnerName ? (await this.rows("SELECT * FROM vms WHERE name = $1", [j.runnerName], c))[0] : undefined;
      const vm = v && toVm(v);
      if (j.pool === undefined && !before && !vm) return { outcome: "ignored" };
      await this.upsertJob({ ...j, at: w.at }, c);
      if (vm && j.status === "in_progress") await this.markBusy(vm.id, j.id, w.at, c);
      // Every host's reconciler looks at the demand now, not at its next tick.
      await this.notify(c);
      return { outcome: "accepted", before, vm };
    });
    return out;
  }

  prune(before: number): Promise<{ vms: number; jobs: number; deliveries: number }> {
    return this.tx(async (c) => ({
      vms: (await c.query("DELETE FROM vms WHERE state = 'finished' AND finished_at IS NOT NULL AND finished_at < $1", [before])).rowCount ?? 0,
      jobs: (await c.query("DELETE FROM jobs WHERE status = 'completed' AND completed_at IS NOT NULL AND completed_at < $1", [before])).rowCount ?? 0,
      deliveries: (await c.query("DELETE FROM deliveries WHERE received_at < $1", [before])).rowCount ?? 0,
    }));
  }

  // ---- hosts ------------------------------------------------------------------------------

  async registerHost(h: HostInfo): Promise<void> {
    await this.db.query(
      `INSERT INTO hosts (id, address, cpus, ram_bytes, pools, state, version, started_at, heartbeat_at) VALUES ($1, $2, $3, $4, $5, 'active', $6, ${DB_NOW}, ${DB_NOW})
       ON CONFLICT (id) DO UPDATE SET address = excluded.address, cpus = excluded.cpus, ram_bytes = excluded.ram_bytes, pools = excluded.pools,
         state = 'active', version = excluded.version, started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, polls = '[]', dead_at = NULL, dead_by = NULL`,
      [h.id, h.address, h.cpus, h.ramBytes, JSON.stringify(h.pools), h.version],
    );
    await this.notify();
  }

  /** A host another declared dead stays dead here (its heartbeat is not renewed): it must re-register. */
  async heartbeat(h: HostInfo, polls: string[]): Promise<HostRecord | undefined> {
    await this.db.query(`UPDATE hosts SET heartbeat_at = ${DB_NOW}, address = $2, cpus = $3, ram_bytes = $4, pools = $5, polls = $6 WHERE id = $1 AND state <> 'dead'`, [
      h.id,
      h.address,
      h.cpus,
      h.ramBytes,
      JSON.stringify(h.pools),
      JSON.stringify(polls),
    ]);
    return (await this.hostRows(h.id))[0];
  }

  async setHostState(id: string, state: HostState): Promise<void> {
    await this.db.query("UPDATE hosts SET state = $2 WHERE id = $1", [id, state]);
    await this.notify();
  }

  private async hostRows(id?: string): Promise<HostRecord[]> {
    const rows = await this.rows(
      `SELECT h.*, ${DB_NOW} - h.heartbeat_at AS age_ms,
         COUNT(v.id) FILTER (WHERE v.state = 'starting') AS starting, COUNT(v.id) FILTER (WHERE v.state = 'idle') AS idle,
         COUNT(v.id) FILTER (WHERE v.state = 'busy') AS busy,
         COALESCE(SUM(v.cpus), 0) AS used_cpus, COALESCE(SUM(v.ram_bytes), 0) AS used_ram
       FROM hosts h LEFT JOIN vms v ON v.host = h.id AND v.state <> 'finished'
       ${id !== undefined ? "WHERE h.id = $1" : ""}
       GROUP BY h.id ORDER BY h.id`,
      id !== undefined ? [id] : [],
    );
    return rows.map(toHost);
  }

  hosts(): Promise<HostRecord[]> {
    return this.hostRows();
  }

  reapDeadHosts(by: string, deadAfterMs: number, at: number): Promise<{ host: string; vms: VmRecord[] }[]> {
    return this.tx(async (c) => {
      // SKIP LOCKED: a dead host another survivor is reaping right now is its.
      const dead = (await this.rows(`SELECT id FROM hosts WHERE id <> $1 AND state IN ('active','draining') AND ${DB_NOW} - heartbeat_at > $2 FOR UPDATE SKIP LOCKED`, [by, deadAfterMs], c)).map((r) => r.id as string);
      if (dead.length === 0) return [];
      await c.query(`UPDATE hosts SET state = 'dead', dead_at = ${DB_NOW}, dead_by = $2, polls = '[]' WHERE id = ANY($1)`, [dead, by]);
      const vms = (await this.rows("UPDATE vms SET state = 'finished', finished_at = $2, exit_reason = 'host-dead', idle_since = NULL WHERE host = ANY($1) AND state <> 'finished' RETURNING *", [dead, at], c)).map(toVm);
      await this.notify(c);
      return dead.map((host) => ({ host, vms: vms.filter((v) => v.host === host) }));
    });
  }

  // ---- the session connection: poller locks and wake-ups -------------------------------------

  private sessionClient(): Promise<pg.Client> {
    if (this.session) return Promise.resolve(this.session);
    this.sessionConnecting ??= (async () => {
      const { Client } = loadPg();
      const c = new Client(this.clientConfig);
      const lost = () => {
        // PostgreSQL drops this session's advisory locks with it: this host polls nothing now.
        if (this.session === c) this.session = undefined;
        this.held.clear();
      };
      c.on("error", lost);
      c.on("end", lost);
      c.on("notification", (m) => {
        if (m.channel === WAKE_CHANNEL) for (const cb of this.wakeListeners) cb();
      });
      try {
        await c.connect();
        await c.query(`LISTEN ${WAKE_CHANNEL}`);
      } catch (e) {
        await c.end().catch(() => {});
        throw e;
      }
      if (this.closed) {
        await c.end().catch(() => {});
        throw new Error("the store is closed");
      }
      this.session = c;
      return c;
    })().finally(() => (this.sessionConnecting = undefined));
    return this.sessionConnecting;
  }

  async lead(keys: readonly string[]): Promise<Set<string>> {
    const c = await this.sessionClient();
    for (const k of [...this.held]) {
      if (keys.includes(k)) continue;
      await c.query("SELECT pg_advisory_unlock($1::bigint)", [lockId(`civm:poller:${k}`)]);
      this.held.delete(k);
    }
    const want = keys.filter((k) => !this.held.has(k));
    if (want.length === 0) await c.query("SELECT 1"); // the session (and so its locks) is alive
    else {
      const r = await c.query("SELECT k, pg_try_advisory_lock(id::bigint) AS got FROM unnest($1::text[], $2::text[]) AS t(k, id)", [want, want.map((k) => lockId(`civm:poller:${k}`))]);
      for (const row of r.rows as { k: string; got: boolean }[]) if (row.got) this.held.add(row.k);
    }
    return new Set(this.held);
  }

  onWake(cb: () => void): void {
    this.wakeListeners.push(cb);
    // Listen from now on (a failure is retried by the next lead()).
    this.sessionClient().catch(() => {});
  }

  async ping(): Promise<void> {
    await this.db.query("SELECT 1");
  }

  async close(): Promise<void> {
    this.closed = true;
    const s = this.session;
    this.session = undefined;
    this.held.clear();
    await s?.end().catch(() => {});
    await this.db.end().catch(() => {});
  }
}
