// A small client for the OCI distribution (registry v2) API: manifests and blobs, pulled
// and pushed, with the WWW-Authenticate challenge flow (anonymous or user/password Bearer
// tokens, or Basic) and credentials from a docker/podman auth file.
//
// Secrets: a password or token is only ever put in an Authorization header; no message,
// log line or error built here contains one (a registry's error body is reduced to its
// `errors[].code/message`). Credentials go only to the registry's own origin and to the
// token realm it names, never over plain HTTP except to a loopback address, and an
// Authorization header is dropped when a redirect leaves the registry's origin (blob
// downloads are redirected to storage hosts).
import { existsSync, readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { CivmError, ConfigError, ExternalError, messageOf } from "../errors/index.js";
import { registryApiHost, type OciReference } from "./oci-ref.js";

export interface Credentials {
  username: string;
  password: string;
}

export interface CredentialLookup {
  credentials?: Credentials;
  /** The file they came from (for messages). */
  source?: string;
  /** A credential helper the file names for this registry (civm does not run helpers). */
  helper?: string;
  /** Files looked at. */
  searched: string[];
}

const DOCKER_HUB_KEYS = ["docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/"];

function normalizeAuthKey(key: string): string {
  return key.replace(/^[a-z]+:\/\//i, "").replace(/\/.*$/, "").toLowerCase();
}

/**
 * Auth files, most specific first: --auth-file, $CIVM_REGISTRY_AUTH_FILE (either one alone
 * when given), else $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json (podman),
 * $DOCKER_CONFIG/config.json or ~/.docker/config.json (docker login).
 */
export function authFileCandidates(authFile: string | undefined, env: NodeJS.ProcessEnv = process.env): { files: string[]; explicit: boolean } {
  if (authFile) return { files: [authFile], explicit: true };
  if (env.CIVM_REGISTRY_AUTH_FILE) return { files: [env.CIVM_REGISTRY_AUTH_FILE], explicit: true };
  const files: string[] = [];
  if (env.REGISTRY_AUTH_FILE) files.push(env.REGISTRY_AUTH_FILE);
  if (env.XDG_RUNTIME_DIR) files.push(join(env.XDG_RUNTIME_DIR, "containers", "auth.json"));
  files.push(join(env.DOCKER_CONFIG || join(env.HOME || homedir(), ".docker"), "config.json"));
  return { files, explicit: false };
}

interface AuthFileEntry {
  auth?: unknown;
  username?: unknown;
  password?: unknown;
  identitytoken?: unknown;
}

/** Credentials for `registry` (host[:port]) from the auth files; a ConfigError for a broken file. */
export function lookupCredentials(registry: string, authFile?: string, env: NodeJS.ProcessEnv = process.env): CredentialLookup {
  const { files, explicit } = authFileCandidates(authFile, env);
  const wanted = registry === "docker.io" ? DOCKER_HUB_KEYS.map(normalizeAuthKey) : [normalizeAuthKey(registry)];
  const out: CredentialLookup = { searched: files };
  for (const file of files) {
    if (!existsSync(file)) {
      if (explicit) throw new ConfigError(`the registry auth file ${file} does not exist (from ${authFile ? "--auth-file" : "CIVM_REGISTRY_AUTH_FILE"}); write it with docker login or podman login, or fix the path`);
      continue;
    }
    let data: unknown;
    try {
      data = JSON.parse(readFileSync(file, "utf8"));
    } catch (e) {
      throw new ConfigError(`the registry auth file ${file} is not valid JSON (${messageOf(e).split("\n")[0]}); it must hold {"auths": {"HOST": {"auth": "BASE64(user:password)"}}} as docker login writes it`);
    }
    if (typeof data !== "object" || data === null || Array.isArray(data)) {
      throw new ConfigError(`the registry auth file ${file} must hold a JSON object with "auths" ({"auths": {"HOST": {"auth": "..."}}})`);
    }
    const obj = data as { auths?: unknown; credHelpers?: unknown; credsStore?: unknown };
    const auths = typeof obj.auths === "object" && obj.auths !== null ? (obj.auths as Record<string, AuthFileEntry>) : {};
    const key = Object.keys(auths).find((k) => wanted.includes(normalizeAuthKey(k)));
    if (key !== undefined) {
      const entry = auths[key] ?? {};
      const where = `${file}: "auths"."${key}"`;
      if (typeof entry.identitytoken === "string" && entry.identitytoken) {
        throw new ConfigError(`${where} holds an identity token (OAuth refresh token), which civm does not use; log in with a user name and password or robot token instead (docker login -u USER --password-stdin)`);
      }
      let username: string | undefined;
      let password: string | undefined;
      if (typeof entry.auth === "string" && entry.auth) {
        const decoded = Buffer.from(entry.auth, "base64").toString("utf8");
        const colon = decoded.indexOf(":");
        if (colon <= 0) throw new ConfigError(`${where}: "auth" must be base64 of USER:PASSWORD (it decodes to no "user:password" pair)`);
        username = decoded.slice(0, colon);
        password = decoded.slice(colon + 1);
      } else if (typeof entry.username === "string" && typeof entry.password === "string") {
        username = entry.username;
        password = entry.password;
      }
      if (username !== undefined && password !== undefined) {
        out.credentials = { username, password };
        out.source = file;
        return out;
      }
      if (explicit) throw new ConfigError(`${where} has neither "auth" nor "username" and "password"`);
    }
    const helpers = typeof obj.credHelpers === "object" && obj.credHelpers !== null ? (obj.credHelpers as Record<string, unknown>) : {};
    const helperKey = Object.keys(helpers).find((k) => wanted.includes(normalizeAuthKey(k)));
    if (helperKey && typeof helpers[helperKey] === "string") out.helper ??= `docker-credential-${helpers[helperKey]} (${file})`;
    else if (typeof obj.credsStore === "string" && obj.credsStore) out.helper ??= `docker-credential-${obj.credsStore} (${file})`;
  }
  return out;
}

// ---- WWW-Authenticate ---------------------------------------------------------------------

export interface Challenge {
  scheme: string;
  params: Record<string, string>;
}

/** Parses a WWW-Authenticate header: `Bearer realm="...",service="...",scope="..."` (one challenge per scheme). */
export function parseChallenges(header: string): Challenge[] {
  const out: Challenge[] = [];
  const re = /\s*([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)((?:\s*,?\s*[A-Za-z0-9_-]+\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^\s,"]+))*)/y;
  let pos = 0;
  while (pos < header.length) {
    re.lastIndex = pos;
    const m = re.exec(header);
    if (!m || m[0].length === 0) break;
    const params: Record<string, string> = {};
    const pre = /([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))/g;
    for (const p of (m[2] ?? "").matchAll(pre)) params[p[1]!.toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, "$1") : p[3]!;
    out.push({ scheme: m[1]!.toLowerCase(), params });
    pos = re.lastIndex;
    while (pos < header.length && (header[pos] === "," || header[pos] === " ")) pos++;
  }
  return out;
}

// ---- the client -----------------------------------------------------------------------------

export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/:\d+$/, "").replace(/^\[|\]$/g, "").toLowerCase();
  return h === "localhost" || h === "::1" || /^127(\.\d{1,3}){3}$/.test(h);
}

/** Registries reached over plain HTTP: loopback ones, and those in $CIVM_INSECURE_REGISTRIES (comma-separated host[:port]). */
export function registryScheme(host: string, env: NodeJS.ProcessEnv = process.env): "http" | "https" {
  if (isLoopbackHost(host)) return "http";
  const insecure = (env.CIVM_INSECURE_REGISTRIES ?? "").split(",").map((s) => s.trim().toLowerCase()).filter(Boolean);
  return insecure.includes(host.toLowerCase()) ? "http" : "https";
}

export type Access = "pull" | "push";

export interface RegistryClientOptions {
  ref: Pick<OciReference, "registry" | "repository">;
  /** --auth-file. */
  authFile?: string;
  env?: NodeJS.ProcessEnv;
  signal?: AbortSignal;
  /** Time allowed for a response's headers (default 60 s). */
  headersTimeoutMs?: number;
}

export interface RegistryRequest {
  method?: string;
  headers?: Record<string, string>;
  body?: BodyInit;
  access?: Access;
  /** Statuses that are not errors (default 2xx). */
  ok?: (status: number) => boolean;
  /** What the request is for, in errors ("manifest quay.io/x:y"). */
  what: string;
  signal?: AbortSignal;
  /** The body is a stream: it cannot be sent twice (authenticate first). */
  once?: boolean;
  /**
   * A blob the manifest names: a 404 is the registry's fault (garbage-collected, half-pushed),
   * not the user's reference, so it is an ExternalError (exit 7), not a ConfigError.
   */
  blob?: boolean;
}

const USER_AGENT = "civm (OCI image pull/push)";

export class RegistryClient {
  readonly host: string;
  readonly origin: string;
  readonly repository: string;
  private readonly registry: string;
  private readonly opts: RegistryClientOptions;
  private credentials: CredentialLookup | undefined;
  /** Bearer tokens by access; `basic` when the registry asked for Basic. */
  private readonly tokens = new Map<Access, string>();
  private basic = false;

  constructor(opts: RegistryClientOptions) {
    this.opts = opts;
    this.registry = opts.ref.registry;
    this.host = registryApiHost(opts.ref);
    this.origin = `${registryScheme(this.host, opts.env)}://${this.host}`;
    this.repository = opts.ref.repository;
  }

  private creds(): CredentialLookup {
    this.credentials ??= lookupCredentials(this.registry, this.opts.authFile, this.opts.env);
    return this.credentials;
  }

  private authorization(access: Access): string | undefined {
    const token = this.tokens.get(access) ?? (access === "pull" ? this.tokens.get("push") : undefined);
    if (token !== undefined) return token ? `Bearer ${token}` : undefined;
    const c = this.basic ? this.creds().credentials : undefined;
    if (c) return `Basic ${Buffer.from(`${c.username}:${c.password}`).toString("base64")}`;
    return undefined;
  }

  /** A request to the registry (path from /v2/...), authenticating on a 401 and retrying once. */
  async request(path: string, req: RegistryRequest): Promise<Response> {
    const access = req.access ?? "pull";
    const url = new URL(path, this.origin);
    let res = await this.send(url, req, this.authorization(access));
    if (res.status === 401 && !req.once) {
      await this.authenticate(res, access, req.what);
      res = await this.send(url, req, this.authorization(access));
    }
    if (res.status === 401 || res.status === 403) throw await this.denied(res, access, req.what);
    const ok = req.ok ?? ((s: number) => s >= 200 && s < 300);
    if (!ok(res.status)) throw await this.failed(res, req.what, req.blob);
    return res;
  }

  /** Answers a 401 challenge: a Bearer token for this repository (anonymous or with credentials), or Basic. */
  async authenticate(res: Response, access: Access, what: string): Promise<void> {
    const header = res.headers.get("www-authenticate") ?? "";
    await res.body?.cancel().catch(() => {});
    const challenges = parseChallenges(header);
    const bearer = challenges.find((c) => c.scheme === "bearer");
    if (bearer) {
      this.tokens.set(access, await this.fetchToken(bearer, access, what));
      return;
    }
    if (challenges.some((c) => c.scheme === "basic")) {
      const c = this.creds();
      if (!c.credentials) throw this.noCredentials(what, "asks for a user name and password (Basic)", c);
      if (!this.origin.startsWith("https:") && !isLoopbackHost(this.host)) {
        throw new ConfigError(`${this.host} asks for a password over plain HTTP; civm sends credentials only over HTTPS (or to a loopback registry)`);
      }
      this.basic = true;
      return;
    }
    throw new ExternalError(`${what}: ${this.host} answered 401 without a Bearer or Basic challenge (WWW-Authenticate: ${JSON.stringify(header.slice(0, 200))})`);
  }

  private async fetchToken(ch: Challenge, access: Access, what: string): Promise<string> {
    const realm = ch.params.realm;
    if (!realm) throw new ExternalError(`${what}: ${this.host}'s Bearer challenge names no realm`);
    let url: URL;
    try {
      url = new URL(realm);
    } catch {
      throw new ExternalError(`${what}: ${this.host}'s token realm ${JSON.stringify(realm)} is not a URL`);
    }
    if (url.protocol !== "https:" && url.protocol !== "http:") throw new ExternalError(`${what}: ${this.host}'s token realm ${realm} is not http(s)`);
    if (ch.params.service) url.searchParams.set("service", ch.params.service);
    url.searchParams.set("scope", `repository:${this.repository}:${access === "push" ? "pull,push" : "pull"}`);
    const headers: Record<string, string> = { "user-agent": USER_AGENT, accept: "application/json" };
    const c = this.creds();
    if (c.credentials) {
      if (url.protocol !== "https:" && !isLoopbackHost(url.host)) {
        throw new ConfigError(`${this.host}'s token service ${url.origin} is plain HTTP; civm sends credentials only over HTTPS (or to a loopback address)`);
      }
      headers.authorization = `Basic ${Buffer.from(`${c.credentials.username}:${c.credentials.password}`).toString("base64")}`;
    }
    let res: Response;
    try {
      res = await fetch(url, { headers, redirect: "error", signal: this.signal() });
    } catch (e) {
      throw networkError(`${what}: the token service ${url.origin}${url.pathname}`, e, this.opts.signal);
    }
    if (res.status === 401 || res.status === 403) {
      await res.body?.cancel().catch(() => {});
      if (c.credentials) throw new ConfigError(`${what}: ${url.host} refused the credentials for ${this.registry} from ${c.source} (HTTP ${res.status}); check the user name and password or token there`);
      throw this.noCredentials(what, `needs credentials for ${access}`, c);
    }
    if (!res.ok) throw await this.failed(res, `${what}: token from ${url.origin}${url.pathname}`);
    let body: { token?: unknown; access_token?: unknown };
    try {
      body = (await res.json()) as typeof body;
    } catch {
      throw new ExternalError(`${what}: the token service ${url.origin}${url.pathname} did not answer JSON`);
    }
    const token = typeof body.token === "string" && body.token ? body.token : typeof body.access_token === "string" ? body.access_token : "";
    if (!token) throw new ExternalError(`${what}: the token service ${url.origin}${url.pathname} answered without a token`);
    return token;
  }

  private noCredentials(what: string, why: string, c: CredentialLookup): ConfigError {
    const helper = c.helper ? ` The credentials for ${this.registry} are in the credential helper ${c.helper}, which civm does not run; put them in an auth file instead.` : "";
    return new ConfigError(
      `${what}: ${this.registry} ${why}, and no credentials for it were found (looked in ${c.searched.join(", ")}).${helper} ` +
        `Log in with docker login / podman login, or write {"auths": {"${this.registry}": {"auth": "BASE64(user:password)"}}} to a file (mode 0600) and pass --auth-file FILE or set CIVM_REGISTRY_AUTH_FILE.`,
    );
  }

  private async denied(res: Response, access: Access, what: string): Promise<CivmError> {
    const detail = await errorDetail(res);
    const c = this.credentials;
    if (c?.credentials) {
      return new ConfigError(`${what}: ${this.registry} denied ${access} access to ${this.repository} for the credentials from ${c.source} (HTTP ${res.status}${detail ? `: ${detail}` : ""})`);
    }
    return this.noCredentials(what, `denied anonymous ${access} access to ${this.repository} (HTTP ${res.status}${detail ? `: ${detail}` : ""})`, this.creds());
  }

  async failed(res: Response, what: string, blob = false): Promise<CivmError> {
    const detail = await errorDetail(res);
    const text = `${what}: HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ""}${detail ? ` (${detail})` : ""}`;
    if (res.status === 404 && blob) return new ExternalError(`${text}; the manifest names this blob but ${this.registry} does not have it (deleted or half-pushed): push the image again`);
    return res.status === 404 ? new ConfigError(`${text}; check the repository and tag`) : new ExternalError(text);
  }

  private signal(extra?: AbortSignal): AbortSignal {
    const signals = [AbortSignal.timeout(this.opts.headersTimeoutMs ?? 60_000)];
    if (this.opts.signal) signals.push(this.opts.signal);
    if (extra) signals.push(extra);
    return AbortSignal.any(signals);
  }

  /** One request, following redirects by hand: Authorization only to the registry's origin, never https→http. */
  private async send(start: URL, req: RegistryRequest, authorization: string | undefined): Promise<Response> {
    let url = start;
    // The headers timeout must not cut a body being streamed: a separate controller, cleared once headers are in.
    for (let hop = 0; ; hop++) {
      const headers: Record<string, string> = { "user-agent": USER_AGENT, ...req.headers };
      if (authorization && url.origin === this.origin) headers.authorization = authorization;
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(new ExternalError(`${req.what}: no answer from ${url.host} within ${Math.round((this.opts.headersTimeoutMs ?? 60_000) / 1000)} s`)), this.opts.headersTimeoutMs ?? 60_000);
      const signals = [controller.signal];
      if (this.opts.signal) signals.push(this.opts.signal);
      if (req.signal) signals.push(req.signal);
      let res: Response;
      try {
        res = await fetch(url, {
          method: req.method ?? "GET",
          headers,
          redirect: "manual",
          signal: AbortSignal.any(signals),
          ...(req.body !== undefined ? { body: req.body, duplex: "half" } : {}),
        } as RequestInit);
      } catch (e) {
        throw networkError(`${req.what}: ${url.host}`, e, AbortSignal.any(signals));
      } finally {
        clearTimeout(timer);
      }
      if (res.status >= 300 && res.status < 400 && res.status !== 304 && res.headers.get("location")) {
        await res.body?.cancel().catch(() => {});
        if (hop >= 5) throw new ExternalError(`${req.what}: more than 5 redirects from ${start.host}`);
        if (req.body !== undefined) throw new ExternalError(`${req.what}: ${url.host} redirected an upload (HTTP ${res.status}); civm does not follow those`);
        const next = new URL(res.headers.get("location")!, url);
        if (next.protocol === "http:" && url.protocol === "https:" && !isLoopbackHost(next.host)) {
          throw new ExternalError(`${req.what}: ${url.host} redirected from HTTPS to plain HTTP (${next.origin}); refused`);
        }
        if (next.protocol !== "http:" && next.protocol !== "https:") throw new ExternalError(`${req.what}: redirect to ${next.protocol} refused`);
        url = next;
        continue;
      }
      return res;
    }
  }
}

async function errorDetail(res: Response): Promise<string> {
  let text = "";
  try {
    text = (await res.text()).slice(0, 4096);
  } catch {
    return "";
  }
  try {
    const j = JSON.parse(text) as { errors?: { code?: unknown; message?: unknown }[] };
    if (Array.isArray(j.errors) && j.errors.length) {
      return j.errors
        .slice(0, 3)
        .map((e) => [e.code, e.message].filter((x) => typeof x === "string" && x).join(": "))
        .filter(Boolean)
        .join("; ");
    }
  } catch {
    /* not JSON */
  }
  return "";
}

export function networkError(what: string, e: unknown, signal?: AbortSignal): CivmError {
  if (e instanceof CivmError) return e;
  if (signal?.aborted && signal.reason instanceof CivmError) return signal.reason;
  if (signal?.aborted) return new ExternalError(`${what}: interrupted`, { cause: e });
  const cause = (e as { cause?: { code?: string; message?: string } }).cause;
  const why = cause ? `${cause.message ?? messageOf(cause)}${cause.code ? ` (${cause.code})` : ""}` : messageOf(e);
  return new ExternalError(`${what} could not be reached: ${why}`, { cause: e });
}
