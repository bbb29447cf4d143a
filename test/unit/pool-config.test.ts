import { test } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ConfigError } from "../../src/errors/index.js";
import { loadServeConfig, parseDuration, parseListen, SERVE_DEFAULTS, type LoadServeOptions } from "../../src/pool/config.js";
import { repoRoot, tempDir } from "../support/paths.js";

const KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAsecretkeymaterial0123456789\n-----END RSA PRIVATE KEY-----\n";
const MiB = 1024 ** 2;

interface Setup {
  dir: string;
  file: string;
  stateDir: string;
}

/** ROOT/serve.yaml (or .json), ROOT/key.pem, ROOT/disk.qcow2, ROOT/state with a stored image "runner-img". */
function setup(config: unknown, name = "serve.json"): Setup {
  const dir = tempDir();
  writeFileSync(join(dir, "key.pem"), KEY);
  writeFileSync(join(dir, "disk.qcow2"), "");
  const stateDir = join(dir, "state");
  const img = join(stateDir, "images", "runner-img");
  mkdirSync(img, { recursive: true });
  writeFileSync(join(img, "disk.qcow2"), "");
  const manifest = { name: "runner-img", key: "k", format: "qcow2", disk: "disk.qcow2", sha256: "0".repeat(64), diskBytes: 0, virtualSize: 1 };
  writeFileSync(join(img, "manifest.json"), JSON.stringify(manifest));
  const file = join(dir, name);
  writeFileSync(file, typeof config === "string" ? config : JSON.stringify(config, null, 2));
  return { dir, file, stateDir };
}

function pool(extra: Record<string, unknown> = {}, runner: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    name: "default",
    maxRunners: 4,
    minRunners: 1,
    runner: { image: "runner-img", organization: "acme", labels: ["linux"], ...runner },
    ...extra,
  };
}

function serve(pools: unknown, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { github: { appId: 123456, privateKeyFile: "key.pem" }, webhookSecret: "whsec-0123456789", apiToken: "api-token-abcdef", pools, ...extra };
}

async function load(s: Setup, opts: LoadServeOptions = {}) {
  return loadServeConfig(s.file, { env: {}, stateDir: s.stateDir, ...opts });
}

async function problems(s: Setup, opts: LoadServeOptions = {}): Promise<string> {
  try {
    await load(s, opts);
  } catch (e) {
    assert.ok(e instanceof ConfigError, `a ConfigError, got ${String(e)}`);
    return e.message;
  }
  assert.fail("expected loadServeConfig to fail");
}

test("seed 003's example pools.json maps field by field onto civm's pool settings", async () => {
  const s = setup(serve("pools.json"));
  copyFileSync(join(repoRoot, "test", "fixtures", "pools", "seed-003-pools.json"), join(s.dir, "pools.json"));
  const c = await load(s, { checkImages: false });
  assert.equal(c.pools.length, 1);
  const p = c.pools[0]!;
  assert.equal(p.name, "default");
  assert.equal(p.maxRunners, 10);
  assert.equal(p.minRunners, 1);
  assert.equal(p.runner.namePrefix, "runner");
  assert.deepEqual(p.runner.image, { ref: "ghcr.io/thpham/fireactions-images/ubuntu-24.04:latest", kind: "oci" });
  assert.equal(p.runner.imagePullPolicy, "IfNotPresent");
  assert.deepEqual(p.runner.target, { kind: "org", org: "your-org" });
  assert.deepEqual(p.runner.labels, ["self-hosted", "fireactions", "linux"]);
  assert.equal(p.runner.groupId, 1);
  assert.equal(p.runner.registration, "jit");
  assert.deepEqual(p.vm, { cpus: 2, ramBytes: 4096 * MiB, rootDiskBytes: undefined, timeoutSeconds: SERVE_DEFAULTS.timeoutSeconds, cmdline: "console=ttyS0 reboot=k panic=1 pci=off", network: { mode: "restricted", allow: [] } });
  assert.equal(p.idleTimeoutSeconds, 300);
  assert.equal(c.poolsFile, join(s.dir, "pools.json"));
});

