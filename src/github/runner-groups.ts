// Which repositories an organization's runner group may serve (GET
// /orgs/{org}/actions/runner-groups/{id} and, for "selected", its repository list), and
// whether a repository is private (a group may be limited to private repositories or
// exclude public ones). Failures become ExternalErrors naming the endpoint.
import type { GitHubClient } from "./client.js";
import { apiFailure } from "./runners.js";

export interface RunnerGroupAccess {
  /** "all" repositories of the org, "selected" ones, or all "private" ones. */
  visibility: "all" | "selected" | "private";
  /** Lower-cased "owner/repo" the group is limited to (visibility "selected" only). */
  repositories: Set<string> | undefined;
  /** false: public repositories may not use the group's runners. */
  allowsPublicRepositories: boolean;
}

export async function runnerGroupAccess(client: GitHubClient, org: string, id: number): Promise<RunnerGroupAccess> {
  const path = `/orgs/${encodeURIComponent(org)}/actions/runner-groups/${id}`;
  let visibility: RunnerGroupAccess["visibility"];
  let allowsPublicRepositories: boolean;
  try {
    const res = await client.request(`GET ${path}`);
    const data = res.data as { visibility?: unknown; allows_public_repositories?: unknown };
    visibility = data.visibility === "selected" || data.visibility === "private" ? data.visibility : "all";
    allowsPublicRepositories = data.allows_public_repositories !== false;
  } catch (e) {
    throw apiFailure(`GET ${path} (runner group ${id} of ${org})`, e);
  }
  if (visibility !== "selected") return { visibility, repositories: undefined, allowsPublicRepositories };
  const repositories = new Set<string>();
  try {
    for (let page = 1; ; page++) {
      const res = await client.request(`GET ${path}/repositories`, { per_page: 100, page });
      const data = res.data as { total_count?: number; repositories?: { full_name?: unknown }[] };
      const items = data.repositories ?? [];
      for (const r of items) if (typeof r.full_name === "string") repositories.add(r.full_name.toLowerCase());
      if (items.length < 100 || (data.total_count !== undefined && repositories.size >= data.total_count)) break;
    }
  } catch (e) {
    throw apiFailure(`GET ${path}/repositories (runner group ${id} of ${org})`, e);
  }
  return { visibility, repositories, allowsPublicRepositories };
}

/** Whether OWNER/REPO is private (GET /repos/{owner}/{repo}). */
export async function repositoryIsPrivate(client: GitHubClient, repository: string): Promise<boolean> {
  const [owner = "", repo = ""] = repository.split("/");
  const path = `/repos/${encodeURIComponent(owner)}/${encodeURIComponent(repo)}`;
  try {
    const res = await client.request(`GET ${path}`);
    return (res.data as { private?: unknown }).private === true;
  } catch (e) {
    throw apiFailure(`GET ${path}`, e);
  }
}
