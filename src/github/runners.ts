// Self-hosted runners of an organization or repository: JIT configs, list, get, delete.
// Shapes follow @octokit/openapi-types ("runner", "job"); failures become ExternalErrors
// that name the endpoint, never a token or a JIT config.
import type { components } from "@octokit/openapi-types";
import { ExternalError, messageOf } from "../errors/index.js";
import type { GitHubClient } from "./client.js";
import type { RunnerTarget } from "./registration-token.js";

export type ApiRunner = components["schemas"]["runner"];

export interface RunnerInfo {
  id: number;
  name: string;
  /** "online" or "offline". */
  status: string;
  busy: boolean;
  labels: string[];
}

export interface JitConfig {
  runnerId: number;
  runnerName: string;
  /** Base64 blob for `run.sh --jitconfig`: a credential, never log it. */
  encodedJitConfig: string;
}

export interface JitRequest {
  /** Unique runner name (`<runner.name>-<vm id>`). */
  name: string;
  runnerGroupId: number;
  labels: string[];
  workFolder: string;
}

/** "/orgs/ORG/actions/runners" or "/repos/OWNER/REPO/actions/runners". */
export function runnersPath(t: RunnerTarget): string {
  return t.kind === "org" ? `/orgs/${encodeURIComponent(t.org)}/actions/runners` : `/repos/${encodeURIComponent(t.owner)}/${encodeURIComponent(t.repo)}/actions/runners`;
}

function toInfo(r: ApiRunner): RunnerInfo {
  return { id: r.id, name: r.name, status: r.status, busy: r.busy, labels: (r.labels ?? []).map((l) => l.name) };
}

function status(e: unknown): number | undefined {
  const err = e as { status?: unknown; response?: unknown };
  return err.response && typeof err.status === "number" ? err.status : undefined;
}

export function apiFailure(what: string, e: unknown): ExternalError {
  const s = status(e);
  const why = s === undefined ? `could not reach GitHub: ${messageOf(e)}` : `${s} ${(e as { message?: string }).message ?? ""}`.trim();
  return new ExternalError(`GitHub ${what} failed: ${why}`, { cause: e });
}

/** POST .../generate-jitconfig: a single-use runner registration. */
export async function generateJitConfig(client: GitHubClient, t: RunnerTarget, req: JitRequest): Promise<JitConfig> {
  const path = `${runnersPath(t)}/generate-jitconfig`;
  try {
    const res = await client.request(`POST ${path}`, { name: req.name, runner_group_id: req.runnerGroupId, labels: req.labels, work_folder: req.workFolder });
    const data = res.data as { runner?: ApiRunner; encoded_jit_config?: unknown };
    if (!data.runner || typeof data.encoded_jit_config !== "string" || data.encoded_jit_config === "") {
      throw new ExternalError(`GitHub answered POST ${path} without a runner and an encoded_jit_config.`);
    }
    return { runnerId: data.runner.id, runnerName: data.runner.name, encodedJitConfig: data.encoded_jit_config };
  } catch (e) {
    if (e instanceof ExternalError) throw e;
    throw apiFailure(`POST ${path} (runner ${req.name})`, e);
  }
}

/** Every runner of the target (all pages). */
export async function listRunners(client: GitHubClient, t: RunnerTarget): Promise<RunnerInfo[]> {
  const path = runnersPath(t);
  const out: RunnerInfo[] = [];
  try {
    for (let page = 1; ; page++) {
      const res = await client.request(`GET ${path}`, { per_page: 100, page });
      const data = res.data as { total_count: number; runners: ApiRunner[] };
      out.push(...data.runners.map(toInfo));
      if (data.runners.length < 100 || out.length >= data.total_count) return out;
    }
  } catch (e) {
    throw apiFailure(`GET ${path}`, e);
  }
}

/** One runner, or undefined when GitHub no longer has it. */
export async function getRunner(client: GitHubClient, t: RunnerTarget, id: number): Promise<RunnerInfo | undefined> {
  const path = `${runnersPath(t)}/${id}`;
  try {
    const res = await client.request(`GET ${path}`);
    return toInfo(res.data as ApiRunner);
  } catch (e) {
    if (status(e) === 404) return undefined;
    throw apiFailure(`GET ${path}`, e);
  }
}

/** Deregisters a runner; false when GitHub did not have it (already gone). */
export async function deleteRunner(client: GitHubClient, t: RunnerTarget, id: number): Promise<boolean> {
  const path = `${runnersPath(t)}/${id}`;
  try {
    await client.request(`DELETE ${path}`);
    return true;
  } catch (e) {
    if (status(e) === 404) return false;
    throw apiFailure(`DELETE ${path}`, e);
  }
}

export interface RegistrationToken {
  /** For `config.sh --token`: a credential (valid about an hour), never log it. */
  token: string;
  expiresAt: string | undefined;
}

/** POST .../registration-token: a token `config.sh` registers one runner with. */
export async function createRegistrationToken(client: GitHubClient, t: RunnerTarget): Promise<RegistrationToken> {
  const path = `${runnersPath(t)}/registration-token`;
  try {
    const res = await client.request(`POST ${path}`);
    const data = res.data as { token?: unknown; expires_at?: unknown };
    if (typeof data.token !== "string" || data.token === "") throw new ExternalError(`GitHub answered POST ${path} without a token.`);
    return { token: data.token, expiresAt: typeof data.expires_at === "string" ? data.expires_at : undefined };
  } catch (e) {
    if (e instanceof ExternalError) throw e;
    throw apiFailure(`POST ${path}`, e);
  }
}

/** The name of an organization's runner group (`config.sh --runnergroup` takes names, JIT configs ids). */
export async function runnerGroupName(client: GitHubClient, org: string, id: number): Promise<string> {
  const path = `/orgs/${encodeURIComponent(org)}/actions/runner-groups/${id}`;
  try {
    const res = await client.request(`GET ${path}`);
    const name = (res.data as { name?: unknown }).name;
    if (typeof name !== "string" || name === "") throw new ExternalError(`GitHub answered GET ${path} without a name.`);
    return name;
  } catch (e) {
    if (e instanceof ExternalError) throw e;
    throw apiFailure(`GET ${path} (runner group ${id} of ${org})`, e);
  }
}

/**
 * The web URL runners register at (`config.sh --url`) for an API URL: api.github.com →
 * https://github.com, GHES https://HOST/api/v3 → https://HOST, anything else (a local test
 * server) as it is.
 */
export function githubWebUrl(apiUrl: string): string {
  const u = new URL(apiUrl);
  if (u.hostname === "api.github.com") return "https://github.com";
  if (u.hostname.startsWith("api.") && u.hostname.endsWith(".ghe.com")) return `${u.protocol}//${u.hostname.slice(4)}`;
  const path = u.pathname.replace(/\/+$/, "").replace(/\/api\/v3$/, "");
  return `${u.origin}${path}`;
}

/** `config.sh --url` for the target: https://github.com/ORG or https://github.com/OWNER/REPO. */
export function registrationUrl(apiUrl: string, t: RunnerTarget): string {
  return `${githubWebUrl(apiUrl)}/${t.kind === "org" ? t.org : `${t.owner}/${t.repo}`}`;
}
