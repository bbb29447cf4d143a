// The network policy on real QEMU: the tiny guest probes addresses from inside, civm and
// QEMU run in a network namespace this test creates (docs/security.md), so nothing leaves it.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync, readFileSync, readdirSync, existsSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { civmEnv, runCivm, startCivm, waitFor, leftovers, qemuProcessesOf, consoleLogOf, type CivmEnv } from "../support/civm-cli.js";
import { createTestNet, type TestNet } from "../support/netns.js";
import { testQemuUser } from "../support/paths.js";

let guest: TinyGuest;
let net: TestNet;
const HOST_SVC = 8081; // on the host namespace's 127.0.0.1 and its own address
const HOST_OTHER = 8082; // loopback only, never allowed
const WORLD = 8080;

before(async () => {
  guest = await buildTinyGuest();
  net = createTestNet();
  await net.serve(net.host, HOST_SVC, "host-service");
  await net.serve(net.host, HOST_OTHER, "other-host-service", "127.0.0.1");
  await net.serve(net.world, WORLD, "world");
});
after(() => net?.close());

function instances(e: CivmEnv, name: string, config: Record<string, unknown>, over: Record<string, unknown> = {}): void {
  writeFileSync(join(e.root, "instances.json"), JSON.stringify([{
    name, image: guest.disk, "cpu-cores": 1, ram: "256M", "timeout-seconds": 120,
    kernel: guest.kernel, initrd: guest.initrd, cmdline: "console=ttyS0 panic=-1 quiet", config, ...over,
  }]));
}

const TARGETS = {
  hostViaGateway: `10.0.2.2:${HOST_SVC}`,
  hostOther: `10.0.2.2:${HOST_OTHER}`,
  hostDirect: `198.51.100.1:${HOST_SVC}`,
  metadata: `169.254.169.254:${WORLD}`,
  private: `10.99.0.1:${WORLD}`,
  public: `203.0.113.7:${WORLD}`,
};

/** Runs one probing guest in the test namespace; returns target → "ok" | "fail" and civm's output. */
async function probe(network: unknown): Promise<{ results: Record<string, string>; stderr: string; console: string }> {
  const e = civmEnv();
  instances(e, "probe", { tiny: "probe", probe: Object.values(TARGETS).join(" ") }, network === undefined ? {} : { network });
  const r = await runCivm(["run", "probe"], e, { wrap: net.wrap });
  assert.equal(r.code, 0, r.stderr);
  const text = consoleLogOf(r.stderr);
  const results: Record<string, string> = {};
  for (const [k, t] of Object.entries(TARGETS)) {
    const m = new RegExp(`probe ${t.replace(/\./g, "\\.")} (ok|fail)`).exec(text);
    results[k] = m ? m[1]! : "missing";
  }
  assert.deepEqual(leftovers(e), []);
  assert.deepEqual(net.civmTables(), [], "the VM's nftables table outlived it");
  return { results, stderr: r.stderr, console: text };
}

test("default policy: the host (through the gateway and directly), metadata and private addresses are refused; the internet is reached", async () => {
  const { results, stderr } = await probe(undefined);
  assert.deepEqual(results, { hostViaGateway: "fail", hostOther: "fail", hostDirect: "fail", metadata: "fail", private: "fail", public: "ok" });
  assert.match(stderr, /network restricted/);
});

test("network.allow opens exactly its entries: host:PORT, ADDRESS:PORT and a CIDR", async () => {
  const { results } = await probe({ allow: [`host:${HOST_SVC}`, `169.254.169.254:${WORLD}`, "10.99.0.0/16"] });
  assert.deepEqual(results, { hostViaGateway: "ok", hostOther: "fail", hostDirect: "ok", metadata: "ok", private: "ok", public: "ok" });
});

test("network: none gives the guest no network device", async () => {
  const { results, console: text } = await probe("none");
  assert.match(text, /probe: no eth0/);
  assert.deepEqual(Object.values(results), Object.values(TARGETS).map(() => "fail"));
});

test("network: unrestricted turns the policy off, with a warning", async () => {
  const { results, stderr } = await probe("unrestricted");
  assert.match(stderr, /warning: probe: network: unrestricted/);
  assert.deepEqual(results, { hostViaGateway: "ok", hostOther: "ok", hostDirect: "ok", metadata: "ok", private: "ok", public: "ok" });
});

