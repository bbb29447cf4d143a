// Tests for guest/bin/civm-agent, run in a temp dir ("container-less harness"):
// CIVM_ROOT points the agent's fixed paths into the temp dir, and PATH holds
// only stub commands (which log their argv) plus a short list of harmless real
// tools, so a command without a stub fails instead of touching the host.
import { after, test } from "node:test";
import { unsettledBoot } from "../../src/vm/snapshot-point.js";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { rmSync, existsSync, mkdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { repoRoot } from "../support/paths.js";
import { parseCalls, stubSandbox, writeExecutable, type StubSandbox } from "../support/stub-path.js";

const AGENT = join(repoRoot, "guest", "bin", "civm-agent");
const RUNNER_DIR = "/home/runner/actions-runner";

const SAFE_TOOLS = [
  "bash", "sh", "cat", "cp", "mv", "rm", "rmdir", "mkdir", "chmod", "readlink", "dirname",
  "cut", "tr", "od", "grep", "env", "jq", "ls", "head", "tail",
];

const STUBS: Record<string, string> = {
  blkid: `if [ -n "\${STUB_DEVICE:-}" ]; then echo "$STUB_DEVICE"; else exit 2; fi`,
  // The CD-ROM mount ("-o ro DEV DIR") puts the fixture where the agent expects it.
  mount: `if [ "$1" = -o ] && [ "$2" = ro ]; then
  [ ! -f "$STUB_FIXTURE" ] || cp "$STUB_FIXTURE" "$4/instance.json"
  exit 0
fi
exit "\${STUB_9P_STATUS:-0}"`,
  umount: `rm -f "$1/instance.json"`,
  eject: `exit "\${STUB_EJECT_STATUS:-0}"`,
  // Runs the command as the current user; insists on the form the agent must use.
  runuser: `[ "$1" = -u ] && [ "$3" = -- ] || { echo "stub runuser: bad usage" >&2; exit 99; }
shift 3
exec "$@"`,
  poweroff: `exit "\${STUB_POWEROFF_STATUS:-0}"`,
  journalctl: `exit 0`,
  timeout: `shift; exec "$@"`,
  sync: `exit 0`,
  systemctl: `[ "$1" != is-system-running ] || echo "\${STUB_SYSTEM_STATE:-running}"; exit "\${STUB_SYSTEMCTL_STATUS:-0}"`,
  getent: `[ "$1" = passwd ] || exit 2
grep "^$2:" "$STUB_PASSWD" || exit 2`,
  chown: `exit 0`,
  sleep: `exit 0`,
  hostname: `[ "$1" = -I ] || exit 2
printf '%s\\n' "\${STUB_ADDRESSES-10.0.2.15 }"`,
};

interface Harness extends StubSandbox {
  runnerCalls: string;
}

const made: string[] = [];
after(() => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});

/** Fake runner scripts record their argv, cwd and environment, then exit with `status`. */
function fakeRunner(h: Harness, runStatus: number, configStatus: number): void {
  const dir = join(h.root, RUNNER_DIR);
  mkdirSync(dir, { recursive: true });
  for (const [script, status] of [["config.sh", configStatus], ["run.sh", runStatus]] as const) {
    writeExecutable(
      join(dir, script),
      `#!/bin/sh
{ printf '%s' ${script}; for a in "$@"; do printf '\\t%s' "$a"; done; printf '\\n'; } >>'${h.runnerCalls}'
{ echo "cwd=$(pwd)"; echo "stdin=$(cat)"; env; } >'${h.dir}/${script}.env'
echo "fake ${script} output"
exit ${status}
`,
    );
  }
}

function makeHarness(opts: { runnerUser?: boolean; runStatus?: number; configStatus?: number; stubs?: Record<string, string> } = {}): Harness {
  const sb = stubSandbox({ prefix: "civm-guest-agent-", safeTools: SAFE_TOOLS, stubs: { ...STUBS, ...opts.stubs }, rootDirs: ["root", "home/runner", "run", "etc"] });
  made.push(sb.dir);
  const h: Harness = { ...sb, runnerCalls: join(sb.dir, "runner-calls.log") };
  const passwd = ["root:x:0:0:root:/root:/bin/bash"];
  if (opts.runnerUser !== false) passwd.push("runner:x:1000:1000::/home/runner:/bin/bash");
  writeFileSync(join(h.dir, "passwd"), passwd.join("\n") + "\n");
  fakeRunner(h, opts.runStatus ?? 0, opts.configStatus ?? 0);
  return h;
}

interface AgentRun {
  status: number | null;
  out: string;
  stdout: string;
  calls: string[][];
  runnerCalls: string[][];
}

function runAgent(h: Harness, instance: unknown, env: Record<string, string> = {}): AgentRun {
  const fixture = join(h.dir, "instance.json");
  writeFileSync(fixture, typeof instance === "string" ? instance : JSON.stringify(instance));
  const r = spawnSync(AGENT, [], {
    encoding: "utf8",
    // Far above the 1-3 s a run takes: a loaded CI host (a compile beside it) once took 30 s.
    timeout: 120_000,
    env: {
      PATH: h.path,
      CIVM_ROOT: h.root,
      CIVM_WAIT_SECONDS: "3",
      STUB_CALLS: h.calls,
      STUB_PASSWD: join(h.dir, "passwd"),
      STUB_FIXTURE: fixture,
      STUB_DEVICE: "/dev/sr0",
      ...env,
    },
  });
  return {
    status: r.status,
    stdout: r.stdout,
    out: r.stdout + r.stderr,
    calls: parseCalls(h.calls),
    runnerCalls: parseCalls(h.runnerCalls),
  };
}

