// The GitHub client against the fake GitHub's slow answers, rate-limit headers, 403/429 with
// retry-after, ETags and 304s.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Registry } from "prom-client";
import { createOctokit } from "../../src/github/client.js";
import { listRunners } from "../../src/github/runners.js";
import { githubRequestObserver } from "../../src/pool/metrics.js";
import { startFakeGitHub } from "../support/fake-github.js";
import { freePort } from "../support/net.js";

const target = { kind: "repo" as const, owner: "rust-lang-ci", repo: "rust" };

test("every call has a timeout: a GitHub that never answers fails the call after timeoutMs, retries included", async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  gh.delay(/\/actions\/runners$/, Infinity);
  const client = createOctokit({ token: gh.validToken, baseUrl: gh.url, retries: 2, retryBaseMs: 1, timeoutMs: 500, warn: () => {} });
  const t0 = Date.now();
  await assert.rejects(listRunners(client, target), /could not reach GitHub: GitHub did not answer GET .*within 0.5 s/);
  const took = Date.now() - t0;
  assert.ok(took < 3000, `failed after ${took} ms`);
});

test("a timed-out call leaves the client usable: the next calls reach GitHub and succeed", async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  // A first call on a cold process can take a few hundred ms: the timeout leaves room for it.
  const client = createOctokit({ token: gh.validToken, baseUrl: gh.url, retries: 2, retryBaseMs: 1, timeoutMs: 2000, warn: () => {} });
  assert.deepEqual(await listRunners(client, target), []);
  const answerAgain = gh.delay(/\/actions\/runners$/, Infinity);
  await assert.rejects(listRunners(client, target), /did not answer GET .*within 2 s/);
  answerAgain();
  const before = gh.requests.length;
  // Octokit hands every call the same `request` options object: a signal left on it by the
  // timed-out call would abort each later call before it is sent.
  for (let i = 0; i < 3; i++) assert.deepEqual(await listRunners(client, target), []);
  assert.equal(gh.requests.length - before, 3, "each call reached GitHub once");
});

test("a shutdown signal abandons calls in flight at once", async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  gh.delay(/\/actions\/runners$/, Infinity);
  const ctl = new AbortController();
  const client = createOctokit({ token: gh.validToken, baseUrl: gh.url, timeoutMs: 60_000, signal: ctl.signal, warn: () => {} });
  const call = listRunners(client, target);
  setTimeout(() => ctl.abort(), 200);
  const t0 = Date.now();
  await assert.rejects(call, /abandoned: civm is shutting down/);
  assert.ok(Date.now() - t0 < 2000);
});

test("a network failure is counted as status 0 (Octokit reports it as 500)", async () => {
  const registry = new Registry();
  const port = await freePort(); // nothing listens there
  const client = createOctokit({ token: "x", baseUrl: `http://127.0.0.1:${port}`, retries: 0, throttle: false, warn: () => {}, onRequest: githubRequestObserver(registry) });
  await assert.rejects(listRunners(client, target), /could not reach GitHub/);
  const text = await registry.getSingleMetricAsString("civm_github_api_requests_total");
  assert.match(text, /route="GET \/repos\/\{owner\}\/\{repo\}\/actions\/runners",status="0"\} 1/);
  assert.doesNotMatch(text, /status="500"/);
});

test("conditional GETs: the same GET again sends If-None-Match; GitHub's 304 costs no budget and the data is the cached one", async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const registry = new Registry();
  const client = createOctokit({ token: gh.validToken, baseUrl: gh.url, throttle: false, retries: 0, warn: () => {}, onRequest: githubRequestObserver(registry) });
  const { generateJitConfig } = await import("../../src/github/runners.js");
  await generateJitConfig(client, target, { name: "civm-x-0000000a", runnerGroupId: 1, labels: ["self-hosted"], workFolder: "_work" });
  const first = await listRunners(client, target);
  const left = gh.state.rateLimit.remaining;
  assert.equal(client.civm.budget.remaining, left, "the budget is read from x-ratelimit-remaining");
  assert.equal(client.civm.budget.limit, 5000);
  const second = await listRunners(client, target);
  assert.deepEqual(second, first);
  assert.equal(gh.state.counts.notModified, 1);
  assert.equal(gh.state.rateLimit.remaining, left, "a 304 costs nothing");
  assert.ok(gh.requests.at(-1)!.headers["if-none-match"], "If-None-Match sent");
  assert.equal(client.civm.budget.notModified, 1);
  // A change is seen: another ETag, a 200.
  gh.setRunner("civm-x-0000000a", { status: "online" });
  assert.equal((await listRunners(client, target))[0]!.status, "online");
  assert.match(await registry.getSingleMetricAsString("civm_github_api_requests_total"), /actions\/runners",status="304"\} 1/);
});

test("rate limits: a 403 with retry-after (or an exhausted budget) fails at once when civm serve's client may not wait, and marks the budget limited until then", async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const warnings: string[] = [];
  // Throttling on, as in civm serve: before, the plugin slept retry-after (up to an hour) here.
  const client = createOctokit({ token: gh.validToken, baseUrl: gh.url, retries: 0, maxRateLimitWaitSeconds: 0, warn: (m) => warnings.push(m) });
  gh.respondWith(/\/actions\/runners$/, 403, { message: "You have exceeded a secondary rate limit." }, { times: 1, headers: { "retry-after": "3600" } });
  const t0 = Date.now();
  await assert.rejects(listRunners(client, target), /403/);
  assert.ok(Date.now() - t0 < 2000, "no wait");
  const until = client.civm.budget.limited();
  assert.ok(until !== undefined && until > Date.now() + 3500_000, "limited for the hour GitHub asked");
  assert.match(warnings.join("\n"), /secondary rate limit hit .*giving up \(GitHub asks to wait 3600s\)/);

  // The primary limit: remaining 0 → limited until x-ratelimit-reset.
  const other = createOctokit({ token: gh.validToken, baseUrl: gh.url, retries: 0, maxRateLimitWaitSeconds: 0, warn: () => {} });
  gh.setRateLimit({ remaining: 0, resetInSeconds: 120 });
  await assert.rejects(listRunners(other, target), /403 API rate limit exceeded/);
  const reset = other.civm.budget.limited();
  assert.ok(reset !== undefined && Math.abs(reset - (Date.now() + 121_000)) < 3000, `limited until the reset (${reset})`);
  assert.equal(other.civm.budget.remaining, 0);
});
