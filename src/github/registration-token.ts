// Self-hosted runner registration tokens ("gha-install-token" in instance configs).
// Failures become messages that say what to do; the token never appears in any of them.
import { ConfigError, ExternalError } from "../errors/index.js";
// client.js (and so Octokit) is loaded only when a token is really fetched; parsing a
// target stays cheap for the config pre-processor.
import type { ClientOptions, GitHubClient } from "./client.js";

export type RunnerTarget = { kind: "repo"; owner: string; repo: string } | { kind: "org"; org: string };

const PART = "[A-Za-z0-9_.-]+";
const TARGET_RE = new RegExp(`^(${PART})(?:/(${PART}))?$`);

/** "OWNER/REPO" or "ORG"; a ConfigError for anything else. */
export function parseRunnerTarget(text: string): RunnerTarget {
  const m = TARGET_RE.exec(text.trim());
  if (!m) {
    throw new ConfigError(
      `${JSON.stringify(text)} is not a GitHub repository or organization; write OWNER/REPO (e.g. rust-lang-ci/rust) or ORG.`,
    );
  }
  const [, owner = "", repo] = m;
  return repo === undefined ? { kind: "org", org: owner } : { kind: "repo", owner, repo };
}

export function describeTarget(t: RunnerTarget): string {
  return t.kind === "repo" ? `repository ${t.owner}/${t.repo}` : `organization ${t.org}`;
}

function tokenPath(t: RunnerTarget): string {
  return t.kind === "repo"
    ? `/repos/${t.owner}/${t.repo}/actions/runners/registration-token`
    : `/orgs/${t.org}/actions/runners/registration-token`;
}

function permissionHint(t: RunnerTarget): string {
  return t.kind === "repo"
    ? `a classic token needs the "repo" scope, a fine-grained token "Administration: Read and write" on ${t.owner}/${t.repo}`
    : `a classic token needs the "admin:org" scope, a fine-grained token "Self-hosted runners: Read and write" on ${t.org}`;
}

export interface RegistrationTokenOptions {
  env: NodeJS.ProcessEnv;
  /** Use this client instead of one built from env (GITHUB_TOKEN, GITHUB_API_URL). */
  client?: GitHubClient;
  /** Passed to createOctokit (tests shorten retries and turn throttling off). */
  clientOptions?: Omit<ClientOptions, "token" | "baseUrl">;
  /** Give up on one request after this long (default 30 s). */
  timeoutMs?: number;
}

/** A fresh registration token for self-hosted runners of OWNER/REPO or ORG. */
export async function fetchRegistrationToken(target: string, opts: RegistrationTokenOptions): Promise<string> {
  const t = parseRunnerTarget(target);
  const token = opts.env.GITHUB_TOKEN?.trim();
  if (!opts.client && !token) {
    throw new ConfigError(
      `GITHUB_TOKEN is not set, so civm cannot get a runner registration token for the ${describeTarget(t)}: export GITHUB_TOKEN with a token that can administer its self-hosted runners (${permissionHint(t)}).`,
    );
  }
  const { createOctokit, githubApiUrl } = await import("./client.js");
  const baseUrl = githubApiUrl(opts.env);
  const client = opts.client ?? createOctokit({ ...opts.clientOptions, token: token ?? "", baseUrl });
  const path = tokenPath(t);
  try {
    const res = await client.request(`POST ${path}`, {
      request: { signal: AbortSignal.timeout(opts.timeoutMs ?? 30_000) },
    });
    const value = (res.data as { token?: unknown }).token;
    if (typeof value !== "string" || value === "") {
      throw new ExternalError(`GitHub answered POST ${path} without a registration token; check GITHUB_API_URL (${baseUrl}).`);
    }
    return value;
  } catch (e) {
    if (e instanceof ExternalError) throw e;
    throw describeFailure(e, { t, path, baseUrl, secret: token ?? "" });
  }
}

interface FailureContext {
  t: RunnerTarget;
  path: string;
  baseUrl: string;
  secret: string;
}

interface RequestErrorLike {
  status?: number;
  message?: string;
  name?: string;
  response?: { headers?: Record<string, string | undefined> };
  cause?: unknown;
}

function describeFailure(e: unknown, ctx: FailureContext): ExternalError {
  const err = (e ?? {}) as RequestErrorLike;
  const message = scrub(describeStatus(err, ctx), ctx.secret);
  return new ExternalError(message, { cause: e });
}

function describeStatus(err: RequestErrorLike, ctx: FailureContext): string {
  const at = `POST ${ctx.path}`;
  const status = err.response ? err.status : undefined;
  if (status === undefined) return `could not reach GitHub API at ${ctx.baseUrl}: ${networkReason(err)}.`;
  if (status === 401) {
    return `GitHub rejected GITHUB_TOKEN (401 Bad credentials) at ${at}: the token is wrong, expired or revoked; export a valid one.`;
  }
  if ((status === 403 || status === 429) && err.response?.headers?.["x-ratelimit-remaining"] === "0") {
    return `GitHub API rate limit exhausted at ${at} (${status}); wait until it resets or use another token.`;
  }
  if (status === 403) {
    return `GitHub refused ${at} (403 Forbidden): GITHUB_TOKEN lacks permission to manage self-hosted runners of the ${describeTarget(ctx.t)}; ${permissionHint(ctx.t)}.`;
  }
  if (status === 404) {
    return `${capitalize(describeTarget(ctx.t))} not found or the token cannot see it (404 at ${at}); check the name in the config and that GITHUB_TOKEN has access to it.`;
  }
  return `GitHub API failed at ${at} (${status}): ${err.message ?? "no details"}.`;
}

function networkReason(err: RequestErrorLike): string {
  if (err.name === "AbortError" || err.name === "TimeoutError") return "the request timed out";
  const codes: string[] = [];
  for (let c: unknown = err; c && typeof c === "object" && codes.length < 5; c = (c as { cause?: unknown }).cause) {
    const code = (c as { code?: unknown }).code;
    if (typeof code === "string") codes.push(code);
  }
  const reason = err.message && err.message !== "fetch failed" ? err.message : "network error";
  return codes[0] && !reason.includes(codes[0]) ? `${codes[0]} (${reason})` : reason;
}

function capitalize(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}

function scrub(text: string, secret: string): string {
  return secret.length >= 4 ? text.split(secret).join("***") : text;
}
