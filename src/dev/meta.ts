// What a dev VM's registry entry carries for wait/exec/ssh/stop/logs (entry.meta.dev), and
// finding a running VM by name or id.
import { accessSync, constants, existsSync } from "node:fs";
import { isAbsolute, resolve } from "node:path";
import { readdir, stat } from "node:fs/promises";
import { join } from "node:path";
import { ConfigError } from "../errors/index.js";
import { Registry, type RegistryEntry } from "../vm/registry.js";
import type { PortForward } from "../vm/argv.js";
import type { HostMountSpec } from "./options.js";
import type { SshTarget } from "./ssh.js";

export interface DevMeta {
  kind: "dev";
  /** SSH with the VM's own key (the private key lives in the work dir). */
  ssh: SshTarget;
  /** Forwards besides SSH. */
  forwards: PortForward[];
  mounts: HostMountSpec[];
  /** The image as given (a stored name or a path). */
  image: string;
  /** Stored kernel name, or a kernel path. */
  kernel?: string;
  /** Whether a background supervisor owns the VM (civm run --detach). */
  detached: boolean;
  /** The supervisor's own log (detached VMs). */
  supervisorLog?: string;
  /** Seconds between the ACPI power-off request and killing QEMU (civm stop waits that long and more). */
  graceSeconds: number;
  /**
   * false: started with --ssh-key, for an image without civm's guest agent (an lvh image):
   * readiness is SSH alone, with the user's key and --ssh-user.
   */
  agent?: boolean;
}

/** --ssh-key FILE / --ssh-user USER (civm run --image, wait, exec, ssh): checked, as an SshTarget override. */
export function sshOverride(f: { sshKey?: string; sshUser?: string }, cwd: string): Partial<SshTarget> {
  const out: Partial<SshTarget> = {};
  if (f.sshKey !== undefined) {
    const key = isAbsolute(f.sshKey) ? f.sshKey : resolve(cwd, f.sshKey);
    try {
      accessSync(key, constants.R_OK);
    } catch {
      throw new ConfigError(`--ssh-key ${f.sshKey}: ${key} is not a readable file; give the private key whose public half the image trusts`);
    }
    out.key = key;
  }
  if (f.sshUser !== undefined) {
    if (!/^[a-z_][a-z0-9_.-]{0,31}\$?$/i.test(f.sshUser)) throw new ConfigError(`--ssh-user ${JSON.stringify(f.sshUser)} is not a user name`);
    out.user = f.sshUser;
  }
  return out;
}

/** entry.meta.dev when it looks like a DevMeta (the registry is a file anyone could edit). */
export function devMetaOf(e: RegistryEntry): DevMeta | undefined {
  const d = (e.meta as { dev?: unknown } | undefined)?.dev as Partial<DevMeta> | undefined;
  if (!d || d.kind !== "dev" || typeof d.ssh !== "object" || !d.ssh) return undefined;
  const s = d.ssh as Partial<SshTarget>;
  if (typeof s.host !== "string" || typeof s.port !== "number" || typeof s.key !== "string" || typeof s.user !== "string") return undefined;
  return d as DevMeta;
}

/** Live entries (owner running) of the registry. */
export async function liveEntries(stateDir: string): Promise<RegistryEntry[]> {
  const registry = new Registry(stateDir);
  return (await registry.list()).filter((e) => registry.verdict(e).state === "running");
}

/** The running VM called `nameOrId` (its name, or its 8-hex id); a ConfigError otherwise. */
export async function findVm(stateDir: string, nameOrId: string): Promise<RegistryEntry> {
  const live = await liveEntries(stateDir);
  const byName = live.filter((e) => e.name === nameOrId);
  if (byName.length === 1) return byName[0]!;
  if (byName.length > 1) {
    throw new ConfigError(`${byName.length} running VMs are named "${nameOrId}" (ids ${byName.map((e) => e.id).join(", ")}); give the id instead`);
  }
  const byId = live.find((e) => e.id === nameOrId);
  if (byId) return byId;
  const names = live.map((e) => e.name);
  throw new ConfigError(`no running VM named "${nameOrId}"` + (names.length ? ` (running: ${names.join(", ")})` : " (none is running; civm ls lists them)"));
}

/** The dev meta of an entry, or a ConfigError saying the VM has no civm-made SSH key. */
export function requireDevMeta(e: RegistryEntry): DevMeta {
  const d = devMetaOf(e);
  if (d) return d;
  throw new ConfigError(
    `VM "${e.name}" was started from an instances file, not with civm run --image, so civm holds no SSH key for it` +
      (e.sshPort ? `; use ssh -p ${e.sshPort} ${e.sshBind ?? "127.0.0.1"} with the image's own credentials` : ""),
  );
}

/** The newest console log of a VM called `name` in the logs dir (for VMs that are gone). */
export async function lastConsoleLog(logsDir: string, name: string): Promise<string | undefined> {
  if (!existsSync(logsDir)) return undefined;
  const re = new RegExp(`^${name.replace(/[.]/g, "\\.")}-\\d{8}-\\d{6}-[0-9a-f]{8}\\.log$`);
  let best: { path: string; mtime: number } | undefined;
  for (const f of await readdir(logsDir)) {
    if (!re.test(f)) continue;
    const p = join(logsDir, f);
    const m = (await stat(p)).mtimeMs;
    if (!best || m > best.mtime) best = { path: p, mtime: m };
  }
  return best?.path;
}
