// Registry of VMs civm has started on this host: one JSON file per VM in
// <state>/registry/. An entry is written before the VM's resources are taken and removed
// after they are released, so a crash of civm leaves a record that the next start (or
// `civm ls`) reconciles: an orphaned QEMU is ended and its work dir deleted.
// Entries are files anyone with access to the state dir can edit, so nothing in one is
// trusted: a work dir is deleted only when it is <state>/vms/<name>-<id> (real paths), and
// a pid is signalled only when its start time and command line are the ones recorded.
import { mkdir, readdir, readFile, rm, writeFile, rename } from "node:fs/promises";
import { lstatSync, readFileSync, realpathSync } from "node:fs";
import { processStartTime } from "../host/proc.js";
import { createHash } from "node:crypto";
import { basename, dirname, isAbsolute, join, resolve } from "node:path";
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
  /** Who ownerPid was when the entry was written. Absent in older entries. */
  owner?: ProcIdentity;
  /** Who qemuPid is: its start time from the spawn, its command line once QMP answers. */
  qemu?: ProcIdentity;
}

/** A process beyond its pid (pids are reused; civm may be PID 1 of a container). */
export interface ProcIdentity {
  /** /proc/<pid>/stat field 22: clock ticks after boot. */
  startTime: number;
  /** sha256 of /proc/<pid>/cmdline (a hash: QEMU's argv is not copied into the entry). */
  cmdlineSha256?: string;
}

export type Liveness = "running" | "orphaned" | "stale" | "refused";

/** What reconcile may do with an entry; "refused" entries and what they name are left alone. */
export type Verdict = { state: "running" | "orphaned" | "stale" } | { state: "refused"; reason: string };

export class Registry {
  readonly dir: string;
  constructor(readonly stateDir: string) {
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
        const e = JSON.parse(await readFile(join(this.dir, n), "utf8")) as unknown;
        if (typeof e !== "object" || e === null || Array.isArray(e)) continue;
        FILE_OF.set(e, n);
        out.push(e as RegistryEntry);
      } catch {
        /* half-written or foreign file: ignored */
      }
    }
    return out.sort((a, b) => String(a.startedAt).localeCompare(String(b.startedAt)));
  }

  /** The file an entry was read from (for messages). */
  fileOf(e: RegistryEntry): string {
    return join(this.dir, FILE_OF.get(e) ?? `${e.id}.json`);
  }

  /** Checks the entry's fields and work dir, then its processes. */
  verdict(e: RegistryEntry): Verdict {
    const problem = entryProblem(e, FILE_OF.get(e)) ?? workDirProblem(e, this.stateDir);
    return problem ? { state: "refused", reason: problem } : assess(e);
  }
}

/** Which file each listed entry came from: its id must name it (registry.remove deletes by id). */
const FILE_OF = new WeakMap<object, string>();

const isPid = (v: unknown): v is number => typeof v === "number" && Number.isSafeInteger(v) && v > 0;

/** A field civm relies on that is missing or of the wrong type. */
function entryProblem(e: RegistryEntry, file: string | undefined): string | undefined {
  if (typeof e.id !== "string" || !e.id || (file !== undefined && `${e.id}.json` !== file)) return `its id ${JSON.stringify(e.id)} does not match its file name`;
  if (typeof e.name !== "string" || !e.name) return "it has no name";
  if (!isPid(e.ownerPid)) return `its owner pid ${JSON.stringify(e.ownerPid)} is not a pid`;
  if (e.qemuPid !== undefined && e.qemuPid !== null && !isPid(e.qemuPid)) return `its QEMU pid ${JSON.stringify(e.qemuPid)} is not a pid`;
  if (typeof e.workDir !== "string") return "it has no work dir";
  return undefined;
}

/**
 * Why `e.workDir` is not one civm may delete: it must be a direct child of <state>/vms (real
 * paths, so no symlink leads out) named <name>-<id>, and a directory when it exists.
 */
export function workDirProblem(e: Pick<RegistryEntry, "name" | "id" | "workDir">, stateDir: string): string | undefined {
  const vms = join(stateDir, STATE_LAYOUT.vms);
  const bad = (why: string) => `its work dir ${JSON.stringify(e.workDir)} ${why}`;
  if (!isAbsolute(e.workDir)) return bad("is not an absolute path");
  if (basename(e.workDir) !== `${e.name}-${e.id}`) return bad(`is not named <name>-<id> (${e.name}-${e.id})`);
  const real = (p: string): string | undefined => {
    try {
      return realpathSync(p);
    } catch {
      return undefined;
    }
  };
  const parent = real(dirname(e.workDir));
  const vmsReal = real(vms);
  // Neither exists: nothing to delete, but only a path inside <state>/vms is accepted.
  if (parent === undefined || vmsReal === undefined) {
    if (resolve(dirname(e.workDir)) !== resolve(vms)) return bad(`is not inside ${vms}`);
    return undefined;
  }
  if (parent !== vmsReal) return bad(`is not inside ${vms}${parent !== resolve(dirname(e.workDir)) ? ` (its folder resolves to ${parent})` : ""}`);
  try {
    if (!lstatSync(e.workDir).isDirectory()) return bad("is not a directory");
  } catch {
    /* gone: fine */
  }
  return undefined;
}

