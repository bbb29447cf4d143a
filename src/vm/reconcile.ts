// Releases what a crashed civm left behind: QEMU processes whose owner is gone and work
// dirs of VMs that no longer run. Safe to call at any start; it only touches entries of
// its own registry, deletes only work dirs inside <state>/vms, and signals only a pid whose
// start time and command line are the ones recorded (checked again before each signal).
// An entry that fails a check is refused: logged, listed by civm ls, and left as it is.
import { rm } from "node:fs/promises";
import { setTimeout as sleep } from "node:timers/promises";
import { Registry, isQemuOf, type RegistryEntry } from "./registry.js";
import { deleteTable, sweepTables, TABLE_PREFIX } from "../net/nft.js";
import { anyProcessWithGid } from "../host/proc.js";

export interface ReconcileReport {
  killed: string[];
  removed: string[];
  refused: { id: string; file: string; reason: string }[];
}

function signalQemu(e: RegistryEntry, sig: NodeJS.Signals): void {
  if (!e.qemuPid || !isQemuOf(e)) return;
  try {
    process.kill(e.qemuPid, sig);
  } catch {
    /* gone meanwhile */
  }
}

async function endQemu(e: RegistryEntry): Promise<void> {
  signalQemu(e, "SIGTERM");
  for (let i = 0; i < 50 && isQemuOf(e); i++) await sleep(100);
  signalQemu(e, "SIGKILL");
  for (let i = 0; i < 50 && isQemuOf(e); i++) await sleep(50);
}

/**
 * `sweep`: also delete nftables tables of VMs whose civm is gone, from any state dir (an nft
 * listing: off civm run's start path, where VmRun sweeps once QEMU runs).
 */
export async function reconcile(registry: Registry, log: (line: string) => void = () => {}, opts: { sweep?: boolean } = {}): Promise<ReconcileReport> {
  const report: ReconcileReport = { killed: [], removed: [], refused: [] };
  for (const e of await registry.list()) {
    const v = registry.verdict(e);
    if (v.state === "running") continue;
    if (v.state === "refused") {
      const file = registry.fileOf(e);
      log(`reconcile: refusing registry entry ${file}: ${v.reason}; nothing it names was signalled or deleted. Check it and delete the file by hand.`);
      report.refused.push({ id: String(e.id), file, reason: v.reason });
      continue;
    }
    if (v.state === "orphaned") {
      log(`reconcile: ending orphaned QEMU of ${e.name} (pid ${e.qemuPid}) whose civm process is gone`);
      await endQemu(e);
      report.killed.push(e.id);
    }
    // A table is deleted only once no process runs with its group: an edited entry cannot
    // take the fence off another VM that still runs.
    if (e.net?.table && !anyProcessWithGid(Number(e.net.table.slice(TABLE_PREFIX.length)))) {
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
