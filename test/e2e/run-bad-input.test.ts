// Every bad input to `civm run` is one clear error, exit 2, and nothing is started.
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync, cpSync, mkdirSync, existsSync, readFileSync, readdirSync } from "node:fs";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { civmEnv, runCivm, qemuStarts, leftovers } from "../support/civm-cli.js";
import { repoRoot } from "../support/paths.js";

interface Case {
  what: string;
  file: string;
  content: string;
  name?: string;
  /** Extra civm run arguments. */
  args?: string[];
  message: RegExp;
}

const base = { name: "vm-1", image: "base.qcow2", "timeout-seconds": 60, config: {} };
const json = (v: unknown) => JSON.stringify(v, null, 2);

const cases: Case[] = [
  { what: "duplicate names", file: "instances.json", content: json([base, { ...base }]), message: /instances #1 and #2 are both named "vm-1"; names must be unique/ },
  { what: "name not in the file", file: "instances.json", content: json([base]), name: "vm-9", message: /instances\.json: no instance named "vm-9"; the file defines "vm-1"/ },
  { what: "unknown key with a suggestion", file: "instances.json", content: json([{ ...base, "cpu-core": 2 }]), message: /unknown key "cpu-core"; did you mean "cpu-cores"\?/ },
  { what: "missing image", file: "instances.json", content: json([{ ...base, image: "nope.qcow2" }]), message: /"image" .*nope\.qcow2 does not exist/ },
  { what: "image that is a directory", file: "instances.json", content: json([{ ...base, image: "." }]), message: /"image" .* is a directory/ },
  { what: "bad size", file: "instances.json", content: json([{ ...base, ram: "4 gigs" }]), message: /"ram".*"4 gigs"/ },
  { what: "non-positive number", file: "instances.json", content: json([{ ...base, "cpu-cores": 0 }]), message: /"cpu-cores"/ },
  { what: "port out of range", file: "instances.json", content: json([{ ...base, "ssh-port": 70000 }]), message: /"ssh-port".*70000/ },
  { what: "malformed JSON with line and column", file: "instances.json", content: '[\n  {"name": "vm-1",\n   "image": "base.qcow2" "ram": "1G"}\n]\n', message: /instances\.json:3:\d+/ },
  { what: "malformed YAML with line and column", file: "instances.yaml", content: "- name: vm-1\n  image: base.qcow2\n   ram: [1G\n", message: /instances\.yaml:\d+:\d+/ },
  { what: "wrong top-level type", file: "instances.json", content: json({ name: "vm-1" }), message: /list/i },
  { what: "unknown pre-processor function", file: "instances.json", content: json([{ ...base, config: { t: "${{ vault:x }}" } }]), message: /unknown function "vault"[\s\S]*env/i },
  { what: "missing environment variable", file: "instances.json", content: json([{ ...base, config: { t: "${{ env:CIVM_NOPE_NOT_SET }}" } }]), message: /CIVM_NOPE_NOT_SET/ },
  { what: "missing file for file:", file: "instances.json", content: json([{ ...base, config: { t: "${{ file:secret.txt }}" } }]), message: /config\.t.*secret\.txt|secret\.txt.*config\.t/s },
  { what: "timeout-seconds past the timer limit", file: "instances.json", content: json([{ ...base, "timeout-seconds": 99999999 }]), message: /instances\.json: instance "vm-1" \(#1\): "timeout-seconds" must be a whole number of seconds from 1 to 2147483 seconds \(about 24\.8 days, the longest a timer can wait\) \(got 99999999\)/ },
  { what: "--grace that is not a number", file: "instances.json", content: json([base]), args: ["--grace", "abc"], message: /--grace "abc" is not accepted: --grace must be a whole number of seconds from 0 to 2147483 seconds/ },
  { what: "--grace past the timer limit", file: "instances.json", content: json([base]), args: ["--grace", "99999999"], message: /--grace "99999999" is not accepted/ },
];

for (const c of cases) {
  test(`bad input: ${c.what} → exit 2, clear message, nothing started`, async () => {
    const e = civmEnv();
    writeFileSync(join(e.root, "base.qcow2"), "");
    writeFileSync(join(e.root, c.file), c.content);
    const r = await runCivm(["run", c.name ?? "vm-1", ...(c.file === "instances.json" ? [] : ["-f", c.file]), ...(c.args ?? [])], e);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /^civm: error: /m);
    assert.match(r.stderr, c.message);
    assert.doesNotMatch(r.stderr, /\n\s+at .+:\d+:\d+\)?\n/, "a stack trace was printed");
    assert.equal(qemuStarts(e), 0, "QEMU was started");
    assert.deepEqual(leftovers(e), []);
  });
}

test("the seed examples load: seed 001 (duplicate fixed) and seed 002 through the CLI", async () => {
  const e = civmEnv();
  const fixtures = join(repoRoot, "test", "fixtures", "instances");
  const dir = join(e.root, "executor");
  mkdirSync(join(e.root, "images", "ubuntu", "build"), { recursive: true });
  writeFileSync(join(e.root, "images", "ubuntu", "build", "ubuntu-amd64.qcow2"), "");
  cpSync(fixtures, dir, { recursive: true });
  // A name that is not in the file gets the list of names back: proof that the file loaded.
  for (const f of ["seed-001-fixed.json", "seed-002-fixed.json"]) {
    const r = await runCivm(["run", "no-such-vm", "-f", f], e, { cwd: dir });
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /no-such-vm/);
    assert.match(r.stderr, /vm-1/);
    assert.doesNotMatch(r.stderr, /unknown key|duplicate/i);
  }
});

