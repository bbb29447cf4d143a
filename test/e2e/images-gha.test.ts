// The built-in image civm-gha end to end, with the fake actions runner (test/support/
// fake-runner.ts: the real release's layout and flags, talking to the fake GitHub) in place
// of GitHub's release, served with its sha256 from a local HTTP server. The image is built
// once into its own store (test/support/gha-image.ts, cached by key across runs). Boots run
// a job that checks what workflows rely on: the runner user, sudo, Docker (an image made
// offline from the host's static busybox), and the job's exit status on the console.
import { test, before, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { runCivm, type CivmEnv, type CivmResult } from "../support/civm-cli.js";
import { startFakeGitHub, sendWebhook, workflowJobPayload, type FakeGitHub } from "../support/fake-github.js";
import { ensureGhaImage, ghaEnv, serveArchive, writeGhaSpec, GHA_IMAGE, type GhaImage } from "../support/gha-image.js";
import { freePort } from "../support/net.js";
import { leftoversNamed, qemuProcessesNamed, runNode, uniqueName } from "../support/runner-image.js";
import { REPO, SECRET, startHub, startServe, type Hub } from "../support/serve-harness.js";
import { civmBin, tempDir } from "../support/paths.js";

let gha: GhaImage;
before(async () => {
  gha = await ensureGhaImage();
});

/** A docker-importable root filesystem: the host's static busybox as /bin/busybox. */
function busyboxRootfs(): Buffer {
  const dir = tempDir("civm-bb-");
  mkdirSync(join(dir, "root", "bin"), { recursive: true });
  copyFileSync("/bin/busybox", join(dir, "root", "bin", "busybox"));
  execFileSync("tar", ["-C", join(dir, "root"), "--owner=0", "--group=0", "-cf", join(dir, "rootfs.tar"), "."]);
  const data = readFileSync(join(dir, "rootfs.tar"));
  rmSync(dir, { recursive: true, force: true });
  return data;
}

/** The job: what a workflow relies on, each printed so the test can check it; ends with `exit`. */
function jobScript(hubPort: number, exitCode: number): string {
  return [
    "set -eu",
    'echo "user=$(id -un) uid=$(id -u) groups=$(id -Gn)"',
    'echo "event=${RUST_WHITELISTED_EVENT_NAME:-none} imageos=${ImageOS:-} toolcache=${RUNNER_TOOL_CACHE:-} agenttools=${AGENT_TOOLSDIRECTORY:-}"',
    'test -w "$RUNNER_TOOL_CACHE" && echo toolcache-writable',
    "sudo -n true && echo sudo-ok",
    "bin/installdependencies.sh | tail -n 2",
    "for t in git git-lfs curl wget jq unzip zip zstd xz gcc make python3 ssh; do command -v $t >/dev/null || echo missing-tool-$t; done",
    "python3 -m venv /tmp/venv && echo venv-ok",
    "docker info --format 'docker-info-ok server={{.ServerVersion}}'",
    `curl -fsS -o /tmp/rootfs.tar http://10.0.2.2:${hubPort}/files/rootfs.tar`,
    "docker import /tmp/rootfs.tar civm-bb:1 >/dev/null",
    "docker run --rm civm-bb:1 /bin/busybox echo hello-from-a-container",
    `exit ${exitCode}`,
    "",
  ].join("\n");
}

function env(t: TestContext): CivmEnv {
  const e = ghaEnv();
  t.after(() => rmSync(e.root, { recursive: true, force: true }));
  return e;
}

function consoleOf(r: CivmResult): string {
  const m = /console(?: log)?: (\S+\.log)/.exec(r.stderr);
  assert.ok(m, `no console log in civm's output:\n${r.stderr}`);
  return readFileSync(m[1]!, "utf8");
}

function tail(s: string, n = 80): string {
  return s.split("\n").slice(-n).join("\n");
}

function assertJobRan(text: string, exitCode: number): void {
  const ctx = `\nconsole (tail):\n${tail(text)}`;
  assert.match(text, /fake-job: user=runner uid=1000 groups=.*\bdocker\b/, `the job runs as runner, in the docker group${ctx}`);
  assert.match(text, /fake-job: .*imageos=debian12 toolcache=\/opt\/hostedtoolcache agenttools=\/opt\/hostedtoolcache/, ctx);
  assert.match(text, /fake-job: toolcache-writable/, ctx);
  assert.match(text, /fake-job: sudo-ok/, ctx);
  assert.match(text, /fake-job:  Finish Install Dependencies/, `the runner's Debian dependencies are installed${ctx}`);
  assert.doesNotMatch(text, /fake-job: missing-tool-/, ctx);
  assert.match(text, /fake-job: venv-ok/, ctx);
  assert.match(text, /fake-job: docker-info-ok server=\d/, ctx);
  assert.match(text, /fake-job: hello-from-a-container/, `docker run of an offline image${ctx}`);
  assert.match(text, new RegExp(`fake-runner: job finished with status ${exitCode}`), `the job's exit status on the console${ctx}`);
  assert.match(text, /civm-agent: runner exited with status 0/, ctx);
  assert.match(text, /civm-agent: powering off/, ctx);
  assert.doesNotMatch(text, /RUNNER_ALLOW_RUNASROOT|Must not run with sudo/, ctx);
}

function assertClean(e: CivmEnv, name: string): void {
  assert.deepEqual(leftoversNamed(e, name), [], "work dirs or registry entries left behind");
  assert.deepEqual(qemuProcessesNamed(e, name), [], "a QEMU process left running");
}

interface Rig {
  gh: FakeGitHub;
  hub: Hub;
}

async function rig(t: TestContext, exitCode: number, webhookUrl = "http://127.0.0.1:9/unused"): Promise<Rig> {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  let hubPort = 0;
  const hub = await startHub(gh, () => webhookUrl, { files: { "rootfs.tar": busyboxRootfs() }, get script() { return jobScript(hubPort, exitCode); } });
  hubPort = hub.port;
  t.after(() => hub.close());
  gh.state.runnerServerUrl = `http://10.0.2.2:${hub.port}`;
  return { gh, hub };
}

test("civm image build civm-gha: the runner archive is downloaded once on the host, verified and cached; a wrong sha256 fails clearly and stores nothing", { timeout: 3_600_000 }, async () => {
  const cached = join(gha.stateDir, "downloads", `sha256-${gha.archive.sha256}`);
  assert.ok(existsSync(cached), "the verified archive is in the state dir's download cache");
  assert.ok(gha.cached || gha.downloads <= 1, `at most one download (${gha.downloads})`);
  if (!gha.cached && gha.downloads === 1) assert.match(gha.output, /actions runner 2\.999\.0 fetched and verified/);
  const manifest = JSON.parse(readFileSync(join(gha.stateDir, "images", GHA_IMAGE, "manifest.json"), "utf8")) as { parent: string; packages: Record<string, string> };
  assert.equal(manifest.parent, "civm-runner");
  for (const p of ["docker.io", "containerd", "runc", "git-lfs", "build-essential", "python3-venv", "libicu72", "sudo"]) assert.ok(manifest.packages[p], `${p} installed`);

  // Built again: the image is cached; nothing is downloaded.
  const server = await serveArchive(gha.archive.path, "actions-runner-linux-x64.tar.gz");
  try {
    const dir = tempDir("civm-gha-spec-");
    const spec = join(dir, "images.json");
    writeGhaSpec(spec, { version: gha.archive.version, sha256: gha.archive.sha256, url: server.url });
    const envv = { ...process.env, CIVM_STATE_DIR: gha.stateDir, CIVM_LOGS_DIR: join(dir, "logs"), CIVM_ACCEL: "tcg" };
    const again = await runNode([civmBin, "image", "build", GHA_IMAGE, "-f", spec, "--json"], envv);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /"status":"cached"/);
    assert.equal(server.requests(), 0, "a cached build downloads nothing");

    // A sha256 that is not the archive's: refused before anything is built, nothing stored.
    const wrong = "0".repeat(64);
    const bad = uniqueName("gha-badsum");
    writeGhaSpec(spec, { version: gha.archive.version, sha256: wrong, url: server.url }, bad);
    const r = await runNode([civmBin, "image", "build", bad, "-f", spec], envv);
    assert.equal(r.code, 2, `${r.stderr}\n${r.stdout}`);
    assert.match(r.stderr, new RegExp(`image "${bad}" \\(#1\\): field "githubRunner": ${server.url.replace(/[.]/g, "\\.")} has sha256 ${gha.archive.sha256}, but the spec pins ${wrong}\\. Nothing was stored`));
    assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
    assert.equal(existsSync(join(gha.stateDir, "images", bad)), false);
    assert.deepEqual(readdirSync(join(gha.stateDir, "images")).filter((n) => n.includes(bad)), [], "no image or temp dir");
    assert.deepEqual(readdirSync(join(gha.stateDir, "downloads")).filter((n) => n.includes(wrong) || n.startsWith(".tmp")), [], "no download stored");
    rmSync(dir, { recursive: true, force: true });
  } finally {
    await server.close();
  }
});

