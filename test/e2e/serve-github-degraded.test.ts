// civm serve as a real process against a GitHub that fails (502s), hangs, then rate-limits:
// after `github.degradedAfter` (4 s here) of each, /healthz says "degraded" and `civm pools`
// shows the pool degraded with its GitHub state; once GitHub answers again both are back to
// ok. A hanging GitHub fails after `github.requestTimeout` (10 s here, room for the two
// retries of a 502 at 1 s and 4 s), not after the default 30 s; the client works again after.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { runCivm } from "../support/civm-cli.js";
import { startServeWithHub, TOKEN, type Serve } from "../support/serve-harness.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

interface Healthz {
  ok: boolean;
  status: "ok" | "degraded";
  github: { targets: { target: string; state: string; degraded: boolean; since: string | null; reason: string | null; rateLimitedUntil: string | null }[] };
}

const DEGRADED_AFTER = 4;

/** Polls /healthz until `until` holds; returns every (state, status) seen on the way and the last answer. */
async function watch(s: Serve, until: (h: Healthz) => boolean, ms: number, what: string): Promise<{ seen: string[]; last: Healthz }> {
  const seen: string[] = [];
  let last: Healthz | undefined;
  await s.poll(async () => {
    const res = await fetch(`${s.base}/healthz`);
    assert.equal(res.status, 200, "/healthz answers 200 whatever GitHub does");
    last = (await res.json()) as Healthz;
    const step = `${last.github.targets[0]?.state}/${last.status}`;
    if (seen.at(-1) !== step) seen.push(step);
    return until(last);
  }, ms, what);
  return { seen, last: last! };
}

test("civm serve: GitHub failing, hanging or rate-limiting for longer than github.degradedAfter → degraded on /healthz and in civm pools; ok again once it answers", { timeout: 300_000 }, async (t) => {
  const { gh, s } = await startServeWithHub(t, {
    image: guest.disk,
    pollInterval: 5,
    github: { degradedAfter: `${DEGRADED_AFTER}s`, requestTimeout: "10s" },
    pools: [{ minRunners: 0, maxRunners: 1 }],
  });
  const pools = () => runCivm(["pools", "--api-url", s.base], { ...s.e, env: { ...s.e.env, CIVM_API_TOKEN: TOKEN } });
  const row = (stdout: string) => stdout.split("\n").find((l) => l.startsWith("tiny ")) ?? stdout;
  const healthy = async (what: string) => {
    const { last } = await watch(s, (h) => h.status === "ok" && h.github.targets[0]?.state === "ok", 30_000, what);
    assert.deepEqual(last.github.targets[0]!.reason, null);
    const p = await pools();
    assert.equal(p.code, 0, p.stderr);
    assert.match(row(p.stdout), /^tiny\s+active\s.*\sok$/, p.stdout);
    assert.doesNotMatch(p.stderr, /GitHub/);
  };
  /** Degraded only after the threshold: seen failing-but-ok first, then degraded; civm pools agrees. */
  const degraded = async (state: string, reason: RegExp, what: string) => {
    const { seen, last } = await watch(s, (h) => h.status === "degraded", 60_000, what);
    const target = last.github.targets[0]!;
    assert.equal(target.state, state);
    assert.equal(target.degraded, true);
    assert.match(target.reason ?? "", reason);
    assert.ok(seen.includes(`${state}/ok`), `${state} before degraded: ${seen.join(" → ")}`);
    const sinceMs = Date.now() - Date.parse(target.since!);
    assert.ok(sinceMs >= DEGRADED_AFTER * 1000, `degraded ${sinceMs} ms after the first failure`);
    const p = await pools();
    assert.equal(p.code, 0, p.stderr);
    assert.match(row(p.stdout), new RegExp(`^tiny\\s+degraded\\s.*\\s${state} \\S+ \\(degraded\\)$`), p.stdout);
    assert.match(p.stderr, new RegExp(`^civm: pool tiny: GitHub ${state} since \\S+: `, "m"));
    return last;
  };

  await s.listening();
  await healthy("a first successful poll");

  // 1. GitHub answers 502 to everything about the repository.
  gh.respondWith(/^\/repos\//, 502, { message: "Bad Gateway" });
  await degraded("failing", /502|Bad Gateway/i, "degraded while GitHub answers 502");
  gh.clearResponses();
  await healthy("recovery after the 502s");

  // 2. GitHub takes the connection and never answers: each call fails after requestTimeout.
  const answerAgain = gh.delay(/^\/repos\//, Infinity);
  await degraded("failing", /did not answer .* within 10 s/, "degraded while GitHub hangs");
  answerAgain();
  await healthy("recovery after the hang");

  // 3. The rate-limit budget is spent until a reset 15 s away: no request until then.
  gh.setRateLimit({ remaining: 0, resetInSeconds: 15 });
  const limited = await degraded("rate-limited", /rate limit/i, "degraded while rate-limited");
  assert.ok(limited.github.targets[0]!.rateLimitedUntil, "rateLimitedUntil is reported");
  await healthy("recovery once the rate limit resets");

  await s.stopClean();
});
