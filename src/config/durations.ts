// Durations civm waits for (timeouts, grace periods, poll intervals) end up in a Node timer,
// which holds at most 2^31-1 ms: a longer one fires at once (a VM timed out at boot). Every
// duration civm takes, in a file or a flag, is checked here against that limit.
import { ConfigError } from "../errors/index.js";

/** The longest a Node timer can wait (about 24.8 days). */
export const MAX_TIMER_MS = 2 ** 31 - 1;
/** The longest duration civm accepts, in whole seconds (2147483 s). */
export const MAX_DURATION_SECONDS = Math.floor(MAX_TIMER_MS / 1000);

export interface DurationRule {
  /** Smallest accepted value in seconds (default 0). */
  min?: number;
  /** What 0 means, when it is accepted and special ("never time out"). */
  zeroMeans?: string;
}

/** "from 1 to 2147483 seconds (about 24.8 days, the longest a timer can wait); 0 = never". */
export function durationRange(rule: DurationRule = {}): string {
  const min = rule.min ?? 0;
  return `from ${min} to ${MAX_DURATION_SECONDS} seconds (about 24.8 days, the longest a timer can wait)${min === 0 && rule.zeroMeans ? `; 0 ${rule.zeroMeans}` : ""}`;
}

/** Why `seconds` is not an accepted duration, or undefined when it is. */
export function durationProblem(seconds: unknown, rule: DurationRule = {}): string | undefined {
  const min = rule.min ?? 0;
  const ok = typeof seconds === "number" && Number.isInteger(seconds) && seconds >= min && seconds <= MAX_DURATION_SECONDS;
  return ok ? undefined : `must be a whole number of seconds ${durationRange(rule)}`;
}

/**
 * A duration flag (`--grace 30`): whole seconds in decimal digits only ("abc", "-1", "1e3",
 * "" and values past the timer limit are refused). Throws a ConfigError naming the flag.
 */
export function parseSecondsFlag(value: string, flag: string, rule: DurationRule = {}): number {
  const t = value.trim();
  const n = /^\d+$/.test(t) ? Number(t) : NaN;
  const problem = durationProblem(n, rule);
  if (problem) throw new ConfigError(`${flag} ${JSON.stringify(value)} is not accepted: ${flag} ${problem}.`);
  return n;
}
