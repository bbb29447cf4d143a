import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ConfigError, ExternalError } from "../../src/errors/index.js";
import { preprocessConfig, preprocessInstanceConfig, redact, type JsonValue, type PreprocessOptions } from "../../src/config/index.js";
import { tempDir } from "../support/paths.js";
import { startFakeGitHub } from "../support/fake-github.js";

const WHERE = 'instances.json: instance "vm-1" (#1)';
const SECRET = "s3cr3t-from-env-VALUE";
const FILE_SECRET = "file-secret-CONTENTS";

function options(extra: Partial<PreprocessOptions> = {}): PreprocessOptions {
  const baseDir = tempDir();
  mkdirSync(join(baseDir, "secrets"));
  writeFileSync(join(baseDir, "secrets", "token"), `${FILE_SECRET}\n`);
  writeFileSync(join(baseDir, "two-newlines"), "abcd\n\n");
  return { env: { API_KEY: SECRET, USER_NAME: "runner", EMPTY: "" }, where: WHERE, baseDir, ...extra };
}

async function problems(config: JsonValue, opts = options()): Promise<{ error: Error; lines: string[] }> {
  try {
    await preprocessConfig(config, opts);
  } catch (e) {
    assert.ok(e instanceof Error);
    for (const s of [SECRET, FILE_SECRET, "REGISTRATION"]) assert.ok(!e.message.includes(s), `secret in message: ${e.message}`);
    return { error: e, lines: e.message.split("\n") };
  }
  assert.fail("expected preprocessConfig to fail");
}

test("env: a whole-string expression becomes the variable's value", async () => {
  const r = await preprocessConfig({ key: "${{ env:API_KEY }}", compact: "${{env:API_KEY}}", spaced: "${{  env  :  API_KEY  }}" }, options());
  assert.deepEqual(r.value, { key: SECRET, compact: SECRET, spaced: SECRET });
  assert.deepEqual(r.secrets, [SECRET]);
});

test("file: contents with one trailing newline removed, relative to baseDir", async () => {
  const r = await preprocessConfig({ token: "${{ file:secrets/token }}", two: "${{ file: two-newlines }}" }, options());
  assert.deepEqual(r.value, { token: FILE_SECRET, two: "abcd\n" });
  assert.deepEqual(r.secrets.sort(), ["abcd\n", FILE_SECRET].sort());
});

test("embedded and multiple expressions are substituted in place", async () => {
  const r = await preprocessConfig("user=${{ env:USER_NAME }} key=${{ env:API_KEY }}; again ${{env:USER_NAME}}!", options());
  assert.equal(r.value, `user=runner key=${SECRET}; again runner!`);
  assert.deepEqual(r.secrets.sort(), ["runner", SECRET].sort());
});

test("nested objects and arrays are walked; keys and non-strings are left alone", async () => {
  const config: JsonValue = {
    "${{ env:API_KEY }}": "key stays",
    list: [1, true, null, ["${{ env:USER_NAME }}", { deep: "${{ file:secrets/token }}" }]],
    plain: "no expressions ${ { here } }",
    n: 4,
  };
  const r = await preprocessConfig(config, options());
  assert.deepEqual(r.value, {
    "${{ env:API_KEY }}": "key stays",
    list: [1, true, null, ["runner", { deep: FILE_SECRET }]],
    plain: "no expressions ${ { here } }",
    n: 4,
  });
});

test("the input is not modified and a __proto__ key stays data", async () => {
  const config = JSON.parse('{"a": "${{ env:USER_NAME }}", "__proto__": {"b": "${{ env:USER_NAME }}"}}') as JsonValue;
  const r = await preprocessConfig(config, options());
  assert.deepEqual(config, JSON.parse('{"a": "${{ env:USER_NAME }}", "__proto__": {"b": "${{ env:USER_NAME }}"}}'));
  assert.equal(Object.getPrototypeOf(r.value), Object.prototype);
  assert.deepEqual(Object.getOwnPropertyDescriptor(r.value, "__proto__")?.value, { b: "runner" });
});

