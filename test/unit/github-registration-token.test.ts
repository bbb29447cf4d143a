import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { ConfigError, ExternalError } from "../../src/errors/index.js";
import { fetchRegistrationToken, githubApiUrl, parseRunnerTarget } from "../../src/github/index.js";
import { startFakeGitHub, type FakeGitHub } from "../support/fake-github.js";

const TOKEN = "ghp_fakeTestToken0123456789";
/** No 1 s spacing of writes, 1 ms retry delays: fast tests. */
const clientOptions = { throttle: false, retryBaseMs: 1 };

async function withFake(fn: (gh: FakeGitHub, env: NodeJS.ProcessEnv) => Promise<void>): Promise<void> {
  const gh = await startFakeGitHub({ token: TOKEN });
  try {
    await fn(gh, { GITHUB_TOKEN: TOKEN, GITHUB_API_URL: gh.url });
  } finally {
    await gh.close();
  }
}

async function failure(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof Error);
    assert.ok(!e.message.includes(TOKEN), `token leaked: ${e.message}`);
    return e;
  }
  assert.fail("expected a failure");
}

/** A port on which nothing listens. */
async function closedPort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

test("repository token: POST to the repo endpoint with the token in the authorization header", () =>
  withFake(async (gh, env) => {
    gh.registrationToken = "REGTOKEN-REPO-1";
    assert.equal(await fetchRegistrationToken("rust-lang-ci/rust", { env, clientOptions }), "REGTOKEN-REPO-1");
    assert.equal(gh.requests.length, 1);
    const [req] = gh.requests;
    assert.equal(req?.method, "POST");
    assert.equal(req?.path, "/repos/rust-lang-ci/rust/actions/runners/registration-token");
    assert.equal(req?.headers.authorization, `token ${TOKEN}`);
    assert.equal(gh.state.issued["rust-lang-ci/rust"], 1);
  }));

test("organization token: POST to the org endpoint", () =>
  withFake(async (gh, env) => {
    assert.equal(await fetchRegistrationToken("rust-lang-ci", { env, clientOptions }), gh.registrationToken);
    assert.equal(gh.requests[0]?.method, "POST");
    assert.equal(gh.requests[0]?.path, "/orgs/rust-lang-ci/actions/runners/registration-token");
  }));

test("missing GITHUB_TOKEN is a ConfigError saying what to export, without calling GitHub", () =>
  withFake(async (gh, env) => {
    const e = await failure(fetchRegistrationToken("rust-lang-ci/rust", { env: { GITHUB_API_URL: env.GITHUB_API_URL } }));
    assert.ok(e instanceof ConfigError);
    assert.match(e.message, /^GITHUB_TOKEN is not set, so civm cannot get a runner registration token for the repository rust-lang-ci\/rust: export GITHUB_TOKEN with a token that can administer its self-hosted runners/);
    const org = await failure(fetchRegistrationToken("rust-lang-ci", { env: { GITHUB_TOKEN: " " } }));
    assert.match(org.message, /organization rust-lang-ci: .*"admin:org" scope/);
    assert.equal(gh.requests.length, 0);
  }));

test("401: GitHub rejected GITHUB_TOKEN, naming the path, once (no retries)", () =>
  withFake(async (gh, env) => {
    const e = await failure(fetchRegistrationToken("rust-lang-ci/rust", { env: { ...env, GITHUB_TOKEN: "ghp_wrongWrongWrong" }, clientOptions }));
    assert.ok(e instanceof ExternalError);
    assert.equal(e.exitCode, 7);
    assert.equal(
      e.message,
      "GitHub rejected GITHUB_TOKEN (401 Bad credentials) at POST /repos/rust-lang-ci/rust/actions/runners/registration-token: the token is wrong, expired or revoked; export a valid one.",
    );
    assert.ok(!e.message.includes("ghp_wrongWrongWrong"));
    assert.equal(gh.requests.length, 1);
  }));