const named = (calls: string[][], name: string) => calls.filter((c) => c[0] === name);

/** The journal flushed (so the console has every line), a sync, then `poweroff -f`, last. */
function assertPoweredOffLast(r: AgentRun): void {
  assert.equal(named(r.calls, "poweroff").length, 1, `poweroff once; output:\n${r.out}`);
  assert.deepEqual(r.calls.slice(-3), [["journalctl", "--sync"], ["sync"], ["poweroff", "-f"]], "journal flush, sync, poweroff -f: the last things the agent does");
  assert.match(r.stdout, /^civm-agent: powering off$/m);
}

function lineIndex(out: string, re: RegExp): number {
  return out.split("\n").findIndex((l) => re.test(l));
}

test("command config: runs the command as runner in its home, after ready, then powers off", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: { command: 'echo "hello from $USER in $(pwd)"' } });
  assert.equal(r.status, 0, r.out);
  const home = join(h.root, "home/runner");
  assert.match(r.stdout, new RegExp(`^hello from runner in ${home}$`, "m"));
  const ready = lineIndex(r.stdout, /^civm-agent: ready$/);
  assert.ok(ready >= 0, "ready marker printed");
  assert.ok(ready < lineIndex(r.stdout, /^hello from/), "ready printed before the workload starts");
  const runuser = named(r.calls, "runuser");
  assert.equal(runuser.length, 1);
  assert.deepEqual(runuser[0]!.slice(0, 4), ["runuser", "-u", "runner", "--"]);
  assert.deepEqual(runuser[0]!.slice(-3), ["sh", "-c", 'echo "hello from $USER in $(pwd)"']);
  assert.match(r.stdout, /runner exited with status 0/);
  assertPoweredOffLast(r);
});

test("command config: config.user picks the user", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: { command: "true", user: "root" } });
  assert.equal(r.status, 0, r.out);
  assert.deepEqual(named(r.calls, "runuser")[0]!.slice(1, 3), ["-u", "root"]);
  assertPoweredOffLast(r);
});

test("a failing command still powers off and its status is logged", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: { command: "echo failing; exit 7" } });
  assert.match(r.stdout, /^failing$/m, "the command ran");
  assert.match(r.stdout, /^civm-agent: runner exited with status 7$/m);
  assert.equal(r.status, 7);
  assertPoweredOffLast(r);
});

test("jitconfig: run.sh --jitconfig as runner in the runner dir; JIT never logged nor in other argv", () => {
  const h = makeHarness();
  const jit = "eyJKSVQtU0VDUkVULXZhbHVlIjoxfQ==";
  const r = runAgent(h, {
    name: "vm-1",
    config: { jitconfig: jit, "whitelisted-event": "push", command: "echo should-not-run" },
  });
  assert.equal(r.status, 0, r.out);
  assert.deepEqual(r.runnerCalls, [["run.sh", "--jitconfig", jit]], "run.sh got the JIT config");
  assert.doesNotMatch(r.out, /should-not-run/, "jitconfig wins over command");
  assert.ok(!r.out.includes(jit), "JIT config must not appear in the agent's output");
  for (const call of r.calls) assert.ok(!call.join(" ").includes(jit), `JIT in argv of ${call[0]}`);
  const runuser = named(r.calls, "runuser");
  assert.deepEqual(runuser[0]!.slice(0, 4), ["runuser", "-u", "runner", "--"]);
  const env = readFileSync(join(h.dir, "run.sh.env"), "utf8");
  assert.match(env, new RegExp(`^cwd=${join(h.root, RUNNER_DIR)}$`, "m"));
  assert.match(env, /^stdin=$/m, "run.sh does not inherit the secret pipe");
  assert.match(env, /^RUST_WHITELISTED_EVENT_NAME=push$/m);
  assert.match(env, /^USER=runner$/m);
  assert.ok(!env.includes(jit), "JIT config must not be in run.sh's environment");
  assert.ok(!env.includes("STUB_CALLS"), "the agent's environment does not leak into the runner");
  assert.ok(r.stdout.indexOf("civm-agent: ready") < r.stdout.indexOf("fake run.sh output"));
  assertPoweredOffLast(r);
});

test("token+repo: config.sh --unattended --ephemeral with url, name+suffix, labels, group; then run.sh", () => {
  const h = makeHarness();
  const token = "AABBREGISTRATIONTOKEN123";
  const instance = {
    name: "vm-1",
    config: {
      repo: "rust-lang-ci/rust",
      token,
      labels: ["self-hosted", "linux", "x64"],
      runnergroup: "ci",
      "whitelisted-event": "push",
    },
  };
  const r = runAgent(h, instance);
  assert.equal(r.status, 0, r.out);
  assert.equal(r.runnerCalls.length, 2, r.out);
  const [config, run] = r.runnerCalls as [string[], string[]];
  assert.deepEqual(run, ["run.sh"], "run.sh after config.sh, without arguments");
  assert.equal(config[0], "config.sh");
  const args = config.slice(1);
  const name = args[args.indexOf("--name") + 1]!;
  assert.match(name, /^vm-1-[0-9a-f]{8}$/, "instance name plus random suffix");
  assert.deepEqual(args, [
    "--unattended", "--ephemeral", "--disableupdate",
    "--url", "https://github.com/rust-lang-ci/rust",
    "--token", token,
    "--name", name,
    "--labels", "self-hosted,linux,x64",
    "--runnergroup", "ci",
  ]);
  assert.match(readFileSync(join(h.dir, "run.sh.env"), "utf8"), /^RUST_WHITELISTED_EVENT_NAME=push$/m);
  assert.ok(!r.out.includes(token), "token must not appear in the agent's output");
  for (const call of r.calls) assert.ok(!call.join(" ").includes(token), `token in argv of ${call[0]}`);
  assert.match(r.stdout, new RegExp(`registering ephemeral runner ${name} at https://github.com/rust-lang-ci/rust`));

  const again = runAgent(makeHarness(), instance);
  const name2 = again.runnerCalls[0]!.at(again.runnerCalls[0]!.indexOf("--name") + 1);
  assert.notEqual(name2, name, "suffix is random per boot");
  assertPoweredOffLast(r);
});