test("an empty variable is allowed and is not a secret", async () => {
  const r = await preprocessConfig({ e: "${{ env:EMPTY }}" }, options());
  assert.deepEqual(r.value, { e: "" });
  assert.deepEqual(r.secrets, []);
});

test("missing variable: ConfigError naming file, instance and JSON path", async () => {
  const { error, lines } = await problems({ a: { b: ["x", "${{ env:NOPE }}"] } });
  assert.ok(error instanceof ConfigError);
  assert.deepEqual(lines, [`${WHERE}: config.a.b[1]: environment variable NOPE is not set; export it before running civm.`]);
});

test("missing file: names the resolved path and reason", async () => {
  const opts = options();
  const { lines } = await problems({ "odd key": "${{ file:nope.txt }}" }, opts);
  assert.deepEqual(lines, [
    `${WHERE}: config["odd key"]: file: cannot read ${join(opts.baseDir, "nope.txt")} (no such file); relative paths start from ${opts.baseDir}.`,
  ]);
});

test("unknown function lists the known ones and suggests", async () => {
  const { lines } = await problems({ a: "${{ evn:API_KEY }}", b: "${{ vault:x }}" });
  assert.deepEqual(lines, [
    `${WHERE}: config.a: unknown function "evn"; the known functions are env, file, gha-install-token. Did you mean "env"?`,
    `${WHERE}: config.b: unknown function "vault"; the known functions are env, file, gha-install-token.`,
  ]);
});

test("syntax errors: no colon, no function, unclosed, empty argument", async () => {
  const { error, lines } = await problems({
    a: "${{ env }}",
    b: `prefix \${{ ${SECRET} }}`,
    c: "${{ env:API_KEY",
    d: "${{ env:API_KEY ${{ env:USER_NAME }}",
    e: "${{ file: }}",
  });
  assert.ok(error instanceof ConfigError);
  assert.deepEqual(lines, [
    `${WHERE}: config.a: "env" needs an argument after a colon: \${{ env:NAME }}.`,
    `${WHERE}: config.b: an expression has no "FUNCTION:" prefix; write \${{ FUNCTION:ARGS }} with FUNCTION one of env, file, gha-install-token.`,
    `${WHERE}: config.c: "\${{" is not closed by "}}"; write \${{ FUNCTION:ARGS }} with FUNCTION one of env, file, gha-install-token.`,
    `${WHERE}: config.d: "\${{" is not closed by "}}"; write \${{ FUNCTION:ARGS }} with FUNCTION one of env, file, gha-install-token.`,
    `${WHERE}: config.e: "file" needs an argument: \${{ file:PATH }}.`,
  ]);
});

test("all problems are collected, and GitHub is not called when any exist", async () => {
  let calls = 0;
  const fetcher = async () => {
    calls++;
    return "REGISTRATION";
  };
  const { lines } = await problems(
    { t: "${{ gha-install-token:rust-lang-ci/rust }}", a: "${{ env:NOPE }}", b: "${{ gha-install-token:not a repo }}", c: "${{ nope:x }}" },
    options({ githubTokenFetcher: fetcher }),
  );
  assert.equal(lines.length, 3);
  assert.match(lines[1] ?? "", /config\.b: gha-install-token: "not a repo" is not a GitHub repository or organization; write OWNER\/REPO/);
  assert.equal(calls, 0);
});

test("gha-install-token uses the fetcher once per target, and the token is a secret", async () => {
  const asked: string[] = [];
  const fetcher = async (target: string) => {
    asked.push(target);
    return `REGISTRATION-${target}`;
  };
  const r = await preprocessConfig(
    { token: "${{ gha-install-token:rust-lang-ci/rust }}", again: "${{gha-install-token:rust-lang-ci/rust}}", org: "${{ gha-install-token: rust-lang-ci }}" },
    options({ githubTokenFetcher: fetcher }),
  );
  assert.deepEqual(asked.sort(), ["rust-lang-ci", "rust-lang-ci/rust"]);
  assert.deepEqual(r.value, { token: "REGISTRATION-rust-lang-ci/rust", again: "REGISTRATION-rust-lang-ci/rust", org: "REGISTRATION-rust-lang-ci" });
  assert.deepEqual(r.secrets.sort(), ["REGISTRATION-rust-lang-ci", "REGISTRATION-rust-lang-ci/rust"]);
});

