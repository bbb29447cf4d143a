// The HTTP cache: Squid. Its config file and what it reports. Squid listens on two loopback
// ports: the proxy (what runner VMs reach, through the VM's network policy) and the cache
// manager (civm's health checks and the store size; no VM can reach it). Each request it
// proxies is sent to civm as one UDP datagram on loopback (its access log: the cache
// status, sizes and method), which is where hits, misses and bytes come from. The proxy
// refuses what the VM network policy denies by default (this host's addresses, private,
// link-local, multicast ranges), except the config's `allow` entries: a guest must not
// reach through the proxy what it cannot reach directly.
import { networkInterfaces } from "node:os";
import { DENIED_V4, DENIED_V6, type AllowRule } from "../net/policy.js";

export const MANAGER_PORT_NAME = "civm_manager";

export interface SquidConfigInput {
  port: number;
  managerPort: number;
  /** civm's UDP port for the access log. */
  logPort: number;
  storage: string;
  maxSizeBytes: number;
  maxObjectBytes: number;
  allow: readonly AllowRule[];
  /** This host's own addresses (default: every interface's). */
  hostAddresses?: string[];
}

/** Every address of this host's interfaces (loopback aside), as /32 and /128 entries. */
export function hostAddresses(): string[] {
  const out = new Set<string>();
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) {
      const addr = a.address.replace(/%.*$/, "");
      if (/^127\./.test(addr) || addr === "::1") continue;
      out.add(`${addr}/${a.family === "IPv6" ? 128 : 32}`);
    }
  }
  return [...out];
}

/** This host: its addresses and loopback, for Squid's dst ACLs. */
function hostAcl(c: SquidConfigInput): string {
  return [...new Set([...(c.hostAddresses ?? hostAddresses()), "127.0.0.0/8", "::1/128"])].join(" ");
}

/** Long-lived files whose names carry their version: kept for months without asking again. */
const IMMUTABLE = String.raw`\.(deb|udeb|rpm|apk|whl|crate|gem|nupkg|jar|tgz|tbz2|txz|tar\.(gz|bz2|xz|zst)|zip)$`;

export function renderSquidConfig(c: SquidConfigInput): string {
  const mb = (n: number) => Math.max(1, Math.floor(n / 1024 ** 2));
  const lines = [
    "# civm serve: the HTTP cache (written at every start; edits are lost). docs/caches.md",
    `http_port 127.0.0.1:${c.port}`,
    `http_port 127.0.0.1:${c.managerPort} name=${MANAGER_PORT_NAME}`,
    "pid_filename none",
    "pinger_enable off",
    "shutdown_lifetime 1 seconds",
    `cache_dir ufs ${c.storage} ${mb(c.maxSizeBytes)} 16 256`,
    `coredump_dir ${c.storage}`,
    // Squid's messages reach civm on stderr (squid -d 1); its own log file is not kept.
    "cache_log /dev/null",
    // %Ss cache status, %>Hs HTTP status, %<st bytes to the client, %<bs body bytes from the server.
    "logformat civm civm %Ss %>Hs %<st %<bs %rm",
    "cache_store_log none",
    "logfile_rotate 0",
    "visible_hostname civm-cache",
    "httpd_suppress_version_string on",
    "via off",
    "forwarded_for delete",
    `maximum_object_size ${Math.max(1, Math.floor(c.maxObjectBytes / 1024))} KB`,
    "cache_mem 64 MB",
    "maximum_object_size_in_memory 1 MB",
    `acl civm_manager_port myportname ${MANAGER_PORT_NAME}`,
    "acl SSL_ports port 443",
    "acl Safe_ports port 80 443 1025-65535",
    "acl CONNECT method CONNECT",
    `acl civm_host dst ${hostAcl(c)}`,
    // IPv4-mapped IPv6 addresses are IPv4 to Squid (the v4 ranges cover them).
    `acl civm_denied dst ${[...DENIED_V4, ...DENIED_V6.filter((r) => r !== "::ffff:0:0/96" && r !== "::/127")].join(" ")}`,
    `access_log udp://127.0.0.1:${c.logPort} logformat=civm buffer-size=0KB !civm_manager_port`,
    "http_access allow manager civm_manager_port localhost",
    "http_access deny manager",
    "http_access deny civm_manager_port",
  ];
  c.allow.forEach((a, i) => {
    const name = `civm_allow_${i}`;
    const t = a.target;
    if (t.kind === "host") lines.push(`acl ${name} dst ${hostAcl(c)}`);
    else if (t.kind === "cidr") lines.push(`acl ${name} dst ${t.cidr}`);
    else lines.push(`acl ${name} dstdomain ${t.host}`);
    const port = a.port === undefined ? "" : ` ${name}_port`;
    if (a.port !== undefined) lines.push(`acl ${name}_port port ${a.port}`);
    lines.push(`http_access allow localhost ${name}${port}`);
  });
  lines.push(
    "http_access deny !Safe_ports",
    "http_access deny CONNECT !SSL_ports",
    "http_access deny civm_host",
    "http_access deny civm_denied",
    "http_access allow localhost",
    "http_access deny all",
    // apt's indexes change; the packages they name never do.
    String.raw`refresh_pattern \/(Packages|Sources)(|\.bz2|\.gz|\.xz)$ 0 0% 0 refresh-ims`,
    String.raw`refresh_pattern \/(InRelease|Release|Release\.gpg)$ 0 0% 0 refresh-ims`,
    `refresh_pattern -i ${IMMUTABLE} 129600 100% 129600`,
    String.raw`refresh_pattern -i (/cgi-bin/|\?) 0 0% 0`,
    "refresh_pattern . 0 20% 4320",
    "",
  );
  return lines.join("\n");
}

/** What one access log record says: a hit, a miss, a tunnel (CONNECT), or nothing to count. */
export interface SquidRequest {
  result: "hit" | "miss" | "tunnel";
  servedBytes: number;
  upstreamBytes: number;
}

/**
 * One record ("civm TCP_MISS 200 1185 853 GET"); undefined for refused, malformed and
 * internal requests (a guest's health check, a denied destination).
 */
export function parseSquidRecord(line: string): SquidRequest | undefined {
  const m = /^civm (\S+) (\d+|-) (\d+|-) (\d+|-) (\S+)$/.exec(line.trim());
  if (!m) return undefined;
  const status = m[1]!;
  const n = (x: string) => (/^\d+$/.test(x) ? Number(x) : 0);
  const result = /^TCP_TUNNEL/.test(status) ? "tunnel" : /HIT|^TCP_REFRESH_UNMODIFIED|^TCP_REFRESH_FAIL_OLD/.test(status) ? "hit" : /^TCP_(MISS|REFRESH_MODIFIED|REFRESH_FAIL_ERR|CLIENT_REFRESH_MISS|SWAPFAIL_MISS|REFRESH_IGNORED)/.test(status) ? "miss" : undefined;
  if (!result) return undefined;
  return { result, servedBytes: n(m[3]!), upstreamBytes: n(m[4]!) };
}

/** "Current Size: 1234.00 KB" of the storedir page: what the cache holds on disk. */
export function parseSquidStoreSize(text: string): number | undefined {
  const m = /^Current Size:\s*([0-9.]+)\s*KB/m.exec(text);
  return m ? Math.round(Number(m[1]) * 1024) : undefined;
}
