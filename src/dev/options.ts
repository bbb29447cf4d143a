// Parsing the ad-hoc flags of `civm run --image` into typed values: host mounts
// (DIR[:TAG][:GUEST-PATH][:ro|:rw|:passthrough]) and port forwards ([ADDR:]HOST[:GUEST][/tcp|/udp]).
// Pure (the caller checks that folders exist and ports are free); table-tested.
import { isAbsolute, resolve, basename } from "node:path";
import { ConfigError } from "../errors/index.js";
import type { PortForward } from "../vm/argv.js";

/** 9p tags civm keeps for itself. */
export const RESERVED_TAGS = ["civm-modules"] as const;
/** The first host mount's tag: lvh's, so its images' fstab line `host_mount /host 9p ...` finds it. */
export const FIRST_MOUNT_TAG = "host_mount";
export const TAG_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$/;

export interface HostMountSpec {
  /** Absolute folder on the host. */
  hostPath: string;
  /** virtio-9p mount tag. */
  tag: string;
  /** Where the guest agent mounts it. */
  guestPath: string;
  readOnly: boolean;
  /** :passthrough: guest owners and modes reach the host as they are (setuid, devices). */
  passthrough?: true;
}

interface ParsedMount {
  hostPath: string;
  tag?: string;
  guestPath?: string;
  readOnly: boolean;
  passthrough?: true;
}

const MOUNT_FORM = "DIR[:TAG][:GUEST-PATH][:ro|:rw|:passthrough]";

/** Printed at every start of a VM with a :passthrough mount. */
export function passthroughWarning(m: { hostPath: string; tag: string }): string {
  return `--host-mount ${m.hostPath} (tag ${m.tag}) is :passthrough: guest root can create setuid-root files and device nodes in it that are real on the host (QEMU's security_model=passthrough); drop :passthrough unless the guest is trusted`;
}

export function parseHostMount(arg: string, cwd: string): ParsedMount {
  const parts = arg.split(":");
  const dir = parts.shift() ?? "";
  if (!dir) throw new ConfigError(`--host-mount ${JSON.stringify(arg)}: no folder; write ${MOUNT_FORM}`);
  let readOnly = false;
  let passthrough = false;
  const last = parts[parts.length - 1];
  if (last === "ro" || last === "rw" || last === "passthrough") {
    readOnly = last === "ro";
    passthrough = last === "passthrough";
    parts.pop();
  }
  const also = parts[parts.length - 1];
  if (also === "ro" || also === "rw" || also === "passthrough") {
    throw new ConfigError(`--host-mount ${JSON.stringify(arg)}: give one of ro, rw or passthrough (passthrough is read-write; a :ro mount needs no passthrough, the guest cannot write to it)`);
  }
  let tag: string | undefined;
  let guestPath: string | undefined;
  for (const p of parts) {
    if (p.startsWith("/")) {
      if (guestPath !== undefined) throw new ConfigError(`--host-mount ${JSON.stringify(arg)}: two guest paths`);
      guestPath = p;
    } else if (tag === undefined && guestPath === undefined) {
      if (!TAG_RE.test(p)) {
        throw new ConfigError(`--host-mount ${JSON.stringify(arg)}: tag ${JSON.stringify(p)} is not valid (1-31 letters, digits, "_", "." or "-"; or give ro, rw, passthrough, or a guest path starting with /)`);
      }
      tag = p;
    } else {
      throw new ConfigError(`--host-mount ${JSON.stringify(arg)}: unexpected ${JSON.stringify(p)}; write ${MOUNT_FORM}`);
    }
  }
  if (guestPath !== undefined && (guestPath === "/" || guestPath.split("/").includes(".."))) {
    throw new ConfigError(`--host-mount ${JSON.stringify(arg)}: guest path ${guestPath} is not allowed`);
  }
  return { hostPath: resolve(cwd, dir), ...(tag ? { tag } : {}), ...(guestPath ? { guestPath } : {}), readOnly, ...(passthrough ? { passthrough: true as const } : {}) };
}

function tagFromPath(p: string): string {
  const base = basename(p).toLowerCase().replace(/[^a-z0-9_.-]+/g, "-").replace(/^[^a-z0-9]+/, "").slice(0, 24);
  return base || "mount";
}

/**
 * Tags and guest paths for every mount: the first is tagged "host_mount" (lvh's tag: images
 * built by little-vm-helper mount it at /host from their fstab) and mounted at /host, the
 * others are tagged after their folder's name and mounted at /host-TAG; an explicit tag or
 * guest path wins. Tags and guest paths must be unique.
 */
