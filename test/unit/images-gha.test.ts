// githubRunner and sudo in image specs, the built-in civm-gha, and the build's download cache
// (sha256-verified, on the host) against a local HTTP server.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, readdirSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { ConfigError, ExternalError } from "../../src/errors/index.js";
import { computeCacheKey } from "../../src/images/cache-key.js";
import { runnerInstallScript, sudoScript } from "../../src/images/build.js";
import { cachedPath, ensureVerifiedFile } from "../../src/images/download.js";
import { githubRunnerReleaseUrl, loadBuiltinImageSpecs, loadImageSpecs } from "../../src/images/spec.js";
import { tempDir } from "../support/paths.js";
import { specLoadError } from "../support/image-specs.js";

const OPTS = { defaultMirror: "http://mirror.test.invalid/debian" };
const SHA = "ab".repeat(32);

function specFile(images: unknown[]): { file: string; dir: string } {
  const dir = tempDir("civm-gha-spec-");
  const file = join(dir, "images.json");
  writeFileSync(file, JSON.stringify(images));
  return { file, dir };
}

function configError(file: string): Promise<string> {
  return specLoadError(file, OPTS);
}

test("githubRunner: url defaults to GitHub's release asset; sha256 is lowercased; a host path is resolved and must exist", async () => {
  const { file, dir } = specFile([
    { name: "a", githubRunner: { version: "2.321.0", sha256: SHA.toUpperCase() }, sudo: true },
    { name: "b", parent: "a", githubRunner: { version: "2.321.0", sha256: SHA, url: "runner.tar.gz" }, sudo: false },
  ]);
  writeFileSync(join(dir, "runner.tar.gz"), "x");
  const { images } = await loadImageSpecs(file, OPTS);
  const [a, b] = images;
  assert.deepEqual(a!.githubRunner, { version: "2.321.0", sha256: SHA, url: githubRunnerReleaseUrl("2.321.0") });
  assert.equal(a!.githubRunner!.url, "https://github.com/actions/runner/releases/download/v2.321.0/actions-runner-linux-x64-2.321.0.tar.gz");
  assert.equal(a!.sudo, true);
  assert.equal(b!.githubRunner!.localPath, join(dir, "runner.tar.gz"));
  assert.equal(b!.sudo, false);
});