test("QEMU runs as its unprivileged user with a group of its own and seccomp; SIGINT to civm's process group stops the VM through ACPI (exit 5)", async () => {
  const e = civmEnv();
  instances(e, "vm-int", { tiny: "acpi" });
  const p = startCivm(["run", "vm-int", "--grace", "20"], e, { wrap: net.wrap, detached: true });
  await waitFor(() => /running \(pid \d+/.test(p.stderrSoFar()), 60_000, "QEMU to run");
  await waitFor(() => safeRead(join(e.logsDir, readdirLog(e))).includes("waiting for acpi power button"), 60_000, "the guest to wait for the power button");
  const pid = Number(/running \(pid (\d+)/.exec(p.stderrSoFar())![1]);
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const uid = Number(/^Uid:\s+(\d+)/m.exec(status)![1]);
  const gid = Number(/^Gid:\s+(\d+)/m.exec(status)![1]);
  // The suite runs QEMU as a user of its own (test/support/paths.ts), named like civm-qemu.
  const qemuUserName = testQemuUser ?? "civm-qemu";
  const passwd = readFileSync("/etc/passwd", "utf8").split("\n").find((l) => l.startsWith(`${qemuUserName}:`));
  assert.ok(passwd, `${qemuUserName} does not exist`);
  assert.equal(uid, Number(passwd.split(":")[2]), `QEMU does not run as ${qemuUserName}`);
  assert.ok(gid >= 2_100_000_000, `QEMU's group ${gid} is not a per-VM group`);
  assert.match(status, /^Seccomp:\s+2$/m, "QEMU has no seccomp filter");
  assert.match(status, /^CapEff:\s+0+$/m, "QEMU kept capabilities");
  assert.deepEqual(net.civmTables(), [`civm_g${gid}`]);
  process.kill(-p.child.pid!, "SIGINT");
  const r = await p.done;
  assert.equal(r.code, 5, r.stderr);
  assert.match(r.stderr, /asking the guest to power off \(ACPI\)/);
  assert.match(consoleLogOf(r.stderr), /acpi power button pressed/);
  assert.deepEqual(net.civmTables(), []);
  assert.deepEqual(leftovers(e), []);
});

test("civm killed with -9: the orphaned QEMU stays fenced; the next civm ends it and removes its table", async () => {
  const e = civmEnv();
  instances(e, "vm-orphan", { tiny: "hang" });
  const p = startCivm(["run", "vm-orphan"], e, { wrap: net.wrap });
  await waitFor(() => /running \(pid \d+/.test(p.stderrSoFar()), 60_000, "QEMU to run");
  p.child.kill("SIGKILL");
  await p.done;
  assert.equal(qemuProcessesOf(e).length, 1);
  assert.equal(net.civmTables().length, 1, "the orphan lost its fence");
  const ls = await runCivm(["ls"], e, { wrap: net.wrap });
  assert.equal(ls.code, 0, ls.stderr);
  assert.deepEqual(qemuProcessesOf(e), []);
  assert.deepEqual(net.civmTables(), []);
  assert.deepEqual(leftovers(e), []);
});

function readdirLog(e: CivmEnv): string {
  const logs = existsSync(e.logsDir) ? readdirSync(e.logsDir).filter((n) => n.endsWith(".log") && !n.includes("supervisor")) : [];
  return logs[0] ?? "missing.log";
}

function safeRead(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

test("a policy nftables refuses: the VM never runs a guest instruction, exit 8, nothing left", async () => {
  const e = civmEnv();
  // An nft that fails to load any ruleset (but lists and deletes as usual).
  writeFileSync(join(e.shimDir, "nft"), `#!/bin/sh\nif [ "$1" = "-f" ]; then echo "Error: Could not process rule: Operation not supported" >&2; exit 1; fi\nexec /usr/sbin/nft "$@"\n`, { mode: 0o755 });
  instances(e, "vm-nofence", { tiny: "poweroff" });
  const r = await runCivm(["run", "vm-nofence"], e, { wrap: net.wrap });
  assert.equal(r.code, 8, r.stderr);
  assert.match(r.stderr, /cannot apply the VM's network policy with nftables[\s\S]*Operation not supported/);
  const logs = existsSync(e.logsDir) ? readdirSync(e.logsDir).filter((n) => n.endsWith(".log")) : [];
  for (const l of logs) assert.doesNotMatch(readFileSync(join(e.logsDir, l), "utf8"), /tiny-guest|Linux version/, "the guest ran");
  assert.deepEqual(leftovers(e), []);
  assert.deepEqual(qemuProcessesOf(e), []);
  assert.deepEqual(net.civmTables(), []);
});