test("civm run civm-gha with a seed 001 token config: config.sh registers (ephemeral, no auto-update), the job runs as runner with sudo and Docker, its status reaches the console, the VM powers off", { timeout: 1_800_000 }, async (t) => {
  const { gh, hub } = await rig(t, 7);
  const job = gh.addJob({ repository: REPO, labels: ["self-hosted"] });
  const e = env(t);
  const name = uniqueName("gha-token");
  const instance = {
    name, image: GHA_IMAGE, "cpu-cores": 2, ram: "2G", "timeout-seconds": 900,
    network: { allow: [`host:${new URL(gh.url).port}`, `host:${hub.port}`] },
    config: { repo: REPO, token: gh.registrationToken, "whitelisted-event": "push", github_url: `http://10.0.2.2:${new URL(gh.url).port}` },
  };
  writeFileSync(join(e.root, "instances.json"), JSON.stringify([instance]));
  const r = await runCivm(["run", name], e);
  const text = consoleOf(r);
  assert.equal(r.code, 0, `${r.stderr}\n${tail(text)}`);
  assertJobRan(text, 7);
  assert.match(text, /fake-job: event=push /, "whitelisted-event reaches the job as RUST_WHITELISTED_EVENT_NAME");
  const runner = [...gh.state.runners.values()][0];
  assert.ok(runner?.registration, "registered through config.sh with the token");
  assert.deepEqual({ ephemeral: runner.registration.ephemeral, disableupdate: runner.registration.disableupdate }, { ephemeral: true, disableupdate: true });
  assert.equal(runner.registration.url, `http://10.0.2.2:${new URL(gh.url).port}/${REPO}`);
  assert.equal(gh.state.jobs.find((j) => j.id === job.id)?.status, "completed");
  assert.ok(!text.includes(gh.registrationToken), "the token is not on the console");
  assert.ok(hub.events.some((x) => x.startsWith("done ")));
  assertClean(e, name);
});

