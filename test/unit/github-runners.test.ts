import { test } from "node:test";
import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { createOctokit } from "../../src/github/client.js";
import { deleteRunner, generateJitConfig, getRunner, listRunners } from "../../src/github/runners.js";
import { listQueuedJobs, targetRepositories } from "../../src/github/jobs.js";
import { createGitHubAccess } from "../../src/github/app-auth.js";
import { ExternalError } from "../../src/errors/index.js";
import { startFakeGitHub, workflowJobPayload, signWebhook } from "../support/fake-github.js";

const org = { kind: "org", org: "rust-lang-ci" } as const;
const repo = { kind: "repo", owner: "rust-lang-ci", repo: "rust" } as const;
const fast = { retries: 0, throttle: false } as const;

test("JIT config, list, get, delete: org and repository forms", async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const client = createOctokit({ ...fast, token: gh.validToken, baseUrl: gh.url });
  for (const target of [org, repo]) {
    const jit = await generateJitConfig(client, target, { name: `runner-${target.kind}`, runnerGroupId: 1, labels: ["self-hosted", "linux"], workFolder: "_work" });
    assert.equal(jit.runnerName, `runner-${target.kind}`);
    assert.ok(jit.encodedJitConfig.length > 10);
    const sent = JSON.parse(gh.requests.at(-1)!.body);
    assert.deepEqual(sent, { name: `runner-${target.kind}`, runner_group_id: 1, labels: ["self-hosted", "linux"], work_folder: "_work" });
    const path = target.kind === "org" ? "/orgs/rust-lang-ci/actions/runners/generate-jitconfig" : "/repos/rust-lang-ci/rust/actions/runners/generate-jitconfig";
    assert.equal(gh.requests.at(-1)!.path, path);
    const listed = await listRunners(client, target);
    assert.deepEqual(listed, [{ id: jit.runnerId, name: `runner-${target.kind}`, status: "offline", busy: false, labels: ["self-hosted", "linux"] }]);
    gh.setRunner(jit.runnerId, { status: "online", busy: true });
    assert.equal((await getRunner(client, target, jit.runnerId))?.busy, true);
    await assert.rejects(deleteRunner(client, target, jit.runnerId), (e) => e instanceof ExternalError && /DELETE .*422/.test(e.message));
    gh.setRunner(jit.runnerId, { busy: false });
    assert.equal(await deleteRunner(client, target, jit.runnerId), true);
    assert.equal(await deleteRunner(client, target, jit.runnerId), false, "already gone");
    assert.equal(await getRunner(client, target, jit.runnerId), undefined);
  }
});

test("a duplicate runner name is refused (409) and the error names the runner, not the config", async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const client = createOctokit({ ...fast, token: gh.validToken, baseUrl: gh.url });
  const req = { name: "dup", runnerGroupId: 1, labels: ["linux"], workFolder: "_work" };
  await generateJitConfig(client, org, req);
  await assert.rejects(generateJitConfig(client, org, req), (e) => e instanceof ExternalError && /generate-jitconfig \(runner dup\) failed: 409/.test(e.message));
});

test("listRunners follows pages", async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const client = createOctokit({ ...fast, token: gh.validToken, baseUrl: gh.url });
  for (let i = 0; i < 130; i++) await generateJitConfig(client, repo, { name: `r-${i}`, runnerGroupId: 1, labels: ["x"], workFolder: "w" });
  const all = await listRunners(client, repo);
  assert.equal(all.length, 130);
  assert.equal(new Set(all.map((r) => r.id)).size, 130);
});

test("queued jobs: from queued and in-progress runs of the target's repositories", async (t) => {
  const gh = await startFakeGitHub({ repos: ["rust-lang-ci/rust", "rust-lang-ci/other"] });
  t.after(() => gh.close());
  const client = createOctokit({ ...fast, token: gh.validToken, baseUrl: gh.url });
  const a = gh.addJob({ repository: "rust-lang-ci/rust", labels: ["self-hosted", "linux"] });
  gh.addJob({ repository: "rust-lang-ci/rust", labels: ["linux"], status: "in_progress", runId: 77 });
  const b = gh.addJob({ repository: "rust-lang-ci/rust", labels: ["arm"], runId: 77 });
  gh.addJob({ repository: "rust-lang-ci/rust", labels: ["linux"], status: "completed" });
  const c = gh.addJob({ repository: "rust-lang-ci/other", labels: ["linux"] });
  assert.deepEqual((await targetRepositories(client, org)).sort(), ["rust-lang-ci/other", "rust-lang-ci/rust"]);
  assert.deepEqual(await targetRepositories(client, repo), ["rust-lang-ci/rust"]);
  const jobs = await listQueuedJobs(client, "rust-lang-ci/rust");
  assert.deepEqual(jobs.map((j) => [j.id, j.labels]).sort(), [[a.id, ["self-hosted", "linux"]], [b.id, ["arm"]]].sort());
  assert.deepEqual((await listQueuedJobs(client, "rust-lang-ci/other")).map((j) => j.id), [c.id]);
});

test("GitHub App: installation found per owner, token created once and reused, refreshed when it expires", async (t) => {
  const { privateKey, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048, publicKeyEncoding: { type: "spki", format: "pem" }, privateKeyEncoding: { type: "pkcs1", format: "pem" } });
  const gh = await startFakeGitHub({ app: { id: 4242, publicKey, installations: { "rust-lang-ci": 99 } } });
  t.after(() => gh.close());
  let clock = Date.now();
  const access = createGitHubAccess({ kind: "app", appId: 4242, privateKey }, { ...fast, baseUrl: gh.url, now: () => clock });
  const client = await access.client(org);
  await generateJitConfig(client, org, { name: "app-1", runnerGroupId: 1, labels: ["x"], workFolder: "w" });
  await listRunners(await access.client(repo), repo);
  await listRunners(client, org);
  const count = (p: RegExp) => gh.requests.filter((r) => p.test(r.path)).length;
  assert.equal(count(/\/installation$/), 1, "installation looked up once per owner");
  assert.equal(count(/access_tokens$/), 1, "one installation token, cached");
  assert.ok(gh.requests.filter((r) => /actions\/runners/.test(r.path)).every((r) => /^token ghs_/.test(String(r.headers.authorization))));
  clock += 50 * 60_000;
  await listRunners(client, org);
  assert.equal(count(/access_tokens$/), 1, "50 minutes on, the token still has 10 to live");
  clock += 6 * 60_000;
  await listRunners(client, org);
  assert.equal(count(/access_tokens$/), 2, "within 5 minutes of expiry, a new token is created first");
  const wrong = createGitHubAccess({ kind: "app", appId: 4242, privateKey }, { ...fast, baseUrl: gh.url });
  await assert.rejects(wrong.client({ kind: "org", org: "elsewhere" }), (e) => e instanceof ExternalError && /installation \(is the GitHub App installed there\?\)/.test(e.message));
});

test("workflow_job payloads come from GitHub's examples; signatures are HMAC-SHA256", async () => {
  const p = (await workflowJobPayload("queued", { id: 5, labels: ["linux"], repository: "o/r" })) as { action: string; workflow_job: { id: number; labels: string[] }; repository: { full_name: string } };
  assert.equal(p.action, "queued");
  assert.equal(p.workflow_job.id, 5);
  assert.deepEqual(p.workflow_job.labels, ["linux"]);
  assert.equal(p.repository.full_name, "o/r");
  // Test vector from GitHub's docs ("Validating webhook deliveries").
  assert.equal(signWebhook("Hello, World!", "It's a Secret to Everybody"), "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17");
});
