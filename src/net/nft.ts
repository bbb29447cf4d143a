// Enforces a VM's network policy on the host with nftables. Under QEMU's user-mode network
// every connection the guest makes is a socket of the QEMU process, so one table per VM that
// matches the socket's group (each QEMU runs with a group id of its own, see identity.ts) in
// the output hook covers everything the guest can send, and guest root cannot change it.
// The table exists before QEMU is spawned and is deleted after QEMU is gone; a table whose
// civm died is swept by the next civm (its comment names the owner). See docs/security.md.
import { readFileSync } from "node:fs";
import { lookup } from "node:dns/promises";
import { randomInt } from "node:crypto";
import { run, ToolError } from "../exec/index.js";
import { HostError } from "../errors/index.js";
import { anyProcessWithGid, identityAlive } from "../host/proc.js";
import { DENIED_V4, DENIED_V6, type AllowRule } from "./policy.js";

export const TABLE_PREFIX = "civm_g";
/** Per-VM group ids: above the ranges distributions, systemd and SSSD's ID mapping hand out, below 2^31. */
export const VM_GID_BASE = 2_100_000_000;
export const VM_GID_COUNT = 1 << 24;

/** A random per-VM group id (see reserveVmGid). */
export function randomVmGid(): number {
  return VM_GID_BASE + randomInt(VM_GID_COUNT);
}

export function tableName(gid: number): string {
  return `${TABLE_PREFIX}${gid}`;
}

/** An allow entry with its name resolved: every address a NAME:PORT entry had at start. */
export type ResolvedAllow = { raw: string; port: number | undefined } & ({ kind: "host" } | { kind: "cidr"; family: 4 | 6; cidr: string });

export interface TableRules {
  gid: number;
  allow: ResolvedAllow[];
  /** The host's DNS servers: QEMU forwards the guest's DNS (10.0.2.3) to them, so port 53 of each stays open. */
  resolvers: string[];
  /** Written into the table: who owns it (see sweepTables). */
  comment: string;
}

function l4(port: number | undefined): string {
  return port === undefined ? "" : ` meta l4proto { tcp, udp } th dport ${port}`;
}

/**
 * The table for one VM, as an nft script that fails as a whole if the table already exists
 * (`create table` first): the table is also the lock on its group id.
 */
export function renderTable(table: string, r: TableRules): string {
  const accept: string[] = [];
  for (const a of r.allow) {
    const why = ` comment ${JSON.stringify(`allow ${a.raw}`.slice(0, 120))}`;
    if (a.kind === "host") accept.push(`fib daddr type local${l4(a.port)} accept${why}`);
    else accept.push(`${a.family === 4 ? "ip" : "ip6"} daddr ${a.cidr}${l4(a.port)} accept${why}`);
  }
  for (const ns of r.resolvers) {
    const fam = ns.includes(":") ? "ip6" : "ip";
    accept.push(`${fam} daddr ${ns} meta l4proto { tcp, udp } th dport 53 accept comment "host DNS server"`);
  }
  return [
    `create table inet ${table}`,
    `table inet ${table} {`,
    `  comment ${JSON.stringify(r.comment)}`,
    `  chain output {`,
    `    type filter hook output priority filter; policy accept;`,
    `    meta skgid ${r.gid} jump vm`,
    `  }`,
    `  chain vm {`,
    // Replies on connections made to the VM's port forwards, and on allowed connections.
    `    ct state established,related accept`,
    ...accept.map((l) => `    ${l}`),
    `    fib daddr type { local, broadcast, multicast, anycast } jump deny`,
    `    ip daddr { ${DENIED_V4.join(", ")} } jump deny`,
    `    ip6 daddr { ${DENIED_V6.join(", ")} } jump deny`,
    `  }`,
    // Rejected rather than dropped: the guest's connect() fails at once instead of timing out.
    `  chain deny {`,
    `    counter meta l4proto tcp reject with tcp reset`,
    `    counter reject with icmpx admin-prohibited`,
    `  }`,
    `}`,
    "",
  ].join("\n");
}

/** nameserver lines of resolv.conf (what QEMU's user-mode DNS forwards to). */
export function hostResolvers(resolvConf = "/etc/resolv.conf"): string[] {
  let text = "";
  try {
    text = readFileSync(resolvConf, "utf8");
  } catch {
    return [];
  }
  const out: string[] = [];
  for (const m of text.matchAll(/^\s*nameserver\s+(\S+)/gm)) {
    const addr = m[1]!.replace(/%.*$/, "");
    if (/^[\d.]+$/.test(addr) || addr.includes(":")) out.push(addr);
  }
  return [...new Set(out)];
}

/** Resolves NAME:PORT entries (every address of the name, at this moment). */
export async function resolveAllow(rules: readonly AllowRule[], where: string): Promise<ResolvedAllow[]> {
  const out: ResolvedAllow[] = [];
  for (const r of rules) {
    const t = r.target;
    if (t.kind === "host") out.push({ raw: r.raw, port: r.port, kind: "host" });
    else if (t.kind === "cidr") out.push({ raw: r.raw, port: r.port, kind: "cidr", family: t.family, cidr: t.cidr });
    else {
      let addrs: { address: string; family: number }[];
      try {
        addrs = await lookup(t.host, { all: true });
      } catch (e) {
        throw new HostError(`${where}: network.allow entry ${JSON.stringify(r.raw)}: cannot resolve ${t.host} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); fix the name or allow its address instead`);
      }
      for (const a of addrs) out.push({ raw: r.raw, port: r.port, kind: "cidr", family: a.family === 6 ? 6 : 4, cidr: `${a.address}/${a.family === 6 ? 128 : 32}` });
    }
  }
  return out;
}

