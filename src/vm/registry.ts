// Registry of VMs civm has started on this host: one JSON file per VM in
// <state>/registry/. An entry is written before the VM's resources are taken and removed
// after they are released, so a crash of civm leaves a record that the next start (or
// `civm ls`) reconciles: an orphaned QEMU is ended and its work dir deleted.
import { mkdir, readdir, readFile, rm, writeFile, rename } from "node:fs/promises";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { STATE_LAYOUT } from "../host/paths.js";

export interface RegistryEntry {
  id: string;
  name: string;
  /** civm process that owns the VM. */
  ownerPid: number;
  /** QEMU's pid once started. */
  qemuPid: number | undefined;
  sshPort: number | undefined;
  sshBind: string | undefined;
  startedAt: string;
  workDir: string;
  consoleLog: string;
  /** Whether the work dir must be kept when the VM is reconciled (--keep). */
  keep: boolean;
  /** Detached (dev) VMs have no owner process; their QEMU is the owner. */
  detached?: boolean;
  /** Extra fields other commands store (ssh key path, forwards). */
  meta?: Record<string, unknown>;
  /** "starting" until QEMU runs the guest (QMP cont done), then "running". Absent in older entries. */
  state?: "starting" | "running";
  /** The VM's network policy: its nftables table and QEMU's group id (restricted mode). */
  net?: { mode: string; table?: string; gid?: number } | undefined;
}

export type Liveness = "running" | "orphaned" | "stale";

export class Registry {
  readonly dir: string;
  constructor(stateDir: string) {
    this.dir = join(stateDir, STATE_LAYOUT.registry);
  }

  private file(id: string): string {
    return join(this.dir, `${id}.json`);
  }

  async put(e: RegistryEntry): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    const tmp = this.file(e.id) + ".tmp";
    await writeFile(tmp, JSON.stringify(e, null, 2), { mode: 0o600 });
    await rename(tmp, this.file(e.id));
  }

  async remove(id: string): Promise<void> {
    await rm(this.file(id), { force: true });
  }

  async list(): Promise<RegistryEntry[]> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch {
      return [];
    }
    const out: RegistryEntry[] = [];
    for (const n of names.filter((x) => x.endsWith(".json"))) {
      try {
        out.push(JSON.parse(await readFile(join(this.dir, n), "utf8")) as RegistryEntry);
      } catch {
        /* half-written or foreign file: ignored */
      }
    }
    return out.sort((a, b) => a.startedAt.localeCompare(b.startedAt));
  }
}

function cmdlineOf(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").replace(/\0/g, " ");
  } catch {
    return undefined;
  }
}

/** True when `pid` is alive and is the QEMU of this entry (guards against pid reuse). */
export function isQemuOf(e: RegistryEntry): boolean {
  if (!e.qemuPid) return false;
  const cmd = cmdlineOf(e.qemuPid);
  return cmd !== undefined && cmd.includes(e.workDir);
}

export function isOwnerAlive(e: RegistryEntry): boolean {
  if (e.detached) return isQemuOf(e);
  if (e.ownerPid === process.pid) return true;
  const cmd = cmdlineOf(e.ownerPid);
  return cmd !== undefined && /civm|node/.test(cmd);
}

export function liveness(e: RegistryEntry): Liveness {
  const qemu = isQemuOf(e);
  if (isOwnerAlive(e)) return "running";
  return qemu ? "orphaned" : "stale";
}
