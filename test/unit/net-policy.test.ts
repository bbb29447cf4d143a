// The network policy as data (parsing, validation) and the nftables table civm renders for it.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseAllowEntry, parseNetworkValue, DEFAULT_NETWORK } from "../../src/net/policy.js";
import { renderTable, hostResolvers, ownerOfComment, tableName, VM_GID_BASE, deleteTable } from "../../src/net/nft.js";
import { accessProblem, setprivArgs } from "../../src/net/identity.js";
import { devNetwork } from "../../src/dev/plan.js";
import { buildQemuArgs, type QemuPlan } from "../../src/vm/argv.js";

test("allow entries: host:PORT, address, CIDR, CIDR:PORT, [v6]:PORT and NAME:PORT", () => {
  assert.deepEqual(parseAllowEntry("host:8443").target, { kind: "host" });
  assert.equal(parseAllowEntry("host:8443").port, 8443);
  assert.deepEqual(parseAllowEntry("10.1.2.3").target, { kind: "cidr", family: 4, cidr: "10.1.2.3/32" });
  assert.equal(parseAllowEntry("10.1.2.3").port, undefined);
  assert.deepEqual(parseAllowEntry("10.1.0.0/16:5432"), { raw: "10.1.0.0/16:5432", target: { kind: "cidr", family: 4, cidr: "10.1.0.0/16" }, port: 5432 });
  assert.deepEqual(parseAllowEntry("[fd00::1]:443").target, { kind: "cidr", family: 6, cidr: "fd00::1/128" });
  // A bare IPv6 address is an address: its port needs brackets.
  assert.deepEqual(parseAllowEntry("fd00::1:443").target, { kind: "cidr", family: 6, cidr: "fd00::1:443/128" });
  assert.deepEqual(parseAllowEntry("fd00::/8").target, { kind: "cidr", family: 6, cidr: "fd00::/8" });
  assert.deepEqual(parseAllowEntry("GHES.corp.example:443").target, { kind: "name", host: "ghes.corp.example" });
});

test("allow entries that are too broad or malformed are refused with the accepted forms", () => {
  for (const [entry, why] of [
    ["host", /without a port/],
    ["ghes.example", /names a host without a port/],
    ["host:0", /port that is not a number from 1 to 65535/],
    ["10.0.0.0/33", /not an address, CIDR or host name/],
    ["fd00::g:443", /IPv6 address with a port; write it in brackets/],
    ["[10.0.0.1]:80", /no IPv6 address/],
    ["", /is empty/],
    ["a b:80", /not an address, CIDR or host name followed by a port/],
  ] as const) {
    assert.throws(() => parseAllowEntry(entry), (e: Error) => why.test(e.message) && /"host:PORT"/.test(e.message), entry);
  }
});

test("network values: modes, {allow}, and every problem named", () => {
  assert.deepEqual(parseNetworkValue(undefined).value, DEFAULT_NETWORK);
  assert.deepEqual(parseNetworkValue("none").value, { mode: "none", allow: [] });
  assert.equal(parseNetworkValue({ allow: ["host:80"] }).value?.allow.length, 1);
  const bad = parseNetworkValue({ allow: ["host", 7], mode: "open", extra: 1 }).problems!.join("\n");
  assert.match(bad, /unknown key "extra"/);
  assert.match(bad, /"mode" must be "restricted", "none" or "unrestricted", but it is "open"/);
  assert.match(bad, /"allow"\[0\]: "host" names the host without a port/);
  assert.match(bad, /"allow"\[1\] must be a string/);
  assert.match(parseNetworkValue({ mode: "none", allow: ["host:80"] }).problems![0]!, /only applies to the restricted mode/);
  assert.match(parseNetworkValue("off").problems![0]!, /"restricted" \(the default\), "none", "unrestricted"/);
  assert.match(parseNetworkValue(["host:80"]).problems![0]!, /but it is a list/);
});

