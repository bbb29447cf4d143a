// This host's membership of the fleet, as the daemon sees it: registration, the heartbeat
// (on a timer of its own, so a slow pass never makes a live host look dead), declaring hosts
// dead that stopped heartbeating (only after this host itself has been connected for that
// long: after an outage of the database every host's heartbeat is old), and the store's
// reachability: while the store cannot be reached nothing new starts, VM exits are kept in
// memory and written once it is back, and reconnection is tried with backoff (1 s doubling
// to 30 s). With the SQLite store the same code runs for one host; nothing is ever dead.
import { cpus as osCpus, hostname, totalmem } from "node:os";
import { messageOf } from "../errors/index.js";
import type { HostInfo, HostRecord, Store, VmRecord } from "../store/types.js";
import type { DaemonLogger } from "./daemon.js";
import type { ServeConfig } from "./types.js";

export interface HostOptions {
  /** Unique in the fleet (default: the machine's host name). */
  id: string;
  /** Where this host's API answers, shown by `civm hosts`. */
  address: string;
  /** Capacity for runner VMs: the sum of their cpus and memory stays within these. */
  cpus: number;
  ramBytes: number;
  /** Heartbeat interval (ms; default 10 s). */
  heartbeatMs?: number;
  /** A host whose heartbeat is older than this is declared dead (ms; default 60 s). */
  deadAfterMs?: number;
  /** A host waits this long before placing a runner a less loaded host could take (ms; default 15 s). */
  placementGraceMs?: number;
}

/** No capacity limit (one host with SQLite, unless the config sets one). */
export const UNLIMITED_CPUS = 2 ** 31 - 1;
export const UNLIMITED_RAM = Number.MAX_SAFE_INTEGER;
export const DEFAULT_HEARTBEAT_MS = 10_000;
export const DEFAULT_DEAD_AFTER_MS = 60_000;
export const DEFAULT_PLACEMENT_GRACE_MS = 15_000;
const RECONNECT_MIN_MS = 1000;
const RECONNECT_MAX_MS = 30_000;

export function LOCAL_HOST(): HostOptions {
  return { id: hostname(), address: "", cpus: UNLIMITED_CPUS, ramBytes: UNLIMITED_RAM };
}

/** This machine's capacity: every cpu, and its memory less 1 GiB for the host (a fleet's default). */
export function machineCapacity(): { cpus: number; ramBytes: number } {
  return { cpus: osCpus().length, ramBytes: Math.max(totalmem() - 1024 ** 3, 512 * 1024 ** 2) };
}

export interface FleetHooks {
  /** Pools this host serves now. */
  pools(): string[];
  /** GitHub targets this host polls now. */
  polls(): string[];
  /** Another host declared this one dead (it was unreachable): settle the VMs it still runs. */
  declaredDead(): Promise<void>;
  /** This host declared `host` dead and finished its VMs: deregister their runners. */
  reaped(host: string, vms: VmRecord[]): Promise<void>;
  /** Whether this host is draining (it re-registers as such). */
  draining(): boolean;
}

export class FleetMember {
  readonly id: string;
  reachable = true;
  unreachableSince: number | undefined;
  /** Since when the store has answered without a break (dead-host judgement waits deadAfter from here). */
  private connectedSince: number;
  private backoffMs = RECONNECT_MIN_MS;
  private nextTryAt = 0;
  /** VM exits the store could not take yet: VM id → reason, time. */
  readonly pending = new Map<string, { reason: string; at: number }>();
  private timer: NodeJS.Timeout | undefined;
  private ticking: Promise<void> | undefined;
  private stopped = false;
  last: HostRecord | undefined;

  constructor(
    private readonly store: Store,
    readonly host: HostOptions,
    private readonly o: { now: () => number; log: DaemonLogger; version: string; hooks: FleetHooks },
  ) {
    this.id = host.id;
    this.connectedSince = o.now();
  }

  get shared(): boolean {
    return this.store.kind === "postgres";
  }

  get deadAfterMs(): number {
    return this.host.deadAfterMs ?? DEFAULT_DEAD_AFTER_MS;
  }

  get placementGraceMs(): number {
    return this.host.placementGraceMs ?? DEFAULT_PLACEMENT_GRACE_MS;
  }

  info(): HostInfo {
    return { id: this.id, address: this.host.address, cpus: this.host.cpus, ramBytes: this.host.ramBytes, pools: this.o.hooks.pools(), version: this.o.version };
  }

  private registered = false;

  /** Registers this host if it has not yet (a pass before start(), in tests). */
  async ensureRegistered(): Promise<void> {
    if (this.registered) return;
    await this.store.registerHost(this.info());
    this.registered = true;
  }

  /** Registers this host and starts the heartbeat. */
  async start(): Promise<void> {
    await this.store.registerHost(this.info());
    this.registered = true;
    this.connectedSince = this.o.now();
    const every = this.host.heartbeatMs ?? DEFAULT_HEARTBEAT_MS;
    this.timer = setInterval(() => {
      if (this.ticking || !this.reachable || this.stopped) return;
      this.ticking = this.tick().finally(() => (this.ticking = undefined));
    }, every);
    this.timer.unref();
  }