test("a failing runner: the tail of its newest _diag logs goes to the console, without lines holding the secret", () => {
  const h = makeHarness({ runStatus: 4 });
  const jit = "SECRET-JIT-CONFIG-abc123";
  const diag = join(h.root, RUNNER_DIR, "_diag");
  mkdirSync(diag, { recursive: true });
  writeFileSync(join(diag, "Runner_20260101-000000-utc.log"), `[INFO] starting\n[INFO] got ${jit}\n[ERR ] Failed to connect: 401\n`);
  const r = runAgent(h, { name: "vm-1", config: { jitconfig: jit } });
  assert.match(r.out, /civm-runner: run\.sh exited with status 4/);
  assert.match(r.out, /civm-runner: last lines of .*_diag\/Runner_20260101-000000-utc\.log:/);
  assert.match(r.out, /\[ERR \] Failed to connect: 401/);
  assert.ok(!r.out.includes(jit), "the line with the secret is dropped");
  assert.match(r.stdout, /^civm-agent: runner exited with status 4$/m);
  assertPoweredOffLast(r);
});

test("the GitHub runner never runs as root: config.user root with a JIT config or token is refused", () => {
  for (const config of [{ jitconfig: "J", user: "root" }, { token: "T", repo: "o/r", user: "root" }]) {
    const h = makeHarness();
    const r = runAgent(h, { name: "vm-1", config });
    assert.match(r.out, /civm-agent: error: config\.user is root \(uid 0\): the GitHub Actions runner never runs as root/);
    assert.deepEqual(r.runnerCalls, []);
    assert.deepEqual(named(r.calls, "runuser"), []);
    assertPoweredOffLast(r);
  }
});

test("token+repo: github_url for GHES, org repo, labels as a string, no group", () => {
  const h = makeHarness();
  const r = runAgent(h, {
    name: "pool-a",
    config: { repo: "my-org", token: "T0K", labels: "gpu,big", github_url: "https://ghe.example.com/" },
  });
  assert.equal(r.status, 0, r.out);
  const args = r.runnerCalls[0]!.slice(1);
  assert.deepEqual(args.slice(0, 5), ["--unattended", "--ephemeral", "--disableupdate", "--url", "https://ghe.example.com/my-org"]);
  assert.deepEqual(args.slice(-2), ["--labels", "gpu,big"]);
  assert.ok(!args.includes("--runnergroup"));
});

test("token+repo: config.runner_name (civm serve) is the runner name exactly; a full URL in repo is used as is", () => {
  const h = makeHarness();
  const r = runAgent(h, {
    name: "civm-linux",
    config: { runner: "github", repo: "http://127.0.0.1:9/my-org", token: "T0K", runner_name: "civm-linux-0a1b2c3d", labels: ["self-hosted", "linux"], pool: "linux" },
  });
  assert.equal(r.status, 0, r.out);
  const args = r.runnerCalls[0]!.slice(1);
  assert.deepEqual(args.slice(0, 5), ["--unattended", "--ephemeral", "--disableupdate", "--url", "http://127.0.0.1:9/my-org"]);
  assert.equal(args[args.indexOf("--name") + 1], "civm-linux-0a1b2c3d");
});

test("token+repo: a failing config.sh skips run.sh, logs the status and powers off", () => {
  const h = makeHarness({ configStatus: 3 });
  const r = runAgent(h, { name: "vm-1", config: { repo: "o/r", token: "t" } });
  assert.deepEqual(r.runnerCalls.map((c) => c[0]), ["config.sh"]);
  assert.match(r.stdout, /^civm-agent: runner exited with status 3$/m);
  assertPoweredOffLast(r);
});

test("token without repo: clear error, nothing runs, powers off", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: { token: "t" } });
  assert.notEqual(r.status, 0);
  assert.match(r.stdout, /error: config\.token needs config\.repo/);
  assert.deepEqual(r.runnerCalls, []);
  assertPoweredOffLast(r);
});

test("reads the CD-ROM: mounted read-only, copied to a 0600 file in a 0700 run dir, unmounted, ejected", () => {
  const h = makeHarness();
  const instance = { name: "vm-1", config: { command: "true" } };
  const r = runAgent(h, instance);
  assert.equal(r.status, 0, r.out);
  assert.deepEqual(named(r.calls, "blkid")[0], ["blkid", "-L", "instance-configuration"]);
  const mnt = join(h.root, "run/civm/cdrom");
  assert.deepEqual(named(r.calls, "mount")[0], ["mount", "-o", "ro", "/dev/sr0", mnt]);
  assert.deepEqual(named(r.calls, "umount"), [["umount", mnt]]);
  assert.deepEqual(named(r.calls, "eject"), [["eject", "/dev/sr0"]]);
  const order = r.calls.map((c) => c[0]);
  assert.ok(order.indexOf("eject") < order.indexOf("runuser"), "ejected before the workload starts");
  const copy = join(h.root, "run/civm/instance.json");
  assert.deepEqual(JSON.parse(readFileSync(copy, "utf8")), instance);
  assert.equal(statSync(copy).mode & 0o777, 0o600);
  assert.equal(statSync(join(h.root, "run/civm")).mode & 0o777, 0o700);
});

