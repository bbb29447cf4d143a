// What a VM's guest may reach: the network policy as data. Pure: parsing and validation of
// `network` (instances, pools) and `--allow`/`--network` (dev VMs); nftables lives in nft.ts.
// See docs/security.md for the threat model.
import { isIP } from "node:net";

/**
 * restricted (default): the public internet and the VM's own port forwards; the host, link-local,
 * private, shared and multicast ranges are denied except for `allow` entries.
 * none: no network device at all. unrestricted: no policy (warned at every start).
 */
export type NetworkMode = "restricted" | "none" | "unrestricted";

export type AllowTarget =
  | { kind: "host" }
  | { kind: "cidr"; family: 4 | 6; cidr: string }
  | { kind: "name"; host: string };

export interface AllowRule {
  /** As written, for messages. */
  raw: string;
  target: AllowTarget;
  /** TCP and UDP port; undefined = every port (CIDR entries only). */
  port: number | undefined;
}

export interface NetworkSpec {
  mode: NetworkMode;
  allow: AllowRule[];
}

export const DEFAULT_NETWORK: NetworkSpec = Object.freeze({ mode: "restricted", allow: [] }) as NetworkSpec;

export const NETWORK_MODES: readonly NetworkMode[] = ["restricted", "none", "unrestricted"];

/** Denied by default (besides every address of the host itself, found by nftables' fib). */
export const DENIED_V4 = [
  "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
  "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
] as const;
export const DENIED_V6 = ["::/127", "::ffff:0:0/96", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8"] as const;

export const ALLOW_FORMS =
  'each entry is "host:PORT" (this host, e.g. "host:8443"), "CIDR" or "CIDR:PORT" (e.g. "10.1.0.0/16" or "10.1.2.3:5432"; IPv6 in brackets with a port: "[fd00::1]:443"), or "NAME:PORT" (a DNS name, resolved when the VM starts)';

function parsePort(s: string): number | undefined {
  if (!/^\d{1,5}$/.test(s)) return undefined;
  const n = Number(s);
  return n >= 1 && n <= 65535 ? n : undefined;
}

/** One address or CIDR, normalised to a CIDR nftables accepts; undefined when it is neither. */
export function parseCidr(s: string): { family: 4 | 6; cidr: string } | undefined {
  const slash = s.indexOf("/");
  const addr = slash < 0 ? s : s.slice(0, slash);
  const family = isIP(addr);
  if (family !== 4 && family !== 6) return undefined;
  const max = family === 4 ? 32 : 128;
  if (slash < 0) return { family, cidr: `${addr}/${max}` };
  const bits = s.slice(slash + 1);
  if (!/^\d{1,3}$/.test(bits) || Number(bits) > max) return undefined;
  return { family, cidr: `${addr}/${Number(bits)}` };
}

const HOSTNAME_RE = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;

/** Parses one `allow` entry; throws an Error whose message says what is wrong (the caller adds where). */
export function parseAllowEntry(raw: string): AllowRule {
  const bad = (why: string) => new Error(`${JSON.stringify(raw)} ${why}; ${ALLOW_FORMS}`);
  const s = raw.trim();
  if (!s) throw bad("is empty");
  // [v6 or v6/len]:port
  const br = /^\[([^\]]+)\](?::(.*))?$/.exec(s);
  if (br) {
    const c = parseCidr(br[1]!);
    if (!c || c.family !== 6) throw bad("has brackets but no IPv6 address or CIDR in them");
    if (br[2] === undefined) return { raw, target: { kind: "cidr", ...c }, port: undefined };
    const port = parsePort(br[2]);
    if (port === undefined) throw bad("has a port that is not a number from 1 to 65535");
    return { raw, target: { kind: "cidr", ...c }, port };
  }
  const whole = parseCidr(s);
  if (whole) return { raw, target: { kind: "cidr", ...whole }, port: undefined };
  const colon = s.lastIndexOf(":");
  if (colon < 0) {
    if (s === "host") throw bad('names the host without a port (a narrow exception is required: "host:PORT")');
    if (HOSTNAME_RE.test(s)) throw bad("names a host without a port");
    throw bad("is not an address, CIDR or host name");
  }
  const left = s.slice(0, colon);
  const port = parsePort(s.slice(colon + 1));
  if (port === undefined) throw bad("has a port that is not a number from 1 to 65535");
  if (left === "host") return { raw, target: { kind: "host" }, port };
  if (left.includes(":")) throw bad("looks like an IPv6 address with a port; write it in brackets, e.g. \"[fd00::1]:443\"");
  const c = parseCidr(left);
  if (c) return { raw, target: { kind: "cidr", ...c }, port };
  if (HOSTNAME_RE.test(left) && !/^[\d.]+$/.test(left)) return { raw, target: { kind: "name", host: left.toLowerCase() }, port };
  throw bad("is not an address, CIDR or host name followed by a port");
}

/**
 * Validates a `network` value: "restricted" | "none" | "unrestricted", or {allow: [...]}
 * (restricted with exceptions; `mode` may be given too). Returns problems as messages
 * relative to the key (the caller prefixes file and field).
 */
export function parseNetworkValue(v: unknown): { value: NetworkSpec; problems?: undefined } | { value?: undefined; problems: string[] } {
  if (v === undefined) return { value: DEFAULT_NETWORK };
  if (typeof v === "string") {
    if ((NETWORK_MODES as readonly string[]).includes(v)) return { value: { mode: v as NetworkMode, allow: [] } };
    return { problems: [`must be "restricted" (the default), "none", "unrestricted", or {"allow": [...]}, but it is ${JSON.stringify(v)}`] };
  }
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    return { problems: [`must be "restricted", "none", "unrestricted" or an object {"allow": [...]}, but it is ${Array.isArray(v) ? "a list" : typeof v}`] };
  }
  const o = v as Record<string, unknown>;
  const problems: string[] = [];
  for (const k of Object.keys(o)) if (k !== "allow" && k !== "mode") problems.push(`has an unknown key ${JSON.stringify(k)}; the keys are "allow" and "mode"`);
  let mode: NetworkMode = "restricted";
  if (o.mode !== undefined) {
    if (typeof o.mode === "string" && (NETWORK_MODES as readonly string[]).includes(o.mode)) mode = o.mode as NetworkMode;
    else problems.push(`"mode" must be "restricted", "none" or "unrestricted", but it is ${JSON.stringify(o.mode)}`);
  }
  const allow: AllowRule[] = [];
  if (o.allow !== undefined) {
    if (!Array.isArray(o.allow)) problems.push(`"allow" must be a list of strings; ${ALLOW_FORMS}`);
    else {
      o.allow.forEach((e, i) => {
        if (typeof e !== "string") return void problems.push(`"allow"[${i}] must be a string; ${ALLOW_FORMS}`);
        try {
          allow.push(parseAllowEntry(e));
        } catch (err) {
          problems.push(`"allow"[${i}]: ${(err as Error).message}`);
        }
      });
    }
  }
  if (allow.length && mode !== "restricted") problems.push(`"allow" only applies to the restricted mode, but "mode" is "${mode}"; remove one of them`);
  if (problems.length) return { problems };
  return { value: { mode, allow } };
}

/** Short words for logs and `civm ls`. */
export function describeNetwork(n: NetworkSpec): string {
  if (n.mode !== "restricted") return n.mode;
  return n.allow.length ? `restricted, allow ${n.allow.map((a) => a.raw).join(" ")}` : "restricted";
}
