// Releases what a crashed civm left behind: QEMU processes whose owner is gone and work
// dirs of VMs that no longer run. Safe to call at any start; it only touches entries of
// its own registry and checks a pid really is that VM's QEMU before signalling it.
import { rm } from "node:fs/promises";
import { setTimeout as sleep } from "node:timers/promises";
import { Registry, liveness, isQemuOf, type RegistryEntry } from "./registry.js";
import { deleteTable, sweepTables } from "../net/nft.js";

export interface ReconcileReport {
  killed: string[];
  removed: string[];
}

async function endQemu(e: RegistryEntry): Promise<void> {
  if (!isQemuOf(e) || !e.qemuPid) return;
  process.kill(e.qemuPid, "SIGTERM");
  for (let i = 0; i < 50 && isQemuOf(e); i++) await sleep(100);
  if (isQemuOf(e)) process.kill(e.qemuPid, "SIGKILL");
  for (let i = 0; i < 50 && isQemuOf(e); i++) await sleep(50);
}

/**
 * `sweep`: also delete nftables tables of VMs whose civm is gone, from any state dir (an nft
 * listing: off civm run's start path, where VmRun sweeps once QEMU runs).
 */
export async function reconcile(registry: Registry, log: (line: string) => void = () => {}, opts: { sweep?: boolean } = {}): Promise<ReconcileReport> {
  const report: ReconcileReport = { killed: [], removed: [] };
  for (const e of await registry.list()) {
    const state = liveness(e);
    if (state === "running") continue;
    if (state === "orphaned") {
      log(`reconcile: ending orphaned QEMU of ${e.name} (pid ${e.qemuPid}) whose civm process is gone`);
      await endQemu(e);
      report.killed.push(e.id);
    }
    if (e.net?.table) {
      try {
        await deleteTable(e.net.table);
      } catch (err) {
        log(`warning: could not remove the network policy table ${e.net.table} of ${e.name}: ${(err as Error).message}`);
      }
    }
    if (!e.keep) await rm(e.workDir, { recursive: true, force: true });
    await registry.remove(e.id);
    report.removed.push(e.id);
  }
  if (opts.sweep) await sweepTables(log);
  return report;
}
