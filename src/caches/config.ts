// Validates the serve config's `caches:` section (zod for the shape, then the checks that
// span fields). Every problem names the file and the field ("caches.registry.mirrors[1].url")
// and says what to write instead; values are not shown (a password may be among them).
import { isAbsolute, resolve } from "node:path";
import * as z from "zod";
import { SIZE_FORMS, formatSize, parseSize } from "../config/sizes.js";
import { issueMessage, joinPath, shapeKeys } from "../config/zod-issues.js";
import { ALLOW_FORMS, parseAllowEntry, type AllowRule } from "../net/policy.js";
import type { CachesSpec, HttpCacheSpec, RegistryCacheSpec, RegistryMirrorSpec } from "./types.js";

export const CACHES_DEFAULTS = {
  registryMaxSize: 50 * 1024 ** 3,
  httpMaxSize: 20 * 1024 ** 3,
  httpMaxObject: 1024 ** 3,
} as const;

/** Smallest cache size accepted: Squid keeps its swap state and two levels of folders. */
const MIN_SIZE = 100 * 1024 ** 2;

/** A registry as containerd and Docker name it: a host name, optionally with a port. */
export const REGISTRY_RE = /^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:\d{1,5})?$/;

/** Where a mirrored registry's content comes from when the config names no upstream. */
export function defaultUpstream(registry: string): string {
  return registry === "docker.io" ? "https://registry-1.docker.io" : `https://${registry}`;
}

const sizeField = z.union([z.string(), z.number()], { error: `must be a size: ${SIZE_FORMS}` });

const serviceUrl = (example: string) =>
  z.string({ error: `must be an http(s) URL such as ${example}, as a string` }).refine(okUrl, `must be an http(s) URL such as ${example}: scheme, host and port only (no path, query or user name)`);

const portField = z
  .number({ error: "must be a port number from 1024 to 65535" })
  .int("must be a whole port number")
  .min(1024, "must be a port number from 1024 to 65535 (lower ports need privileges the caches do not get)")
  .max(65535, "must be a port number from 1024 to 65535");