test("eject failure is logged and not fatal", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: { command: "echo still-ran" } }, { STUB_EJECT_STATUS: "1" });
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, /^civm-agent: warning: eject \/dev\/sr0 failed \(status 1\); continuing$/m);
  assert.match(r.stdout, /^still-ran$/m);
  assertPoweredOffLast(r);
});

test("CD-ROM never appearing: waits CIVM_WAIT_SECONDS, clear log, powers off, runs nothing", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: { command: "echo nope" } }, { STUB_DEVICE: "" });
  assert.notEqual(r.status, 0);
  assert.match(r.stdout, /error: no CD-ROM labelled instance-configuration appeared within 3s/);
  assert.equal(named(r.calls, "blkid").length, 4, "one look per second plus a last one");
  assert.equal(named(r.calls, "sleep").length, 3);
  assert.deepEqual(named(r.calls, "mount"), []);
  assert.deepEqual(named(r.calls, "runuser"), []);
  assertPoweredOffLast(r);
});

test("CD-ROM found through /dev/disk/by-label when blkid does not know it", () => {
  const h = makeHarness();
  const dev = join(h.dir, "sr0");
  writeFileSync(dev, "");
  mkdirSync(join(h.root, "dev/disk/by-label"), { recursive: true });
  symlinkSync(dev, join(h.root, "dev/disk/by-label/instance-configuration"));
  const r = runAgent(h, { name: "vm-1", config: { command: "echo via-label" } }, { STUB_DEVICE: "" });
  assert.equal(r.status, 0, r.out);
  assert.equal(named(r.calls, "mount")[0]![3], dev);
  assert.match(r.stdout, /^via-label$/m);
});

test("no instance.json on the CD-ROM or invalid JSON: clear error and poweroff", () => {
  const h = makeHarness();
  const missing = runAgent(h, {}, { STUB_FIXTURE: join(h.dir, "absent.json") });
  assert.notEqual(missing.status, 0);
  assert.match(missing.stdout, /error: no instance\.json on \/dev\/sr0/);
  assertPoweredOffLast(missing);

  const h2 = makeHarness();
  const bad = runAgent(h2, "{not json");
  assert.notEqual(bad.status, 0);
  assert.match(bad.stdout, /error: instance\.json is not a JSON object/);
  assert.deepEqual(named(bad.calls, "runuser"), []);
  assertPoweredOffLast(bad);
});

test("nothing to run: clear message, ready, powers off", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: {} });
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, /^civm-agent: ready$/m);
  assert.match(r.stdout, /nothing to run: instance\.json has no config\.jitconfig, config\.token .* or config\.command/);
  assert.deepEqual(named(r.calls, "runuser"), []);
  assertPoweredOffLast(r);
});

test("ssh_authorized_keys (list) installed for root and runner with 0700/0600 modes and ownership", () => {
  const h = makeHarness();
  const keys = ["ssh-ed25519 AAAAC3Nza one@host", "ssh-rsa AAAAB3Nza two@host"];
  mkdirSync(join(h.root, "root/.ssh"), { recursive: true });
  writeFileSync(join(h.root, "root/.ssh/authorized_keys"), `${keys[0]}\nssh-ed25519 BAKED image@key\n`);
  const r = runAgent(h, { name: "vm-1", config: { ssh_authorized_keys: keys } });
  assert.equal(r.status, 0, r.out);
  for (const [user, home] of [["root", "root"], ["runner", "home/runner"]] as const) {
    const dir = join(h.root, home, ".ssh");
    const file = join(dir, "authorized_keys");
    const lines = readFileSync(file, "utf8").split("\n").filter(Boolean);
    for (const k of keys) assert.equal(lines.filter((l) => l === k).length, 1, `${user} has ${k} once`);
    assert.equal(statSync(file).mode & 0o777, 0o600, `${user} authorized_keys mode`);
    assert.equal(statSync(dir).mode & 0o777, 0o700, `${user} .ssh mode`);
    assert.ok(
      named(r.calls, "chown").some((c) => c[1] === `${user}:` && c.includes(file) && c.includes(dir)),
      `${user} owns its key file`,
    );
  }
  assert.ok(
    readFileSync(join(h.root, "root/.ssh/authorized_keys"), "utf8").includes("BAKED image@key"),
    "keys already in the image are kept",
  );
  const order = r.stdout.split("\n");
  assert.ok(lineIndex(r.stdout, /installed 2 authorized key\(s\) for runner/) < order.indexOf("civm-agent: ready"));
});

