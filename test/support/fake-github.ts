// A fake GitHub REST API for tests: node:http on 127.0.0.1, a small router table, state in
// plain objects. Self-hosted runners (registration tokens, JIT configs, list, delete), queued
// jobs, App installations and webhooks; ETags and 304s, a rate-limit budget with its
// headers, forced answers (403/429 with retry-after) and slow or hanging answers.
import { createHash, createHmac, randomBytes, verify as verifySignature } from "node:crypto";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

export interface RecordedRequest {
  method: string;
  path: string;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

export interface FakeGitHubState {
  /** Accepted credential (as "token X" or "Bearer X"). */
  token: string;
  /** Known repositories ("owner/repo") and organizations; others answer 404. */
  repos: Set<string>;
  orgs: Set<string>;
  /** Value handed out by the registration-token endpoints. */
  registrationToken: string;
  /** How many registration tokens were issued, per "owner/repo" or org. */
  issued: Record<string, number>;
  /** Self-hosted runners by id (JIT-registered ones carry their owner and JIT config). */
  runners: Map<number, FakeRunner>;
  nextRunnerId: number;
  /** Workflow jobs the queued-jobs endpoints report. */
  jobs: FakeJob[];
  /** GitHub App: its id, public key (PEM) and installations by owner (org or user). */
  app: { id: number; publicKey: string; installations: Map<string, number> } | undefined;
  /** Installation tokens handed out, with their installation and expiry (ms epoch). */
  installationTokens: Map<string, { installation: number; expires: number }>;
  /** Lifetime of installation tokens (default 1 h). */
  installationTokenTtlMs: number;
  /** Organization runner groups by "org/id" (org lower-cased); group 1 (Default) of every org is implied. */
  runnerGroups: Map<string, FakeRunnerGroup>;
  /** Repositories ("owner/repo") that are private; others are public. */
  privateRepos: Set<string>;
  /**
   * The core rate limit, one budget for every credential: each authenticated answer but a
   * 304 costs 1; at 0 GitHub answers 403 "API rate limit exceeded" until `resetAt` (ms epoch).
   */
  rateLimit: { limit: number; remaining: number; resetAt: number };
  /** Answers by kind: all requests, those that cost budget, 304s. */
  counts: { total: number; counted: number; notModified: number };
  /**
   * Where the test's fake actions runner (test/support/fake-runner.ts) finds its job server;
   * put into every JIT config handed out (as "serverUrl") when set.
   */
  runnerServerUrl?: string;
}

export interface FakeRunnerGroup {
  id: number;
  name: string;
  visibility: "all" | "selected" | "private";
  /** "owner/repo" the group may serve when visibility is "selected". */
  repositories: string[];
  allowsPublicRepositories: boolean;
}

export interface FakeRunner {
  id: number;
  name: string;
  /** "org:NAME" or "repo:OWNER/REPO". */
  owner: string;
  os: string;
  status: "online" | "offline";
  busy: boolean;
  labels: string[];
  runnerGroupId: number;
  workFolder: string | undefined;
  encodedJitConfig: string | undefined;
  /** config.sh's flags, for runners registered with a registration token (POST /actions/runner-registration). */
  registration?: { url: string; ephemeral: boolean; disableupdate: boolean; runnergroup: string | null };
}

export interface FakeJob {
  id: number;
  runId: number;
  /** "owner/repo". */
  repository: string;
  labels: string[];
  status: "queued" | "in_progress" | "completed";
  runnerName: string | null;
  createdAt: string;
}

export interface FakeGitHubOptions {
  token?: string;
  repos?: string[];
  orgs?: string[];
  registrationToken?: string;
  /** Act as a GitHub App: its id, public key, installations by owner. */
  app?: { id: number; publicKey: string; installations: Record<string, number> };
}

export interface FakeGitHub {
  /** Base URL, e.g. http://127.0.0.1:PORT (use as GITHUB_API_URL). */
  url: string;
  requests: RecordedRequest[];
  state: FakeGitHubState;
  /** The credential the fake accepts (state.token); put it in GITHUB_TOKEN. */
  readonly validToken: string;
  /** Token the registration endpoints return (shortcut for state.registrationToken). */
  registrationToken: string;
  /** Forces `status`/`body` for requests whose path matches; `times` limits how often (default: always). */
  respondWith(path: RegExp, status: number, body?: unknown, opts?: { method?: string; times?: number; headers?: Record<string, string> }): void;
  /** Forgets every respondWith. */
  clearResponses(): void;
  /** Adds a workflow job (default queued) to the queued-jobs endpoints; returns it. */
  addJob(job: { repository: string; labels: string[]; status?: FakeJob["status"]; id?: number; runId?: number }): FakeJob;
  /** The runner of that name or id. */
  runner(nameOrId: string | number): FakeRunner | undefined;
  /** Adds (or replaces) an organization runner group; returns it. */
  addRunnerGroup(org: string, g: Partial<FakeRunnerGroup> & { id: number }): FakeRunnerGroup;
  /**
   * Delays answers to requests whose path matches by `ms` (Infinity: never answers, the
   * connection stays open); `times` limits how often (default: always). Returns a function
   * that removes the delay.
   */
  delay(path: RegExp, ms: number, opts?: { method?: string; times?: number }): () => void;
  /** Sets the rate-limit budget (remaining, limit) and when it resets (seconds from now; default 3600). */
  setRateLimit(o: { remaining: number; limit?: number; resetInSeconds?: number }): void;
  /** Marks a runner online/offline and busy/idle (what a real runner would report). */
  setRunner(nameOrId: string | number, change: Partial<Pick<FakeRunner, "status" | "busy">>): void;
  close(): Promise<void>;
}

interface Ctx {
  req: IncomingMessage;
  url: URL;
  params: string[];
  body: string;
  state: FakeGitHubState;
}

interface Reply {
  status: number;
  body?: unknown;
  headers?: Record<string, string>;
}

interface Route {
  method: string;
  pattern: RegExp;
  /** Whether the route needs a valid credential (all real endpoints here do). */
  auth: boolean;
  handle(ctx: Ctx): Reply;
}

const DOCS = "https://docs.github.com/rest";

function notFound(): Reply {
  return { status: 404, body: { message: "Not Found", documentation_url: DOCS, status: "404" } };
}

function registrationToken(state: FakeGitHubState, key: string): Reply {
  state.issued[key] = (state.issued[key] ?? 0) + 1;
  const expires = new Date(Date.now() + 3600_000).toISOString();
  return { status: 201, body: { token: state.registrationToken, expires_at: expires } };
}

function ownerKey(params: (string | undefined)[], kind: "org" | "repo"): string {
  return kind === "org" ? `org:${params[0]}` : `repo:${params[0]}/${params[1]}`;
}

function ownerKnown(state: FakeGitHubState, key: string): boolean {
  return key.startsWith("org:") ? state.orgs.has(key.slice(4)) : state.repos.has(key.slice(5));
}

function apiRunner(r: FakeRunner): unknown {
  return {
    id: r.id,
    name: r.name,
    os: r.os,
    status: r.status,
    busy: r.busy,
    runner_group_id: r.runnerGroupId,
    ephemeral: true,
    labels: r.labels.map((name, i) => ({ id: i + 1, name, type: i === 0 && name === "self-hosted" ? "read-only" : "custom" })),
  };
}

function unprocessable(message: string): Reply {
  return { status: 422, body: { message, documentation_url: DOCS, status: "422" } };
}

function generateJit(state: FakeGitHubState, key: string, body: string): Reply {
  if (!ownerKnown(state, key)) return notFound();
  let req: { name?: unknown; runner_group_id?: unknown; labels?: unknown; work_folder?: unknown };
  try {
    req = JSON.parse(body) as typeof req;
  } catch {
    return { status: 400, body: { message: "Problems parsing JSON" } };
  }
  if (typeof req.name !== "string" || req.name === "") return unprocessable("name is required");
  if (typeof req.runner_group_id !== "number") return unprocessable("runner_group_id is required");
  if (!Array.isArray(req.labels) || req.labels.length < 1 || req.labels.length > 100 || req.labels.some((l) => typeof l !== "string")) {
    return unprocessable("labels must be a list of 1 to 100 strings");
  }
  if ([...state.runners.values()].some((r) => r.owner === key && r.name === req.name)) {
    return { status: 409, body: { message: "Already exists - A runner with the same name already exists" } };
  }
  const id = state.nextRunnerId++;
  const jit = jitConfig(state, id);
  const runner: FakeRunner = {
    id,
    name: req.name,
    owner: key,
    os: "Linux",
    status: "offline",
    busy: false,
    labels: req.labels as string[],
    runnerGroupId: req.runner_group_id,
    workFolder: typeof req.work_folder === "string" ? req.work_folder : undefined,
    encodedJitConfig: jit,
  };
  state.runners.set(id, runner);
  return { status: 201, body: { runner: apiRunner(runner), encoded_jit_config: jit } };
}

function jitConfig(state: FakeGitHubState, id: number): string {
  const doc = { ".runner": `runner-${id}`, ".credentials": randomBytes(12).toString("hex"), ...(state.runnerServerUrl ? { serverUrl: state.runnerServerUrl } : {}) };
  return Buffer.from(JSON.stringify(doc)).toString("base64");
}

/**
 * What the fake runner's config.sh calls with a registration token (as the real one does
 * first, at <origin>/actions/runner-registration with "RemoteAuth <token>"): registers a
 * runner for the URL's repo or org and answers with a JIT config for run.sh.
 */
function tokenRegistration(state: FakeGitHubState, req: IncomingMessage, body: string): Reply {
  const m = /^RemoteAuth\s+(.+)$/i.exec(req.headers.authorization ?? "");
  if (!m || m[1] !== state.registrationToken) return { status: 401, body: { message: "Bad registration token" } };
  let r: { url?: unknown; name?: unknown; labels?: unknown; ephemeral?: unknown; disableupdate?: unknown; runnergroup?: unknown };
  try {
    r = JSON.parse(body) as typeof r;
  } catch {
    return { status: 400, body: { message: "Problems parsing JSON" } };
  }
  if (typeof r.url !== "string" || typeof r.name !== "string" || r.name === "") return unprocessable("url and name are required");
  const parts = new URL(r.url).pathname.split("/").filter(Boolean);
  const key = parts.length >= 2 ? `repo:${parts[0]}/${parts[1]}` : `org:${parts[0] ?? ""}`;
  if (!ownerKnown(state, key)) return notFound();
  if ([...state.runners.values()].some((x) => x.owner === key && x.name === r.name)) {
    return { status: 409, body: { message: "Already exists - A runner with the same name already exists" } };
  }
  const id = state.nextRunnerId++;
  const jit = jitConfig(state, id);
  const labels = Array.isArray(r.labels) && r.labels.length ? (r.labels as string[]) : ["self-hosted", "Linux", "X64"];
  state.runners.set(id, {
    id, name: r.name, owner: key, os: "Linux", status: "offline", busy: false, labels, runnerGroupId: 1, workFolder: "_work", encodedJitConfig: jit,
    registration: { url: r.url, ephemeral: r.ephemeral === true, disableupdate: r.disableupdate === true, runnergroup: typeof r.runnergroup === "string" ? r.runnergroup : null },
  });
  return { status: 201, body: { encoded_jit_config: jit } };
}

function page<T>(items: T[], url: URL): T[] {
  const per = Math.min(100, Number(url.searchParams.get("per_page") ?? 30));
  const n = Math.max(1, Number(url.searchParams.get("page") ?? 1));
  return items.slice((n - 1) * per, n * per);
}

function listRunnersReply(state: FakeGitHubState, key: string, url: URL): Reply {
  if (!ownerKnown(state, key)) return notFound();
  const all = [...state.runners.values()].filter((r) => r.owner === key);
  return { status: 200, body: { total_count: all.length, runners: page(all, url).map(apiRunner) } };
}

function oneRunner(state: FakeGitHubState, key: string, id: string | undefined, del: boolean): Reply {
  const r = state.runners.get(Number(id));
  if (!ownerKnown(state, key) || !r || r.owner !== key) return notFound();
  if (!del) return { status: 200, body: apiRunner(r) };
  if (r.busy) return unprocessable("Bad request - Runner \"" + r.name + "\" is still running a job\"");
  state.runners.delete(r.id);
  return { status: 204 };
}

function runStatus(jobs: FakeJob[]): string {
  if (jobs.every((j) => j.status === "completed")) return "completed";
  if (jobs.every((j) => j.status === "queued")) return "queued";
  return "in_progress";
}

function apiJob(j: FakeJob): unknown {
  return {
    id: j.id,
    run_id: j.runId,
    status: j.status,
    conclusion: j.status === "completed" ? "success" : null,
    labels: j.labels,
    runner_name: j.runnerName,
    created_at: j.createdAt,
    started_at: j.createdAt,
    name: `job ${j.id}`,
  };
}

/** Verifies an RS256 App JWT against the App's public key; returns the App id or undefined. */
function appFromJwt(state: FakeGitHubState, req: IncomingMessage): number | undefined {
  const m = /^bearer\s+([\w-]+)\.([\w-]+)\.([\w-]+)$/i.exec(req.headers.authorization ?? "");
  if (!m || !state.app) return undefined;
  const [, h = "", p = "", sig = ""] = m;
  const ok = verifySignature("RSA-SHA256", Buffer.from(`${h}.${p}`), state.app.publicKey, Buffer.from(sig, "base64url"));
  if (!ok) return undefined;
  const claims = JSON.parse(Buffer.from(p, "base64url").toString("utf8")) as { iss?: unknown; exp?: number };
  if (String(claims.iss) !== String(state.app.id) || (claims.exp ?? 0) * 1000 < Date.now()) return undefined;
  return state.app.id;
}

function installationReply(state: FakeGitHubState, req: IncomingMessage, owner: string | undefined): Reply {
  if (appFromJwt(state, req) === undefined) return { status: 401, body: { message: "A JSON web token could not be decoded" } };
  const id = state.app?.installations.get(owner ?? "");
  return id === undefined ? notFound() : { status: 200, body: { id, account: { login: owner }, app_id: state.app?.id } };
}

function runnerGroup(state: FakeGitHubState, org: string | undefined, id: string | undefined): FakeRunnerGroup | undefined {
  const known = [...state.orgs].some((o) => o.toLowerCase() === (org ?? "").toLowerCase());
  if (!known) return undefined;
  const g = state.runnerGroups.get(`${(org ?? "").toLowerCase()}/${id}`);
  if (g) return g;
  return Number(id) === 1 ? { id: 1, name: "Default", visibility: "all", repositories: [], allowsPublicRepositories: true } : undefined;
}

function apiRepo(state: FakeGitHubState, full: string, i: number): Record<string, unknown> {
  return { id: i + 1, full_name: full, name: full.split("/")[1], private: state.privateRepos.has(full), archived: false };
}

const ROUTES: Route[] = [
  { method: "POST", pattern: /^\/actions\/runner-registration$/, auth: false, handle: ({ req, state, body }) => tokenRegistration(state, req, body) },
  {
    method: "GET",
    pattern: /^\/orgs\/([^/]+)\/actions\/runner-groups\/(\d+)$/,
    auth: true,
    handle: ({ params: [org, id], state }) => {
      const g = runnerGroup(state, org, id);
      if (!g) return notFound();
      return { status: 200, body: { id: g.id, name: g.name, visibility: g.visibility, default: g.id === 1, allows_public_repositories: g.allowsPublicRepositories, restricted_to_workflows: false } };
    },
  },
  {
    method: "GET",
    pattern: /^\/orgs\/([^/]+)\/actions\/runner-groups\/(\d+)\/repositories$/,
    auth: true,
    handle: ({ params: [org, id], state, url }) => {
      const g = runnerGroup(state, org, id);
      if (!g) return notFound();
      const repos = g.repositories.map((full, i) => apiRepo(state, full, i));
      return { status: 200, body: { total_count: repos.length, repositories: page(repos, url) } };
    },
  },
  {
    method: "GET",
    pattern: /^\/repos\/([^/]+)\/([^/]+)$/,
    auth: true,
    handle: ({ params: [owner, repo], state }) => {
      const full = [...state.repos].find((r) => r.toLowerCase() === `${owner}/${repo}`.toLowerCase());
      return full ? { status: 200, body: apiRepo(state, full, 0) } : notFound();
    },
  },
  {
    method: "POST",
    pattern: /^\/orgs\/([^/]+)\/actions\/runners\/generate-jitconfig$/,
    auth: true,
    handle: ({ params, state, body }) => generateJit(state, ownerKey(params, "org"), body),
  },
  {
    method: "POST",
    pattern: /^\/repos\/([^/]+)\/([^/]+)\/actions\/runners\/generate-jitconfig$/,
    auth: true,
    handle: ({ params, state, body }) => generateJit(state, ownerKey(params, "repo"), body),
  },
  { method: "GET", pattern: /^\/orgs\/([^/]+)\/actions\/runners$/, auth: true, handle: ({ params, state, url }) => listRunnersReply(state, ownerKey(params, "org"), url) },
  { method: "GET", pattern: /^\/repos\/([^/]+)\/([^/]+)\/actions\/runners$/, auth: true, handle: ({ params, state, url }) => listRunnersReply(state, ownerKey(params, "repo"), url) },
  { method: "GET", pattern: /^\/orgs\/([^/]+)\/actions\/runners\/(\d+)$/, auth: true, handle: ({ params, state }) => oneRunner(state, ownerKey(params, "org"), params[1], false) },
  { method: "DELETE", pattern: /^\/orgs\/([^/]+)\/actions\/runners\/(\d+)$/, auth: true, handle: ({ params, state }) => oneRunner(state, ownerKey(params, "org"), params[1], true) },
  { method: "GET", pattern: /^\/repos\/([^/]+)\/([^/]+)\/actions\/runners\/(\d+)$/, auth: true, handle: ({ params, state }) => oneRunner(state, ownerKey(params, "repo"), params[2], false) },
  { method: "DELETE", pattern: /^\/repos\/([^/]+)\/([^/]+)\/actions\/runners\/(\d+)$/, auth: true, handle: ({ params, state }) => oneRunner(state, ownerKey(params, "repo"), params[2], true) },
  {
    method: "GET",
    pattern: /^\/orgs\/([^/]+)\/repos$/,
    auth: true,
    handle: ({ params: [org], state, url }) => {
      if (!state.orgs.has(org ?? "")) return notFound();
      const repos = [...state.repos].filter((r) => r.startsWith(`${org}/`)).map((full, i) => ({ id: i + 1, full_name: full, name: full.split("/")[1], archived: false }));
      return { status: 200, body: page(repos, url) };
    },
  },
  {
    method: "GET",
    pattern: /^\/repos\/([^/]+)\/([^/]+)\/actions\/runs$/,
    auth: true,
    handle: ({ params: [owner, repo], state, url }) => {
      const full = `${owner}/${repo}`;
      if (!state.repos.has(full)) return notFound();
      const byRun = new Map<number, FakeJob[]>();
      for (const j of state.jobs.filter((j) => j.repository === full)) byRun.set(j.runId, [...(byRun.get(j.runId) ?? []), j]);
      const want = url.searchParams.get("status");
      // Newest first, as GitHub lists them.
      const runs = [...byRun].reverse().map(([id, jobs]) => ({ id, status: runStatus(jobs), name: `run ${id}`, repository: { full_name: full } })).filter((r) => !want || r.status === want);
      return { status: 200, body: { total_count: runs.length, workflow_runs: page(runs, url) } };
    },
  },
  {
    method: "GET",
    pattern: /^\/repos\/([^/]+)\/([^/]+)\/actions\/runs\/(\d+)\/jobs$/,
    auth: true,
    handle: ({ params: [owner, repo, run], state, url }) => {
      const jobs = state.jobs.filter((j) => j.repository === `${owner}/${repo}` && j.runId === Number(run));
      if (jobs.length === 0) return notFound();
      return { status: 200, body: { total_count: jobs.length, jobs: page(jobs, url).map(apiJob) } };
    },
  },
  { method: "GET", pattern: /^\/orgs\/([^/]+)\/installation$/, auth: false, handle: ({ params: [org], state, req }) => installationReply(state, req, org) },
  { method: "GET", pattern: /^\/repos\/([^/]+)\/[^/]+\/installation$/, auth: false, handle: ({ params: [owner], state, req }) => installationReply(state, req, owner) },
  {
    method: "POST",
    pattern: /^\/app\/installations\/(\d+)\/access_tokens$/,
    auth: false,
    handle: ({ params: [id], state, req }) => {
      if (appFromJwt(state, req) === undefined) return { status: 401, body: { message: "A JSON web token could not be decoded" } };
      if (![...(state.app?.installations.values() ?? [])].includes(Number(id))) return notFound();
      const token = `ghs_${randomBytes(16).toString("hex")}`;
      const expires = Date.now() + state.installationTokenTtlMs;
      state.installationTokens.set(token, { installation: Number(id), expires });
      return { status: 201, body: { token, expires_at: new Date(expires).toISOString(), permissions: { administration: "write", organization_self_hosted_runners: "write" }, repository_selection: "all" } };
    },
  },
  {
    method: "POST",
    pattern: /^\/repos\/([^/]+)\/([^/]+)\/actions\/runners\/registration-token$/,
    auth: true,
    handle: ({ params: [owner, repo], state }) => {
      const key = `${owner}/${repo}`;
      return state.repos.has(key) ? registrationToken(state, key) : notFound();
    },
  },
  {
    method: "POST",
    pattern: /^\/orgs\/([^/]+)\/actions\/runners\/registration-token$/,
    auth: true,
    handle: ({ params: [org], state }) => (state.orgs.has(org ?? "") ? registrationToken(state, org ?? "") : notFound()),
  },
];

interface Override {
  path: RegExp;
  method: string | undefined;
  times: number;
  reply: Reply;
}

function authorized(req: IncomingMessage, state: FakeGitHubState): boolean {
  const m = /^(?:token|bearer)\s+(.+)$/i.exec(req.headers.authorization ?? "");
  if (m?.[1] === state.token) return true;
  const inst = state.installationTokens.get(m?.[1] ?? "");
  return inst !== undefined && inst.expires > Date.now();
}

function send(res: ServerResponse, reply: Reply): void {
  const text = reply.body === undefined || reply.status === 304 ? "" : JSON.stringify(reply.body);
  res.writeHead(reply.status, {
    "content-type": "application/json; charset=utf-8",
    "x-github-api-version-selected": "2022-11-28",
    ...reply.headers,
  });
  res.end(text);
}

/**
 * As GitHub: a 200 to a GET carries an ETag of its body; a GET whose If-None-Match names it
 * is answered 304, which costs no rate-limit budget. Every authenticated answer carries the
 * x-ratelimit-* headers; an exhausted budget is a 403 until the reset.
 */
function conditionalAndLimited(req: IncomingMessage, state: FakeGitHubState, reply: () => Reply): Reply {
  state.counts.total++;
  const rl = state.rateLimit;
  const now = Date.now();
  if (rl.resetAt <= now) {
    rl.remaining = rl.limit;
    rl.resetAt = now + 3600_000;
  }
  const limitHeaders = () => ({
    "x-ratelimit-limit": String(rl.limit),
    "x-ratelimit-remaining": String(rl.remaining),
    "x-ratelimit-reset": String(Math.ceil(rl.resetAt / 1000)),
    "x-ratelimit-used": String(rl.limit - rl.remaining),
    "x-ratelimit-resource": "core",
  });
  const authed = /^(?:token|bearer)\s+/i.test(req.headers.authorization ?? "");
  if (authed && rl.remaining <= 0) {
    state.counts.counted++;
    return { status: 403, body: { message: "API rate limit exceeded for user ID 1.", documentation_url: DOCS }, headers: limitHeaders() };
  }
  const r = reply();
  if (req.method === "GET" && r.status === 200) {
    const etag = `W/"${createHash("sha256").update(JSON.stringify(r.body ?? null)).digest("hex").slice(0, 32)}"`;
    if (req.headers["if-none-match"] === etag) {
      state.counts.notModified++;
      return { status: 304, headers: { etag, ...(authed ? limitHeaders() : {}) } };
    }
    r.headers = { etag, ...r.headers };
  }
  state.counts.counted++;
  if (!authed) return r;
  rl.remaining = Math.max(0, rl.remaining - 1);
  return { ...r, headers: { ...limitHeaders(), ...r.headers } };
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    let body = "";
    req.setEncoding("utf8");
    req.on("data", (c: string) => (body += c));
    req.on("end", () => resolve(body));
    req.on("error", reject);
  });
}