export function planHostMounts(args: readonly string[], cwd: string): HostMountSpec[] {
  const parsed = args.map((a) => parseHostMount(a, cwd));
  const used = new Set<string>(parsed.flatMap((p) => (p.tag ? [p.tag] : [])));
  const out: HostMountSpec[] = [];
  const tags = new Set<string>();
  const paths = new Set<string>();
  parsed.forEach((p, i) => {
    let tag = p.tag;
    if (!tag) {
      const base = i === 0 ? FIRST_MOUNT_TAG : tagFromPath(p.hostPath);
      tag = base;
      for (let n = 2; used.has(tag) || tags.has(tag); n++) tag = `${base}-${n}`;
    }
    if ((RESERVED_TAGS as readonly string[]).includes(tag)) throw new ConfigError(`--host-mount ${JSON.stringify(args[i])}: the tag ${tag} is reserved by civm`);
    if (tags.has(tag)) throw new ConfigError(`--host-mount: the tag ${tag} is used twice; give each mount its own tag (DIR:TAG)`);
    tags.add(tag);
    const guestPath = p.guestPath ?? (i === 0 ? "/host" : `/host-${tag}`);
    if (paths.has(guestPath)) throw new ConfigError(`--host-mount: two mounts at ${guestPath} in the guest`);
    paths.add(guestPath);
    out.push({ hostPath: p.hostPath, tag, guestPath, readOnly: p.readOnly, ...(p.passthrough ? { passthrough: true as const } : {}) });
  });
  return out;
}

function port(v: string, arg: string, what: string): number {
  const n = Number(v);
  if (!/^\d+$/.test(v) || n < 1 || n > 65535) throw new ConfigError(`-p ${JSON.stringify(arg)}: ${what} ${JSON.stringify(v)} is not a port (1-65535)`);
  return n;
}

/**
 * `-p [ADDR:]HOST[:GUEST][/tcp|/udp]`: HOST on the host (ADDR, default `defaultAddr`) to
 * GUEST in the guest (default: the same number). lvh's form, `HOST[:GUEST][:tcp|:udp]`, is
 * the same forward with the protocol after a colon.
 */
export function parsePortSpec(arg: string, defaultAddr: string): PortForward {
  let spec = arg;
  let proto: "tcp" | "udp" = "tcp";
  const slash = spec.lastIndexOf("/");
  if (slash >= 0 && /:(tcp|udp)\//i.test(spec)) throw new ConfigError(`-p ${JSON.stringify(arg)}: give the protocol once, as /PROTO or :PROTO`);
  const lvhProto = /:(tcp|udp)$/i.exec(spec);
  if (lvhProto && slash >= 0) throw new ConfigError(`-p ${JSON.stringify(arg)}: give the protocol once, as /${lvhProto[1]!.toLowerCase()} or :${lvhProto[1]!.toLowerCase()}`);
  if (lvhProto) {
    proto = lvhProto[1]!.toLowerCase() as "tcp" | "udp";
    spec = spec.slice(0, lvhProto.index);
  } else if (slash >= 0) {
    const p = spec.slice(slash + 1);
    if (p !== "tcp" && p !== "udp") throw new ConfigError(`-p ${JSON.stringify(arg)}: protocol ${JSON.stringify(p)} is not tcp or udp`);
    proto = p;
    spec = spec.slice(0, slash);
  }
  let addr = defaultAddr;
  let parts: string[];
  const v6 = /^\[([^\]]+)\]:(.*)$/.exec(spec);
  if (v6) {
    addr = v6[1]!;
    parts = v6[2]!.split(":");
  } else {
    parts = spec.split(":");
    if (parts.length === 3 || (parts.length === 2 && !/^\d+$/.test(parts[0]!))) addr = parts.shift()!;
  }
  if (parts.length < 1 || parts.length > 2 || !parts[0]) throw new ConfigError(`-p ${JSON.stringify(arg)}: write [ADDR:]HOST-PORT[:GUEST-PORT][/tcp|/udp] (or lvh's HOST-PORT[:GUEST-PORT][:tcp|:udp]), e.g. 8080:80`);
  const hostPort = port(parts[0], arg, "host port");
  const guestPort = parts[1] !== undefined ? port(parts[1], arg, "guest port") : hostPort;
  if (!addr) throw new ConfigError(`-p ${JSON.stringify(arg)}: empty address`);
  return { proto, hostAddr: addr, hostPort, guestPort };
}

/** Forwards must not share a host address:port:protocol. */
export function checkForwardsDistinct(forwards: readonly PortForward[]): void {
  const seen = new Set<string>();
  for (const f of forwards) {
    const k = `${f.hostAddr}:${f.hostPort}/${f.proto}`;
    if (seen.has(k)) throw new ConfigError(`-p: host port ${k} is forwarded twice`);
    seen.add(k);
  }
}

export const VM_NAME_RE = /^[a-z0-9][a-z0-9._-]{0,62}$/;

export function checkVmName(name: string): string {
  if (!VM_NAME_RE.test(name)) {
    throw new ConfigError(`--name ${JSON.stringify(name)} is not valid: use lowercase letters, digits, ".", "_" and "-", starting with a letter or digit (at most 63 characters)`);
  }
  return name;
}

/** Absolute path of a host path argument. */
export function absolute(p: string, cwd: string): string {
  return isAbsolute(p) ? p : resolve(cwd, p);
}