test("a dev VM (keys given) gets its address and sshd reported before ready; none when there are none", () => {
  const h = makeHarness();
  mkdirSync(join(h.root, "usr/sbin"), { recursive: true });
  writeExecutable(join(h.root, "usr/sbin/sshd"), "#!/bin/sh\n");
  const key = "ssh-ed25519 AAAAC3Nza dev@host";
  const ok = runAgent(h, { name: "dev", config: { ssh_authorized_keys: key, command: "true" } }, { STUB_ADDRESSES: "10.0.2.15 fec0::5054:ff:fe12:3456 " });
  assert.equal(ok.status, 0, ok.out);
  assert.ok(lineIndex(ok.stdout, /^civm-agent: network: 10\.0\.2\.15 fec0::5054:ff:fe12:3456$/) >= 0, ok.stdout);
  assert.ok(lineIndex(ok.stdout, /^civm-agent: network: /) < lineIndex(ok.stdout, /^civm-agent: ready$/));
  assert.doesNotMatch(ok.stdout, /sshd: not/);

  const bare = makeHarness();
  const r = runAgent(bare, { name: "dev", config: { ssh_authorized_keys: key, command: "true" } }, { STUB_ADDRESSES: "", CIVM_ADDRESS_WAIT: "2" });
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, /^civm-agent: network: none: no address on any interface after 2s \(the image configures no DHCP client/m);
  assert.match(r.stdout, /^civm-agent: sshd: not installed \(add openssh-server/m);
  assert.equal(named(r.calls, "hostname").length, 3, "looked again each second for CIVM_ADDRESS_WAIT seconds");

  const ci = runAgent(makeHarness(), { name: "job", config: { command: "true" } });
  assert.equal(named(ci.calls, "hostname").length, 0, "a CI job without keys is not slowed down");
});

test("ssh_authorized_keys (string) installed for root only when there is no runner user", () => {
  const h = makeHarness({ runnerUser: false });
  const key = "ssh-ed25519 AAAAC3Nza dev@laptop";
  const r = runAgent(h, { name: "dev", config: { ssh_authorized_keys: key } });
  assert.equal(r.status, 0, r.out);
  assert.equal(readFileSync(join(h.root, "root/.ssh/authorized_keys"), "utf8"), `${key}\n`);
  assert.equal(existsSync(join(h.root, "home/runner/.ssh/authorized_keys")), false);
  assert.match(r.stdout, /no user runner in the image/);
});

test("config.mounts: 9p mounts with ro honoured; a failing mount is fatal", () => {
  const h = makeHarness();
  const mounts = [
    { tag: "src", path: "/mnt/src", ro: true },
    { tag: "out", path: "/mnt/out" },
  ];
  const r = runAgent(h, { name: "vm-1", config: { mounts, command: "true" } });
  assert.equal(r.status, 0, r.out);
  assert.deepEqual(named(r.calls, "mount").slice(1), [
    ["mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,ro", "src", join(h.root, "mnt/src")],
    ["mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L", "out", join(h.root, "mnt/out")],
  ]);
  assert.ok(statSync(join(h.root, "mnt/out")).isDirectory(), "mount point created");

  const failing = runAgent(makeHarness(), { name: "vm-1", config: { mounts, command: "echo ran" } }, { STUB_9P_STATUS: "32" });
  assert.notEqual(failing.status, 0);
  assert.match(failing.stdout, /error: cannot mount 9p tag src on \/mnt\/src/);
  assert.doesNotMatch(failing.stdout, /^ran$/m);
  assertPoweredOffLast(failing);

  const bad = runAgent(makeHarness(), { name: "vm-1", config: { mounts: [{ tag: "x", path: "relative" }] } });
  assert.match(bad.stdout, /error: config\.mounts must be a list/);
  assertPoweredOffLast(bad);
});

test("runner dir without run.sh: clear error, poweroff", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: { jitconfig: "J", runner_dir: "/opt/none" } });
  assert.notEqual(r.status, 0);
  assert.match(r.stdout, /error: no run\.sh in .*\/opt\/none/);
  assert.doesNotMatch(r.stdout, /^civm-agent: ready$/m);
  assertPoweredOffLast(r);
});

test("instance.json is parsed once: shell-hostile values arrive intact, nothing from them runs in the agent", () => {
  const h = makeHarness();
  const marker = join(h.dir, "pwned");
  // Quotes, $(...), backticks and newlines inside values must reach the workload as text.
  const command = `printf '%s|' 'it'"'"'s' "$(echo sub)"; echo; echo 'line2 \`touch ${marker}\` $(touch ${marker})'`;
  const r = runAgent(h, { name: "vm-1", config: { command, "whitelisted-event": "push'; touch " + marker + "; '", user: false } });
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, /^it's\|sub\|$/m);
  assert.match(r.stdout, /^line2 `touch .*` \$\(touch .*\)$/m);
  assert.equal(existsSync(marker), false, "no value was executed by the agent");
  assert.equal(named(r.calls, "runuser")[0]?.[2], "runner", "user: false means the default user");
});

test("malformed ssh_authorized_keys, labels or config: one clear error each, nothing runs", () => {
  const keys = runAgent(makeHarness(), { name: "vm-1", config: { ssh_authorized_keys: ["ok", 3], command: "echo ran" } });
  assert.match(keys.stdout, /error: config\.ssh_authorized_keys must be a string or a list of strings/);
  assert.doesNotMatch(keys.stdout, /^ran$/m);
  assertPoweredOffLast(keys);

  const h = makeHarness();
  const labels = runAgent(h, { name: "vm-1", config: { token: "T", repo: "o/r", labels: [{ a: 1 }] } });
  assert.match(labels.stdout, /error: config\.labels must be a string or a list of strings/);
  assert.deepEqual(labels.runnerCalls, []);
  assert.doesNotMatch(labels.out, /\bT\b.*\bT\b/, "the token is never printed");
  assertPoweredOffLast(labels);

  for (const bad of [[1, 2], { name: "x", config: "str" }]) {
    const r = runAgent(makeHarness(), bad);
    assert.match(r.stdout, /error: instance\.json is not a JSON object with an object "config"/);
    assertPoweredOffLast(r);
  }
});