test("dev VM flags: --allow and --network, with errors that name the flag", () => {
  assert.deepEqual(devNetwork({}), { mode: "restricted", allow: [] });
  assert.equal(devNetwork({ allow: ["host:5000"] }).allow[0]!.port, 5000);
  assert.throws(() => devNetwork({ network: "none" }), /--network "none".*SSH/);
  assert.throws(() => devNetwork({ allow: ["nope"] }), /^ConfigError: --allow "nope"|--allow "nope"/);
  assert.throws(() => devNetwork({ network: "unrestricted", allow: ["host:1"] }), /--allow only applies to the restricted network/);
});

const sampleTable = () =>
  renderTable(tableName(VM_GID_BASE + 7), {
    gid: VM_GID_BASE + 7,
    allow: [
      { raw: "host:8443", port: 8443, kind: "host" },
      { raw: "10.1.0.0/16", port: undefined, kind: "cidr", family: 4, cidr: "10.1.0.0/16" },
      { raw: "[fd00::1]:443", port: 443, kind: "cidr", family: 6, cidr: "fd00::1/128" },
    ],
    resolvers: ["10.255.255.53", "fd00::53"],
    comment: "civm vm=0123abcd owner=42:4242",
  });

test("the table: keyed on QEMU's group, exceptions before the denials, the host's DNS servers on port 53 only", () => {
  const t = sampleTable();
  assert.match(t, /^create table inet civm_g2100000007\n/, "the table must be created exclusively (it locks its group id)");
  assert.match(t, /meta skgid 2100000007 jump vm/);
  const order = ["ct state established,related accept", "fib daddr type local meta l4proto { tcp, udp } th dport 8443 accept", "ip daddr 10.1.0.0/16 accept", "ip6 daddr fd00::1/128 meta l4proto { tcp, udp } th dport 443 accept", "ip daddr 10.255.255.53 meta l4proto { tcp, udp } th dport 53 accept", "fib daddr type { local, broadcast, multicast, anycast } jump deny", "ip daddr { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/4, 240.0.0.0/4 } jump deny", "ip6 daddr { ::/127, ::ffff:0:0/96, fc00::/7, fe80::/10, fec0::/10, ff00::/8 } jump deny"];
  let at = -1;
  for (const line of order) {
    const i = t.indexOf(line);
    assert.ok(i > at, `${line} missing or out of order in\n${t}`);
    at = i;
  }
  assert.match(t, /reject with tcp reset/);
  assert.deepEqual(ownerOfComment(/comment "(civm[^"]*)"/.exec(t)![1]!), { vm: "0123abcd", owner: "42:4242" });
});

test("the table is valid nftables (nft --check), when nft and root are here", { skip: process.getuid?.() !== 0 }, () => {
  try {
    execFileSync("nft", ["--version"], { stdio: "ignore" });
  } catch {
    return;
  }
  execFileSync("nft", ["--check", "-f", "-"], { input: sampleTable() });
});

