// civm stop: asks the process that owns a VM (a detached supervisor, or a foreground civm
// run) to stop it with SIGTERM (ACPI power-off, the grace period, then kill; a second
// SIGTERM with --force kills at once), then waits until its registry entry is gone, which
// the owner removes last, after QEMU has exited and the work dir is deleted.
import { existsSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { CivmError } from "../errors/index.js";
import { STATE_LAYOUT } from "../host/paths.js";
import { Registry, isOwnerVerified, liveness, type RegistryEntry } from "../vm/registry.js";
import { reconcile } from "../vm/reconcile.js";
import { formatSeconds } from "../vm/format.js";

export interface StopOptions {
  stateDir: string;
  force: boolean;
  timeoutMs: number;
  log: (line: string) => void;
}

/** Resolves with the milliseconds it took; throws a CivmError "timeout" when the entry outlives timeoutMs. */
export async function stopVm(e: RegistryEntry, o: StopOptions): Promise<number> {
  const started = Date.now();
  const entryFile = join(o.stateDir, STATE_LAYOUT.registry, `${e.id}.json`);
  const signal = (): void => {
    // Only the process that wrote the entry (start time and command line as recorded).
    if (!isOwnerVerified(e)) return;
    try {
      process.kill(e.ownerPid, "SIGTERM");
    } catch {
      /* gone meanwhile */
    }
  };
  if (liveness(e) === "running") {
    signal();
    if (o.force) {
      await sleep(200);
      signal();
    }
  }
  for (;;) {
    if (!existsSync(entryFile)) return Date.now() - started;
    if (liveness(e) !== "running") {
      // The owner is gone without cleaning up (killed): release what it held.
      await reconcile(new Registry(o.stateDir), o.log);
      if (!existsSync(entryFile)) return Date.now() - started;
    }
    if (Date.now() - started > o.timeoutMs) {
      throw new CivmError("timeout", `${e.name}: still running ${formatSeconds(o.timeoutMs)} after the stop request (owner pid ${e.ownerPid}); try civm stop --force ${e.name}`);
    }
    await sleep(100);
  }
}