function isRoot(): boolean {
  return typeof process.getuid === "function" && process.getuid() === 0;
}

/** Why the policy cannot be applied here, or undefined when it can (root; nft is checked when it runs). */
export function policyUnavailable(): string | undefined {
  if (!isRoot()) return "civm is not running as root, and the network policy needs root (an nftables table, QEMU started as its own user)";
  return undefined;
}

/**
 * Reserves a fresh per-VM group id for as long as this process holds it: an abstract unix
 * socket named after it (bound atomically in this network namespace, where the tables live
 * too, and released by the kernel when civm dies). Costs well under a millisecond, so the
 * table itself can be made while QEMU starts.
 */
export async function reserveVmGid(): Promise<{ gid: number; release: () => void }> {
  const { createServer } = await import("node:net");
  for (let attempt = 0; ; attempt++) {
    const gid = randomVmGid();
    const server = createServer();
    try {
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen({ path: `\0civm-vm-gid-${gid}` }, () => resolve());
      });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "EADDRINUSE" && attempt < 20) continue;
      throw e;
    }
    server.unref();
    return { gid, release: () => server.close() };
  }
}

/**
 * Creates the VM's table for QEMU's group `gid`. The caller runs QEMU with that group,
 * lets the guest run only once this resolved, and deletes the table after QEMU exits.
 */
export async function installTable(r: TableRules): Promise<{ table: string; gid: number }> {
  const table = tableName(r.gid);
  try {
    await run("nft", ["-f", "-"], { input: renderTable(table, r), failCode: "host", timeoutMs: 10_000 });
    return { table, gid: r.gid };
  } catch (e) {
    if (e instanceof ToolError && /File exists/.test(e.stderr)) {
      throw new HostError(`the network policy table ${table} already exists: a VM whose civm died still holds group ${r.gid}. Run civm ls (it ends orphaned VMs and removes their tables), then start again.`);
    }
    if (e instanceof ToolError) {
      throw new HostError(`cannot apply the VM's network policy with nftables (nft exited ${e.exitStatus}); civm does not start a VM it cannot fence. Check that the kernel has nf_tables (lsmod | grep nf_tables) and that civm runs as root, or set network: unrestricted for this VM.`, { cause: e, details: e.stderr.trim() });
    }
    throw e;
  }
}

/** Deletes a table; a table that is already gone is fine. */
export async function deleteTable(table: string): Promise<void> {
  if (!table.startsWith(TABLE_PREFIX) || !/^[a-z0-9_]+$/.test(table)) throw new Error(`refusing to delete nftables table ${JSON.stringify(table)}: not one of civm's`);
  try {
    await run("nft", ["delete", "table", "inet", table], { failCode: "host", timeoutMs: 10_000 });
  } catch (e) {
    if (e instanceof ToolError && /No such file or directory/.test(e.stderr)) return;
    throw e;
  }
}

/** Owner recorded in a table's comment ("civm vm=ID owner=PID:START"). */
export function ownerOfComment(comment: string): { vm: string | undefined; owner: string | undefined } {
  return { vm: /\bvm=([0-9a-f]+)/.exec(comment)?.[1], owner: /\bowner=(\d+:\d+)/.exec(comment)?.[1] };
}

export interface CivmTable {
  table: string;
  gid: number;
  comment: string;
}

/** civm's tables on this host (network namespace). Empty when nft is missing or not root. */
export async function listTables(): Promise<CivmTable[]> {
  if (!isRoot()) return [];
  let listing: string;
  try {
    listing = (await run("nft", ["list", "tables", "inet"], { timeoutMs: 10_000 })).stdout;
  } catch {
    return [];
  }
  const out: CivmTable[] = [];
  for (const m of listing.matchAll(new RegExp(`^table inet (${TABLE_PREFIX}(\\d+))$`, "gm"))) {
    const table = m[1]!;
    let text = "";
    try {
      text = (await run("nft", ["list", "table", "inet", table], { timeoutMs: 10_000 })).stdout;
    } catch {
      continue; // deleted meanwhile
    }
    out.push({ table, gid: Number(m[2]), comment: /^\s*comment "(.*)"$/m.exec(text)?.[1] ?? "" });
  }
  return out;
}

/**
 * Deletes tables nobody needs: the civm that made it is gone (pid and start time) and no
 * process runs with its group (an orphaned QEMU keeps its fence until it is ended).
 */
export async function sweepTables(log: (line: string) => void = () => {}): Promise<string[]> {
  const removed: string[] = [];
  for (const t of await listTables()) {
    const { owner } = ownerOfComment(t.comment);
    if (owner && identityAlive(owner)) continue;
    if (anyProcessWithGid(t.gid)) continue;
    try {
      await deleteTable(t.table);
      removed.push(t.table);
      log(`reconcile: removed the network policy table ${t.table} of a VM whose civm is gone`);
    } catch (e) {
      log(`warning: could not remove nftables table ${t.table}: ${(e as Error).message}`);
    }
  }
  return removed;
}