function cmdlineOf(pid: number): Buffer | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`);
  } catch {
    return undefined;
  }
}

/** Field 22 of /proc/<pid>/stat (src/host/proc.ts), re-exported for the registry's callers. */
export const startTimeOf = processStartTime;

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** The identity of a live pid; cmdline: false while it may not have exec'd yet (start time is kept across exec). */
export function procIdentity(pid: number, o: { cmdline?: boolean } = {}): ProcIdentity | undefined {
  const startTime = startTimeOf(pid);
  if (startTime === undefined) return undefined;
  const cmd = o.cmdline === false ? undefined : cmdlineOf(pid);
  return cmd ? { startTime, cmdlineSha256: sha256(cmd) } : { startTime };
}

/** "match": the recorded process; "gone": not running (or a reused pid that is plainly someone else); else why it cannot be trusted. */
type PidCheck = "match" | "gone" | { refuse: string };

/**
 * Is `pid` the process `recorded` describes? A pid whose command line names the VM's work
 * dir yet does not match (or cannot be checked: an entry from an older civm) is refused,
 * never treated as gone: that is what a tampered entry pointing at a victim looks like.
 */
function checkPid(pid: number, recorded: ProcIdentity | undefined, e: RegistryEntry, role: "owner" | "QEMU"): PidCheck {
  const startTime = startTimeOf(pid);
  if (startTime === undefined) return "gone";
  const cmd = cmdlineOf(pid);
  if (cmd === undefined) return "gone";
  const namesWorkDir = cmd.toString("utf8").replace(/\0/g, " ").includes(e.workDir);
  if (!recorded || typeof recorded.startTime !== "number") {
    // Older entries: the only safe answers are "someone else" and "cannot tell".
    const civmLike = role === "owner" ? /civm|node/.test(cmd.toString("utf8")) : namesWorkDir;
    return civmLike ? { refuse: `its ${role} pid ${pid} is alive but the entry has no recorded start time (written by an older civm), so civm cannot tell whether it is that process` } : "gone";
  }
  if (recorded.startTime !== startTime) {
    if (role === "QEMU" && namesWorkDir) return { refuse: `its QEMU pid ${pid} names the work dir but started at tick ${startTime}, not the recorded ${recorded.startTime}: it is not the VM's QEMU` };
    return "gone"; // the pid was reused
  }
  if (recorded.cmdlineSha256 !== undefined) {
    if (recorded.cmdlineSha256 !== sha256(cmd)) return { refuse: `its ${role} pid ${pid} started at the recorded time but runs a different command line` };
    return "match";
  }
  // QEMU's start time is recorded at spawn, its command line once QMP answers.
  if (role === "QEMU" && namesWorkDir) return "match";
  return { refuse: `its ${role} pid ${pid} started at the recorded time but its command line was never recorded and does not name the work dir` };
}

/** True when qemuPid is alive and provably this entry's QEMU (safe to signal). */
export function isQemuOf(e: RegistryEntry): boolean {
  return isPid(e.qemuPid) && checkPid(e.qemuPid, e.qemu, e, "QEMU") === "match";
}

/** True when ownerPid is alive and provably the process that wrote the entry (safe to signal). */
export function isOwnerVerified(e: RegistryEntry): boolean {
  return isPid(e.ownerPid) && checkPid(e.ownerPid, e.owner, e, "owner") === "match";
}

/** The processes' side of the verdict (the entry's fields and work dir are Registry.verdict's). */
export function assess(e: RegistryEntry): Verdict {
  const qemu = isPid(e.qemuPid) ? checkPid(e.qemuPid, e.qemu, e, "QEMU") : "gone";
  if (typeof qemu === "object") return { state: "refused", reason: qemu.refuse };
  if (e.detached) return { state: qemu === "match" ? "running" : "stale" };
  if (e.ownerPid === process.pid) return { state: "running" };
  const owner = isPid(e.ownerPid) ? checkPid(e.ownerPid, e.owner, e, "owner") : "gone";
  if (typeof owner === "object") return { state: "refused", reason: owner.refuse };
  if (owner === "match") return { state: "running" };
  return { state: qemu === "match" ? "orphaned" : "stale" };
}

export function liveness(e: RegistryEntry): Liveness {
  return assess(e).state;
}