test("boot units: with systemd running, the agent waits for growfs and network-online.target after the CD-ROM work, before ready", () => {
  const h = makeHarness();
  mkdirSync(join(h.root, "run/systemd/system"), { recursive: true });
  const r = runAgent(h, { name: "vm-1", config: { command: "echo job" } });
  assert.equal(r.status, 0, r.out);
  const names = r.calls.map((c) => c.join(" "));
  const wait = names.indexOf("systemctl start civm-growfs.service network-online.target");
  assert.ok(wait >= 0, `systemctl start civm-growfs.service network-online.target was called; calls:\n${names.join("\n")}`);
  assert.ok(names.indexOf("eject /dev/sr0") < wait, "the CD-ROM is read and ejected before the network wait");
  assert.ok(wait < names.findIndex((n) => n.startsWith("runuser ")), "the workload starts after the network wait");
  assertPoweredOffLast(r);
});

test("boot units: a failed growfs or network-online.target is a warning; the workload still runs", () => {
  const h = makeHarness();
  mkdirSync(join(h.root, "run/systemd/system"), { recursive: true });
  const r = runAgent(h, { name: "vm-1", config: { command: "echo job ran" } }, { STUB_SYSTEMCTL_STATUS: "1" });
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, /^civm-agent: warning: starting civm-growfs\.service network-online\.target failed \(status 1\); starting the workload anyway$/m);
  assert.match(r.stdout, /^job ran$/m);
  assertPoweredOffLast(r);
});

test("boot units: without systemd (no /run/systemd/system) nothing is waited for; nothing to run means no wait either", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: { command: "true" } });
  assert.equal(r.status, 0, r.out);
  assert.equal(named(r.calls, "systemctl").length, 0);
  mkdirSync(join(h.root, "run/systemd/system"), { recursive: true });
  const none = runAgent(h, { name: "vm-1", config: {} });
  assert.equal(named(none.calls, "systemctl").length, 0, "no workload, no network wait");
  assert.match(none.stdout, /^civm-agent: ready$/m);
});

test("poweroff: when poweroff -f fails, an orderly poweroff follows", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: { command: "true" } }, { STUB_POWEROFF_STATUS: "1" });
  assert.deepEqual(named(r.calls, "poweroff"), [["poweroff", "-f"], ["poweroff"]]);
  assert.match(r.stdout, /^civm-agent: poweroff -f failed \(status 1\); trying an orderly poweroff$/m);
});

// ---- config.caches (guest/lib/civm-caches.sh) ----------------------------------------------

/** An HTTP server in a process of its own (the agent runs synchronously): answers every request. */
async function httpServerProcess(t: { after: (f: () => void) => void }): Promise<number> {
  const { spawn } = await import("node:child_process");
  const child = spawn(process.execPath, ["-e", `const s = require("node:http").createServer((q, r) => r.end("ok")); s.listen(0, "127.0.0.1", () => console.log(s.address().port));`], { stdio: ["ignore", "pipe", "inherit"] });
  t.after(() => child.kill("SIGKILL"));
  return new Promise((resolve, reject) => {
    child.stdout!.once("data", (d: Buffer) => resolve(Number(d.toString().trim())));
    child.once("exit", (c) => reject(new Error(`test server exited ${c}`)));
  });
}

