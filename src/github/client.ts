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
 * Octokit plugin: reports every request to `options.civmObserveRequest`. Applied before
 * retry and throttling, so its hook is the innermost and sees each attempt.
 */
export function observeRequests(octokit: { hook: Octokit["hook"] }, options: { civmObserveRequest?: RequestObserver; baseUrl?: string }): void {
  const observe = options.civmObserveRequest;
  if (!observe) return;
  const base = (options.baseUrl ?? "").replace(/\/+$/, "");
  const route = (o: { method?: string; url?: string }) => routeTemplate(o.method ?? "GET", o.url ?? "", base);
  const safe = (r: string, s: number | undefined) => {
    try {
      observe(r, s);
    } catch {
      // metrics never fail a request
    }
  };
  octokit.hook.after("request", (res, o) => safe(route(o), res.status));
  octokit.hook.error("request", (err, o) => {
    const status = (err as { status?: unknown }).status;
    safe(route(o), typeof status === "number" ? status : undefined);
    throw err;
  });
}

const CivmOctokit = Octokit.plugin(observeRequests, retry, throttling);
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
   * Throttling (default on): waits out rate limits (up to 2 retries) and, as GitHub asks,
   * spaces write requests 1 s apart. Tests turn it off to run fast.
   */
  throttle?: boolean;
  /** Told about every request (metrics). */
  onRequest?: RequestObserver;
}

/** GITHUB_API_URL without a trailing slash, or the public API. */
export function githubApiUrl(env: NodeJS.ProcessEnv = process.env): string {
  return (env.GITHUB_API_URL || DEFAULT_GITHUB_API_URL).replace(/\/+$/, "");
}

const RATE_LIMIT_RETRIES = 2;

export function createOctokit(opts: ClientOptions): GitHubClient {
  const warn = opts.warn ?? ((m: string) => process.stderr.write(`civm: ${m}\n`));
  const onLimit = (kind: string) => (retryAfter: number, options: { method: string; url: string }, _o: unknown, retryCount: number) => {
    const again = retryCount < RATE_LIMIT_RETRIES;
    warn(`GitHub ${kind} rate limit hit on ${options.method} ${options.url}; ${again ? `retrying in ${retryAfter}s` : "giving up"}.`);
    return again;
  };
  return new CivmOctokit({
    auth: opts.token,
    baseUrl: (opts.baseUrl ?? githubApiUrl()).replace(/\/+$/, ""),
    userAgent: "civm",
    ...(opts.onRequest ? { civmObserveRequest: opts.onRequest } : {}),
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
        : { onRateLimit: onLimit("primary"), onSecondaryRateLimit: onLimit("secondary") },
  });
}