test("404: repository or organization not found or not visible", () =>
  withFake(async (gh, env) => {
    const repo = await failure(fetchRegistrationToken("octo/missing", { env, clientOptions }));
    assert.ok(repo instanceof ExternalError);
    assert.match(repo.message, /^Repository octo\/missing not found or the token cannot see it \(404 at POST \/repos\/octo\/missing\/actions\/runners\/registration-token\)/);
    const org = await failure(fetchRegistrationToken("nobody", { env, clientOptions }));
    assert.match(org.message, /^Organization nobody not found or the token cannot see it/);
    assert.equal(gh.requests.length, 2);
  }));

test("403: explains the permission the token needs", () =>
  withFake(async (gh, env) => {
    gh.respondWith(/registration-token$/, 403, { message: "Resource not accessible by personal access token" });
    const e = await failure(fetchRegistrationToken("rust-lang-ci/rust", { env, clientOptions }));
    assert.ok(e instanceof ExternalError);
    assert.match(e.message, /^GitHub refused POST \/repos\/rust-lang-ci\/rust\/actions\/runners\/registration-token \(403 Forbidden\): GITHUB_TOKEN lacks permission to manage self-hosted runners of the repository rust-lang-ci\/rust; a classic token needs the "repo" scope/);
  }));

test("an exhausted rate limit says so instead of blaming permissions", () =>
  withFake(async (gh, env) => {
    gh.respondWith(/registration-token$/, 403, { message: "API rate limit exceeded" }, { headers: { "x-ratelimit-remaining": "0" } });
    const e = await failure(fetchRegistrationToken("rust-lang-ci/rust", { env, clientOptions }));
    assert.ok(e instanceof ExternalError);
    assert.match(e.message, /^GitHub API rate limit exhausted at POST \/repos\/rust-lang-ci\/rust\/actions\/runners\/registration-token \(403\); wait until it resets/);
  }));

test("with throttling on (the default), a token is fetched too", () =>
  withFake(async (gh, env) => {
    assert.equal(await fetchRegistrationToken("rust-lang-ci/rust", { env }), gh.registrationToken);
  }));

test("5xx is retried, then succeeds", () =>
  withFake(async (gh, env) => {
    gh.respondWith(/registration-token$/, 502, { message: "Bad Gateway" }, { times: 1 });
    assert.equal(await fetchRegistrationToken("rust-lang-ci/rust", { env, clientOptions }), gh.registrationToken);
    assert.equal(gh.requests.length, 2);
  }));

test("connection refused: could not reach GitHub API at the base URL", async () => {
  const url = `http://127.0.0.1:${await closedPort()}`;
  const e = await failure(fetchRegistrationToken("rust-lang-ci/rust", { env: { GITHUB_TOKEN: TOKEN, GITHUB_API_URL: url }, clientOptions }));
  assert.ok(e instanceof ExternalError);
  assert.match(e.message, new RegExp(`^could not reach GitHub API at ${url.replace(/\./g, "\\.")}: .*ECONNREFUSED`));
});

test("bad targets are ConfigErrors; good ones parse", () => {
  assert.deepEqual(parseRunnerTarget("rust-lang-ci/rust"), { kind: "repo", owner: "rust-lang-ci", repo: "rust" });
  assert.deepEqual(parseRunnerTarget("rust-lang-ci"), { kind: "org", org: "rust-lang-ci" });
  for (const bad of ["", "a/b/c", "a b", "/rust"]) {
    assert.throws(() => parseRunnerTarget(bad), (e: Error) => e instanceof ConfigError && /write OWNER\/REPO/.test(e.message));
  }
});

test("GITHUB_API_URL defaults to api.github.com and loses trailing slashes", () => {
  assert.equal(githubApiUrl({}), "https://api.github.com");
  assert.equal(githubApiUrl({ GITHUB_API_URL: "https://ghe.example/api/v3/" }), "https://ghe.example/api/v3");
});

test("fake GitHub accepts Bearer credentials too", () =>
  withFake(async (gh) => {
    assert.equal(gh.validToken, TOKEN);
    const res = await fetch(`${gh.url}/orgs/rust-lang-ci/actions/runners/registration-token`, {
      method: "POST",
      headers: { authorization: `Bearer ${gh.validToken}` },
    });
    assert.equal(res.status, 201);
    const body = (await res.json()) as { token: string; expires_at: string };
    assert.equal(body.token, gh.registrationToken);
    assert.ok(!Number.isNaN(Date.parse(body.expires_at)));
  }));