test("githubRunner: bad version, sha256, url or keys are named with the field and how to fix them", async () => {
  const { file } = specFile([
    { name: "a", githubRunner: { version: "v2.321.0", sha256: "abc", url: "ftp://x/y" } },
    { name: "b", githubRunner: { version: "2.321.0", sha256: SHA, url: "missing.tar.gz" } },
    { name: "c", githubRunner: { version: "2.321.0", sha: SHA } },
    { name: "d", sudo: "yes" },
    { name: "e", runner: {} },
  ]);
  const msg = await configError(file);
  assert.match(msg, /image "a" \(#1\): field "githubRunner\.version": must be a release version such as "2\.321\.0"/);
  assert.match(msg, /image "a" \(#1\): field "githubRunner\.sha256": must be the release asset's sha256: 64 hex digits/);
  assert.match(msg, /image "b" \(#2\): field "githubRunner\.url": the runner archive .*missing\.tar\.gz does not exist/);
  assert.match(msg, /image "c" \(#3\): field "githubRunner.*unknown key "sha"/);
  assert.match(msg, /image "d" \(#4\): field "sudo": must be true/);
  assert.match(msg, /image "e" \(#5\): field "runner": unknown key; did you mean "githubRunner"\?/);
});

test("the built-in civm-gha is a child of civm-runner with a pinned runner and sudo", async () => {
  const builtins = await loadBuiltinImageSpecs(OPTS);
  const gha = builtins.find((i) => i.name === "civm-gha");
  assert.ok(gha, "civm-gha is built in");
  assert.equal(gha.parent, "civm-runner");
  assert.match(gha.githubRunner!.sha256, /^[0-9a-f]{64}$/);
  assert.match(gha.githubRunner!.url, /^https:\/\/github\.com\/actions\/runner\/releases\/download\/v/);
  assert.equal(gha.sudo, true);
  for (const p of ["docker.io", "containerd", "runc", "git", "git-lfs", "build-essential", "python3-venv", "libicu72", "liblttng-ust1"]) assert.ok(gha.packages.includes(p), p);
});

test("cache key: the runner's sha256 and sudo change it, its url does not; images without them keep their keys", () => {
  const base = { name: "x", suite: "bookworm", mirror: "m", packages: [], sizeBytes: 1, format: "qcow2" as const, flatten: false, actions: [], source: { file: "f", baseDir: "/", index: 0, lvh: false, builtin: false } };
  const key = (over: object) => computeCacheKey({ spec: { ...base, ...over }, fileHashes: {}, agentVersion: "1" });
  const gr = { version: "2.321.0", sha256: SHA, url: "https://a/x.tar.gz" };
  assert.equal(key({}), key({ githubRunner: undefined, sudo: undefined }));
  assert.notEqual(key({ githubRunner: gr }), key({}));
  assert.equal(key({ githubRunner: gr }), key({ githubRunner: { ...gr, url: "/mirror/x.tar.gz", localPath: "/mirror/x.tar.gz" } }));
  assert.notEqual(key({ githubRunner: gr }), key({ githubRunner: { ...gr, sha256: "cd".repeat(32) } }));
  assert.notEqual(key({ sudo: true }), key({ sudo: false }));
});

test("the runner is unpacked as the runner user and its layout checked; sudo true/false", () => {
  const s = runnerInstallScript("2.321.0", "/run/civm-build/github-runner.tar.gz").join("\n");
  assert.match(s, /runuser -u runner -- tar -xzf - -C "\$d" < \/run\/civm-build\/github-runner\.tar\.gz/);
  assert.match(s, /config\.sh run\.sh bin\/Runner\.Listener/);
  assert.match(sudoScript(true).join("\n"), /runner ALL=\(ALL:ALL\) NOPASSWD: ALL/);
  assert.match(sudoScript(true).join("\n"), /visudo -cqf/);
  assert.match(sudoScript(false).join("\n"), /rm -f \/etc\/sudoers\.d\/civm-runner/);
});

test("download cache: fetched once and verified, reused without a request, a wrong digest stores nothing", async (t) => {
  const data = Buffer.from("fake runner archive\n".repeat(1000));
  const sha = createHash("sha256").update(data).digest("hex");
  let requests = 0;
  const srv = createServer((req, res) => {
    requests++;
    if (req.url === "/runner.tar.gz") res.end(data);
    else res.writeHead(404).end();
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  t.after(() => srv.close());
  const url = `http://127.0.0.1:${(srv.address() as AddressInfo).port}/runner.tar.gz`;
  const cacheDir = join(tempDir("civm-downloads-"), "downloads");
  const lines: string[] = [];
  const o = { url, sha256: sha, cacheDir, where: 'images.yaml: image "g" (#1): field "githubRunner"', log: (l: string) => lines.push(l) };

  const first = await ensureVerifiedFile(o);
  assert.equal(first.downloaded, true);
  assert.equal(first.path, cachedPath(cacheDir, sha));
  assert.equal(requests, 1);
  const second = await ensureVerifiedFile(o);
  assert.equal(second.downloaded, false);
  assert.equal(requests, 1, "the second use makes no request");

  const wrong = "0".repeat(64);
  await assert.rejects(ensureVerifiedFile({ ...o, sha256: wrong }), (e: unknown) => {
    assert.ok(e instanceof ConfigError);
    assert.match(e.message, new RegExp(`field "githubRunner": ${url.replace(/[.]/g, "\\.")} has sha256 ${sha}, but the spec pins ${wrong}\\. Nothing was stored`));
    return true;
  });
  assert.deepEqual(readdirSync(cacheDir), [`sha256-${sha}`], "nothing stored for the wrong digest, no temp file left");

  await assert.rejects(ensureVerifiedFile({ ...o, url: url.replace("runner", "nope"), sha256: wrong }), (e: unknown) => e instanceof ExternalError && /HTTP 404/.test(e.message));

  // A host path (offline hosts) goes through the same check.
  const local = join(tempDir("civm-local-"), "r.tar.gz");
  writeFileSync(local, "other bytes");
  const localSha = createHash("sha256").update("other bytes").digest("hex");
  const got = await ensureVerifiedFile({ ...o, sha256: localSha, localPath: local });
  assert.equal(got.downloaded, true);
  assert.ok(existsSync(cachedPath(cacheDir, localSha)));
  assert.equal(requests, 3);
});