  /** Heartbeat; then, in a fleet, hosts that stopped heartbeating are declared dead. */
  async tick(): Promise<void> {
    try {
      await this.beat();
      if (!this.shared || this.o.now() - this.connectedSince < this.deadAfterMs) return;
      const reaped = await this.store.reapDeadHosts(this.id, this.deadAfterMs, this.o.now());
      for (const r of reaped) {
        this.o.log.warn({ deadHost: r.host, vms: r.vms.length, deadAfterSeconds: Math.round(this.deadAfterMs / 1000) }, "host missed its heartbeats: declared dead; deregistering its runners, its share is placed on the other hosts");
        await this.o.hooks.reaped(r.host, r.vms);
      }
    } catch (e) {
      await this.check(e);
    }
  }

  private async beat(): Promise<void> {
    const rec = await this.store.heartbeat(this.info(), this.o.hooks.polls());
    if (!rec || rec.state === "dead") {
      this.o.log.error({ ...(rec?.deadBy ? { declaredBy: rec.deadBy } : {}) }, "another host declared this one dead while it could not reach the store; its idle runners stop, busy ones finish; registering again");
      await this.o.hooks.declaredDead();
      await this.store.registerHost(this.info());
      if (this.o.hooks.draining()) await this.store.setHostState(this.id, "draining");
      this.last = (await this.store.hosts()).find((h) => h.id === this.id);
      return;
    }
    this.last = rec;
  }

  /** After an error: is the store still there? If not, this host is cut off until ensure() reconnects. */
  async check(e: unknown): Promise<void> {
    if (!this.reachable) return;
    try {
      await this.store.ping();
    } catch {
      this.lost(e);
    }
  }

  lost(e: unknown): void {
    if (!this.reachable) return;
    this.reachable = false;
    this.unreachableSince = this.o.now();
    this.backoffMs = RECONNECT_MIN_MS;
    this.nextTryAt = this.o.now() + this.backoffMs;
    this.o.log.error({ store: this.store.where, err: messageOf(e) }, "the state store is unreachable: running runners carry on, nothing new starts; reconnecting");
  }

  /** Whether the store can be used now; while it cannot, tries to reconnect (with backoff) and settles what waited. */
  async ensure(): Promise<boolean> {
    if (this.reachable) return true;
    if (this.o.now() < this.nextTryAt) return false;
    try {
      await this.store.ping();
      const since = this.unreachableSince ?? this.o.now();
      this.reachable = true;
      this.unreachableSince = undefined;
      this.connectedSince = this.o.now();
      this.o.log.info({ store: this.store.where, downSeconds: Math.round((this.o.now() - since) / 1000), pendingExits: this.pending.size }, "the state store is back: reconciling");
      await this.flush();
      await this.beat();
      return true;
    } catch (e) {
      this.reachable = false;
      this.backoffMs = Math.min(this.backoffMs * 2, RECONNECT_MAX_MS);
      this.nextTryAt = this.o.now() + this.backoffMs;
      this.o.log.warn({ store: this.store.where, err: messageOf(e), retryInSeconds: Math.round(this.backoffMs / 1000) }, "the state store is still unreachable");
      return false;
    }
  }

  /** Records a VM's end; if the store cannot take it now, it is written once the store is back. */
  async finish(id: string, reason: string, at: number): Promise<void> {
    try {
      if (!this.reachable) throw new Error("the store is unreachable");
      await this.store.markFinished(id, reason, at);
    } catch (e) {
      this.pending.set(id, { reason, at });
      await this.check(e);
    }
  }

  private async flush(): Promise<void> {
    for (const [id, p] of [...this.pending]) {
      await this.store.markFinished(id, p.reason, p.at);
      this.pending.delete(id);
    }
  }

  /** Shutdown: no more heartbeats; the host is recorded as stopped (best effort). */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    await this.ticking;
    try {
      if (this.reachable) {
        await this.flush();
        await this.store.setHostState(this.id, "stopped");
      }
    } catch (e) {
      this.o.log.warn({ err: messageOf(e) }, "could not record this host as stopped");
    }
  }
}

/** This host from the serve config's `fleet:` and store: defaults filled in. */
export function hostOptions(c: ServeConfig): HostOptions {
  const shared = c.store.kind === "postgres";
  const machine = machineCapacity();
  return {
    id: c.fleet.hostId ?? hostname(),
    address: c.fleet.address ?? "",
    // One host: no limit unless the config sets one; a fleet places by capacity, this machine's by default.
    cpus: c.fleet.cpus ?? (shared ? machine.cpus : UNLIMITED_CPUS),
    ramBytes: c.fleet.ramBytes ?? (shared ? machine.ramBytes : UNLIMITED_RAM),
    heartbeatMs: c.fleet.heartbeatSeconds * 1000,
    deadAfterMs: c.fleet.deadAfterSeconds * 1000,
    placementGraceMs: c.fleet.placementGraceSeconds * 1000,
  };
}
