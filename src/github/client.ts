// The one place civm builds a GitHub API client: @octokit/rest with retries for server
// errors and network failures (not for 4xx, which will not fix themselves) and throttling
// that waits out rate limits a couple of times. Nothing here logs tokens or request bodies.
import { Octokit } from "@octokit/rest";
import { retry } from "@octokit/plugin-retry";
import { throttling } from "@octokit/plugin-throttling";

export const DEFAULT_GITHUB_API_URL = "https://api.github.com";

/** Called once per HTTP attempt (retries and rate-limit waits count again): the route template and the status (undefined: no response). */
export type RequestObserver = (route: string, status: number | undefined) => void;

/**
 * "METHOD /template" of a request, never the expanded URL: a template passed to
 * client.request is kept as it is; a path civm expanded itself (or a full URL) gets its
 * owner, repository, organization and numeric ids put back as {placeholders}. No query.
 */
export function routeTemplate(method: string, url: string, baseUrl = ""): string {
  let path = url.split("?")[0] ?? "";
  if (baseUrl && path.startsWith(baseUrl)) path = path.slice(baseUrl.length);
  else if (/^https?:\/\//i.test(path)) path = new URL(path).pathname;
  if (!path.includes("{")) {
    path = path
      .replace(/^\/(orgs|enterprises|users)\/[^/]+/, (_m, k: string) => `/${k}/{${k === "orgs" ? "org" : k === "users" ? "username" : "enterprise"}}`)
      .replace(/^\/repos\/[^/]+\/[^/]+/, "/repos/{owner}/{repo}")
      .replace(/\/(runners|runs|jobs|runner-groups|installations)\/\d+(?=\/|$)/g, (_m, k: string) => `/${k}/{${ID_NAMES[k] ?? "id"}}`)
      .replace(/\/\d+(?=\/|$)/g, "/{id}");
  }
  return `${method.toUpperCase()} ${path || "/"}`;
}

const ID_NAMES: Record<string, string> = { runners: "runner_id", runs: "run_id", jobs: "job_id", "runner-groups": "runner_group_id", installations: "installation_id" };

/**
 * The rate-limit budget of one client (one credential), from the `x-ratelimit-*` headers of
 * its responses. `limitedUntil`: GitHub refused a request for the rate limit (403/429 with
 * `retry-after` or a budget of 0) and asked to wait until then (ms epoch).
 */
export class GitHubBudget {
  limit: number | undefined;
  remaining: number | undefined;
  /** When the budget is refilled (ms epoch). */
  resetAt: number | undefined;
  limitedUntil: number | undefined;
  /** Responses that count against the budget (not 304s). */
  counted = 0;
  /** 304 Not Modified answers (free). */
  notModified = 0;
  constructor(private readonly now: () => number = Date.now) {}

  observe(status: number, headers: Record<string, unknown>): void {
    const num = (k: string) => {
      const v = headers[k];
      const n = typeof v === "string" || typeof v === "number" ? Number(v) : NaN;
      return Number.isFinite(n) ? n : undefined;
    };
    const resource = headers["x-ratelimit-resource"];
    if (status === 304) this.notModified++;
    else this.counted++;
    // Search and GraphQL have budgets of their own; civm uses the core one.
    if (resource !== undefined && resource !== "core") return;
    const remaining = num("x-ratelimit-remaining");
    const reset = num("x-ratelimit-reset");
    if (remaining !== undefined) this.remaining = remaining;
    if (reset !== undefined) this.resetAt = reset * 1000;
    this.limit = num("x-ratelimit-limit") ?? this.limit;
    if (status === 403 || status === 429) {
      const after = num("retry-after");
      if (after !== undefined) this.limitedUntil = this.now() + after * 1000;
      else if (remaining === 0 && reset !== undefined) this.limitedUntil = reset * 1000 + 1000;
    }
  }

  /** Rate-limited now: until when (ms epoch). */
  limited(): number | undefined {
    return this.limitedUntil !== undefined && this.limitedUntil > this.now() ? this.limitedUntil : undefined;
  }
}

interface CachedResponse {
  etag: string;
  response: { status: number; url: string; headers: Record<string, unknown>; data: unknown };
}

/** Most GET responses kept for conditional requests (an organisation of a few thousand repositories). */
const ETAG_CACHE_ENTRIES = 5000;

/** Header on a response served from the ETag cache after GitHub answered 304. */
export const NOT_MODIFIED_HEADER = "x-civm-not-modified";

type RequestFn = (o: Record<string, unknown>) => Promise<{ status: number; url: string; headers: Record<string, unknown>; data: unknown }>;
type HookOptions = Record<string, unknown> & { method?: string; url?: string; headers?: Record<string, string>; request?: Record<string, unknown> };

/**
 * Octokit plugin, applied first so its hook is the innermost and sees each attempt: reports
 * every request to `options.civmObserveRequest` (status undefined: no response, including
 * a network failure Octokit reports as 500), keeps the rate-limit budget, and makes GETs
 * conditional: a response with an ETag is kept, the same GET later sends If-None-Match, and
 * a 304 (which does not count against the rate limit) is answered from the cache.
 */
export function observeRequests(
  octokit: { hook: Octokit["hook"]; request: Octokit["request"] },
  options: { civmObserveRequest?: RequestObserver; baseUrl?: string; civmEtags?: boolean; civmNow?: () => number },
): { civm: { budget: GitHubBudget } } {
  const observe = options.civmObserveRequest;
  const budget = new GitHubBudget(options.civmNow);
  const base = (options.baseUrl ?? "").replace(/\/+$/, "");
  const route = (o: { method?: string; url?: string }) => routeTemplate(o.method ?? "GET", o.url ?? "", base);
  const safe = (o: HookOptions, s: number | undefined) => {
    if (!observe) return;
    try {
      observe(route(o), s);
    } catch {
      // metrics never fail a request
    }
  };
  const cache = new Map<string, CachedResponse>();
  const etags = options.civmEtags !== false;
  octokit.hook.wrap("request", async (request, o) => {
    const req = request as unknown as RequestFn;
    const opts = o as unknown as HookOptions;
    let key: string | undefined;
    let hit: CachedResponse | undefined;
    if (etags && (opts.method ?? "GET").toUpperCase() === "GET") {
      key = octokit.request.endpoint.parse(opts as never).url;
      hit = cache.get(key);
      // In place: before-after-hook hands every hook the same options object (what a hook
      // passes on is ignored), so only a change to that object reaches the request.
      if (hit) opts.headers = Object.assign(opts.headers ?? {}, { "if-none-match": hit.etag });
    }
    try {
      const res = await req(opts);
      budget.observe(res.status, res.headers);
      safe(opts, res.status);
      const etag = res.headers.etag;
      if (key !== undefined && typeof etag === "string" && etag !== "") {
        cache.delete(key);
        cache.set(key, { etag, response: res });
        if (cache.size > ETAG_CACHE_ENTRIES) cache.delete(cache.keys().next().value as string);
      } else if (key !== undefined) cache.delete(key);
      return res as never;
    } catch (err) {
      const e = err as { status?: unknown; response?: { headers?: Record<string, unknown> } };
      const status = e.response && typeof e.status === "number" ? e.status : undefined;
      if (status !== undefined) budget.observe(status, e.response?.headers ?? {});
      safe(opts, status);
      if (status === 304 && hit && key !== undefined) {
        cache.delete(key);
        cache.set(key, hit);
        return { ...hit.response, headers: { ...hit.response.headers, [NOT_MODIFIED_HEADER]: "1" } } as never;
      }
      throw err;
    }
  });
  return { civm: { budget } };
}

/** GitHub did not answer in time (or civm gave up on it at shutdown). */
export class GitHubTimeoutError extends Error {
  override name = "GitHubTimeoutError";
}

/**
 * Octokit plugin, applied last so its hook is the outermost: each call (its retries and
 * rate-limit waits included) ends after `civmTimeoutMs` or when `civmSignal` aborts; the
 * attempt in flight is aborted too, so it frees its place in the throttling queue.
 */
export function requestTimeouts(octokit: { hook: Octokit["hook"] }, options: { civmTimeoutMs?: number; civmSignal?: AbortSignal; baseUrl?: string }): Record<string, never> {
  const ms = options.civmTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
  const outer = options.civmSignal;
  octokit.hook.wrap("request", async (request, o) => {
    const opts = o as unknown as HookOptions;
    const what = `${(opts.method ?? "GET").toUpperCase()} ${String(opts.url ?? "")}`;
    const ctl = new AbortController();
    const own = opts.request?.signal as AbortSignal | undefined;
    const signal = AbortSignal.any([ctl.signal, ...(own ? [own] : []), ...(outer ? [outer] : [])]);
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const stop = new Promise<never>((_, reject) => {
      const fail = (e: Error) => {
        ctl.abort(e);
        reject(e);
      };
      timer = setTimeout(() => fail(new GitHubTimeoutError(`GitHub did not answer ${what} within ${ms / 1000} s`)), ms);
      onAbort = () => fail(new GitHubTimeoutError(`${what} was abandoned: civm is shutting down`));
      if (outer?.aborted) onAbort();
      else outer?.addEventListener("abort", onAbort, { once: true });
    });
    try {
      // On the options object, which every hook of this call shares (as in observeRequests),
      // but in a copy of `request`: Octokit hands every call the same `request` object, and a
      // signal left there would abort each later call once this one has timed out.
      opts.request = { ...opts.request, signal };
      return (await Promise.race([(request as unknown as RequestFn)(opts), stop])) as never;
    } finally {
      clearTimeout(timer);
      if (onAbort) outer?.removeEventListener("abort", onAbort);
    }
  });
  return {};
}

/** A GitHub call (retries included) that takes longer than this fails (ms). */
export const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;

export const CivmOctokit = Octokit.plugin(observeRequests, retry, throttling, requestTimeouts);
export type GitHubClient = InstanceType<typeof CivmOctokit>;

export interface ClientOptions {
  token: string;
  /** API root; default GITHUB_API_URL or https://api.github.com. */
  baseUrl?: string;
  /** Retries after a 5xx or network failure (default 2). */
  retries?: number;
  /** Base delay of those retries in ms; the n-th waits n² times this (default 1000). */
  retryBaseMs?: number;
  /** Where rate-limit notices go (default: stderr). */
  warn?: (message: string) => void;
  /**
   * Throttling (default on): waits out rate limits (up to 2 retries, each at most
   * `maxRateLimitWaitSeconds`) and, as GitHub asks, spaces write requests 1 s apart. Tests
   * turn it off to run fast.
   */
  throttle?: boolean;
  /**
   * A rate-limited request is retried only when GitHub asks to wait at most this long
   * (default: any wait). `civm serve` uses 0: it fails at once and that target's poll is
   * rescheduled, instead of every pool waiting up to an hour.
   */
  maxRateLimitWaitSeconds?: number;
  /** A call (its retries included) fails after this long (ms; default 30 s). */
  timeoutMs?: number;
  /** Aborts every call in flight (shutdown). */
  signal?: AbortSignal;
  /** Conditional GETs with ETags (default on). */
  etags?: boolean;
  /** Told about every request (metrics). */
  onRequest?: RequestObserver;
}

/** GITHUB_API_URL without a trailing slash, or the public API. */
export function githubApiUrl(env: NodeJS.ProcessEnv = process.env): string {
  return (env.GITHUB_API_URL || DEFAULT_GITHUB_API_URL).replace(/\/+$/, "");
}

const RATE_LIMIT_RETRIES = 2;

/** The Octokit options every civm client shares (token and GitHub App clients alike), without `auth`. */
export function octokitOptions(opts: Omit<ClientOptions, "token">): Record<string, unknown> {
  const warn = opts.warn ?? ((m: string) => process.stderr.write(`civm: ${m}\n`));
  const maxWait = opts.maxRateLimitWaitSeconds ?? Infinity;
  const onLimit = (kind: string) => (retryAfter: number, options: { method: string; url: string }, _o: unknown, retryCount: number) => {
    const again = retryCount < RATE_LIMIT_RETRIES && retryAfter <= maxWait;
    warn(`GitHub ${kind} rate limit hit on ${options.method} ${options.url}; ${again ? `retrying in ${retryAfter}s` : `giving up (GitHub asks to wait ${retryAfter}s)`}.`);
    return again;
  };
  return {
    baseUrl: (opts.baseUrl ?? githubApiUrl()).replace(/\/+$/, ""),
    userAgent: "civm",
    ...(opts.onRequest ? { civmObserveRequest: opts.onRequest } : {}),
    civmEtags: opts.etags !== false,
    civmTimeoutMs: opts.timeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
    ...(opts.signal ? { civmSignal: opts.signal } : {}),
    // error: the request-log plugin reports each failed request; callers turn those into
    // their own messages, so stay quiet.
    log: { debug: () => {}, info: () => {}, warn: (m: string) => warn(m), error: () => {} },
    retry: {
      retries: opts.retries ?? 2,
      retryAfterBaseValue: opts.retryBaseMs ?? 1000,
      doNotRetry: [400, 401, 403, 404, 409, 410, 422, 429, 451],
    },
    throttle:
      opts.throttle === false
        ? { enabled: false }
        : // A throttling id of its own: the plugin's queues are shared by id, and one client's
          // waits must not hold up another's.
          { id: `civm-${++clientSerial}`, onRateLimit: onLimit("primary"), onSecondaryRateLimit: onLimit("secondary") },
  };
}

let clientSerial = 0;

export function createOctokit(opts: ClientOptions): GitHubClient {
  return new CivmOctokit({ auth: opts.token, ...octokitOptions(opts) });
}