test("gha-install-token against the fake GitHub through GITHUB_TOKEN and GITHUB_API_URL", async () => {
  const gh = await startFakeGitHub({ token: "ghp_fakeForPreprocess1234" });
  try {
    gh.registrationToken = "REGISTRATION-FROM-FAKE";
    const opts = options({ env: { GITHUB_TOKEN: "ghp_fakeForPreprocess1234", GITHUB_API_URL: gh.url } });
    const r = await preprocessConfig({ repo: "rust-lang-ci/rust", token: "${{ gha-install-token:rust-lang-ci/rust }}" }, opts);
    assert.deepEqual(r.value, { repo: "rust-lang-ci/rust", token: "REGISTRATION-FROM-FAKE" });
    assert.deepEqual(r.secrets, ["REGISTRATION-FROM-FAKE"]);
    assert.equal(gh.requests.length, 1);

    const bad = options({ env: { GITHUB_TOKEN: "ghp_wrongForPreprocess99", GITHUB_API_URL: gh.url } });
    const { error, lines } = await problems({ token: "${{ gha-install-token:rust-lang-ci/rust }}" }, bad);
    assert.ok(error instanceof ExternalError);
    assert.equal(lines.length, 1);
    assert.match(lines[0] ?? "", /^instances\.json: instance "vm-1" \(#1\): config\.token: GitHub rejected GITHUB_TOKEN \(401 Bad credentials\)/);
    assert.ok(!error.message.includes("ghp_wrongForPreprocess99"));
  } finally {
    await gh.close();
  }
});

test("a missing GITHUB_TOKEN is a ConfigError naming the value's path", async () => {
  const { error, lines } = await problems({ runner: { token: "${{ gha-install-token:rust-lang-ci/rust }}" } }, options({ env: {} }));
  assert.ok(error instanceof ConfigError);
  assert.match(lines[0] ?? "", /^instances\.json: instance "vm-1" \(#1\): config\.runner\.token: GITHUB_TOKEN is not set/);
});

test("a fetcher failure that echoes a resolved value is redacted", async () => {
  const fetcher = async () => {
    throw new ExternalError(`boom ${SECRET}`);
  };
  const opts = options({ githubTokenFetcher: fetcher });
  const { error } = await problems({ a: "${{ env:API_KEY }}", t: "${{ gha-install-token:o/r }}" }, opts);
  assert.ok(error instanceof ExternalError);
  assert.equal(error.message, `${WHERE}: config.t: boom ***`);
});

test("preprocessInstanceConfig names the instance and resolves files from its folder", async () => {
  const dir = tempDir();
  writeFileSync(join(dir, "pw"), "hunter22\n");
  const spec = {
    name: "vm-1",
    config: { pw: "${{ file:pw }}", missing: "${{ env:NOPE }}" },
    source: { file: join(dir, "instances.json"), index: 0, baseDir: dir },
  };
  await assert.rejects(
    preprocessInstanceConfig(spec as never, { env: {} }),
    (e: Error) => e.message === `${join(dir, "instances.json")}: instance "vm-1" (#1): config.missing: environment variable NOPE is not set; export it before running civm.`,
  );
  const ok = await preprocessInstanceConfig({ ...spec, config: { pw: "${{ file:pw }}" } } as never, { env: {} });
  assert.deepEqual(ok.value, { pw: "hunter22" });
});

test("redact replaces every occurrence of secrets of 4+ characters, longest first", () => {
  assert.equal(redact("a=abcd b=abcdef abcd", ["abcd", "abcdef"]), "a=*** b=*** ***");
  assert.equal(redact("short abc stays", ["abc", ""]), "short abc stays");
  const key = "-----BEGIN KEY-----\nAAAAverysecretline\n-----END KEY-----";
  assert.equal(redact(`log: AAAAverysecretline`, [key]), "log: ***");
  assert.equal(redact(`whole ${key} done`, [key]), "whole *** done");
});