test("civm run civm-gha with a JIT config: run.sh --jitconfig takes the job, as runner; a failing job's status reaches the console", { timeout: 1_800_000 }, async (t) => {
  const { gh, hub } = await rig(t, 3);
  gh.addJob({ repository: REPO, labels: ["self-hosted"] });
  const res = await fetch(`${gh.url}/repos/${REPO}/actions/runners/generate-jitconfig`, {
    method: "POST", headers: { authorization: `token ${gh.validToken}`, "content-type": "application/json" },
    body: JSON.stringify({ name: "gha-jit", runner_group_id: 1, labels: ["self-hosted", "gha"] }),
  });
  const { encoded_jit_config: jit } = (await res.json()) as { encoded_jit_config: string };
  const e = env(t);
  const name = uniqueName("gha-jit");
  writeFileSync(join(e.root, "instances.json"), JSON.stringify([{ name, image: GHA_IMAGE, "cpu-cores": 2, ram: "2G", "timeout-seconds": 900, network: { allow: [`host:${hub.port}`] }, config: { jitconfig: jit } }]));
  const r = await runCivm(["run", name], e);
  const text = consoleOf(r);
  assert.equal(r.code, 0, `${r.stderr}\n${tail(text)}`);
  assertJobRan(text, 3);
  assert.match(text, /starting the GitHub Actions runner \(JIT config\)/);
  assert.ok(hub.events.includes("register gha-jit"), hub.events.join(", "));
  assert.ok(!text.includes(jit), "the JIT config is not on the console");
  assertClean(e, name);
});

test("civm serve: a pool of civm-gha serves one job end to end", { timeout: 1_800_000 }, async (t) => {
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const { gh, hub } = await rig(t, 0, `${base}/webhook`);
  const e = ghaEnv();
  t.after(() => rmSync(e.root, { recursive: true, force: true }));
  const config = {
    listen: `127.0.0.1:${port}`,
    github: { apiUrl: gh.url, token: gh.validToken },
    webhookSecret: SECRET,
    apiToken: "gha-serve-api-token",
    pollInterval: 5,
    shutdownTimeout: 60,
    pools: [{
      name: "ghapool", minRunners: 0, maxRunners: 1, idleTimeout: 0, cpus: 2, ram: "2G", "timeout-seconds": 900,
      network: { allow: [`host:${hub.port}`] },
      // A prefix no other test's VM has (gha-token-…, gha-jit-…): the leftover check goes by it.
      runner: { name: "ghapool", image: GHA_IMAGE, repository: REPO, labels: ["gha"] },
    }],
  };
  // The state dir is the suite's cached image store, kept between runs: a daemon's database
  // from an earlier run knows this job id and delivery (the fake GitHub numbers from 1) and
  // would answer the webhook "duplicate". Each run starts with no daemon state.
  for (const f of ["serve.db", "serve.db-wal", "serve.db-shm"]) rmSync(join(e.stateDir, f), { force: true });
  const s = startServe({ e, port, config });
  t.after(() => {
    if (s.child.exitCode === null) s.child.kill("SIGKILL");
  });
  const job = gh.addJob({ repository: REPO, labels: ["self-hosted", "gha"] });
  await s.poll(async () => (await fetch(`${base}/healthz`).catch(() => undefined))?.ok === true, 60_000, "civm serve to listen");
  const q = await sendWebhook(`${base}/webhook`, { secret: SECRET, payload: await workflowJobPayload("queued", { id: job.id, runId: job.runId, labels: job.labels, repository: REPO }) });
  assert.equal(q.status, 202);
  await s.poll(() => gh.state.jobs[0]?.status === "completed", 1_200_000, "the job to complete");
  const ran = gh.state.jobs[0]!.runnerName!;
  await s.poll(async () => gh.runner(ran) === undefined, 180_000, "the job's VM to finish and its runner to be deregistered");
  const r = await s.stop();
  assert.equal(r.code, 0, r.stderr);
  const logs = readdirSync(e.logsDir).filter((f) => f.endsWith(".log") && f.startsWith("ghapool"));
  const text = logs.map((f) => readFileSync(join(e.logsDir, f), "utf8")).join("\n");
  assertJobRan(text, 0);
  assert.ok(!/"\.credentials"/.test(s.stdout()));
  assertClean(e, "ghapool");
});
