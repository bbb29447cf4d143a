// Jobs waiting for a runner, found by polling (so a job whose webhook was lost is still
// served): the recent workflow runs of each repository (one request, conditional: a 304
// when nothing changed costs no rate limit), then the jobs of those not completed. The
// REST API has no "queued jobs of an org" endpoint, so an organization target lists its
// repositories first (the caller caches that list).
import type { components } from "@octokit/openapi-types";
import type { GitHubClient } from "./client.js";
import type { RunnerTarget } from "./registration-token.js";
import { apiFailure } from "./runners.js";

type ApiJob = components["schemas"]["job"];
type ApiRun = components["schemas"]["workflow-run"];

export interface QueuedJob {
  id: number;
  runId: number;
  /** "owner/repo". */
  repository: string;
  labels: string[];
  status: string;
  createdAt: string;
}

const PER_PAGE = 100;

async function pages<T>(client: GitHubClient, route: string, params: Record<string, unknown>, key: string): Promise<T[]> {
  const out: T[] = [];
  for (let page = 1; ; page++) {
    const res = await client.request(route, { ...params, per_page: PER_PAGE, page });
    const data = res.data as Record<string, unknown> & { total_count?: number };
    const items = (Array.isArray(res.data) ? res.data : data[key]) as T[];
    out.push(...items);
    if (items.length < PER_PAGE || (data.total_count !== undefined && out.length >= data.total_count)) return out;
  }
}

/** "owner/repo" of every repository the target covers (an org: all its repositories). */
export async function targetRepositories(client: GitHubClient, t: RunnerTarget): Promise<string[]> {
  if (t.kind === "repo") return [`${t.owner}/${t.repo}`];
  try {
    const repos = await pages<{ full_name: string; archived?: boolean }>(client, "GET /orgs/{org}/repos", { org: t.org, type: "all" }, "");
    return repos.filter((r) => !r.archived).map((r) => r.full_name);
  } catch (e) {
    throw apiFailure(`GET /orgs/${t.org}/repos`, e);
  }
}

/** Most pages of recent runs read per repository (the poll is a safety net, not an audit). */
const MAX_RUN_PAGES = 5;

/**
 * Queued jobs of one repository. One listing of its most recent runs (all statuses, so one
 * request instead of one per status; conditional, so mostly a free 304) and the jobs of
 * every run not completed. A further page is read only while a full page ends with a run
 * still active (a busy repository).
 */
export async function listQueuedJobs(client: GitHubClient, repository: string): Promise<QueuedJob[]> {
  const [owner, repo] = repository.split("/") as [string, string];
  const out: QueuedJob[] = [];
  try {
    const runs: ApiRun[] = [];
    for (let page = 1; page <= MAX_RUN_PAGES; page++) {
      const res = await client.request("GET /repos/{owner}/{repo}/actions/runs", { owner, repo, per_page: PER_PAGE, page });
      const items = (res.data as { workflow_runs: ApiRun[] }).workflow_runs;
      runs.push(...items);
      const last = items[items.length - 1];
      if (items.length < PER_PAGE || !last || last.status === "completed") break;
    }
    const seen = new Set<number>();
    for (const run of runs) {
      if (run.status === "completed" || seen.has(Number(run.id))) continue;
      seen.add(Number(run.id));
      const jobs = await pages<ApiJob>(client, "GET /repos/{owner}/{repo}/actions/runs/{run_id}/jobs", { owner, repo, run_id: run.id, filter: "latest" }, "jobs");
      for (const j of jobs) {
        if (j.status !== "queued") continue;
        out.push({ id: Number(j.id), runId: Number(j.run_id), repository, labels: j.labels, status: j.status, createdAt: j.created_at });
      }
    }
  } catch (e) {
    throw apiFailure(`listing queued jobs of ${repository}`, e);
  }
  return out;
}
