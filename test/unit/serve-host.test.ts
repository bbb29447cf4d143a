// `civm serve` as a real process against host problems: a port in use, a second daemon on
// the same state dir (refused by the serve lock, which kill -9 releases), a state dir that
// is a file, and the CLI's exit codes for bad flags and YAML alias bombs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer, type AddressInfo } from "node:net";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { startFakeGitHub } from "../support/fake-github.js";
import { civmEnv, runCivm, type CivmEnv } from "../support/civm-cli.js";
import { killAfter, spawnServe } from "../support/serve-harness.js";

function serveConfig(e: CivmEnv, githubUrl: string, token: string, listen: string, extra: Record<string, unknown> = {}): string {
  const disk = join(e.root, "runner.img");
  writeFileSync(disk, "not booted: minRunners 0 and no jobs");
  const file = join(e.root, `serve-${listen.replace(/\W/g, "_")}.json`);
  writeFileSync(
    file,
    JSON.stringify({
      listen,
      github: { apiUrl: githubUrl, token },
      webhookSecret: "hook-secret-for-host-test",
      apiToken: "api-token-for-host-test",
      pools: [{ name: "linux", maxRunners: 1, runner: { image: disk, repository: "rust-lang-ci/rust", labels: ["linux"] } }],
      ...extra,
    }),
  );
  return file;
}

const noStack = (stderr: string) => assert.doesNotMatch(stderr, /^\s+at /m, `a stack trace:\n${stderr}`);

test("civm serve: a port in use is a clear error and exit 8, no stack trace", { timeout: 60_000 }, async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const taken = createServer();
  await new Promise<void>((r) => taken.listen(0, "127.0.0.1", r));
  t.after(() => taken.close());
  const port = (taken.address() as AddressInfo).port;
  const e = civmEnv();
  const r = await runCivm(["serve", "--config", serveConfig(e, gh.url, gh.validToken, `127.0.0.1:${port}`), "--accel", "tcg"], e);
  assert.equal(r.code, 8, r.stderr);
  assert.match(r.stderr, new RegExp(`civm: error: cannot listen on 127\\.0\\.0\\.1:${port} \\("listen"\\): the port is already in use`));
  noStack(r.stderr);
});

test("civm serve: a second daemon on the same state dir is refused (exit 8) while the first runs; kill -9 releases the lock", { timeout: 90_000 }, async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const e = civmEnv();
  const cfg = serveConfig(e, gh.url, gh.validToken, "127.0.0.1:0");
  const first = spawnServe(["--config", cfg, "--accel", "tcg"], e);
  killAfter(t, first);
  await first.listening();
  const second = await runCivm(["serve", "--config", cfg, "--accel", "tcg"], e);
  assert.equal(second.code, 8, second.stderr);
  assert.match(second.stderr, new RegExp(`another civm serve \\(pid ${first.child.pid}\\) is using the state dir ${e.stateDir.replace(/[.]/g, "\\.")}`));
  noStack(second.stderr);
  assert.equal(first.child.exitCode, null, "the first daemon keeps running");

  first.child.kill("SIGKILL");
  await first.done;
  // After kill -9 of the lock holder, the lock is free again.
  const third = spawnServe(["--config", cfg, "--accel", "tcg"], e);
  killAfter(t, third);
  await third.listening();
  third.child.kill("SIGKILL");
  await third.done;
});

test("exit codes: a state dir that is a file is 8, a bad --api-url 2, a YAML alias bomb 2", { timeout: 60_000 }, async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const e = civmEnv();
  const asFile = join(e.root, "a-file");
  writeFileSync(asFile, "");
  const cfg = serveConfig(e, gh.url, gh.validToken, "127.0.0.1:0");
  const serve = await runCivm(["--state-dir", asFile, "serve", "--config", cfg, "--accel", "tcg"], e);
  assert.equal(serve.code, 8, serve.stderr);
  assert.match(serve.stderr, /cannot use the state dir .*a-file: it \(or a folder above it\) is a file, not a directory/);
  const images = await runCivm(["--state-dir", asFile, "image", "ls"], e);
  assert.equal(images.code, 8, images.stderr);
  assert.doesNotMatch(images.stderr, /internal error/);

  const vms = await runCivm(["vms", "--api-url", "notaurl", "--api-token", "x"], e);
  assert.equal(vms.code, 2, vms.stderr);
  assert.match(vms.stderr, /--api-url \/ CIVM_API_URL must be an http\(s\) URL/);

  const bomb = join(e.root, "bomb.yaml");
  const rows = ["a: &a [x, x, x, x, x, x, x, x, x]"];
  for (const [n, p] of [["b", "a"], ["c", "b"], ["d", "c"], ["e", "d"], ["f", "e"], ["g", "f"]]) rows.push(`${n}: &${n} [${Array(9).fill(`*${p}`).join(", ")}]`);
  writeFileSync(bomb, rows.join("\n") + "\n");
  const check = await runCivm(["config", "check", bomb], e);
  assert.equal(check.code, 2, check.stderr);
  assert.match(check.stderr, /bomb\.yaml:1:1: .*aliases/);
  noStack(check.stderr);
});
