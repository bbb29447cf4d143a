// civm image build end to end: a child image of civm-runner (built in the suite's shared
// store, test/support/runner-image.ts) that is built on its parent, booted, changed and
// rebuilt alone; and bad specs (test/fixtures/images-e2e/) that must fail with exit 2, one
// clear message naming file, image and field, and nothing left in the image store.
// The child's name is unique per run and it is removed at the end, so parallel runs and
// other test files sharing the store do not see it.
import { test, before, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { civmEnv, runCivm, startCivm, qemuStarts, leftovers, waitFor, type CivmEnv, type CivmResult } from "../support/civm-cli.js";
import { repoRoot } from "../support/paths.js";
import { ensureRunnerImage, leftoversNamed, qemuProcessesNamed, runnerEnv, uniqueName, RUNNER_IMAGE, type RunnerImage } from "../support/runner-image.js";

const fixtures = join(repoRoot, "test", "fixtures", "images-e2e");

let runner: RunnerImage;
before(async () => {
  runner = await ensureRunnerImage();
});

function tail(text: string, lines = 40): string {
  return text.split("\n").slice(-lines).join("\n");
}

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

function consoleText(r: CivmResult): string {
  const m = /console(?: log)?: (\S+\.log)/.exec(r.stderr);
  assert.ok(m, `no console log path in civm's output:\n${r.stderr}`);
  return readFileSync(m[1]!, "utf8");
}

/** What is in the store's images dir (nothing when it does not exist). */
function imagesDirEntries(stateDir: string): string[] {
  const d = join(stateDir, "images");
  return existsSync(d) ? readdirSync(d).sort() : [];
}

interface ListedImage {
  name: string;
  key: string;
  parent?: string;
  parentKey?: string;
  backing?: string;
  diskPath: string;
}

async function listImages(e: CivmEnv): Promise<ListedImage[]> {
  const r = await runCivm(["image", "ls", "--json"], e);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as ListedImage[];
}

function childSpec(name: string, content: string): string {
  return [
    `- name: ${name}`,
    `  parent: ${RUNNER_IMAGE}`,
    "  actions:",
    `    - write: {path: /etc/civm-child, content: ${JSON.stringify(content)}}`,
    "    - run: echo built > /etc/civm-child-run",
    "",
  ].join("\n");
}

/** Boots `image` with a command printing the child's two files, each line prefixed. */
async function bootChild(e: CivmEnv, image: string): Promise<{ lines: string[]; console: string }> {
  const name = uniqueName(`${image}-vm`);
  writeFileSync(
    join(e.root, "instances.json"),
    JSON.stringify([{ name, image, "cpu-cores": 2, ram: "1G", "timeout-seconds": 300, config: { command: "cat /etc/civm-child /etc/civm-child-run | sed 's/^/civm-e2e-child: /'" } }]),
  );
  const r = await runCivm(["run", name], e);
  const text = consoleText(r);
  assert.equal(r.code, 0, `${r.stderr}\nconsole (tail):\n${tail(text)}`);
  assert.match(text, /civm-agent: ready/);
  assert.deepEqual(leftoversNamed(e, name), [], "the VM's work dir or registry entry was left behind");
  assert.deepEqual(qemuProcessesNamed(e, name), []);
  const lines = [...text.matchAll(/civm-e2e-child: (\S+)/g)].map((m) => m[1]!);
  return { lines, console: text };
}

test("a child of civm-runner: built on it, listed with its parent, boots with its files; changing its action rebuilds only the child", async (t: TestContext) => {
  const e = runnerEnv();
  const child = uniqueName("child");
  t.after(async () => {
    // Safety net when an assertion failed midway (the test removes it itself otherwise).
    if (existsSync(join(e.stateDir, "images", child))) await runCivm(["image", "rm", child], e);
    rmSync(e.root, { recursive: true, force: true });
  });
  writeFileSync(join(e.root, "images.yaml"), childSpec(child, "v1\n"));

  // Build 1: from ./images.yaml (no -f); the parent is the built-in image, already stored.
  let started = Date.now();
  const b1 = await runCivm(["image", "build", child], e, { cwd: e.root });
  t.diagnostic(`child build: ${((Date.now() - started) / 1000).toFixed(1)} s`);
  assert.equal(b1.code, 0, tail(b1.stderr, 60));
  assert.match(b1.stderr, new RegExp(`civm: ${RUNNER_IMAGE}: cached in`), "the parent should come from the store");
  assert.match(b1.stderr, new RegExp(`civm: ${child}: built in [\\d.]+ s`));
  assert.equal(qemuStarts(e), 1, "one build VM for the child");

  const listed1 = await listImages(e);
  const c1 = listed1.find((i) => i.name === child);
  const parent = listed1.find((i) => i.name === RUNNER_IMAGE);
  assert.ok(c1 && parent, `civm image ls --json lacks ${child} or ${RUNNER_IMAGE}: ${JSON.stringify(listed1.map((i) => i.name))}`);
  assert.equal(c1.parent, RUNNER_IMAGE);
  assert.equal(c1.parentKey, parent.key);
  assert.equal(c1.backing, runner.diskPath, "the child's qcow2 is backed by the stored civm-runner disk");
  const boot1 = await bootChild(e, child);
  assert.deepEqual(boot1.lines, ["v1", "built"], `the child's files, as printed in the VM:\n${tail(boot1.console)}`);

  // Build 2: only the child's write changed.
  writeFileSync(join(e.root, "images.yaml"), childSpec(child, "v2\n"));
  started = Date.now();
  const b2 = await runCivm(["image", "build", child], e, { cwd: e.root });
  t.diagnostic(`child rebuild: ${((Date.now() - started) / 1000).toFixed(1)} s`);
  assert.equal(b2.code, 0, tail(b2.stderr, 60));
  assert.match(b2.stderr, new RegExp(`civm: ${RUNNER_IMAGE}: cached in`));
  assert.match(b2.stderr, new RegExp(`civm: ${child}: built in [\\d.]+ s`));
  assert.doesNotMatch(b2.stderr, new RegExp(`civm: ${child}: cached`));
  assert.doesNotMatch(b2.stderr, new RegExp(`civm: ${RUNNER_IMAGE}: built`));
  assert.equal(qemuStarts(e), 3, "two boots so far plus exactly one more build VM (the child's; the parent was not rebuilt)");
  const listed2 = await listImages(e);
  const c2 = listed2.find((i) => i.name === child);
  assert.ok(c2);
  assert.notEqual(c2.key, c1.key, "the child's key must change with its action");
  assert.equal(listed2.find((i) => i.name === RUNNER_IMAGE)?.key, parent.key, "the parent's key changed");
  const boot2 = await bootChild(e, child);
  assert.deepEqual(boot2.lines, ["v2", "built"], `after the rebuild:\n${tail(boot2.console)}`);

  // Nothing of the builds is left: no build VM, no temporary image folder.
  assert.deepEqual(leftoversNamed(e, `build-${child}`), []);
  assert.deepEqual(imagesDirEntries(e.stateDir).filter((n) => n.includes(child)), [child]);
  const rm = await runCivm(["image", "rm", child], e);
  assert.equal(rm.code, 0, rm.stderr);
  assert.equal((await listImages(e)).some((i) => i.name === child), false);
});

test("SIGTERM during a build's VM stage: exit 5 within seconds, the build VM ended, nothing stored, no work files left", async (t: TestContext) => {
  const e = runnerEnv();
  const child = uniqueName("interrupted");
  t.after(() => rmSync(e.root, { recursive: true, force: true }));
  // The child's action would keep its build VM busy for ten minutes.
  writeFileSync(join(e.root, "images.yaml"), [`- name: ${child}`, `  parent: ${RUNNER_IMAGE}`, "  actions:", "    - run: echo civm-e2e-long-action && sleep 600", ""].join("\n"));
  const build = startCivm(["image", "build", child], e, { cwd: e.root });
  await waitFor(() => qemuProcessesNamed(e, `build-${child}`).length === 1, 120_000, "the build VM to start");
  const buildLog = () => /full log: (\S+\.log)/.exec(build.stderrSoFar())?.[1];
  // Into the action itself (the guest agent runs the build script): not only QEMU's start.
  await waitFor(() => { const f = buildLog(); return !!f && existsSync(f) && readFileSync(f, "utf8").includes("civm-e2e-long-action"); }, 240_000, "the build VM to run the action");
  const pids = qemuProcessesNamed(e, `build-${child}`);
  const sentAt = Date.now();
  build.child.kill("SIGTERM");
  const r = await build.done;
  const took = (Date.now() - sentAt) / 1000;
  t.diagnostic(`SIGTERM → exit: ${took.toFixed(1)} s`);
  assert.equal(r.code, 5, r.stderr);
  assert.match(r.stderr, new RegExp(`SIGTERM: the build of ${escape(child)} was interrupted`));
  assert.doesNotMatch(r.stderr, /internal error|at \S+\.js:\d+/);
  assert.ok(took < 20, `civm took ${took.toFixed(1)} s to end after SIGTERM`);
  for (const pid of pids) assert.equal(existsSync(`/proc/${pid}`), false, `the build VM's QEMU (pid ${pid}) outlived civm`);
  assert.deepEqual(qemuProcessesNamed(e, `build-${child}`), []);
  assert.deepEqual(leftoversNamed(e, `build-${child}`), [], "the build VM's work dir or registry entry");
  assert.deepEqual(imagesDirEntries(e.stateDir).filter((n) => n.includes(child)), [], "a pending or stored image of the interrupted build");
});

function assertOneError(r: CivmResult, pattern: RegExp): void {
  assert.equal(r.code, 2, r.stderr);
  assert.equal((r.stderr.match(/civm: error:/g) ?? []).length, 1, `expected one error:\n${r.stderr}`);
  assert.match(r.stderr, pattern);
  assert.doesNotMatch(r.stderr, /internal error|at \S+\.js:\d+/, "an internal error or a stack trace was printed");
}

function assertStoreEmpty(e: CivmEnv): void {
  assert.deepEqual(imagesDirEntries(e.stateDir), [], "something was left in the store's images dir");
  assert.deepEqual(leftovers(e), [], "a VM work dir or registry entry was left");
}

for (const c of [
  {
    what: "an unknown action",
    file: "bad-unknown-action.yaml",
    image: "bad-action",
    pattern: /bad-unknown-action\.yaml: image "bad-action" \(#1\): field "actions\[1\]": unknown action "frobnicate"/,
  },
  {
    what: "a missing parent",
    file: "bad-missing-parent.yaml",
    image: "orphan",
    pattern: /bad-missing-parent\.yaml: image "orphan" \(#1\): field "parent": no image named "no-such-parent-civm"/,
  },
  {
    what: "a parent cycle",
    file: "bad-parent-cycle.yaml",
    image: "loop-a",
    pattern: /bad-parent-cycle\.yaml: images "loop-a" \(#1\), "loop-b" \(#2\): field "parent" forms a cycle: "loop-a" -> "loop-b" -> "loop-a"/,
  },
  {
    what: "a copy source that does not exist",
    file: "bad-copy-source.yaml",
    image: "bad-copy",
    pattern: new RegExp(`bad-copy-source\\.yaml: image "bad-copy" \\(#1\\): field "actions\\[0\\]\\.copy\\.src": the file or folder ${escape(join(fixtures, "no-such-dir", "missing-civm.txt"))} does not exist`),
  },
]) {
  test(`a spec with ${c.what} fails with exit 2 and one message naming file, image and field, and leaves nothing`, async (t) => {
    const e = civmEnv();
    t.after(() => rmSync(e.root, { recursive: true, force: true }));
    const r = await runCivm(["image", "build", c.image, "-f", join(fixtures, c.file)], e);
    assertOneError(r, c.pattern);
    assert.equal(r.stderr.trim().split("\n").length, 1, `the error should be one line:\n${r.stderr}`);
    assert.equal(qemuStarts(e), 0);
    assertStoreEmpty(e);
  });
}

test("an unknown package in a root image: exit 2, apt's complaint surfaced, nothing stored", async (t) => {
  const e = civmEnv();
  t.after(() => rmSync(e.root, { recursive: true, force: true }));
  const started = Date.now();
  const r = await runCivm(["image", "build", "bad-pkg", "-f", join(fixtures, "bad-package.yaml")], e);
  t.diagnostic(`failed build: ${((Date.now() - started) / 1000).toFixed(1)} s`);
  assertOneError(r, /bad-package\.yaml: image "bad-pkg" \(#1\): field "packages": package "no-such-package-civm" not found/);
  assert.match(r.stderr, /Unable to locate package no-such-package-civm/);
  assert.equal(qemuStarts(e), 0, "no build VM for a root tree that failed");
  assertStoreEmpty(e);
  const ls = await runCivm(["image", "ls"], e);
  assert.equal(ls.stdout.trim().split("\n").length, 1, `only the header: ${ls.stdout}`);
});