/** A port nothing listens on (bound, then closed). */
async function deadPort(): Promise<number> {
  const { createServer } = await import("node:net");
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", () => r()));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

const DOCKER_STUBS = { dockerd: "exit 0", docker: "exit 0", containerd: "exit 0" };
const MIRRORS = [
  { registry: "docker.io", url: "http://10.0.2.2:40001" },
  { registry: "ghcr.io", url: "http://10.0.2.2:40002/" },
];

test("caches: Docker, containerd and BuildKit get the registry mirrors; the job gets the proxy and apt uses it", async (t) => {
  const port = await httpServerProcess(t);
  const h = makeHarness({ stubs: DOCKER_STUBS });
  mkdirSync(join(h.root, "etc/apt/apt.conf.d"), { recursive: true });
  const proxy = `http://127.0.0.1:${port}`;
  const noProxy = "localhost,127.0.0.1,::1,10.0.2.2";
  const r = runAgent(h, { name: "vm-1", config: { jitconfig: "J", caches: { registry: MIRRORS, http: { url: proxy, noProxy } } } });
  assert.equal(r.status, 0, r.out);
  assert.deepEqual(JSON.parse(readFileSync(join(h.root, "etc/docker/daemon.json"), "utf8")), { "registry-mirrors": ["http://10.0.2.2:40001"] });
  const hosts = readFileSync(join(h.root, "etc/containerd/certs.d/docker.io/hosts.toml"), "utf8");
  assert.match(hosts, /^server = "https:\/\/registry-1\.docker\.io"$/m);
  assert.match(hosts, /^\[host\."http:\/\/10\.0\.2\.2:40001"\]\n {2}capabilities = \["pull", "resolve"\]$/m);
  assert.match(readFileSync(join(h.root, "etc/containerd/certs.d/ghcr.io/hosts.toml"), "utf8"), /^server = "https:\/\/ghcr\.io"\n\n\[host\."http:\/\/10\.0\.2\.2:40002"\]/m);
  const buildkit = readFileSync(join(h.root, "etc/buildkit/buildkitd.toml"), "utf8");
  for (const [reg, host] of [["docker.io", "10.0.2.2:40001"], ["ghcr.io", "10.0.2.2:40002"]]) {
    assert.ok(buildkit.includes(`[registry."${reg}"]\n  mirrors = ["${host}"]\n`), buildkit);
    assert.ok(buildkit.includes(`[registry."${host}"]\n  http = true\n`), buildkit);
  }
  const buildx = join(h.root, "home/runner/.docker/buildx/buildkitd.default.toml");
  assert.equal(readFileSync(buildx, "utf8"), buildkit, "buildx's default builder config for the job user");
  assert.ok(named(r.calls, "chown").some((c) => c[1] === "runner:" && c.includes(buildx)), "the job user owns its buildx config");
  assert.match(readFileSync(join(h.root, "etc/apt/apt.conf.d/80civm-proxy"), "utf8"), new RegExp(`^Acquire::http::Proxy "${proxy}";$`, "m"));
  const env = readFileSync(join(h.dir, "run.sh.env"), "utf8");
  for (const v of ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"]) assert.match(env, new RegExp(`^${v}=${proxy}$`, "m"));
  for (const v of ["no_proxy", "NO_PROXY"]) assert.match(env, new RegExp(`^${v}=${noProxy}$`, "m"));
  assert.match(r.stdout, /^civm-agent: registry caches: docker\.io ghcr\.io mirrored for docker containerd buildkit$/m);
  assert.match(r.stdout, /^civm-agent: HTTP cache: http:\/\/127\.0\.0\.1:\d+ answers; the job's HTTP\(S\)_PROXY and apt use it$/m);
  // Before the workload, after the network.
  assert.ok(lineIndex(r.stdout, /HTTP cache:/) < lineIndex(r.stdout, /^civm-agent: ready$/));
  assertPoweredOffLast(r);
});

test("caches: an image's own daemon.json keeps its settings (the mirror goes first); its own buildkitd.toml is left alone; a running dockerd reloads", () => {
  const h = makeHarness({ stubs: DOCKER_STUBS });
  mkdirSync(join(h.root, "etc/docker"), { recursive: true });
  mkdirSync(join(h.root, "etc/buildkit"), { recursive: true });
  mkdirSync(join(h.root, "run/systemd/system"), { recursive: true });
  writeFileSync(join(h.root, "etc/docker/daemon.json"), JSON.stringify({ "log-driver": "local", "registry-mirrors": ["https://mirror.example", "http://10.0.2.2:40001"] }));
  writeFileSync(join(h.root, "etc/buildkit/buildkitd.toml"), "debug = true\n");
  const r = runAgent(h, { name: "vm-1", config: { command: "true", caches: { registry: MIRRORS.slice(0, 1) } } });
  assert.equal(r.status, 0, r.out);
  assert.deepEqual(JSON.parse(readFileSync(join(h.root, "etc/docker/daemon.json"), "utf8")), { "log-driver": "local", "registry-mirrors": ["http://10.0.2.2:40001", "https://mirror.example"] });
  assert.equal(readFileSync(join(h.root, "etc/buildkit/buildkitd.toml"), "utf8"), "debug = true\n");
  assert.match(r.stdout, /buildkitd\.toml exists in the image; left as it is/);
  assert.deepEqual(named(r.calls, "systemctl").slice(-2), [["systemctl", "is-active", "--quiet", "docker.service"], ["systemctl", "reload", "docker.service"]]);
});

test("caches: an image without Docker, containerd or BuildKit gets none of their files", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: { command: "echo job ran", caches: { registry: MIRRORS } } });
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, /^job ran$/m);
  assert.match(r.stdout, /registry caches: no Docker, containerd or BuildKit in this image; nothing to configure/);
  for (const f of ["etc/docker", "etc/containerd", "etc/buildkit", "home/runner/.docker"]) assert.ok(!existsSync(join(h.root, f)), `${f} was written`);
});

test("caches: a proxy that does not answer at start is left out (no proxy variables, no apt proxy); the job runs", async () => {
  const h = makeHarness();
  mkdirSync(join(h.root, "etc/apt/apt.conf.d"), { recursive: true });
  const url = `http://127.0.0.1:${await deadPort()}`;
  const r = runAgent(h, { name: "vm-1", config: { jitconfig: "J", caches: { http: { url, noProxy: "localhost" } } } });
  assert.equal(r.status, 0, r.out);
  assert.match(r.stdout, new RegExp(`^civm-agent: warning: the HTTP cache at ${url} does not answer; the job runs without a proxy$`, "m"));
  assert.doesNotMatch(readFileSync(join(h.dir, "run.sh.env"), "utf8"), /proxy/i);
  assert.ok(!existsSync(join(h.root, "etc/apt/apt.conf.d/80civm-proxy")));
  assert.deepEqual(r.runnerCalls, [["run.sh", "--jitconfig", "J"]]);
});

