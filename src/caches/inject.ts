// What a runner VM gets of the caches (pure): instance.json's `config.caches` (the addresses
// the guest agent configures Docker, containerd, BuildKit, the job's proxy variables and apt
// with) and the `network.allow` entries that open exactly those ports in the VM's nftables
// policy. Under QEMU's user network the guest reaches this host's loopback at 10.0.2.2.
import { isIP } from "node:net";
import { parseAllowEntry, type AllowRule, type NetworkSpec } from "../net/policy.js";

/** The host as the guest sees it under QEMU's user network (and its DNS forwarder). */
export const GUEST_HOST = "10.0.2.2";
export const GUEST_DNS = "10.0.2.3";

/** A cache a VM may use now. */
export interface OfferedCache {
  kind: "registry" | "http";
  /** The registry it mirrors (registry caches). */
  registry?: string;
  /** Where this host reaches it: http(s)://HOST:PORT. */
  url: string;
}

export interface GuestCaches {
  /** instance.json's config.caches; undefined when there is nothing to hand over. */
  config: { registry?: { registry: string; url: string }[]; http?: { url: string; noProxy: string } } | undefined;
  /** Extra network.allow entries for a restricted VM. */
  allow: AllowRule[];
}

function isLoopback(host: string): boolean {
  return host === "localhost" || /^127\./.test(host) || host === "::1";
}

/** The guest's URL for a host-side URL (loopback becomes 10.0.2.2) and the allow entry it needs. */
export function guestEndpoint(url: string): { url: string; allow: AllowRule } {
  const u = new URL(url);
  const host = u.hostname.replace(/^\[|\]$/g, "");
  const port = Number(u.port || (u.protocol === "https:" ? 443 : 80));
  if (isLoopback(host)) return { url: `${u.protocol}//${GUEST_HOST}:${port}`, allow: parseAllowEntry(`host:${port}`) };
  const hostPort = isIP(host) === 6 ? `[${host}]:${port}` : `${host}:${port}`;
  return { url: `${u.protocol}//${hostPort}`, allow: parseAllowEntry(hostPort) };
}

/** NO_PROXY: the host and its DNS forwarder, loopback, and what the VM's policy allows directly. */
export function noProxyFor(network: NetworkSpec): string {
  const out = ["localhost", "127.0.0.1", "::1", GUEST_HOST, GUEST_DNS];
  for (const a of network.allow) {
    const t = a.target;
    if (t.kind === "name") out.push(t.host);
    else if (t.kind === "cidr") out.push(/\/(32|128)$/.test(t.cidr) ? t.cidr.replace(/\/\d+$/, "") : t.cidr);
  }
  return [...new Set(out)].join(",");
}

/** What a VM with `network` gets of `offered` (nothing without a network device). */
export function guestCaches(offered: readonly OfferedCache[], network: NetworkSpec): GuestCaches {
  if (network.mode === "none" || offered.length === 0) return { config: undefined, allow: [] };
  const allow: AllowRule[] = [];
  const registry: { registry: string; url: string }[] = [];
  let http: { url: string; noProxy: string } | undefined;
  for (const c of offered) {
    const e = guestEndpoint(c.url);
    if (!allow.some((a) => a.raw === e.allow.raw)) allow.push(e.allow);
    if (c.kind === "registry" && c.registry) registry.push({ registry: c.registry, url: e.url });
    else if (c.kind === "http") http = { url: e.url, noProxy: noProxyFor(network) };
  }
  const config = { ...(registry.length ? { registry } : {}), ...(http ? { http } : {}) };
  return { config, allow: network.mode === "restricted" ? allow : [] };
}

/** The VM's network with the caches' ports opened (restricted VMs; others unchanged). */
export function withCacheAccess(network: NetworkSpec, extra: readonly AllowRule[]): NetworkSpec {
  if (network.mode !== "restricted" || extra.length === 0) return network;
  const have = new Set(network.allow.map((a) => a.raw));
  return { mode: network.mode, allow: [...network.allow, ...extra.filter((a) => !have.has(a.raw))] };
}

/**
 * A runner VM's launch with the caches in: instance.json's config gains `caches`, and a
 * restricted VM's policy opens their ports. Unchanged when the VM gets none.
 */
export function launchWithCaches<R extends { pool: { vm: { network: NetworkSpec } }; config: unknown }>(req: R, forVm: (network: NetworkSpec) => GuestCaches): R {
  const g = forVm(req.pool.vm.network);
  if (!g.config || typeof req.config !== "object" || req.config === null || Array.isArray(req.config)) return req;
  return {
    ...req,
    pool: { ...req.pool, vm: { ...req.pool.vm, network: withCacheAccess(req.pool.vm.network, g.allow) } },
    config: { ...req.config, caches: g.config },
  };
}