test("an image that is a text file is refused before any QEMU starts (instances file and --image), exit 2", async () => {
  const e = civmEnv();
  writeFileSync(join(e.root, "notes.txt"), "this is a README, not a disk\n".repeat(50));
  writeFileSync(join(e.root, "instances.json"), json([{ ...base, image: "notes.txt" }]));
  const runs = [
    { args: ["run", "vm-1"], message: /instances\.json: instance "vm-1": "image" .*notes\.txt is not a disk image: it is text\. Point it at a disk image/ },
    { args: ["run", "--image", "notes.txt"], message: /--image notes\.txt: .*notes\.txt is not a disk image: it is text\./ },
    { args: ["run", "--image", "notes.txt", "--detach"], message: /--image notes\.txt: .*notes\.txt is not a disk image: it is text\./ },
  ];
  for (const { args, message } of runs) {
    const r = await runCivm(args, e);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, /^civm: error: /m);
    assert.match(r.stderr, message);
    assert.doesNotMatch(r.stderr, /\n\s+at .+:\d+:\d+\)?\n/, "a stack trace was printed");
  }
  assert.equal(qemuStarts(e), 0, "QEMU was started");
  assert.deepEqual(leftovers(e), []);
});

test("ad-hoc duration flags: --timeout past the timer limit and --grace abc are refused, exit 2", async () => {
  const e = civmEnv();
  writeFileSync(join(e.root, "disk.img"), Buffer.alloc(65536));
  for (const [flag, value, message] of [
    ["--timeout", "99999999", /--timeout "99999999" is not accepted: --timeout must be a whole number of seconds from 0 to 2147483 seconds \(about 24\.8 days, the longest a timer can wait\); 0 = never/],
    ["--grace", "abc", /--grace "abc" is not accepted/],
    ["--wait-timeout", "-5", /--wait-timeout "-5" is not accepted/],
  ] as const) {
    const r = await runCivm(["run", "--image", "disk.img", "--detach", "--wait", flag, value], e);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, message);
  }
  assert.equal(qemuStarts(e), 0, "QEMU was started");
  assert.deepEqual(leftovers(e), []);
});

test("tampered registry entries: civm ls reports them refused; nothing is deleted and no process is signalled", async (t) => {
  const e = civmEnv();
  const reg = join(e.stateDir, "registry");
  mkdirSync(reg, { recursive: true });
  mkdirSync(join(e.stateDir, "vms"), { recursive: true });
  const now = new Date().toISOString();
  const dead = 4194301; // above the usual pid_max: no such process
  // A work dir outside <state>/vms, holding a marker that must survive.
  const outside = join(e.root, "precious", "evil-a1b2c3d4");
  mkdirSync(outside, { recursive: true });
  writeFileSync(join(outside, "marker"), "keep");
  writeFileSync(join(reg, "a1b2c3d4.json"), JSON.stringify({ id: "a1b2c3d4", name: "evil", ownerPid: dead, startedAt: now, workDir: outside, consoleLog: "/dev/null", keep: false }));
  // A live process the test started whose argv names the entry's work dir (the old check would
  // have signalled it), recorded with a start time that is not its own.
  const workDir = join(e.stateDir, "vms", "vm-b1b2c3d4");
  mkdirSync(workDir);
  writeFileSync(join(workDir, "marker"), "keep");
  const victim = spawn("sh", ["-c", "sleep 600; true", workDir], { stdio: "ignore", detached: true });
  t.after(() => process.kill(-victim.pid!, "SIGKILL")); // sh and its sleep

  await new Promise((r) => setTimeout(r, 200));
  const startTime = Number(readFileSync(`/proc/${victim.pid}/stat`, "utf8").split(") ")[1]!.split(" ")[19]);
  writeFileSync(join(reg, "b1b2c3d4.json"), JSON.stringify({ id: "b1b2c3d4", name: "vm", ownerPid: dead, owner: { startTime: 1 }, qemuPid: victim.pid, qemu: { startTime: startTime + 1000 }, startedAt: now, workDir, consoleLog: "/dev/null", keep: false }));

  const ls = await runCivm(["ls"], e);
  assert.equal(ls.code, 0, ls.stderr);
  assert.match(ls.stdout, /^REFUSED \(left untouched/m);
  assert.match(ls.stdout, /a1b2c3d4\.json: its work dir ".*precious\/evil-a1b2c3d4" is not inside .*state\/vms/);
  assert.match(ls.stdout, new RegExp(`b1b2c3d4\\.json: its QEMU pid ${victim.pid} names the work dir but started at tick ${startTime}, not the recorded ${startTime + 1000}: it is not the VM's QEMU`));
  const json = JSON.parse((await runCivm(["ls", "--json"], e)).stdout) as { id: string; state: string; reason?: string }[];
  assert.deepEqual(json.map((j) => [j.id, j.state]).sort(), [["a1b2c3d4", "refused"], ["b1b2c3d4", "refused"]]);
  // civm stop cannot pick them either.
  const stop = await runCivm(["stop", "vm"], e);
  assert.equal(stop.code, 2, stop.stderr);
  assert.equal(existsSync(join(outside, "marker")), true, "a folder outside the state dir was deleted");
  assert.equal(existsSync(join(workDir, "marker")), true, "the work dir of a refused entry was deleted");
  assert.deepEqual(readdirSync(reg).sort(), ["a1b2c3d4.json", "b1b2c3d4.json"]);
  assert.equal(victim.exitCode, null, "the process was signalled");
  assert.equal(victim.signalCode, null, "the process was signalled");
});