test("deleteTable refuses names that are not civm's", async () => {
  await assert.rejects(deleteTable("filter"), /not one of civm's/);
  await assert.rejects(deleteTable("civm_g1; flush ruleset"), /not one of civm's/);
});

test("hostResolvers reads nameserver lines (scoped v6 addresses lose the scope)", () => {
  const d = mkdtempSync(join(tmpdir(), "civm-unit-"));
  const f = join(d, "resolv.conf");
  writeFileSync(f, "# c\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\nsearch x\nnameserver 10.255.255.53\noptions edns0\n");
  assert.deepEqual(hostResolvers(f), ["10.255.255.53", "fe80::1"]);
  assert.deepEqual(hostResolvers(join(d, "missing")), []);
});

test("accessProblem follows owner, group and other bits down the path", () => {
  const tree: Record<string, { mode: number; uid: number; gid: number }> = {
    "/a": { mode: 0o40755, uid: 0, gid: 0 },
    "/a/private": { mode: 0o40700, uid: 0, gid: 0 },
    "/a/private/img": { mode: 0o100644, uid: 0, gid: 0 },
    "/a/grp": { mode: 0o40750, uid: 0, gid: 50 },
    "/a/grp/img": { mode: 0o100640, uid: 0, gid: 50 },
    "/a/mine": { mode: 0o40700, uid: 999, gid: 0 },
    "/a/ro": { mode: 0o40755, uid: 0, gid: 0 },
  };
  const stat = (p: string) => {
    const s = tree[p];
    if (!s) throw new Error("ENOENT");
    return s;
  };
  assert.match(accessProblem("/a/private/img", 999, [995], "r", stat)!, /the directory \/a\/private \(mode 700, owner 0:0\) cannot be entered/);
  assert.equal(accessProblem("/a/grp/img", 999, [50], "r", stat), undefined);
  assert.match(accessProblem("/a/grp/img", 999, [51], "r", stat)!, /cannot be entered/);
  assert.equal(accessProblem("/a/mine", 999, [], "rwx", stat), undefined);
  assert.match(accessProblem("/a/ro", 999, [], "rwx", stat)!, /is not writable/);
  assert.match(accessProblem("/a/nope", 999, [], "r", stat)!, /does not exist/);
});

test("setpriv: QEMU's user, the VM's group, the user's groups; no capabilities, no new privileges", () => {
  assert.deepEqual(setprivArgs({ name: "civm-qemu", uid: 999, gid: 995, groups: [995, 108] }, 2100000001), [
    "--reuid=999", "--regid=2100000001", "--groups=995,108", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
  ]);
});

test("QEMU's argv: seccomp sandbox always; network none has no network device", () => {
  const plan: QemuPlan = {
    binary: "qemu-system-x86_64", name: "vm", accel: "tcg", machine: "pc", cpus: 1, ramBytes: 256 << 20, overlay: "/w/disk.qcow2",
    configIso: "/w/config.iso", qmpSocket: "/w/qmp.sock", consoleSocket: "/w/console.sock", consoleLog: "/l/vm.log", forwards: [], mounts: [], kernel: undefined, extraArgs: [],
  } as QemuPlan;
  const user = buildQemuArgs(plan);
  assert.deepEqual(user.slice(user.indexOf("-sandbox"), user.indexOf("-sandbox") + 2), ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
  assert.ok(user.includes("-netdev"));
  const none = buildQemuArgs({ ...plan, network: "none" });
  assert.ok(!none.includes("-netdev") && !none.some((a) => a.startsWith("virtio-net")), none.join(" "));
});

test("image build VMs may reach their Debian mirror, wherever it is", async () => {
  const { buildNetwork } = await import("../../src/images/build.js");
  assert.deepEqual(buildNetwork("http://deb.debian.org/debian").allow.map((a: { raw: string }) => a.raw), ["deb.debian.org:80"]);
  assert.deepEqual(buildNetwork("https://10.0.0.5:3142/debian").allow.map((a: { raw: string }) => a.raw), ["10.0.0.5:3142"]);
  assert.deepEqual(buildNetwork("http://localhost:3142/debian").allow.map((a: { raw: string }) => a.raw), ["host:3142"]);
  assert.deepEqual(buildNetwork("http://[fd00::5]/debian").allow.map((a: { raw: string }) => a.raw), ["[fd00::5]:80"]);
  assert.deepEqual(buildNetwork("file:///srv/mirror").allow, []);
});

test("the QEMU user: created on demand as a system user without home or login; named users must exist; root is refused", { skip: process.getuid?.() !== 0 }, async () => {
  const { qemuUser } = await import("../../src/net/identity.js");
  const { readFileSync } = await import("node:fs");
  const name = `civmt-mk${process.pid}`;
  try {
    const u = await qemuUser(name, { create: true });
    const line = readFileSync("/etc/passwd", "utf8").split("\n").find((l) => l.startsWith(`${name}:`))!;
    const [, , uid, gid, , home, shell] = line.split(":");
    assert.equal(u.uid, Number(uid));
    assert.ok(u.uid > 0 && u.uid < 1000, `not a system uid: ${u.uid}`);
    assert.ok(u.groups.includes(Number(gid)));
    assert.equal(home, "/nonexistent");
    assert.equal(shell, "/usr/sbin/nologin");
  } finally {
    execFileSync("userdel", ["-f", name], { stdio: "ignore" });
  }
  await assert.rejects(qemuUser(`civmt-none${process.pid}`, { create: false }), /does not exist; create it or leave the setting out/);
  await assert.rejects(qemuUser("root"), /must not run as root/);
});