test("seed 003's example: its image is an OCI reference, accepted (pulled on first use); with imagePullPolicy Never it must be pulled already; a registry-less one is explained", async () => {
  const s = setup(serve("pools.json"));
  copyFileSync(join(repoRoot, "test", "fixtures", "pools", "seed-003-pools.json"), join(s.dir, "pools.json"));
  const c = await load(s);
  assert.equal(c.pools[0]!.runner.image.kind, "oci");
  const pools = JSON.parse(readFileSync(join(s.dir, "pools.json"), "utf8"));
  pools[0].runner.imagePullPolicy = "Never";
  writeFileSync(join(s.dir, "pools.json"), JSON.stringify(pools));
  assert.match(await problems(s), /pools\.json: pool "default" \(#1\): "runner\.image" "ghcr\.io\/thpham\/fireactions-images\/ubuntu-24\.04:latest" has not been pulled and "runner\.imagePullPolicy" is "Never"; pull it first \(civm image pull ghcr\.io/);
  pools[0].runner.imagePullPolicy = "IfNotPresent";
  pools[0].runner.image = "thpham/ubuntu:latest";
  writeFileSync(join(s.dir, "pools.json"), JSON.stringify(pools));
  assert.match(await problems(s), /"runner\.image" "thpham\/ubuntu:latest" looks like a container image, but not like a reference civm pulls: those start with the registry .*docker\.io\/thpham\/ubuntu:latest/);
});

test("seed 003's example with a stored civm image loads completely", async () => {
  const s = setup(serve("pools.json"));
  const pools = JSON.parse(JSON.stringify(await import("node:fs").then((fs) => JSON.parse(fs.readFileSync(join(repoRoot, "test/fixtures/pools/seed-003-pools.json"), "utf8")))));
  pools[0].runner.image = "runner-img";
  writeFileSync(join(s.dir, "pools.json"), JSON.stringify(pools));
  const c = await load(s);
  assert.deepEqual(c.pools[0]!.runner.image, { ref: "runner-img", kind: "stored" });
  assert.equal(c.github.auth.kind, "app");
  assert.equal(c.github.apiUrl, "https://api.github.com");
  assert.deepEqual(c.listen, { host: "127.0.0.1", port: 8080 });
  assert.equal(c.pollIntervalSeconds, 60);
  assert.equal(c.maxWebhookBytes, MiB);
});

test("the issue's YAML example with secrets from env: and file:, pools inline", async () => {
  const yaml = `
listen: 127.0.0.1:9090
stateDir: ./state
github:
  apiUrl: http://127.0.0.1:1234/
  appId: 123456
  privateKeyFile: key.pem
webhookSecret: \${{ file:secret.txt }}
apiToken: \${{ env:CIVM_API_TOKEN }}
pollInterval: 2m
pools:
  - name: small
    maxRunners: 3
    minRunners: 0
    idleTimeout: 90s
    cpus: 1
    ram: 1G
    disk: 20G
    timeout-seconds: 600
    runnerGroup: 7
    runner: { image: disk.qcow2, repository: acme/app, labels: [Linux, small] }
`;
  const s = setup(yaml, "serve.yaml");
  writeFileSync(join(s.dir, "secret.txt"), "webhook-secret-value\n");
  const c = await loadServeConfig(s.file, { env: { CIVM_API_TOKEN: "tok-from-env-123" } });
  assert.equal(c.webhookSecret, "webhook-secret-value");
  assert.equal(c.apiToken, "tok-from-env-123");
  assert.deepEqual(c.listen, { host: "127.0.0.1", port: 9090 });
  assert.equal(c.stateDir, join(s.dir, "state"));
  assert.equal(c.github.apiUrl, "http://127.0.0.1:1234");
  assert.equal(c.pollIntervalSeconds, 120);
  const p = c.pools[0]!;
  assert.deepEqual(p.runner.target, { kind: "repo", owner: "acme", repo: "app" });
  assert.deepEqual(p.runner.image, { ref: "disk.qcow2", kind: "path", path: join(s.dir, "disk.qcow2") });
  assert.equal(p.runner.namePrefix, "small");
  assert.equal(p.runner.groupId, 7);
  assert.deepEqual(p.vm, { cpus: 1, ramBytes: 1024 * MiB, rootDiskBytes: 20 * 1024 * MiB, timeoutSeconds: 600, cmdline: undefined, network: { mode: "restricted", allow: [] } });
  assert.equal(p.idleTimeoutSeconds, 90);
  for (const secret of ["webhook-secret-value", "tok-from-env-123", KEY]) assert.ok(c.secrets.includes(secret));
});

test("a token instead of a GitHub App", async () => {
  const s = setup({ github: { token: "${{ env:GH_TOKEN }}" }, pools: [pool()] });
  const c = await load(s, { env: { GH_TOKEN: "ghp_secret_value_1" } });
  assert.deepEqual(c.github.auth, { kind: "token", token: "ghp_secret_value_1" });
  assert.ok(c.secrets.includes("ghp_secret_value_1"));
});

test("every pool error is reported at once, named by pool and field", async () => {
  const s = setup(
    serve([
      pool({ minRunners: 5, maxRunners: 2 }),
      pool({ name: "neg", maxRunners: -1, idleTimeout: -5 }, { labels: ["x"] }),
      pool({ name: "img" }, { image: "no-such-image", labels: ["y"] }),
      pool({ name: "path" }, { image: "./missing.qcow2", labels: ["z"] }),
      pool({ name: "typo", maxRunner: 3 }, { labels: ["w"], organisation: "x" }),
    ]),
  );
  const msg = await problems(s);
  const lines = msg.split("\n");
  const expect = [
    /pool "default" \(#1\): "minRunners" \(5\) is greater than "maxRunners" \(2\)/,
    /pool "neg" \(#2\): "maxRunners" must not be negative \(got -1\)/,
    /pool "neg" \(#2\): "idleTimeout" must not be negative \(got -5\)/,
    /pool "img" \(#3\): "runner\.image" names no stored image "no-such-image" in .*stored images: runner-img/,
    /pool "path" \(#4\): "runner\.image" .*missing\.qcow2 cannot be used \(no such file\)/,
    /pool "typo" \(#5\): unknown key "maxRunner"; did you mean "maxRunners"\?/,
    /pool "typo" \(#5\): unknown key "runner\.organisation"; did you mean "runner\.organization"\?/,
  ];
  for (const re of expect) assert.ok(lines.some((l) => re.test(l)), `no line matches ${re}:\n${msg}`);
});

test("duplicate pool names", async () => {
  const s = setup(serve([pool(), pool({}, { labels: ["other"] })]));
  assert.match(await problems(s), /pools #1 and #2 are both named "default"; names must be unique because the API, the metrics and the logs pick a pool by name, so rename one of them\./);
  const three = setup(serve([pool(), pool({}, { labels: ["b"] }), pool({}, { labels: ["c"] })]));
  assert.match(await problems(three), /pools #1, #2 and #3 are all named "default"; .*rename all but one\./);
});

test("a label set shared by two pools (case-insensitive, self-hosted implied)", async () => {
  const s = setup(serve([pool({ name: "a" }, { labels: ["Linux", "X64"] }), pool({ name: "b" }, { labels: ["self-hosted", "x64", "linux"] })]));
  assert.match(await problems(s), /pool "a" \(#1\) and pool "b" \(#2\) have the same "runner\.labels" \(linux, self-hosted, x64, ignoring case/);
});

test("pools of different organizations or repositories may share labels; an org pool and a repository of that org may not", async () => {
  const ok = setup(serve([pool({ name: "a" }, { organization: "org-a" }), pool({ name: "b" }, { organization: "Org-B" }), pool({ name: "c" }, { organization: undefined, repository: "org-b2/app" })]));
  assert.deepEqual((await load(ok)).pools.map((p) => p.name), ["a", "b", "c"]);
  const clash = setup(serve([pool({ name: "a" }, { organization: "org-a" }), pool({ name: "b" }, { organization: undefined, repository: "Org-A/app" })]));
  assert.match(await problems(clash), /pool "a" \(#1\) and pool "b" \(#2\) have the same "runner\.labels" .* and serve the same repositories/);
});

test("an unreadable key file names the field and the path, not the contents", async (t) => {
  const s = setup(serve([pool()]));
  if (process.getuid?.() === 0) {
    // root reads anything: use a directory instead.
    mkdirSync(join(s.dir, "dir.pem"));
    writeFileSync(s.file, JSON.stringify(serve([pool()], { github: { appId: 1, privateKeyFile: "dir.pem" } })));
    assert.match(await problems(s), /"github\.privateKeyFile": cannot read .*dir\.pem \(it is a directory\)/);
    t.diagnostic("running as root: checked a directory instead of chmod 000");
    return;
  }
  chmodSync(join(s.dir, "key.pem"), 0o000);
  assert.match(await problems(s), /"github\.privateKeyFile": cannot read .*key\.pem \(permission denied\)/);
});

test("a missing key file and a file that is not a PEM key", async () => {
  const s = setup(serve([pool()], { github: { appId: 1, privateKeyFile: "nope.pem" } }));
  assert.match(await problems(s), /"github\.privateKeyFile": cannot read .*nope\.pem \(no such file\)/);
  writeFileSync(join(s.dir, "bad.pem"), "not a key but secret-looking-text");
  writeFileSync(s.file, JSON.stringify(serve([pool()], { github: { appId: 1, privateKeyFile: "bad.pem" } })));
  const msg = await problems(s);
  assert.match(msg, /is not a PEM private key/);
  assert.doesNotMatch(msg, /secret-looking-text/);
});

test("resolved secrets never appear in messages; unresolvable ones name the field", async () => {
  const s = setup(serve([pool({ maxRunners: "${{ env:MAXR }}" })], { apiToken: "${{ env:MISSING_TOKEN }}", webhookSecret: 42 }));
  const msg = await problems(s, { env: { MAXR: "not-a-number-SECRET" } });
  assert.match(msg, /serve\.json: apiToken: environment variable MISSING_TOKEN is not set/);
  assert.match(msg, /"webhookSecret" must be a non-empty string \(got a whole number\)/);
  assert.match(msg, /pool "default" \(#1\): "maxRunners" must be a whole number \(got a string\)/);
  assert.doesNotMatch(msg, /SECRET/);
});

test("github credentials: none, both, conflicting", async () => {
  assert.match(await problems(setup(serve([pool()], { github: {} }))), /"github" needs credentials/);
  assert.match(await problems(setup(serve([pool()], { github: { token: "t0ken-value", appId: 1 } }))), /sets both "token" and a GitHub App/);
  assert.match(await problems(setup({ pools: [pool()] })), /missing "github"/);
});

test("organization or repository, exactly one", async () => {
  assert.match(await problems(setup(serve([pool({}, { organization: undefined })]))), /"runner" needs "organization" \(org-level runners\) or "repository"/);
  assert.match(await problems(setup(serve([pool({}, { repository: "a/b" })]))), /sets both "organization" and "repository"/);
  assert.match(await problems(setup(serve([pool({}, { organization: "a/b" })]))), /"runner\.organization": write the organization alone/);
});

test("cpus/ram overrides and their firecracker twins cannot both be set", async () => {
  const s = setup(serve([pool({ cpus: 2, firecracker: { vcpuCount: 4, memSizeMib: 8 } })]));
  const msg = await problems(s);
  assert.match(msg, /both "cpus" and "firecracker\.vcpuCount" are set/);
  assert.match(msg, /memory \(8 MiB\) is too little/);
});

test("pools: missing, not a list, a pools file that is not a list", async () => {
  assert.match(await problems(setup(serve(undefined))), /missing "pools"/);
  assert.match(await problems(setup(serve(3))), /"pools" must be the path of a pools file or a list/);
  const s = setup(serve("p.json"));
  writeFileSync(join(s.dir, "p.json"), "{}");
  assert.match(await problems(s), /p\.json: the pools file must contain a list of pools/);
});

test("parseDuration and parseListen", () => {
  assert.equal(parseDuration(90), 90);
  assert.equal(parseDuration("90"), 90);
  assert.equal(parseDuration("1h30m"), 5400);
  assert.equal(parseDuration("5m"), 300);
  assert.equal(parseDuration("-1"), undefined);
  assert.equal(parseDuration("5 minutes"), undefined);
  assert.deepEqual(parseListen("0.0.0.0:80"), { host: "0.0.0.0", port: 80 });
  assert.deepEqual(parseListen(":8080"), { host: "127.0.0.1", port: 8080 });
  assert.deepEqual(parseListen(9000), { host: "127.0.0.1", port: 9000 });
  assert.deepEqual(parseListen("[::1]:8080"), { host: "::1", port: 8080 });
  assert.equal(parseListen("host"), undefined);
  assert.equal(parseListen("h:70000"), undefined);
});

test("civm config check (registerServe): exit 0 and a summary for a valid file, 2 and the problems otherwise", async () => {
  const { spawnSync } = await import("node:child_process");
  const script = `
import { Command } from "commander";
import { registerServe } from "./dist/src/cli/commands/serve.js";
import { reportError } from "./dist/src/cli/output.js";
const p = new Command().option("--state-dir <d>").exitOverride();
registerServe(p);
try { await p.parseAsync(process.argv.slice(1), { from: "user" }); } catch (e) { process.exitCode = reportError(e); }`;
  const good = setup(serve([pool()]));
  const run = (file: string) => spawnSync(process.execPath, ["--input-type=module", "-e", script, "--", "--state-dir", good.stateDir, "config", "check", file], { cwd: repoRoot, encoding: "utf8" });
  const ok = run(good.file);
  assert.equal(ok.status, 0, ok.stderr);
  assert.match(ok.stdout, /pool default: 1\.\.4 runners, image runner-img \(stored\), 2 cpus, 2048 MiB, org acme, labels linux,self-hosted/);
  assert.match(ok.stderr, /valid \(1 pool\)/);
  assert.doesNotMatch(ok.stdout + ok.stderr, /whsec-0123456789|api-token-abcdef|secretkeymaterial/);
  const bad = setup(serve([pool({ minRunners: 9 })]));
  const ko = run(bad.file);
  assert.equal(ko.status, 2);
  assert.match(ko.stderr, /civm: error: .*pool "default" \(#1\): "minRunners" \(9\) is greater than "maxRunners" \(4\)/);
});

test("negative numbers: each numeric pool field is named (minRunners, maxRunners, idleTimeout, timeout-seconds, firecracker.*)", async () => {
  const msg = await problems(
    setup(
      serve([
        pool({ name: "min", minRunners: -1 }, { labels: ["a"] }),
        pool({ name: "max", minRunners: 0, maxRunners: -3 }, { labels: ["b"] }),
        pool({ name: "idle", idleTimeout: -5 }, { labels: ["c"] }),
        pool({ name: "timeout", "timeout-seconds": -60 }, { labels: ["d"] }),
        pool({ name: "fc", firecracker: { vcpuCount: -2, memSizeMib: -512 } }, { labels: ["e"] }),
      ]),
    ),
  );
  const expect = [
    /pool "min" \(#1\): "minRunners" must not be negative \(got -1\)/,
    /pool "max" \(#2\): "maxRunners" must not be negative \(got -3\)/,
    /pool "idle" \(#3\): "idleTimeout" must not be negative \(got -5\)/,
    /pool "timeout" \(#4\): "timeout-seconds" must not be negative \(got -60\)/,
    /pool "fc" \(#5\): "firecracker\.vcpuCount" must not be negative \(got -2\)/,
    /pool "fc" \(#5\): "firecracker\.memSizeMib" must not be negative \(got -512\)/,
  ];
  for (const re of expect) assert.ok(msg.split("\n").some((l) => re.test(l)), `no line matches ${re}:\n${msg}`);
});

test("civm config check (bin/civm): the issue's config errors, each named by pool and field, exit 2", async () => {
  const { spawnSync } = await import("node:child_process");
  const { civmBin } = await import("../support/paths.js");
  const s = setup(
    serve(
      [
        pool({ name: "minmax", minRunners: 3, maxRunners: 1 }, { labels: ["m"] }),
        pool({ name: "neg", minRunners: -1 }, { labels: ["n"] }),
        pool({ name: "img" }, { image: "no-such-image", labels: ["i"] }),
        pool({ name: "dup" }, { labels: ["d1"] }),
        pool({ name: "dup" }, { labels: ["d2"] }),
        pool({ name: "l1" }, { labels: ["Linux", "X64"] }),
        pool({ name: "l2" }, { labels: ["self-hosted", "x64", "linux"] }),
      ],
      // A key file that cannot be read, as root too: a directory.
      { github: { appId: 1, privateKeyFile: "key-dir.pem" } },
    ),
    "serve.json",
  );
  mkdirSync(join(s.dir, "key-dir.pem"));
  const r = spawnSync(process.execPath, [civmBin, "config", "check", s.file], { cwd: s.dir, encoding: "utf8", env: { ...process.env, CIVM_STATE_DIR: s.stateDir } });
  assert.equal(r.status, 2, `exit code 2 (config error); stderr:\n${r.stderr}`);
  assert.equal(r.stdout, "");
  const lines = r.stderr.trim().split("\n");
  assert.match(lines[0]!, /^civm: error: /);
  const expect = [
    /serve\.json: "github\.privateKeyFile": cannot read .*key-dir\.pem \(it is a directory\)/,
    /serve\.json: pool "minmax" \(#1\): "minRunners" \(3\) is greater than "maxRunners" \(1\); raise maxRunners or lower minRunners\./,
    /serve\.json: pool "neg" \(#2\): "minRunners" must not be negative \(got -1\)/,
    /serve\.json: pool "img" \(#3\): "runner\.image" names no stored image "no-such-image" in .*\(stored images: runner-img\)/,
    /serve\.json: pools #4 and #5 are both named "dup"/,
    /serve\.json: pool "l1" \(#6\) and pool "l2" \(#7\) have the same "runner\.labels" \(linux, self-hosted, x64/,
  ];
  for (const re of expect) assert.ok(lines.some((l) => re.test(l)), `no line matches ${re}:\n${r.stderr}`);
  assert.equal(lines.length, expect.length, `one line per problem:\n${r.stderr}`);
  assert.doesNotMatch(r.stderr, /whsec-0123456789|api-token-abcdef/);
});

test("civm config check (bin/civm): seed 003's pools.json with a civm image loads, exit 0", async () => {
  const { spawnSync } = await import("node:child_process");
  const { readFileSync } = await import("node:fs");
  const { civmBin } = await import("../support/paths.js");
  const s = setup(serve("pools.json"));
  const seed = JSON.parse(readFileSync(join(repoRoot, "test/fixtures/pools/seed-003-pools.json"), "utf8")) as { runner: { image: string } }[];
  seed[0]!.runner.image = "runner-img";
  writeFileSync(join(s.dir, "pools.json"), JSON.stringify(seed));
  const r = spawnSync(process.execPath, [civmBin, "config", "check", s.file], { cwd: s.dir, encoding: "utf8", env: { ...process.env, CIVM_STATE_DIR: s.stateDir } });
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /pool default: 1\.\.10 runners, image runner-img \(stored\), 2 cpus, 4096 MiB, org your-org, labels/);
  // Its kernelArgs end in pci=off, which would hide the runner's disk: dropped, and said so.
  assert.match(r.stderr, /civm: warning: .*pools\.json: pool "default" \(#1\): "firecracker\.kernelArgs" option "pci=off" is dropped: civm's pc machine puts the root disk/);
});

test("retention: default 7 days; \"7d\", \"36h\", \"1d12h\" or seconds; too short or not a duration is a clear error", async () => {
  assert.equal((await load(setup(serve([pool()])))).retentionSeconds, 7 * 86400);
  assert.equal(SERVE_DEFAULTS.retentionSeconds, 7 * 86400);
  for (const [v, s] of [["7d", 604800], ["36h", 129600], ["1d12h", 129600], [7200, 7200]] as const) {
    assert.equal((await load(setup(serve([pool()], { retention: v })))).retentionSeconds, s, String(v));
  }
  assert.equal(parseDuration("2d"), 172800);
  assert.equal(parseDuration("d"), undefined);
  const bad = await problems(setup(serve([pool()], { retention: "a week" })));
  assert.match(bad, /"retention" must be a number of seconds or a duration such as "90s", "5m", "1h30m", "7d" \(got "a week"\)/);
  assert.match(await problems(setup(serve([pool()], { retention: "10m" }))), /"retention" must be at least 3600 s \(got 600\)/);
  assert.match(await problems(setup(serve([pool()], { retention: -5 }))), /"retention" must not be negative/);
});

test("logs: console log retention defaults to 14 days / 1 GiB and takes keepDays and maxBytes", async () => {
  const d = await load(setup(serve([pool()])));
  assert.deepEqual(d.logs, { keepDays: 14, maxBytes: 1024 ** 3 });
  const c = await load(setup(serve([pool()], { logs: { keepDays: 3, maxBytes: "500M" } })));
  assert.deepEqual(c.logs, { keepDays: 3, maxBytes: 500 * MiB });
  const off = await load(setup(serve([pool()], { logs: { keepDays: 0, maxBytes: 0 } })));
  assert.deepEqual(off.logs, { keepDays: 0, maxBytes: 0 });
});

test("logs: bad values and unknown keys are named with the file, the field and the fix", async () => {
  const s = setup(serve([pool()], { logs: { keepDays: -1, maxBytes: "lots", keepdays: 2 } }));
  const msg = await problems(s);
  assert.match(msg, new RegExp(`${s.file.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}: "logs.keepDays" must be a whole number of days \\(0 keeps logs regardless of age\\), not -1`));
  assert.match(msg, /"logs.maxBytes" must be a size such as 500M or 2G \(binary units\), or 0 for no limit, not "lots"/);
  assert.match(msg, /unknown key "logs.keepdays"; did you mean "logs.keepDays"\?/);
  const notObj = await problems(setup(serve([pool()], { logs: 7 })));
  assert.match(notObj, /"logs" must be an object/);
});

test("durations past the timer limit (2^31-1 ms) are refused by field; retention, an age, is not limited", async () => {
  const msg = await problems(
    setup(serve([pool({ "timeout-seconds": 99999999, idleTimeout: "30d" })], { pollInterval: 3000000, shutdownTimeout: "25d" })),
  );
  const expect = [
    /"pollInterval" must be a whole number of seconds from 5 to 2147483 seconds \(about 24\.8 days, the longest a timer can wait\) \(got 3000000\)/,
    /"shutdownTimeout" must be a whole number of seconds from 0 to 2147483 seconds .* \(got "25d"\)/,
    /pool "default" \(#1\): "idleTimeout" must be a whole number of seconds from 0 to 2147483 seconds .* \(got "30d"\)/,
    /pool "default" \(#1\): "timeout-seconds" must be a whole number of seconds from 1 to 2147483 seconds .* \(got 99999999\)/,
  ];
  for (const re of expect) assert.ok(msg.split("\n").some((l) => re.test(l)), `no line matches ${re}:\n${msg}`);
  assert.equal((await load(setup(serve([pool({ "timeout-seconds": 2147483, idleTimeout: "24d" })], { retention: "90d" })))).retentionSeconds, 90 * 86400);
});

test("store: sqlite by default; a postgres URL with its password through ${{ file: }} is redacted; bad stores and fleet keys are named", async () => {
  const d = setup(serve([pool()]));
  const c = await load(d);
  assert.equal(c.store.kind, "sqlite");
  assert.equal(c.fleet.deadAfterSeconds, 60);
  writeFileSync(join(d.dir, "pg-password"), "s3cr3t-pg-pass\n");
  const pg = setup(serve([pool()], { store: "postgres://civm:${{ file:pg-password }}@db.example:5432/civm", fleet: { hostId: "runner-07", cpus: 8, ram: "16G", heartbeat: "2s", deadAfter: "10s" } }));
  writeFileSync(join(pg.dir, "pg-password"), "s3cr3t-pg-pass\n");
  const p = await load(pg);
  assert.equal(p.store.kind, "postgres");
  assert.ok(p.store.kind === "postgres" && p.store.url.includes("s3cr3t-pg-pass"));
  assert.equal(p.store.where, "postgres://civm:***@db.example:5432/civm");
  assert.ok(p.secrets.includes("s3cr3t-pg-pass"), "the password is redacted from logs");
  assert.deepEqual({ ...p.fleet }, { hostId: "runner-07", address: undefined, cpus: 8, ramBytes: 16 * 1024 ** 3, heartbeatSeconds: 2, deadAfterSeconds: 10, placementGraceSeconds: 15 });
  const bad = setup(serve([pool()], { store: "mysql://root:hunter2@db/civm", fleet: { hostID: "x", heartbeat: "10s", deadAfter: "15s", cpus: 0 } }));
  const msg = await problems(bad);
  assert.match(msg, /"store" must be "sqlite" \(the default, one host\) or a PostgreSQL URL/);
  assert.doesNotMatch(msg, /hunter2/, "a store value is never shown");
  assert.match(msg, /unknown key "fleet.hostID"; did you mean "fleet.hostId"\?/);
  assert.match(msg, /"fleet.deadAfter" \(15 s\) must be at least twice "fleet.heartbeat" \(10 s\)/);
  assert.match(msg, /"fleet.cpus" must be at least 1/);
});

test("github thresholds: requestTimeout 30 s, degradedAfter 5 min, repositoryListCache 10 min, rateLimitReserve 10% by default; durations and percentages as written", async () => {
  const d = await load(setup(serve([pool()])));
  assert.deepEqual(d.githubLimits, { requestTimeoutSeconds: 30, degradedAfterSeconds: 300, repositoryListCacheSeconds: 600, rateLimitReservePercent: 10 });
  // The defaults are the constants the client and the poll used before these keys existed.
  const { DEFAULT_REQUEST_TIMEOUT_MS } = await import("../../src/github/client.js");
  assert.equal(SERVE_DEFAULTS.githubRequestTimeoutSeconds * 1000, DEFAULT_REQUEST_TIMEOUT_MS);
  const github = { appId: 123456, privateKeyFile: "key.pem", requestTimeout: "10s", degradedAfter: "2m30s", repositoryListCache: 0, rateLimitReserve: "25%" };
  const c = await load(setup(serve([pool()], { github })));
  assert.deepEqual(c.githubLimits, { requestTimeoutSeconds: 10, degradedAfterSeconds: 150, repositoryListCacheSeconds: 0, rateLimitReservePercent: 25 });
  assert.equal(c.github.auth.kind, "app", "the credentials are read as before");
  const yaml = setup("github:\n  token: t\n  degradedAfter: 0\n  rateLimitReserve: 0%\npools: []\n", "serve.yaml");
  assert.deepEqual((await load(yaml)).githubLimits, { requestTimeoutSeconds: 30, degradedAfterSeconds: 0, repositoryListCacheSeconds: 600, rateLimitReservePercent: 0 });
});

test("github thresholds: bad values name the file, the field and what is accepted", async () => {
  const github = { token: "t", requestTimeout: 0, degradedAfter: "soon", repositoryListCache: "30d", rateLimitReserve: 10, rateLimitreserve: "5%" };
  const s = setup(serve([pool()], { github }));
  const msg = await problems(s);
  const file = s.file.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  const expect = [
    new RegExp(`^${file}: "github\\.requestTimeout" must be at least 1 s \\(got 0\\)\\.$`),
    /"github\.degradedAfter" must be a number of seconds or a duration such as "90s", "5m", "1h30m", "7d" \(got "soon"\)/,
    /"github\.repositoryListCache" must be a whole number of seconds from 0 to 2147483 seconds \(about 24\.8 days, the longest a timer can wait\); 0 = read the list on every poll \(got "30d"\)/,
    /"github\.rateLimitReserve" must be a percentage from 0% to 90% \(of the rate limit kept for JIT configs and deregistration\), such as "10%" \(got 10, a number without "%"\)/,
    /unknown key "github\.rateLimitreserve"; did you mean "github\.rateLimitReserve"\?/,
  ];
  for (const re of expect) assert.ok(msg.split("\n").some((l) => re.test(l)), `no line matches ${re}:\n${msg}`);
  assert.match(await problems(setup(serve([pool()], { github: { token: "t", rateLimitReserve: "95%" } }))), /"github\.rateLimitReserve" must be a percentage from 0% to 90% .* \(got "95%"\)/);
  assert.match(await problems(setup(serve([pool()], { github: { token: "t", degradedAfter: -1 } }))), /"github\.degradedAfter" must not be negative \(got -1\)/);
});

test("start: snapshot or boot is kept; unset is left out (restore when a snapshot matches); anything else is refused", async () => {
  const c = await load(setup(serve([pool({ start: "snapshot" }), pool({ name: "b", start: "boot", runner: { image: "runner-img", organization: "acme", labels: ["b"] } }), pool({ name: "c", runner: { image: "runner-img", organization: "acme", labels: ["c"] } })])));
  assert.deepEqual(c.pools.map((p) => p.vm.start), ["snapshot", "boot", undefined]);
  const msg = await problems(setup(serve([pool({ start: "restore" })])));
  assert.match(msg, /"start" must be "snapshot" \(restore runner VMs from the image's memory snapshot, made on first use\) or "boot".*got "restore"/);
});

test("firmware-boot: true is kept (vm.firmwareBoot), false or unset is left out; anything but a boolean is refused", async () => {
  const c = await load(setup(serve([pool({ "firmware-boot": true }), pool({ name: "b", "firmware-boot": false, runner: { image: "runner-img", organization: "acme", labels: ["b"] } })])));
  assert.deepEqual(c.pools.map((p) => p.vm.firmwareBoot), [true, undefined]);
  assert.match(await problems(setup(serve([pool({ "firmware-boot": "yes" })]))), /"firmware-boot" must be true or false \(got a string\): true boots the image through its firmware/);
});
