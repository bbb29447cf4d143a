import { test } from "node:test";
import assert from "node:assert/strict";
import { MAX_DURATION_SECONDS, MAX_TIMER_MS, durationProblem, parseSecondsFlag } from "../../src/config/durations.js";
import { ConfigError } from "../../src/errors/index.js";

test("the limit is the largest delay a Node timer holds (2^31-1 ms)", () => {
  assert.equal(MAX_TIMER_MS, 2147483647);
  assert.equal(MAX_DURATION_SECONDS, 2147483);
  // The reason for the limit: a longer delay fires at once.
  assert.ok(MAX_DURATION_SECONDS * 1000 <= MAX_TIMER_MS && (MAX_DURATION_SECONDS + 1) * 1000 > MAX_TIMER_MS);
});

test("durationProblem: whole seconds from min to the timer limit, nothing else", () => {
  for (const ok of [0, 1, 30, 3600, MAX_DURATION_SECONDS]) assert.equal(durationProblem(ok), undefined, String(ok));
  for (const bad of [-1, 0.5, MAX_DURATION_SECONDS + 1, 99999999, NaN, Infinity, "30", null]) {
    assert.match(durationProblem(bad) ?? "", /whole number of seconds from 0 to 2147483 seconds \(about 24\.8 days/, String(bad));
  }
  assert.match(durationProblem(0, { min: 1 }) ?? "", /from 1 to 2147483/);
});

test("parseSecondsFlag: refuses non-numbers, negatives, fractions and values past the limit, naming flag, value and range", () => {
  assert.equal(parseSecondsFlag("30", "--grace"), 30);
  assert.equal(parseSecondsFlag(" 0 ", "--timeout", { zeroMeans: "= never" }), 0);
  assert.equal(parseSecondsFlag(String(MAX_DURATION_SECONDS), "--grace"), MAX_DURATION_SECONDS);
  for (const bad of ["abc", "", "-1", "1.5", "1e3", "0x10", "99999999", String(MAX_DURATION_SECONDS + 1)]) {
    assert.throws(
      () => parseSecondsFlag(bad, "--grace"),
      (e: unknown) => e instanceof ConfigError && e.message.startsWith(`--grace ${JSON.stringify(bad)} is not accepted`) && /from 0 to 2147483 seconds/.test(e.message),
      bad,
    );
  }
  assert.throws(() => parseSecondsFlag("0", "--wait-timeout", { min: 1 }), /--wait-timeout "0" is not accepted: --wait-timeout must be a whole number of seconds from 1 to 2147483/);
  assert.throws(() => parseSecondsFlag("x", "--timeout", { zeroMeans: "= never" }), /; 0 = never/);
});