function dispatch(ctx: Omit<Ctx, "params">, path: string, overrides: Override[]): Reply {
  const method = ctx.req.method ?? "GET";
  const forced = overrides.find((o) => o.times > 0 && o.path.test(path) && (!o.method || o.method === method));
  if (forced) {
    forced.times--;
    return forced.reply;
  }
  for (const route of ROUTES) {
    const m = route.method === method ? route.pattern.exec(path) : null;
    if (!m) continue;
    if (route.auth && !authorized(ctx.req, ctx.state)) {
      return { status: 401, body: { message: "Bad credentials", documentation_url: DOCS, status: "401" } };
    }
    return route.handle({ ...ctx, params: m.slice(1).map(decodeURIComponent) });
  }
  return notFound();
}

export async function startFakeGitHub(opts: FakeGitHubOptions = {}): Promise<FakeGitHub> {
  const state: FakeGitHubState = {
    token: opts.token ?? "ghp_fakeTestToken0123456789",
    repos: new Set(opts.repos ?? ["rust-lang-ci/rust"]),
    orgs: new Set(opts.orgs ?? ["rust-lang-ci"]),
    registrationToken: opts.registrationToken ?? "AABBCCDDREGISTRATIONTOKEN",
    issued: {},
    runners: new Map(),
    nextRunnerId: 1,
    jobs: [],
    app: opts.app && { id: opts.app.id, publicKey: opts.app.publicKey, installations: new Map(Object.entries(opts.app.installations)) },
    installationTokens: new Map(),
    installationTokenTtlMs: 3600_000,
    runnerGroups: new Map(),
    privateRepos: new Set(),
    rateLimit: { limit: 5000, remaining: 5000, resetAt: Date.now() + 3600_000 },
    counts: { total: 0, counted: 0, notModified: 0 },
  };
  const delays: { path: RegExp; method: string | undefined; times: number; ms: number }[] = [];
  let nextJobId = 1000;
  const requests: RecordedRequest[] = [];
  const overrides: Override[] = [];
  const server = createServer((req, res) => {
    void (async () => {
      const body = await readBody(req);
      const url = new URL(req.url ?? "/", "http://fake");
      const path = url.pathname;
      requests.push({ method: req.method ?? "GET", path, headers: { ...req.headers }, body });
      const slow = delays.find((d) => d.times > 0 && d.path.test(path) && (!d.method || d.method === req.method));
      if (slow) {
        slow.times--;
        if (slow.ms === Infinity) return; // hangs: closeAllConnections() ends it
        await new Promise((r) => setTimeout(r, slow.ms));
      }
      send(res, conditionalAndLimited(req, state, () => dispatch({ req, url, body, state }, path, overrides)));
    })().catch(() => send(res, { status: 500, body: { message: "fake GitHub failed" } }));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    state,
    get validToken() {
      return state.token;
    },
    get registrationToken() {
      return state.registrationToken;
    },
    set registrationToken(v: string) {
      state.registrationToken = v;
    },
    respondWith(path, status, body, o = {}) {
      const reply: Reply = { status, body: body ?? { message: `forced ${status}`, documentation_url: DOCS } };
      if (o.headers) reply.headers = o.headers;
      overrides.push({ path, method: o.method, times: o.times ?? Infinity, reply });
    },
    clearResponses() {
      overrides.length = 0;
    },
    addJob(j) {
      const id = j.id ?? nextJobId++;
      const job: FakeJob = { id, runId: j.runId ?? id + 500_000, repository: j.repository, labels: j.labels, status: j.status ?? "queued", runnerName: null, createdAt: new Date().toISOString() };
      state.jobs.push(job);
      return job;
    },
    addRunnerGroup(org, g) {
      const group: FakeRunnerGroup = { name: `group ${g.id}`, visibility: "all", repositories: [], allowsPublicRepositories: true, ...g };
      state.runnerGroups.set(`${org.toLowerCase()}/${g.id}`, group);
      return group;
    },
    delay(path, ms, o = {}) {
      const d = { path, method: o.method, times: o.times ?? Infinity, ms };
      delays.push(d);
      return () => void delays.splice(delays.indexOf(d), 1);
    },
    setRateLimit(o) {
      state.rateLimit = { limit: o.limit ?? state.rateLimit.limit, remaining: o.remaining, resetAt: Date.now() + (o.resetInSeconds ?? 3600) * 1000 };
    },
    runner(nameOrId) {
      return [...state.runners.values()].find((r) => r.id === nameOrId || r.name === nameOrId);
    },
    setRunner(nameOrId, change) {
      const r = [...state.runners.values()].find((x) => x.id === nameOrId || x.name === nameOrId);
      if (!r) throw new Error(`fake GitHub: no runner ${String(nameOrId)}`);
      Object.assign(r, change);
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

// ---- webhooks -------------------------------------------------------------------------------

export type WorkflowJobAction = "queued" | "in_progress" | "completed" | "waiting";

/**
 * A workflow_job payload: GitHub's own example for `action` (@octokit/webhooks-examples)
 * with the job's id, labels, repository and runner replaced as given.
 */
export async function workflowJobPayload(
  action: WorkflowJobAction,
  over: { id?: number; runId?: number; labels?: string[]; repository?: string; runnerName?: string | null; runnerId?: number | null } = {},
): Promise<Record<string, unknown>> {
  const { createRequire } = await import("node:module");
  const examples = createRequire(import.meta.url)("@octokit/webhooks-examples") as { name: string; examples: { action: string }[] }[];
  const example = examples.find((e) => e.name === "workflow_job")?.examples.find((x) => x.action === action);
  if (!example) throw new Error(`no workflow_job example for ${action}`);
  const payload = JSON.parse(JSON.stringify(example)) as { workflow_job: Record<string, unknown>; repository: Record<string, unknown> };
  const job = payload.workflow_job;
  if (over.id !== undefined) job.id = over.id;
  if (over.runId !== undefined) job.run_id = over.runId;
  if (over.labels !== undefined) job.labels = over.labels;
  if (over.runnerName !== undefined) job.runner_name = over.runnerName;
  if (over.runnerId !== undefined) job.runner_id = over.runnerId;
  if (over.repository !== undefined) {
    payload.repository.full_name = over.repository;
    payload.repository.name = over.repository.split("/")[1];
  }
  return payload as unknown as Record<string, unknown>;
}

export function signWebhook(body: string, secret: string): string {
  return `sha256=${createHmac("sha256", secret).update(body).digest("hex")}`;
}

/** POSTs a webhook as GitHub does (X-GitHub-Event, X-GitHub-Delivery, X-Hub-Signature-256). */
export async function sendWebhook(
  url: string,
  opts: { event?: string; payload: unknown; secret?: string; deliveryId?: string; signature?: string | null; rawBody?: string },
): Promise<{ status: number; body: string; deliveryId: string }> {
  const body = opts.rawBody ?? JSON.stringify(opts.payload);
  const deliveryId = opts.deliveryId ?? crypto.randomUUID();
  const headers: Record<string, string> = {
    "content-type": "application/json",
    "user-agent": "GitHub-Hookshot/fake",
    "x-github-event": opts.event ?? "workflow_job",
    "x-github-delivery": deliveryId,
  };
  const signature = opts.signature === undefined ? (opts.secret !== undefined ? signWebhook(body, opts.secret) : null) : opts.signature;
  if (signature !== null) headers["x-hub-signature-256"] = signature;
  const res = await fetch(url, { method: "POST", headers, body });
  return { status: res.status, body: await res.text(), deliveryId };
}
