// When the daemon talks to GitHub about each target (an organization or repository): every
// target has its own poll schedule, stretched to fit the rate-limit budget its credential has
// left, paused while GitHub rate-limits it, and a health record (failing since when, why).
// One target's trouble never holds up another's: the daemon runs each target's GitHub work on
// its own and reads the state kept here. Pure bookkeeping; no requests are made here.
import { messageOf } from "../errors/index.js";
import type { GitHubBudget } from "../github/client.js";

/** GitHub failing (unreachable, rate-limited, refusing) for this long makes civm report "degraded" (ms). */
export const DEFAULT_GITHUB_DEGRADED_AFTER_MS = 5 * 60_000;
/** An organization's repository list is read again after this long (ms); a webhook needs no list. */
export const DEFAULT_REPO_LIST_TTL_MS = 10 * 60_000;
/**
 * Budget left for what cannot wait (JIT configs, deregistration): polling stops spending
 * below this share of the limit (`github.rateLimitReserve`), and never below BUDGET_RESERVE_MIN
 * requests unless the share is 0.
 */
export const BUDGET_RESERVE_MIN = 100;
export const BUDGET_RESERVE_SHARE = 0.1;

/** Requests polling leaves unspent out of a budget of `limit` (see BUDGET_RESERVE_MIN). */
export function budgetReserve(limit: number | undefined, share: number = BUDGET_RESERVE_SHARE): number {
  return share > 0 ? Math.max(BUDGET_RESERVE_MIN, Math.ceil((limit ?? 0) * share)) : 0;
}

export interface TargetState {
  key: string;
  /** Next poll of queued jobs and runners (ms epoch). */
  nextPollAt: number;
  /** The target's GitHub work under way (at most one at a time). */
  inFlight: Promise<void> | undefined;
  /** Its pools' reconciliation under way (at most one at a time). */
  poolsInFlight: Promise<void> | undefined;
  /** First failure since the last success (ms epoch). */
  failingSince: number | undefined;
  lastError: string | undefined;
  lastOkAt: number | undefined;
  /** GitHub asked to wait until then (ms epoch): no poll and no runner start for the target. */
  limitedUntil: number | undefined;
  /** Budget-counted requests of the last poll (the adaptive interval's cost). */
  lastCost: number | undefined;
  /** Cached repository list of an organization. */
  repos: { list: string[]; at: number } | undefined;
}

export type TargetHealthState = "ok" | "failing" | "rate-limited";

export interface TargetHealth {
  target: string;
  state: TargetHealthState;
  /** Failing or rate-limited for longer than the degraded threshold. */
  degraded: boolean;
  /** Since when it has been failing (ISO time). */
  since: string | null;
  reason: string | null;
  rateLimitedUntil: string | null;
  nextPollAt: string | null;
  /** The credential's budget as GitHub last reported it. */
  rateLimit: { remaining: number; limit: number | null; resetAt: string | null } | null;
}

/**
 * Delay until the next poll: the configured interval, or longer when polls at that pace
 * would spend the budget (less a reserve) before it is refilled. `cost`: budget-counted
 * requests one poll of this target took; `sharers`: targets polled with the same budget;
 * `reserveShare`: the share of the limit kept back (default BUDGET_RESERVE_SHARE).
 * With nothing left to spend, the next poll comes after the reset.
 */
export function nextPollDelay(o: { intervalMs: number; now: number; cost: number; sharers: number; budget: Pick<GitHubBudget, "remaining" | "limit" | "resetAt">; reserveShare?: number }): number {
  const { remaining, resetAt } = o.budget;
  if (remaining === undefined || resetAt === undefined || o.cost <= 0) return o.intervalMs;
  const reserve = budgetReserve(o.budget.limit, o.reserveShare);
  const untilReset = Math.max(0, resetAt - o.now);
  const perPoll = o.cost * Math.max(1, o.sharers);
  const affordable = (remaining - reserve) / perPoll;
  if (affordable < 1) return Math.max(o.intervalMs, untilReset + 1000);
  return Math.max(o.intervalMs, Math.ceil(untilReset / affordable));
}

export class TargetSchedule {
  private readonly states = new Map<string, TargetState>();
  private readonly budgets = new Map<string, GitHubBudget>();

  constructor(
    private readonly now: () => number,
    public degradedAfterMs: number = DEFAULT_GITHUB_DEGRADED_AFTER_MS,
  ) {}

  state(key: string): TargetState {
    let s = this.states.get(key);
    if (!s) {
      s = { key, nextPollAt: 0, inFlight: undefined, poolsInFlight: undefined, failingSince: undefined, lastError: undefined, lastOkAt: undefined, limitedUntil: undefined, lastCost: undefined, repos: undefined };
      this.states.set(key, s);
    }
    return s;
  }

  /** Targets no pool uses any more are forgotten. */
  retain(keys: Iterable<string>): void {
    const keep = new Set(keys);
    for (const k of this.states.keys()) if (!keep.has(k)) this.states.delete(k);
    for (const k of this.budgets.keys()) if (!keep.has(k)) this.budgets.delete(k);
  }

  /** The budget of the target's client (learnt when its work runs). */
  setBudget(key: string, b: GitHubBudget): void {
    this.budgets.set(key, b);
  }

  budget(key: string): GitHubBudget | undefined {
    return this.budgets.get(key);
  }

  /** Targets sharing this target's budget (one token for all, or one App installation per owner). */
  sharers(key: string): number {
    const b = this.budgets.get(key);
    let n = 0;
    for (const x of this.budgets.values()) if (x === b) n++;
    return Math.max(1, n);
  }

  /** Rate-limited now: until when (ms, the daemon's clock). */
  limitedUntil(key: string): number | undefined {
    const until = this.states.get(key)?.limitedUntil;
    return until !== undefined && until > this.now() ? until : undefined;
  }

  succeeded(key: string): void {
    const s = this.state(key);
    s.failingSince = undefined;
    s.lastError = undefined;
    s.lastOkAt = this.now();
  }

  /** A failure; when GitHub rate-limits the target, its next poll waits for the limit to end. */
  failed(key: string, e: unknown): void {
    const s = this.state(key);
    s.failingSince ??= this.now();
    s.lastError = messageOf(e);
    const until = this.budgets.get(key)?.limited();
    if (until !== undefined) {
      // The budget keeps wall-clock times; the schedule runs on the daemon's clock.
      s.limitedUntil = this.now() + (until - Date.now());
      s.nextPollAt = Math.max(s.nextPollAt, until);
    }
  }

  health(key: string): TargetHealth {
    const s = this.state(key);
    const now = this.now();
    const limited = this.limitedUntil(key);
    const b = this.budgets.get(key);
    const iso = (t: number | undefined) => (t === undefined ? null : new Date(t).toISOString());
    const state: TargetHealthState = limited !== undefined ? "rate-limited" : s.failingSince !== undefined ? "failing" : "ok";
    return {
      target: key,
      state,
      degraded: state !== "ok" && s.failingSince !== undefined && now - s.failingSince >= this.degradedAfterMs,
      since: iso(state === "ok" ? undefined : s.failingSince ?? now),
      reason: state === "ok" ? null : s.lastError ?? null,
      rateLimitedUntil: iso(limited),
      nextPollAt: s.nextPollAt > 0 ? iso(s.nextPollAt) : null,
      rateLimit: b?.remaining !== undefined ? { remaining: b.remaining, limit: b.limit ?? null, resetAt: iso(b.resetAt) } : null,
    };
  }

  keys(): string[] {
    return [...this.states.keys()];
  }
}
