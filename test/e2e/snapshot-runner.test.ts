// civm-runner restored from a memory snapshot (docs/images.md "Snapshots"): two VMs restored
// from one snapshot are different machines before their job runs (boot_id, random bytes,
// SSH host keys, machine-id, hostname) and their clocks are the host's. The snapshot is made
// on first use in the shared civm-runner store and kept there (keyed by the image, this
// QEMU and these settings), so later runs only restore.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { startCivm } from "../support/civm-cli.js";
import { ensureRunnerImage, leftoversNamed, qemuProcessesNamed, runnerEnv, uniqueName, RUNNER_IMAGE } from "../support/runner-image.js";

before(async () => {
  await ensureRunnerImage();
});

// Printed by the job once the new host keys exist (they are made beside the workload). The
// clock is compared NTP-style (the console is too slow to time under load): the guest's time
// before and after asking the host's (HTTP to a server of this test), whose answer is its time.
const command = (port: number) => [
  "for i in $(seq 120); do [ -e /etc/ssh/ssh_host_ecdsa_key.pub ] && break; sleep 0.5; done",
  'echo "ID boot_id=$(cat /proc/sys/kernel/random/boot_id) machine_id=$(cat /etc/machine-id) host=$(hostname) random=$(head -c16 /dev/urandom | od -An -tx1 | tr -d \' \\n\')"',
  'for k in /etc/ssh/ssh_host_*_key.pub; do echo "KEY $(ssh-keygen -lf $k | cut -d" " -f2)"; done',
  `t1=$(date +%s.%N); h=$(curl -s http://10.0.2.2:${port}/); t2=$(date +%s.%N); echo "CLOCK $t1 $h $t2"`,
].join("; ");

interface Seen {
  fields: Record<string, string>;
  keys: string[];
  /** Host clock minus the guest's (the midpoint of its two readings), and half the round trip. */
  offset: number;
  bound: number;
  stderr: string;
}

async function restoreOne(e: ReturnType<typeof runnerEnv>, file: string, name: string): Promise<Seen> {
  const started = startCivm(["run", "-f", file, name, "--snapshot", "--console"], e);
  let out = "";
  started.child.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  const r = await started.done;
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /restored from snapshot [0-9a-f]{8} of civm-runner/, r.stderr);
  assert.match(out, /civm-agent: restored: RNG reseeded \(VM generation ID changed\)/);
  assert.match(out, /civm-agent: restored: unique now/);
  const id = /ID (boot_id=.*)/.exec(out);
  assert.ok(id, out);
  const fields = Object.fromEntries(id[1]!.trim().split(" ").map((kv) => kv.split("=") as [string, string]));
  const keys = [...out.matchAll(/KEY (SHA256:\S+)/g)].map((m) => m[1]!);
  assert.equal(keys.length, 2, `two host keys (ed25519, ecdsa): ${out}`);
  const c = /CLOCK (\d+\.\d+) (\d+\.\d+) (\d+\.\d+)/.exec(out);
  assert.ok(c, `the clock line: ${out}`);
  const [t1, host, t2] = [Number(c[1]), Number(c[2]), Number(c[3])];
  return { fields, keys, offset: host - (t1 + t2) / 2, bound: (t2 - t1) / 2, stderr: r.stderr };
}

test("two civm-runner VMs restored from one snapshot differ in boot_id, random bytes, SSH host keys, machine-id and hostname; their clocks are the host's", { timeout: 1_800_000 }, async (t) => {
  const server = createServer((_req, res) => res.end((Date.now() / 1000).toFixed(3)));
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  t.after(() => server.close());
  const port = (server.address() as AddressInfo).port;
  // The host's QEMU, not the test's recording shim: the snapshot is kept for later runs.
  const e = runnerEnv();
  e.env = { ...e.env, PATH: (e.env.PATH ?? "").split(":").filter((p) => p !== e.shimDir).join(":") };
  const prefix = uniqueName("snaprun");
  const file = join(e.root, "instances.json");
  const inst = (name: string) => ({ name, image: RUNNER_IMAGE, "cpu-cores": 2, ram: "1G", "timeout-seconds": 600, network: { allow: [`host:${port}`] }, config: { command: command(port) } });
  writeFileSync(file, JSON.stringify([inst(`${prefix}-a`), inst(`${prefix}-b`)], null, 2));
  // The first makes the snapshot if the store has none for these settings; then both restore at once.
  const first = await restoreOne(e, file, `${prefix}-a`);
  const [a, b] = await Promise.all([restoreOne(e, file, `${prefix}-a`), restoreOne(e, file, `${prefix}-b`)]);
  for (const s of [first, a, b]) {
    t.diagnostic(`clock: host - guest = ${s.offset.toFixed(3)} s (± ${s.bound.toFixed(3)} s)`);
    assert.ok(Math.abs(s.offset) < 1, `the guest's clock is ${s.offset.toFixed(3)} s (± ${s.bound.toFixed(3)}) off the host's`);
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