const pathField = z
  .string({ error: "must be a folder path, as a string" })
  .min(1, "must be a folder path")
  // Squid's config takes the path as one word.
  .regex(/^[^\s"'#\\]+$/, "must be a folder path without spaces, quotes, backslashes or #");

const mirrorObject = z.strictObject(
  {
    registry: z.string({ error: 'must be the registry\'s name, e.g. "ghcr.io"' }),
    upstream: serviceUrl("https://ghcr.io").optional(),
    url: serviceUrl("http://cache.example:5000").optional(),
    port: portField.optional(),
  },
  { error: 'must be a registry name such as "docker.io", or {"registry": "ghcr.io", "upstream": "https://ghcr.io"} or {"registry": "quay.io", "url": "http://cache.example:5000"}' },
);

const registrySchema = z.strictObject(
  {
    mirrors: z.array(z.union([z.string(), mirrorObject], { error: 'must be a registry name such as "docker.io", or an object {"registry": ..., "upstream" or "url": ...}' }), {
      error: 'must be a list of registries, e.g. ["docker.io", "ghcr.io", "quay.io"]',
    }),
    storage: pathField.optional(),
    maxSize: sizeField.optional(),
    credentials: z
      .record(
        z.string(),
        z.strictObject(
          { username: z.string({ error: "must be the user name, as a string" }).min(1, "must not be empty"), password: z.string({ error: "must be the password or token, as a string (e.g. ${{ file:/etc/civm/dockerhub-token }})" }).min(1, "must not be empty") },
          { error: 'must be {"username": ..., "password": ...}' },
        ),
        { error: 'must be an object of registry → {"username", "password"}, e.g. {"docker.io": {"username": "me", "password": "${{ file:/etc/civm/dockerhub-token }}"}}' },
      )
      .optional(),
  },
  { error: 'must be an object such as {"mirrors": ["docker.io"], "maxSize": "50G"}' },
);

const httpSchema = z.strictObject(
  {
    url: serviceUrl("http://proxy.example:3128").optional(),
    storage: pathField.optional(),
    maxSize: sizeField.optional(),
    maxObjectSize: sizeField.optional(),
    port: portField.optional(),
    allow: z.array(z.string({ error: `must be a string; ${ALLOW_FORMS}` }), { error: `must be a list of strings; ${ALLOW_FORMS}` }).optional(),
  },
  { error: 'must be an object such as {"maxSize": "20G"}, or {"url": "http://proxy.example:3128"} for a proxy civm does not run' },
);

const cachesSchema = z.strictObject(
  { registry: registrySchema.optional(), http: httpSchema.optional() },
  { error: 'must be an object with "registry" and/or "http", e.g. {"registry": {"mirrors": ["docker.io"]}, "http": {"maxSize": "20G"}}' },
);

/** Known keys of each object in the section, for "did you mean" (by the issue's path shape). */
function knownKeysAt(path: readonly PropertyKey[]): string[] {
  const p = path.map((x) => (typeof x === "number" ? "#" : String(x))).join(".");
  if (p === "") return shapeKeys(cachesSchema);
  if (p === "registry") return shapeKeys(registrySchema);
  if (p === "http") return shapeKeys(httpSchema);
  if (/^registry\.mirrors\.#$/.test(p)) return shapeKeys(mirrorObject);
  if (/^registry\.credentials\.[^.]+$/.test(p)) return ["username", "password"];
  return [];
}

function okUrl(text: string): boolean {
  let u: URL;
  try {
    u = new URL(text);
  } catch {
    return false;
  }
  return (u.protocol === "http:" || u.protocol === "https:") && (u.pathname === "/" || u.pathname === "") && !u.search && !u.hash && !u.username && !u.password;
}

/** "http://host:port" without a trailing slash. */
function cleanUrl(text: string): string {
  return text.replace(/\/+$/, "");
}

/**
 * Validates `caches` (undefined: no caches). Problems are full lines (`FILE: "caches.X" ...`);
 * relative storage paths start from `baseDir` (the config file's folder).
 */
export function parseCaches(v: unknown, file: string, baseDir: string): { value: CachesSpec | undefined; problems: string[] } {
  if (v === undefined || v === null) return { value: undefined, problems: [] };
  const problems: string[] = [];
  const add = (field: string, message: string) => problems.push(`${file}: "${field}" ${message}${/[.?]$/.test(message) ? "" : "."}`);
  // Each section on its own, so a mistake in one does not hide the other's.
  const shape = <T>(schema: z.ZodType<T>, value: unknown, at: PropertyKey[]): T | undefined => {
    const parsed = schema.safeParse(value);
    if (parsed.success) return parsed.data;
    for (const issue of parsed.error.issues) {
      const path = [...at, ...issue.path];
      const keysPath = issue.code === "unrecognized_keys" ? path : path.slice(0, -1);
      const msg = issueMessage({ ...issue, path } as z.core.$ZodIssue, v, knownKeysAt(keysPath));
      add(joinPath("caches", path), issue.code === "unrecognized_keys" ? `has an ${msg}` : msg.startsWith("missing: ") ? `is missing; it ${msg.slice("missing: ".length)}` : msg);
    }
    return undefined;
  };
  shape(cachesSchema.extend({ registry: z.unknown().optional(), http: z.unknown().optional() }), v, []);
  if (typeof v !== "object" || Array.isArray(v)) return { value: undefined, problems };
  const top = v as { registry?: unknown; http?: unknown };
  const parsed = { data: { registry: top.registry === undefined ? undefined : shape(registrySchema, top.registry, ["registry"]), http: top.http === undefined ? undefined : shape(httpSchema, top.http, ["http"]) } };
  const size = (field: string, raw: string | number | undefined, def: number): number => {
    if (raw === undefined) return def;
    try {
      const n = parseSize(raw);
      if (n < MIN_SIZE) add(field, `is ${formatSize(n)}; a cache needs at least ${formatSize(MIN_SIZE)}`);
      return n;
    } catch (e) {
      add(field, (e as Error).message);
      return def;
    }
  };
  const folder = (p: string | undefined) => (p === undefined ? undefined : isAbsolute(p) ? p : resolve(baseDir, p));
  const ports = new Map<number, string>();
  const usePort = (port: number | undefined, field: string) => {
    if (port === undefined) return;
    const other = ports.get(port);
    if (other) add(field, `is ${port}, which "${other}" uses too; give each cache a port of its own, or leave "port" out for a free one`);
    else ports.set(port, field);
  };

  let registry: RegistryCacheSpec | undefined;
  const r = parsed.data.registry;
  if (r) {
    const mirrors: RegistryMirrorSpec[] = [];
    const seen = new Map<string, number>();
    if (r.mirrors.length === 0) add("caches.registry.mirrors", 'is empty; list the registries to cache, e.g. ["docker.io", "ghcr.io"], or remove "registry"');
    r.mirrors.forEach((m, i) => {
      const field = `caches.registry.mirrors[${i}]`;
      const o = typeof m === "string" ? { registry: m } : m;
      const name = o.registry.trim().toLowerCase();
      if (!REGISTRY_RE.test(name)) {
        add(typeof m === "string" ? field : `${field}.registry`, `must be a registry host name such as "docker.io", "ghcr.io" or "registry.example:5000" (no scheme, no path)`);
        return;
      }
      const first = seen.get(name);
      if (first !== undefined) add(field, `names ${JSON.stringify(name)} again (first at caches.registry.mirrors[${first}]); each registry has one cache`);
      seen.set(name, i);
      const url = "url" in o ? o.url : undefined;
      const upstream = "upstream" in o ? o.upstream : undefined;
      const port = "port" in o ? o.port : undefined;
      if (url !== undefined && (upstream !== undefined || port !== undefined)) {
        add(field, `sets "url" (an existing cache civm only checks) together with ${upstream !== undefined ? '"upstream"' : '"port"'} (for a cache civm runs); keep one`);
      }
      usePort(port, `${field}.port`);
      mirrors.push({ registry: name, upstream: url === undefined ? cleanUrl(upstream ?? defaultUpstream(name)) : undefined, url: url === undefined ? undefined : cleanUrl(url), port, credentials: undefined });
    });
    for (const [reg, cred] of Object.entries(r.credentials ?? {})) {
      const m = mirrors.find((x) => x.registry === reg.toLowerCase());
      if (!m) add(`caches.registry.credentials.${reg}`, `names a registry that is not in "caches.registry.mirrors" (${mirrors.map((x) => x.registry).join(", ") || "none"}); add it there or remove these credentials`);
      else if (m.url !== undefined) add(`caches.registry.credentials.${reg}`, `is for a registry whose cache civm does not run ("url"); set the credentials in that cache instead`);
      else m.credentials = { username: cred.username, password: cred.password };
    }
    registry = { mirrors, storage: folder(r.storage), maxSizeBytes: size("caches.registry.maxSize", r.maxSize, CACHES_DEFAULTS.registryMaxSize) };
    if (mirrors.length > 0 && mirrors.every((m) => m.url !== undefined)) {
      for (const k of ["storage", "maxSize"] as const) if (r[k] !== undefined) add(`caches.registry.${k}`, `applies to caches civm runs, but every mirror names an existing cache ("url"); remove it`);
    }
  }

  let http: HttpCacheSpec | undefined;
  const h = parsed.data.http;
  if (h) {
    if (h.url !== undefined) {
      for (const k of ["storage", "maxSize", "maxObjectSize", "port", "allow"] as const) {
        if (h[k] !== undefined) add(`caches.http.${k}`, `applies to the proxy civm runs, but "caches.http.url" names an existing one; remove "${k}" or "url"`);
      }
    }
    usePort(h.port, "caches.http.port");
    const allow: AllowRule[] = [];
    (h.allow ?? []).forEach((e, i) => {
      try {
        allow.push(parseAllowEntry(e));
      } catch (err) {
        add(`caches.http.allow[${i}]`, (err as Error).message);
      }
    });
    const maxSizeBytes = size("caches.http.maxSize", h.maxSize, CACHES_DEFAULTS.httpMaxSize);
    const maxObjectBytes = h.maxObjectSize === undefined ? Math.min(CACHES_DEFAULTS.httpMaxObject, Math.floor(maxSizeBytes / 4)) : size("caches.http.maxObjectSize", h.maxObjectSize, CACHES_DEFAULTS.httpMaxObject);
    if (maxObjectBytes > maxSizeBytes) add("caches.http.maxObjectSize", `(${formatSize(maxObjectBytes)}) is larger than "caches.http.maxSize" (${formatSize(maxSizeBytes)}); lower it`);
    http = { url: h.url === undefined ? undefined : cleanUrl(h.url), storage: folder(h.storage), maxSizeBytes, maxObjectBytes, port: h.port, allow };
  }
  if (problems.length) return { value: undefined, problems };
  if (!registry && !http) return { value: undefined, problems: [] };
  return { value: { registry, http }, problems: [] };
}

/** Every password in the section (for redaction). */
export function cacheSecrets(c: CachesSpec | undefined): string[] {
  return (c?.registry?.mirrors ?? []).flatMap((m) => (m.credentials ? [m.credentials.password] : []));
}

/** One line per cache for `civm config check`. */
export function summarizeCaches(c: CachesSpec | undefined): string[] {
  if (!c) return [];
  const out: string[] = [];
  for (const m of c.registry?.mirrors ?? []) {
    out.push(m.url !== undefined ? `cache registry/${m.registry}: existing cache ${m.url} (checked, not run)` : `cache registry/${m.registry}: pull-through cache of ${m.upstream}${m.credentials ? " (with credentials)" : ""}`);
  }
  if (c.registry && c.registry.mirrors.some((m) => m.url === undefined)) out.push(`registry caches: up to ${formatSize(c.registry.maxSizeBytes)} in ${c.registry.storage ?? "<state>/caches/registry"}`);
  if (c.http) {
    out.push(c.http.url !== undefined ? `cache http: existing proxy ${c.http.url} (checked, not run)` : `cache http: Squid, up to ${formatSize(c.http.maxSizeBytes)} (objects up to ${formatSize(c.http.maxObjectBytes)}) in ${c.http.storage ?? "<state>/caches/http"}${c.http.allow.length ? `, may fetch from ${c.http.allow.map((a) => a.raw).join(" ")}` : ""}`);
  }
  return out;
}