test("caches: malformed config.caches is a warning, not a failure; no cache is used", () => {
  for (const caches of [[], { registry: [{ registry: "docker.io; rm -rf /", url: "http://10.0.2.2:1" }] }, { http: { url: "http://x\"; evil" } }]) {
    const h = makeHarness({ stubs: DOCKER_STUBS });
    const r = runAgent(h, { name: "vm-1", config: { command: "echo job ran", caches } });
    assert.equal(r.status, 0, r.out);
    assert.match(r.stdout, /^civm-agent: warning: config\.caches is malformed; the job runs without the host's caches$/m);
    assert.match(r.stdout, /^job ran$/m);
    assert.ok(!existsSync(join(h.root, "etc/docker")), JSON.stringify(caches));
  }
});

/** A guest booted for a snapshot (civm.snapshot on its command line), with what become_unique touches. */
function snapshotGuest(): Harness {
  const h = makeHarness({
    stubs: {
      dmesg: `echo "[ 1.0] random: crng reseeded due to virtual machine fork"`,
      perl: `echo "perl $4" >>"$STUB_CALLS.perl"; exit 0`,
      "civm-hostkeys": `echo "civm-hostkeys: host key (stub)"`,
      nice: `shift 2; exec "$@"`,
      networkctl: `exit 0`,
      sed: `exit 0`,
      date: `echo 2026-12-07T00:00:00Z`,
    },
  });
  mkdirSync(join(h.root, "proc", "sys", "kernel", "random"), { recursive: true });
  mkdirSync(join(h.root, "sys", "class", "rtc", "rtc0"), { recursive: true });
  mkdirSync(join(h.root, "sys", "class", "net", "eth0"), { recursive: true });
  mkdirSync(join(h.root, "etc", "ssh"), { recursive: true });
  mkdirSync(join(h.root, "run", "systemd", "system"), { recursive: true });
  writeFileSync(join(h.root, "proc", "cmdline"), "console=ttyS0 quiet civm.snapshot\n");
  writeFileSync(join(h.root, "proc", "sys", "kernel", "random", "uuid"), "0b6c6bd1-4f55-4b3c-9d4e-1a2b3c4d5e6f\n");
  writeFileSync(join(h.root, "proc", "sys", "kernel", "random", "boot_id"), "old\n");
  writeFileSync(join(h.root, "proc", "sys", "kernel", "hostname"), "civm-runner");
  writeFileSync(join(h.root, "sys", "class", "rtc", "rtc0", "since_epoch"), "1796600000\n");
  writeFileSync(join(h.root, "etc", "hostname"), "civm-runner\n");
  writeFileSync(join(h.root, "etc", "machine-id"), "f".repeat(32) + "\n");
  writeFileSync(join(h.root, "etc", "ssh", "ssh_host_ed25519_key"), "old key\n");
  return h;
}

test("snapshot boot (civm.snapshot): settles, announces the snapshot point, and once restored makes the copy unique before the workload", () => {
  const h = snapshotGuest();
  const r = runAgent(h, { name: "vm-1", restore: { rtcLagMicros: 123456 }, config: { command: "echo job-ran" } });
  assert.equal(r.status, 0, r.out);
  const order = [/snapshot: the boot settled \(running\) after \d+ s/, /snapshot point: waiting for the configuration disc/, /reading instance configuration/, /restored: RNG reseeded/, /restored: unique now \(hostname civm-runner-0b6c6bd1, machine-id 0b6c6bd14f554b3c9d4e1a2b3c4d5e6f/, /civm-agent: ready/, /job-ran/];
  const at = order.map((re) => lineIndex(r.out, re));
  assert.ok(at.every((i) => i >= 0), `every step logged:\n${r.out}`);
  assert.deepEqual([...at].sort((a, b) => a - b), at, `in this order:\n${r.out}`);
  assert.equal(readFileSync(join(h.root, "etc", "machine-id"), "utf8"), "0b6c6bd14f554b3c9d4e1a2b3c4d5e6f\n");
  assert.equal(readFileSync(join(h.root, "etc", "hostname"), "utf8"), "civm-runner-0b6c6bd1\n");
  assert.equal(readFileSync(join(h.root, "proc", "sys", "kernel", "hostname"), "utf8"), "civm-runner-0b6c6bd1");
  assert.ok(!existsSync(join(h.root, "etc", "ssh", "ssh_host_ed25519_key")), "the snapshot's host key is removed before the workload");
  // The boot id is bind-mounted from a fresh file; the clock step gets the RTC and civm's lag.
  const bind = named(r.calls, "mount").find((c) => c[1] === "--bind");
  assert.ok(bind && bind[3] === join(h.root, "proc", "sys", "kernel", "random", "boot_id"), JSON.stringify(r.calls));
  assert.match(readFileSync(bind[2]!, "utf8"), /^0b6c6bd1-4f55-4b3c-9d4e-1a2b3c4d5e6f\n$/);
  assert.match(readFileSync(`${h.calls}.perl`, "utf8"), /^perl 123456$/m);
  assert.deepEqual(named(r.calls, "networkctl")[0], ["networkctl", "renew", "eth0"]);
});


test("snapshot boot whose boot has not settled in time: a warning naming the state, then the snapshot point all the same", () => {
  const h = snapshotGuest();
  const r = runAgent(h, { name: "vm-1", restore: {}, config: { command: "true" } }, { STUB_SYSTEM_STATE: "starting", STUB_SYSTEMCTL_STATUS: "1" });
  assert.equal(r.status, 0, r.out);
  const warn = lineIndex(r.out, /warning: snapshot: the boot had not settled after \d+ s \(starting\); the snapshot keeps that unfinished work/);
  assert.ok(warn >= 0 && warn < lineIndex(r.out, /snapshot point: waiting for the configuration disc/), r.out);
  // civm reads the same line off the console and repeats it in its own log (src/vm/run.ts).
  assert.match(unsettledBoot(r.out) ?? "", /^snapshot: the boot had not settled after \d+ s \(starting\);/);
  assert.equal(unsettledBoot("civm-agent: snapshot: the boot settled (running) after 3 s\n"), undefined);
});
test("a cold boot (no civm.snapshot) does none of the snapshot steps", () => {
  const h = makeHarness();
  const r = runAgent(h, { name: "vm-1", config: { command: "echo job-ran" } });
  assert.equal(r.status, 0, r.out);
  assert.doesNotMatch(r.out, /snapshot point|restored:/);
});
