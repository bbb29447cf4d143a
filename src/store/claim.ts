// The placement rule, pure: whether one more runner VM of a pool may start on this host.
// Both stores gather the same facts inside one transaction (the pool's row locked, so
// claims for a pool are serialized across the fleet) and ask this function.
import { desiredRunners } from "../pool/plan.js";
import type { ClaimResult, HostState } from "./types.js";

export interface ClaimFacts {
  pool: { paused: boolean; minRunnersOverride: number | undefined; minRunners: number; maxRunners: number };
  /** The pool's VMs across the fleet: not finished; of those, not being stopped; busy. */
  live: number;
  kept: number;
  busy: number;
  /** Jobs queued for the pool. */
  queued: number;
  /** This host: state, capacity and what its live VMs take. */
  host: { id: string; state: HostState | undefined; cpus: number; ramBytes: number; usedCpus: number; usedRamBytes: number };
  /** Other hosts that could take the VM: active, heartbeat fresh, serving the pool. */
  others: { id: string; cpus: number; ramBytes: number; usedCpus: number; usedRamBytes: number }[];
  vm: { cpus: number; ramBytes: number };
  waitedMs: number;
  graceMs: number;
}

/** How full a host is: the larger of its cpu and memory shares. */
function load(h: { cpus: number; ramBytes: number; usedCpus: number; usedRamBytes: number }): number {
  return Math.max(h.cpus > 0 ? h.usedCpus / h.cpus : 1, h.ramBytes > 0 ? h.usedRamBytes / h.ramBytes : 1);
}

function fits(h: { cpus: number; ramBytes: number; usedCpus: number; usedRamBytes: number }, vm: { cpus: number; ramBytes: number }): boolean {
  return h.usedCpus + vm.cpus <= h.cpus && h.usedRamBytes + vm.ramBytes <= h.ramBytes;
}

/**
 * The pool's maxRunners caps its VMs fleet-wide; it starts one only while its kept runners
 * are fewer than desired (minRunners idle on top of queued and busy, as plan.ts); the host
 * must be active and have room. Among the hosts with room, the least loaded take the
 * missing runners first (one each); a host further down waits `graceMs` before it claims
 * anyway (a less loaded host may be failing to start its own).
 */
export function decideClaim(f: ClaimFacts): Exclude<ClaimResult, { claimed: true }> | { claimed: true } {
  if (f.pool.paused) return { claimed: false, reason: "paused" };
  if (f.live >= f.pool.maxRunners) return { claimed: false, reason: "full" };
  const min = Math.min(f.pool.minRunnersOverride ?? f.pool.minRunners, f.pool.maxRunners);
  const desired = desiredRunners({ minRunners: min, maxRunners: f.pool.maxRunners }, f.queued + f.busy);
  if (f.kept >= desired) return { claimed: false, reason: "satisfied" };
  if (f.host.state !== "active") return { claimed: false, reason: "not-active" };
  if (!fits(f.host, f.vm)) return { claimed: false, reason: "no-capacity" };
  if (f.waitedMs < f.graceMs) {
    const need = Math.min(desired - f.kept, f.pool.maxRunners - f.live);
    const ahead = f.others.filter((o) => fits(o, f.vm) && (load(o) < load(f.host) || (load(o) === load(f.host) && o.id < f.host.id))).length;
    if (ahead >= need) return { claimed: false, reason: "other-host" };
  }
  return { claimed: true };
}
