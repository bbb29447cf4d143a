// Which pool a workflow job goes to. GitHub offers a job only to runners registered where
// the job's repository can use them, so labels alone are not enough: the pool's target must
// cover the repository (that repository, or an organization owning it), the pool's runner
// group must allow it (the default group, id 1, serves every repository of the org), and the
// pool's labels must include the job's. Anything else is ignored, and counted in
// civm_jobs_ignored_total by reason. Owner and repository names compare as GitHub's do:
// case-insensitively. Runner-group access comes from the REST API and is cached.
import { Counter, type Registry } from "prom-client";
import { messageOf } from "../errors/index.js";
import type { GitHubAccess } from "../github/app-auth.js";
import type { RunnerTarget } from "../github/registration-token.js";
import { repositoryIsPrivate, runnerGroupAccess, type RunnerGroupAccess } from "../github/runner-groups.js";
import { labelsMatch } from "./labels.js";
import { matchPool } from "./plan.js";
import { perRegistry } from "./metrics.js";

export const DEFAULT_RUNNER_GROUP = 1;

export type IgnoreReason = "no_repository" | "no_pool_for_repository" | "no_pool_for_labels" | "repository_not_in_runner_group" | "runner_group_unavailable";

export interface RoutablePool {
  name: string;
  labels: readonly string[];
  target: RunnerTarget;
  /** Runner group id (organization pools); 1 is the default group. */
  groupId: number;
}

export interface JobFacts {
  /** "owner/repo" as GitHub sent it. */
  repository: string | undefined;
  labels: readonly string[];
  /** From the webhook payload when known. */
  private?: boolean | undefined;
}

export type Route<P> = { pool: P; ignored?: undefined } | { pool?: undefined; ignored: IgnoreReason };

/** Whether runners registered with `t` can take jobs of `repository` (runner groups aside). */
export function targetCovers(t: RunnerTarget, repository: string): boolean {
  const [owner, repo, extra] = repository.toLowerCase().split("/");
  if (!owner || !repo || extra !== undefined) return false;
  return t.kind === "org" ? t.org.toLowerCase() === owner : t.owner.toLowerCase() === owner && t.repo.toLowerCase() === repo;
}

/**
 * The pool for a job, pure: `groupAllows` answers for an organization pool in a non-default
 * group (true, false, or undefined when unknown). Among pools that cover the repository,
 * match the labels and are allowed, the most specific (fewest labels), then the first.
 */
export function routeJob<P extends RoutablePool>(pools: readonly P[], job: JobFacts, groupAllows: (pool: P, repository: string) => boolean | undefined): Route<P> {
  const repository = job.repository;
  if (!repository || !/^[^/\s]+\/[^/\s]+$/.test(repository)) return { ignored: "no_repository" };
  const covering = pools.filter((p) => targetCovers(p.target, repository));
  if (covering.length === 0) return { ignored: "no_pool_for_repository" };
  const labelled = covering.filter((p) => labelsMatch(p.labels, job.labels));
  if (labelled.length === 0) return { ignored: "no_pool_for_labels" };
  const answers = labelled.map((p) => (needsGroupCheck(p) ? groupAllows(p, repository) : true));
  const allowed = labelled.filter((_, i) => answers[i] === true);
  const best = matchPool(allowed, job.labels);
  if (best) return { pool: best };
  return { ignored: answers.includes(undefined) ? "runner_group_unavailable" : "repository_not_in_runner_group" };
}

function needsGroupCheck(p: RoutablePool): boolean {
  return p.target.kind === "org" && p.groupId !== DEFAULT_RUNNER_GROUP;
}

/** Whether a group with `access` serves a repository (`isPrivate`: undefined when unknown). */
export function groupServes(access: RunnerGroupAccess, repository: string, isPrivate: boolean | undefined): boolean | undefined {
  if (access.visibility === "selected" && !access.repositories?.has(repository.toLowerCase())) return false;
  const needPrivate = access.visibility === "private" || !access.allowsPublicRepositories;
  if (!needPrivate) return true;
  return isPrivate;
}

export interface JobRouterOptions {
  registry: Registry;
  /** GitHub access (a function: a reload may change the credentials). */
  access: () => GitHubAccess | undefined;
  now?: () => number;
  /** How long a runner group's repository access is trusted (default 5 min). */
  ttlMs?: number;
  warn?: (fields: Record<string, unknown>, msg: string) => void;
}

const DEFAULT_TTL_MS = 5 * 60_000;
/** A failed lookup is not retried for this long (a webhook burst must not hammer the API). */
const FAILURE_TTL_MS = 60_000;
const IGNORED_REMEMBERED = 10_000;

