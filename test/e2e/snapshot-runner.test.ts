// civm-runner restored from a memory snapshot (docs/images.md "Snapshots"): two VMs restored
// from one snapshot are different machines before their job runs (boot_id, random bytes,
// SSH host keys, machine-id, hostname) and their clocks are the host's. The snapshot is made
// on first use in the shared civm-runner store and kept there (keyed by the image, this
// QEMU and these settings), so later runs only restore.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { startCivm } from "../support/civm-cli.js";
import { ensureRunnerImage, leftoversNamed, qemuProcessesNamed, runnerEnv, uniqueName, RUNNER_IMAGE } from "../support/runner-image.js";

before(async () => {
  await ensureRunnerImage();
});

// Printed by the job once the new host keys exist (they are made beside the workload).
const COMMAND = [
  "for i in $(seq 120); do [ -e /etc/ssh/ssh_host_ecdsa_key.pub ] && break; sleep 0.5; done",
  'echo "ID boot_id=$(cat /proc/sys/kernel/random/boot_id) machine_id=$(cat /etc/machine-id) host=$(hostname) random=$(head -c16 /dev/urandom | od -An -tx1 | tr -d \' \\n\')"',
  'for k in /etc/ssh/ssh_host_*_key.pub; do echo "KEY $(ssh-keygen -lf $k | cut -d" " -f2)"; done',
  'echo "CLOCK $(date +%s.%N)"',
].join("; ");

interface Seen {
  fields: Record<string, string>;
  keys: string[];
  guestClock: number;
  hostClock: number;
  stderr: string;
}

async function restoreOne(e: ReturnType<typeof runnerEnv>, file: string, name: string): Promise<Seen> {
  const started = startCivm(["run", "-f", file, name, "--snapshot", "--console"], e);
  let out = "";
  let hostClock = 0;
  started.child.stdout!.on("data", (d: Buffer) => {
    out += d.toString();
    if (!hostClock && /CLOCK \d+\.\d+/.test(out)) hostClock = Date.now() / 1000;
  });
  const r = await started.done;
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /restored from snapshot [0-9a-f]{8} of civm-runner/, r.stderr);
  assert.match(out, /civm-agent: restored: RNG reseeded \(VM generation ID changed\)/);
  assert.match(out, /civm-agent: restored: unique now/);
  const id = /ID (.*)/.exec(out);
  assert.ok(id, out);
  const fields = Object.fromEntries(id[1]!.trim().split(" ").map((kv) => kv.split("=") as [string, string]));
  const keys = [...out.matchAll(/KEY (SHA256:\S+)/g)].map((m) => m[1]!);
  assert.equal(keys.length, 2, `two host keys (ed25519, ecdsa): ${out}`);
  const guestClock = Number(/CLOCK (\d+\.\d+)/.exec(out)![1]);
  return { fields, keys, guestClock, hostClock, stderr: r.stderr };
}

test("two civm-runner VMs restored from one snapshot differ in boot_id, random bytes, SSH host keys, machine-id and hostname; their clocks are the host's", { timeout: 1_800_000 }, async () => {
  // The host's QEMU, not the test's recording shim: the snapshot is kept for later runs.
  const e = runnerEnv();
  e.env = { ...e.env, PATH: (e.env.PATH ?? "").split(":").filter((p) => p !== e.shimDir).join(":") };
  const prefix = uniqueName("snaprun");
  const file = join(e.root, "instances.json");
  const inst = (name: string) => ({ name, image: RUNNER_IMAGE, "cpu-cores": 2, ram: "1G", "timeout-seconds": 600, config: { command: COMMAND } });
  writeFileSync(file, JSON.stringify([inst(`${prefix}-a`), inst(`${prefix}-b`)], null, 2));
  // The first makes the snapshot if the store has none for these settings; then both restore at once.
  const first = await restoreOne(e, file, `${prefix}-a`);
  const [a, b] = await Promise.all([restoreOne(e, file, `${prefix}-a`), restoreOne(e, file, `${prefix}-b`)]);
  for (const s of [first, a, b]) {
    assert.ok(Math.abs(s.guestClock - s.hostClock) < 1, `guest clock ${s.guestClock} vs host ${s.hostClock}`);
  }
  for (const k of ["boot_id", "machine_id", "host", "random"]) {
    assert.ok(a.fields[k] && b.fields[k], `${k} printed`);
    assert.notEqual(a.fields[k], b.fields[k], `${k} differs between the two restored VMs`);
    assert.notEqual(first.fields[k], a.fields[k], `${k} differs from the earlier restore`);
  }
  assert.match(a.fields.host!, /^civm-runner-[0-9a-f]{8}$/);
  assert.match(a.fields.machine_id!, /^[0-9a-f]{32}$/);
  assert.notDeepEqual(a.keys, b.keys, "SSH host keys differ");
  for (const k of a.keys) assert.ok(!b.keys.includes(k) && !first.keys.includes(k), `host key ${k} shared`);
  assert.deepEqual(leftoversNamed(e, prefix), []);
  assert.deepEqual(qemuProcessesNamed(e, prefix), []);
});
