// Who QEMU runs as. As root, civm starts QEMU through setpriv as an unprivileged system user
// (default civm-qemu, created on demand), with a group id of its own per VM (the key of the
// VM's nftables table), supplementary groups of that user's primary group and kvm, no
// capabilities and no_new_privs. Not root: QEMU runs as the caller (and only an unrestricted
// network is possible).
import { readFileSync } from "node:fs";
import { run, ToolError } from "../exec/index.js";
import { HostError } from "../errors/index.js";

export const DEFAULT_QEMU_USER = "civm-qemu";

export interface QemuUser {
  name: string;
  uid: number;
  /** The user's primary group. */
  gid: number;
  /** Supplementary groups QEMU keeps: the primary group, and kvm where it exists (/dev/kvm). */
  groups: number[];
}

function passwdEntry(name: string, passwd = "/etc/passwd"): { uid: number; gid: number } | undefined {
  let text: string;
  try {
    text = readFileSync(passwd, "utf8");
  } catch {
    return undefined;
  }
  for (const line of text.split("\n")) {
    const f = line.split(":");
    if (f[0] === name && f.length >= 4) return { uid: Number(f[2]), gid: Number(f[3]) };
  }
  return undefined;
}

function groupId(name: string, group = "/etc/group"): number | undefined {
  try {
    for (const line of readFileSync(group, "utf8").split("\n")) {
      const f = line.split(":");
      if (f[0] === name && f.length >= 3) return Number(f[2]);
    }
  } catch {
    /* no /etc/group */
  }
  return undefined;
}

async function getent(name: string): Promise<{ uid: number; gid: number } | undefined> {
  try {
    const f = (await run("getent", ["passwd", name], { timeoutMs: 10_000 })).stdout.trim().split(":");
    return f.length >= 4 ? { uid: Number(f[2]), gid: Number(f[3]) } : undefined;
  } catch {
    return undefined;
  }
}

const cache = new Map<string, QemuUser>();

/**
 * A system user's ids, looked up and, when `create`, made as a system user with no home and
 * no login shell. `what` names its use and `setting` how to pick another (for messages).
 */
export async function systemUser(name: string, o: { create: boolean; comment: string; what: string; setting: string }): Promise<{ uid: number; gid: number }> {
  let ent = passwdEntry(name) ?? (await getent(name));
  // Several civm processes may start at once on a new host: useradd then finds the user
  // made (exit 9) or /etc/passwd locked by another (exit 1/10); look again and retry.
  for (let attempt = 0; !ent && o.create; attempt++) {
    try {
      await run("useradd", ["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "--comment", o.comment, name], { failCode: "host", timeoutMs: 30_000 });
    } catch (e) {
      ent = passwdEntry(name);
      if (!ent && attempt >= 10) {
        throw new HostError(`cannot create the system user ${name} that ${o.what} as; create it yourself (useradd --system --user-group --no-create-home --shell /usr/sbin/nologin ${name}) or name an existing one with ${o.setting}`, { cause: e, ...(e instanceof ToolError ? { details: e.stderr.trim() } : {}) });
      }
      if (!ent) await new Promise((r) => setTimeout(r, 100 + Math.floor(Math.random() * 200)));
      continue;
    }
    ent = passwdEntry(name) ?? (await getent(name));
  }
  if (!ent) throw new HostError(`the user ${JSON.stringify(name)} that ${o.what} as (${o.setting}) does not exist; create it or leave the setting out for the default`);
  if (ent.uid === 0) throw new HostError(`${o.what} must not run as root, but the user ${JSON.stringify(name)} has uid 0; name an unprivileged user`);
  return ent;
}

/**
 * The QEMU user, looked up (and, for the default name, created as a system user with no
 * home and no login shell). A named user that does not exist is an error.
 */
export async function qemuUser(name: string = process.env.CIVM_QEMU_USER || DEFAULT_QEMU_USER, opts: { create?: boolean } = {}): Promise<QemuUser> {
  const hit = cache.get(name);
  if (hit) return hit;
  const ent = await systemUser(name, { create: opts.create ?? name === DEFAULT_QEMU_USER, comment: "civm QEMU processes", what: "QEMU runs", setting: "CIVM_QEMU_USER or the config's qemuUser" });
  const kvm = groupId("kvm");
  const groups = [...new Set([ent.gid, ...(kvm !== undefined ? [kvm] : [])])];
  const u: QemuUser = { name, uid: ent.uid, gid: ent.gid, groups };
  cache.set(name, u);
  return u;
}

/** setpriv's arguments that make the following program run as `user` with primary group `gid`. */
export function setprivArgs(user: QemuUser, gid: number): string[] {
  return [
    `--reuid=${user.uid}`, `--regid=${gid}`, `--groups=${user.groups.join(",")}`,
    "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
  ];
}

/**
 * Whether `user` (with groups `gids`) may open `path` for `want` ("r", "rw", or "x" for a
 * directory to enter), by the mode bits of the path and every directory above it. ACLs are
 * not read: a path they alone open is reported unreadable (the message says how to fix it).
 */
export function accessProblem(path: string, uid: number, gids: readonly number[], want: "r" | "rw" | "rx" | "rwx", statSync: (p: string) => { mode: number; uid: number; gid: number }): string | undefined {
  const bits = (st: { mode: number; uid: number; gid: number }): number => {
    if (st.uid === uid) return (st.mode >> 6) & 7;
    if (gids.includes(st.gid)) return (st.mode >> 3) & 7;
    return st.mode & 7;
  };
  const parts = path.split("/").filter(Boolean);
  let dir = "";
  for (let i = 0; i < parts.length - 1; i++) {
    dir += `/${parts[i]}`;
    let st;
    try {
      st = statSync(dir);
    } catch {
      return `${dir} does not exist`;
    }
    if ((bits(st) & 1) === 0) return `the directory ${dir} (mode ${(st.mode & 0o777).toString(8)}, owner ${st.uid}:${st.gid}) cannot be entered`;
  }
  let st;
  try {
    st = statSync(path);
  } catch {
    return `${path} does not exist`;
  }
  const need = (want.includes("r") ? 4 : 0) | (want.includes("w") ? 2 : 0) | (want.includes("x") ? 1 : 0);
  if ((bits(st) & need) !== need) return `${path} (mode ${(st.mode & 0o777).toString(8)}, owner ${st.uid}:${st.gid}) is not ${want.includes("w") ? "writable" : "readable"}`;
  return undefined;
}