export const jobsIgnoredCounter = perRegistry(
  (registers): Counter<"reason"> => new Counter({ name: "civm_jobs_ignored_total", help: "Workflow jobs no pool serves, by reason (each job counted once)", labelNames: ["reason"], registers }),
);

/** routeJob with runner-group access fetched from GitHub and cached; counts ignored jobs once each. */
export class JobRouter {
  private readonly groups = new Map<string, { at: number; access: RunnerGroupAccess | undefined }>();
  private readonly privacy = new Map<string, { at: number; private: boolean | undefined }>();
  private readonly ignoredIds = new Set<number>();
  private readonly ignoredCounter: Counter<"reason">;
  private readonly now: () => number;

  constructor(private readonly opts: JobRouterOptions) {
    this.now = opts.now ?? Date.now;
    this.ignoredCounter = jobsIgnoredCounter(opts.registry);
  }

  /** Fetches what it needs (runner groups, a repository's visibility) first. */
  async route<P extends RoutablePool>(pools: readonly P[], job: JobFacts): Promise<Route<P>> {
    const repo = job.repository;
    if (repo) {
      const need = pools.filter((p) => needsGroupCheck(p) && targetCovers(p.target, repo) && labelsMatch(p.labels, job.labels));
      for (const p of need) {
        const access = await this.groupAccess(p);
        if (access && (access.visibility === "private" || !access.allowsPublicRepositories) && job.private === undefined) await this.repoPrivacy(p.target, repo);
      }
    }
    return this.routeCached(pools, job);
  }

  /** Only what is cached (a reload re-matches synchronously; unknown groups count as unavailable). */
  routeCached<P extends RoutablePool>(pools: readonly P[], job: JobFacts): Route<P> {
    return routeJob(pools, job, (p, repository) => {
      if (p.target.kind !== "org") return true;
      const access = this.groups.get(groupKey(p.target.org, p.groupId))?.access;
      if (!access) return undefined;
      return groupServes(access, repository, job.private ?? this.privacy.get(repository.toLowerCase())?.private);
    });
  }

  /** Counts a job no pool serves, once per job id. */
  ignored(jobId: number, reason: IgnoreReason): void {
    if (this.ignoredIds.has(jobId)) return;
    if (this.ignoredIds.size >= IGNORED_REMEMBERED) this.ignoredIds.clear();
    this.ignoredIds.add(jobId);
    this.ignoredCounter.inc({ reason });
  }

  private async groupAccess(p: RoutablePool): Promise<RunnerGroupAccess | undefined> {
    if (p.target.kind !== "org") return undefined;
    const key = groupKey(p.target.org, p.groupId);
    const hit = this.groups.get(key);
    const now = this.now();
    if (hit && now - hit.at < (hit.access ? (this.opts.ttlMs ?? DEFAULT_TTL_MS) : FAILURE_TTL_MS)) return hit.access;
    let access: RunnerGroupAccess | undefined;
    try {
      const gh = this.opts.access();
      if (gh) access = await runnerGroupAccess(await gh.client(p.target), p.target.org, p.groupId);
    } catch (e) {
      // Keep the last known answer over a failed refresh.
      access = hit?.access;
      this.opts.warn?.({ pool: p.name, group: p.groupId, err: messageOf(e) }, "could not read the runner group's repository access");
    }
    this.groups.set(key, { at: now, access });
    return access;
  }

  private async repoPrivacy(t: RunnerTarget, repository: string): Promise<void> {
    const key = repository.toLowerCase();
    const hit = this.privacy.get(key);
    const now = this.now();
    if (hit && now - hit.at < (hit.private === undefined ? FAILURE_TTL_MS : (this.opts.ttlMs ?? DEFAULT_TTL_MS))) return;
    let isPrivate: boolean | undefined;
    try {
      const gh = this.opts.access();
      if (gh) isPrivate = await repositoryIsPrivate(await gh.client(t), repository);
    } catch (e) {
      isPrivate = hit?.private;
      this.opts.warn?.({ repository, err: messageOf(e) }, "could not read whether the repository is private");
    }
    this.privacy.set(key, { at: now, private: isPrivate });
  }
}

function groupKey(org: string, id: number): string {
  return `${org.toLowerCase()}:${id}`;
}

/** A pool spec as routeJob sees it. */
export function routable(p: { name: string; runner: { labels: readonly string[]; target: RunnerTarget; groupId: number } }): RoutablePool & { name: string } {
  return { name: p.name, labels: p.runner.labels, target: p.runner.target, groupId: p.runner.groupId };
}
