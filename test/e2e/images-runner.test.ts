// The built-in image civm-runner end to end: built once into the suite's shared store
// (test/support/runner-image.ts: cached by its key across runs, ~100 s cold under TCG), then
// booted with `civm run` and an instances.json that names it ("image": "civm-runner").
// Each boot takes ~30 s under TCG. Every VM here has an instance name unique to this run, so
// leftover checks see only this file's VMs while other test files use the same store.
import { test, before, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { DISK_LAYOUT } from "../../src/images/disk.js";
import { runCivm, startCivm, waitFor, qemuStarts, type CivmEnv, type CivmResult } from "../support/civm-cli.js";
import { ensureRunnerImage, leftoversNamed, qemuProcessesNamed, runnerEnv, uniqueName, RUNNER_IMAGE, type RunnerImage } from "../support/runner-image.js";

const GiB = 1024 ** 3;
const MARKER_COMMAND = "echo civm-e2e-marker-$((6*7))";
const MARKER = "civm-e2e-marker-42";

let runner: RunnerImage;
let builtAt = 0;
before(async () => {
  const t0 = Date.now();
  runner = await ensureRunnerImage();
  builtAt = (Date.now() - t0) / 1000;
});

function env(t: TestContext): CivmEnv {
  const e = runnerEnv();
  t.after(() => rmSync(e.root, { recursive: true, force: true }));
  return e;
}

function writeInstances(e: CivmEnv, instances: Record<string, unknown>[]): void {
  writeFileSync(join(e.root, "instances.json"), JSON.stringify(instances, null, 2));
}

function runnerInstance(name: string, command: string, over: Record<string, unknown> = {}): Record<string, unknown> {
  return { name, image: RUNNER_IMAGE, "cpu-cores": 2, ram: "1G", "timeout-seconds": 300, config: { command }, ...over };
}

function tail(text: string, lines = 40): string {
  return text.split("\n").slice(-lines).join("\n");
}

/** The console log civm named in its output ("console: PATH" / "console log: PATH"). */
function consoleLogPath(stderr: string): string {
  const m = /console(?: log)?: (\S+\.log)/.exec(stderr);
  assert.ok(m, `no console log path in civm's output:\n${stderr}`);
  return m[1]!;
}

function consoleText(r: CivmResult): string {
  return readFileSync(consoleLogPath(r.stderr), "utf8");
}

/** The VM's work dir: <state>/vms/<name>-<id>, where <id> ends the console log's name. */
function workDirOf(e: CivmEnv, name: string, stderr: string): string {
  const id = /-([0-9a-z]+)\.log$/.exec(consoleLogPath(stderr))?.[1];
  assert.ok(id, `no VM id in the console log's name: ${consoleLogPath(stderr)}`);
  return join(e.stateDir, "vms", `${name}-${id}`);
}

/** QEMU argv lines the shim recorded for VMs named `name` (their work dir is in the argv). */
function qemuArgvOf(e: CivmEnv, name: string): string[] {
  if (!existsSync(e.qemuStartsFile)) return [];
  return readFileSync(e.qemuStartsFile, "utf8").split("\n").filter((l) => l.includes(`/vms/${name}-`));
}

function assertClean(e: CivmEnv, name: string, stderr: string): void {
  assert.equal(existsSync(workDirOf(e, name, stderr)), false, "the VM's work dir was left behind");
  assert.deepEqual(leftoversNamed(e, name), [], "work dirs or registry entries were left behind");
  assert.deepEqual(qemuProcessesNamed(e, name), [], "a QEMU process was left running");
}

/** One `civm run` of civm-runner: exit 0, the agent got ready and the guest powered off. */
async function bootOk(e: CivmEnv, name: string): Promise<{ r: CivmResult; console: string }> {
  const r = await runCivm(["run", name], e);
  const text = existsSync(consoleLogPath(r.stderr)) ? consoleText(r) : "(no console log)";
  assert.equal(r.code, 0, `civm run ${name} exited ${r.code}\n${r.stderr}\nconsole (tail):\n${tail(text)}`);
  assert.match(r.stderr, new RegExp(`${name}: poweroff after [\\d.]+ s \\(exit 0\\)`));
  assert.match(text, /civm-agent: ready/, `the agent never got ready; console (tail):\n${tail(text)}`);
  return { r, console: text };
}

test("civm-runner booted by its stored kernel: the agent reads and ejects the disc, runs the command, powers off; exit 0, work dir gone", async (t) => {
  t.diagnostic(`civm-runner ${runner.cached ? "was cached" : "was built"} (image build ${runner.seconds.toFixed(1)} s, ${builtAt.toFixed(1)} s with the lock wait): ${runner.diskPath}`);
  const e = env(t);
  const name = uniqueName("rn-cmd");
  writeInstances(e, [runnerInstance(name, MARKER_COMMAND)]);
  const started = Date.now();
  const p = startCivm(["run", name], e);
  await waitFor(() => /running \(pid \d+/.test(p.stderrSoFar()), 60_000, "QEMU to run");
  // While the VM runs, its work dir and registry entry exist (so the checks below mean something).
  const during = leftoversNamed(e, name);
  const r = await p.done;
  t.diagnostic(`civm run of civm-runner with a command: ${((Date.now() - started) / 1000).toFixed(1)} s`);
  const text = consoleText(r);
  assert.equal(r.code, 0, `${r.stderr}\nconsole (tail):\n${tail(text)}`);
  assert.ok(during.includes(`vms/${basename(workDirOf(e, name, r.stderr))}`), `the work dir did not exist while the VM ran: ${JSON.stringify(during)}`);
  assert.ok(during.some((d) => d.startsWith("registry/")), `no registry entry while the VM ran: ${JSON.stringify(during)}`);

  // The agent: ready, then the command's output (expanded by the guest's shell), then power-off.
  const ready = text.indexOf("civm-agent: ready");
  const marker = text.indexOf(MARKER);
  assert.ok(ready >= 0, `no "civm-agent: ready" on the console:\n${tail(text)}`);
  assert.ok(marker > ready, `the command's output (${MARKER}) is missing or came before the agent was ready:\n${tail(text)}`);
  assert.match(text, /civm-agent: runner exited with status 0/);
  assert.match(r.stderr, /medium removed \(confirmed by query-block\)/);
  assert.match(r.stderr, new RegExp(`${name}: poweroff after [\\d.]+ s \\(exit 0\\)`));

  // A stored image with a kernel and no firmware-boot: QEMU gets the stored kernel directly.
  const argv = qemuArgvOf(e, name);
  assert.equal(argv.length, 1, `expected one QEMU start for ${name}:\n${argv.join("\n")}`);
  assert.ok(argv[0]!.includes(`-kernel ${join(runner.stateDir, "images", RUNNER_IMAGE, "vmlinuz")}`), `no -kernel with the stored kernel in:\n${argv[0]}`);
  assertClean(e, name, r.stderr);
});

test("firmware-boot: the same image boots through BIOS and GRUB (no -kernel) to the same result", async (t) => {
  const e = env(t);
  const name = uniqueName("rn-fw");
  writeInstances(e, [runnerInstance(name, MARKER_COMMAND, { "firmware-boot": true })]);
  const started = Date.now();
  const { r, console: text } = await bootOk(e, name);
  t.diagnostic(`firmware boot cycle: ${((Date.now() - started) / 1000).toFixed(1)} s`);
  assert.ok(text.includes(MARKER), `no ${MARKER} on the console:\n${tail(text)}`);
  assert.match(r.stderr, /medium removed \(confirmed by query-block\)/);
  const argv = qemuArgvOf(e, name);
  assert.equal(argv.length, 1, `expected one QEMU start for ${name}:\n${argv.join("\n")}`);
  assert.doesNotMatch(argv[0]!, /(^|\s)-kernel\s/, `firmware-boot must not pass -kernel:\n${argv[0]}`);
  assert.doesNotMatch(argv[0]!, /(^|\s)-initrd\s/);
  assertClean(e, name, r.stderr);
});

test("root-disk larger than the image: the guest's root filesystem has grown to the disk", async (t) => {
  const manifest = JSON.parse(readFileSync(join(runner.stateDir, "images", RUNNER_IMAGE, "manifest.json"), "utf8")) as { virtualSize: number };
  assert.equal(manifest.virtualSize, 4 * GiB, "the test assumes civm-runner is a 4G image");
  const e = env(t);
  const name = uniqueName("rn-grow");
  writeInstances(e, [runnerInstance(name, "echo civm-e2e-rootsize=$(df -B1 --output=size / | tail -1 | tr -d ' ')", { "root-disk": "6G" })]);
  const { r, console: text } = await bootOk(e, name);
  const m = /civm-e2e-rootsize=(\d+)/.exec(text);
  assert.ok(m, `df's output is not on the console:\n${tail(text)}`);
  const size = Number(m[1]);
  t.diagnostic(`root filesystem: ${(size / GiB).toFixed(2)} GiB on a 6G disk (image 4G)`);
  assert.ok(size > 5 * GiB, `the root filesystem is ${size} bytes (${(size / GiB).toFixed(2)} GiB): not grown past the image's 4G`);
  assert.ok(size <= 6 * GiB, `the root filesystem (${size} bytes) is larger than the disk`);
  assertClean(e, name, r.stderr);
});

test("the stored image's root filesystem is clean (no journal to replay, no orphan inodes) and marked up to date for systemd", async (t) => {
  // The build VM ends with poweroff -f; without remounting / read-only first, ext4 keeps
  // needs_recovery and an orphan list, and every VM of the image replays the journal.
  const dir = mkdtempSync(join(tmpdir(), "civm-fsck-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const raw = join(dir, "disk.raw");
  const convert = spawnSync("qemu-img", ["convert", "-O", "raw", runner.diskPath, raw], { encoding: "utf8" });
  assert.equal(convert.status, 0, convert.stderr);
  // e2fsprogs read the root partition at its offset in the disk.
  const fs = `${raw}?offset=${DISK_LAYOUT.partitionStartBytes}`;
  const dump = spawnSync("dumpe2fs", ["-h", fs], { encoding: "utf8" });
  assert.equal(dump.status, 0, dump.stderr);
  const features = /^Filesystem features:\s*(.*)$/m.exec(dump.stdout)?.[1] ?? "";
  assert.match(features, /has_journal/, `not the ext4 root filesystem:\n${dump.stdout}`);
  assert.doesNotMatch(features, /needs_recovery/, "the image's journal needs replaying at every boot");
  assert.match(dump.stdout, /^Filesystem state:\s*clean$/m);
  assert.doesNotMatch(dump.stdout, /^First orphan inode:/m, "the image carries an orphan list");
  // /etc/.updated and /var/.updated as new as /usr: systemd's ConditionNeedsUpdate is false,
  // so systemd-sysusers does not run at every boot.
  const mtime = (path: string): number => {
    const stat = spawnSync("debugfs", ["-R", `stat ${path}`, fs], { encoding: "utf8" });
    const m = /^ mtime: 0x([0-9a-f]+):([0-9a-f]+)/m.exec(stat.stdout);
    assert.ok(m, `${path} is not in the image:\n${stat.stdout}${stat.stderr}`);
    return Number.parseInt(m[1]!, 16) * 1e9 + (Number.parseInt(m[2]!, 16) >> 2);
  };
  const usr = mtime("/usr");
  for (const p of ["/etc/.updated", "/var/.updated"]) assert.ok(mtime(p) >= usr, `${p} is older than /usr: systemd-sysusers would run at every boot`);
});

test("SSH host keys differ between two runs of the same image", async (t) => {
  const e = env(t);
  const names = [uniqueName("rn-key1"), uniqueName("rn-key2")];
  // Host keys are made at boot off the critical path (Nice=19) and the agent does not wait
  // for them, so on a loaded host the job may start first: wait for the key (up to 60 s).
  const key = "/etc/ssh/ssh_host_ed25519_key.pub";
  writeInstances(e, names.map((n) => runnerInstance(n, `i=0; while [ ! -s ${key} ] && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done; cat ${key}`)));
  const keys: string[] = [];
  for (const name of names) {
    const { r, console: text } = await bootOk(e, name);
    const m = /ssh-ed25519 (AAAA[A-Za-z0-9+/]+=*)/.exec(text);
    assert.ok(m, `${name}: the runner user could not print /etc/ssh/ssh_host_ed25519_key.pub:\n${tail(text)}`);
    keys.push(m[1]!);
    assertClean(e, name, r.stderr);
  }
  assert.notEqual(keys[0], keys[1], "two VMs of the same image have the same SSH host key");
});

test("civm image ls lists civm-runner with its key; civm image path prints its disk", async (t) => {
  const e = env(t);
  const manifest = JSON.parse(readFileSync(join(runner.stateDir, "images", RUNNER_IMAGE, "manifest.json"), "utf8")) as { key: string };
  const ls = await runCivm(["image", "ls"], e);
  assert.equal(ls.code, 0, ls.stderr);
  // SNAPSHOTS: "-" for an image without a memory snapshot, "1 (179M)" or "2 (179M, 180M)" (the
  // snapshot tests share this store, so either may be seen here).
  assert.match(ls.stdout, /^NAME\s+KEY\s+FORMAT\s+SIZE\s+VIRTUAL\s+AGE\s+SNAPSHOTS$/m);
  assert.match(ls.stdout, new RegExp(`^${RUNNER_IMAGE}\\s+${manifest.key.slice(0, 12)}\\s+qcow2\\s+\\S+\\s+4G\\s+\\S+\\s+(-|\\d+ \\([^)]*\\))$`, "m"));
  const json = JSON.parse((await runCivm(["image", "ls", "--json"], e)).stdout) as { name: string; key: string; diskPath: string }[];
  const entry = json.find((i) => i.name === RUNNER_IMAGE);
  assert.ok(entry, `civm image ls --json has no ${RUNNER_IMAGE}`);
  assert.equal(entry.key, manifest.key);
  const path = await runCivm(["image", "path", RUNNER_IMAGE], e);
  assert.equal(path.code, 0, path.stderr);
  const disk = path.stdout.trim();
  assert.equal(disk, runner.diskPath);
  assert.ok(statSync(disk).isFile(), `${disk} is not a file`);
  const missing = await runCivm(["image", "path", "no-such-image-civm"], e);
  assert.equal(missing.code, 2, missing.stderr);
  assert.match(missing.stderr, /no stored image named no-such-image-civm/);
});

test("a second civm image build civm-runner is a no-op: exit 0, cached, no VM, the disk untouched, in under 5 s", async (t) => {
  const e = env(t);
  const disk = statSync(runner.diskPath);
  const manifestPath = join(runner.stateDir, "images", RUNNER_IMAGE, "manifest.json");
  const manifestBefore = readFileSync(manifestPath, "utf8");
  const started = Date.now();
  const r = await runCivm(["image", "build", RUNNER_IMAGE], e);
  const seconds = (Date.now() - started) / 1000;
  t.diagnostic(`warm no-op build: ${seconds.toFixed(2)} s wall`);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, new RegExp(`${RUNNER_IMAGE}: cached in [\\d.]+ s \\(key [0-9a-f]{12}\\): ${runner.diskPath.replace(/[.]/g, "\\.")}`));
  assert.doesNotMatch(r.stderr, /built in/);
  assert.ok(seconds < 5, `the cached build took ${seconds.toFixed(1)} s`);
  assert.equal(qemuStarts(e), 0, "a cached build started QEMU");
  assert.equal(statSync(runner.diskPath).mtimeMs, disk.mtimeMs, "the disk was rewritten");
  assert.equal(statSync(runner.diskPath).ino, disk.ino, "the image folder was replaced");
  assert.equal(readFileSync(manifestPath, "utf8"), manifestBefore, "the manifest changed");

  // --json: progress and the result as JSON lines on stdout, for CI.
  const j = await runCivm(["image", "build", RUNNER_IMAGE, "--json"], e);
  assert.equal(j.code, 0, j.stderr);
  const lines = j.stdout.trim().split("\n").map((l) => JSON.parse(l) as { type: string; image: string; step?: string; status?: string; disk?: string });
  assert.ok(lines.some((l) => l.type === "progress" && l.image === RUNNER_IMAGE && l.step === "cached"), j.stdout);
  assert.deepEqual(lines.filter((l) => l.type === "result").map((l) => [l.image, l.status, l.disk]), [[RUNNER_IMAGE, "cached", runner.diskPath]]);
  // --quiet: only the result line.
  const q = await runCivm(["image", "build", RUNNER_IMAGE, "--quiet"], e);
  assert.equal(q.code, 0, q.stderr);
  assert.deepEqual(q.stderr.trim().split("\n").length, 1, q.stderr);
});
