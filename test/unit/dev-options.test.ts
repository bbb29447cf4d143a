// Parsing of civm run's ad-hoc flags: host mounts, port forwards, VM names; SSH command lines.
import { test } from "node:test";
import { startTimeoutFor } from "../../src/dev/supervise.js";
import assert from "node:assert/strict";
import { parseHostMount, passthroughWarning, planHostMounts, parsePortSpec, checkForwardsDistinct, checkVmName } from "../../src/dev/options.js";
import { lacksUserXattrs, securityModelFor } from "../../src/vm/ninep.js";
import { statfs } from "node:fs/promises";
import { release, tmpdir } from "node:os";
import { remoteCommand, shellQuote, sshArgv } from "../../src/dev/ssh.js";
import { devMetaOf } from "../../src/dev/meta.js";
import type { RegistryEntry } from "../../src/vm/registry.js";

test("parseHostMount: DIR[:TAG][:GUEST-PATH][:ro|:rw], relative to cwd", () => {
  assert.deepEqual(parseHostMount("src", "/w"), { hostPath: "/w/src", readOnly: false });
  assert.deepEqual(parseHostMount("/a/b:ro", "/w"), { hostPath: "/a/b", readOnly: true });
  assert.deepEqual(parseHostMount("/a/b:rw", "/w"), { hostPath: "/a/b", readOnly: false });
  assert.deepEqual(parseHostMount("/a:data", "/w"), { hostPath: "/a", tag: "data", readOnly: false });
  assert.deepEqual(parseHostMount("/a:data:ro", "/w"), { hostPath: "/a", tag: "data", readOnly: true });
  assert.deepEqual(parseHostMount("/a:/mnt/x:ro", "/w"), { hostPath: "/a", guestPath: "/mnt/x", readOnly: true });
  assert.deepEqual(parseHostMount("/a:data:/mnt/x", "/w"), { hostPath: "/a", tag: "data", guestPath: "/mnt/x", readOnly: false });
});

test("parseHostMount: bad forms are ConfigErrors (exit 2) with the argument in the message", () => {
  for (const [arg, re] of [
    ["", /no folder/],
    [":ro", /no folder/],
    ["/a:bad tag", /tag "bad tag" is not valid/],
    ["/a:/x:/y", /two guest paths/],
    ["/a:t1:t2", /unexpected "t2"/],
    ["/a:/", /not allowed/],
    ["/a:/x/../etc", /not allowed/],
    ["/a:" + "t".repeat(32), /is not valid/],
    ["/a:ro:passthrough", /give one of ro, rw or passthrough/],
    ["/a:passthrough:rw", /give one of ro, rw or passthrough/],
  ] as const) {
    assert.throws(() => parseHostMount(arg, "/w"), (e: Error & { exitCode?: number }) => re.test(e.message) && e.exitCode === 2, arg);
  }
});

test("parseHostMount: :passthrough (read-write, asked for explicitly), alone or after a tag and guest path", () => {
  assert.deepEqual(parseHostMount("/a:passthrough", "/w"), { hostPath: "/a", readOnly: false, passthrough: true });
  assert.deepEqual(parseHostMount("/a:data:/mnt/x:passthrough", "/w"), { hostPath: "/a", tag: "data", guestPath: "/mnt/x", readOnly: false, passthrough: true });
  // the existing forms carry no passthrough at all
  assert.equal("passthrough" in parseHostMount("/a:data:rw", "/w"), false);
  assert.deepEqual(planHostMounts(["/a:passthrough", "/b:ro"], "/w"), [
    { hostPath: "/a", tag: "host_mount", guestPath: "/host", readOnly: false, passthrough: true },
    { hostPath: "/b", tag: "b", guestPath: "/host-b", readOnly: true },
  ]);
  assert.match(passthroughWarning({ hostPath: "/a", tag: "host" }), /--host-mount \/a .*passthrough.*setuid-root files and device nodes/);
});

test("9p security model: mapped-xattr by default, mapped-file where user xattrs may be missing, passthrough only when asked", async () => {
  const dir = tmpdir();
  const expected = lacksUserXattrs(Number((await statfs(dir)).type), release()) ? "mapped-file" : "mapped-xattr";
  assert.equal((await securityModelFor(dir)).model, expected);
  if (Number((await statfs("/dev/shm").catch(() => ({ type: 0 }))).type) === 0x01021994) {
    // tmpfs on a kernel before 6.6: mapped-file, and the note says why
    const old = await securityModelFor("/dev/shm", { kernelRelease: "6.1.0-28-amd64" });
    assert.equal(old.model, "mapped-file");
    assert.match(old.note ?? "", /\/dev\/shm is on tmpfs \(before Linux 6\.6\).*security_model=mapped-file/);
    assert.deepEqual(await securityModelFor("/dev/shm", { kernelRelease: "6.6.0" }), { model: "mapped-xattr" });
  }
  assert.deepEqual(await securityModelFor(tmpdir(), { passthrough: true }), { model: "passthrough" });
  assert.equal(lacksUserXattrs(0xef53, "6.1.0"), undefined); // ext4
  assert.equal(lacksUserXattrs(0x58465342, "6.1.0"), undefined); // xfs
  assert.equal(lacksUserXattrs(0x4d44, "6.1.0"), "vfat");
  assert.equal(lacksUserXattrs(0x65735546, "6.1.0"), "fuse");
  assert.equal(lacksUserXattrs(0x01021994, "6.1.0-28-amd64"), "tmpfs (before Linux 6.6)");
  assert.equal(lacksUserXattrs(0x01021994, "6.6.0"), undefined);
  assert.equal(lacksUserXattrs(0x01021994, "7.0.1"), undefined);
});

test("planHostMounts: first at /host (tag host_mount, as lvh), others at /host-TAG tagged after the folder; explicit tags and paths win", () => {
  assert.deepEqual(planHostMounts(["/src/linux", "/data/Build Out:ro", "/x:mytag", "/y:/opt/y"], "/w"), [
    { hostPath: "/src/linux", tag: "host_mount", guestPath: "/host", readOnly: false },
    { hostPath: "/data/Build Out", tag: "build-out", guestPath: "/host-build-out", readOnly: true },
    { hostPath: "/x", tag: "mytag", guestPath: "/host-mytag", readOnly: false },
    { hostPath: "/y", tag: "y", guestPath: "/opt/y", readOnly: false },
  ]);
  // the first mount keeps /host even with its own tag; derived tags avoid explicit ones
  assert.deepEqual(
    planHostMounts(["/a:src", "/b/src", "/c/src"], "/w").map((m) => [m.tag, m.guestPath]),
    [["src", "/host"], ["src-2", "/host-src-2"], ["src-3", "/host-src-3"]],
  );
  assert.deepEqual(planHostMounts([], "/w"), []);
});

test("planHostMounts: duplicate tags or guest paths and the reserved tag are refused", () => {
  assert.throws(() => planHostMounts(["/a:t", "/b:t"], "/w"), /tag t is used twice/);
  assert.throws(() => planHostMounts(["/a:/m", "/b:/m"], "/w"), /two mounts at \/m/);
  assert.throws(() => planHostMounts(["/a:civm-modules"], "/w"), /reserved/);
});

test("parsePortSpec: [ADDR:]HOST[:GUEST][/tcp|/udp]", () => {
  const d = "127.0.0.1";
  assert.deepEqual(parsePortSpec("8080", d), { proto: "tcp", hostAddr: d, hostPort: 8080, guestPort: 8080 });
  assert.deepEqual(parsePortSpec("8080:80", d), { proto: "tcp", hostAddr: d, hostPort: 8080, guestPort: 80 });
  assert.deepEqual(parsePortSpec("2222:22", d), { proto: "tcp", hostAddr: d, hostPort: 2222, guestPort: 22 });
  assert.deepEqual(parsePortSpec("5353:53/udp", d), { proto: "udp", hostAddr: d, hostPort: 5353, guestPort: 53 });
  assert.deepEqual(parsePortSpec("0.0.0.0:8080:80", d), { proto: "tcp", hostAddr: "0.0.0.0", hostPort: 8080, guestPort: 80 });
  assert.deepEqual(parsePortSpec("localhost:9000", d), { proto: "tcp", hostAddr: "localhost", hostPort: 9000, guestPort: 9000 });
  assert.deepEqual(parsePortSpec("[::1]:8080:80/tcp", d), { proto: "tcp", hostAddr: "::1", hostPort: 8080, guestPort: 80 });
  // lvh's form: HOST[:GUEST][:tcp|udp]
  assert.deepEqual(parsePortSpec("2222:22:tcp", d), { proto: "tcp", hostAddr: d, hostPort: 2222, guestPort: 22 });
  assert.deepEqual(parsePortSpec("5353:53:udp", d), { proto: "udp", hostAddr: d, hostPort: 5353, guestPort: 53 });
  assert.deepEqual(parsePortSpec("8080:UDP", d), { proto: "udp", hostAddr: d, hostPort: 8080, guestPort: 8080 });
  assert.deepEqual(parsePortSpec("0.0.0.0:2222:22:tcp", d), { proto: "tcp", hostAddr: "0.0.0.0", hostPort: 2222, guestPort: 22 });
  assert.throws(() => parsePortSpec("2222:22:tcp/udp", d), /give the protocol once|not tcp or udp/);
  assert.throws(() => parsePortSpec("2222:22:sctp", d), /not a port/);
  for (const [bad, re] of [
    ["", /write/],
    ["x:y:z:w", /write/],
    ["70000", /not a port/],
    ["80:0", /not a port/],
    ["80/sctp", /not tcp or udp/],
    ["a:b:c", /not a port/],
  ] as const) {
    assert.throws(() => parsePortSpec(bad, d), (e: Error & { exitCode?: number }) => re.test(e.message) && e.exitCode === 2, bad);
  }
});

test("checkForwardsDistinct and checkVmName", () => {
  const f = { proto: "tcp" as const, hostAddr: "127.0.0.1", hostPort: 1, guestPort: 1 };
  assert.doesNotThrow(() => checkForwardsDistinct([f, { ...f, proto: "udp" }, { ...f, hostPort: 2 }]));
  assert.throws(() => checkForwardsDistinct([f, { ...f, guestPort: 9 }]), /forwarded twice/);
  assert.equal(checkVmName("kt-1.a_b"), "kt-1.a_b");
  for (const bad of ["", "Upper", "-x", "a b", "x".repeat(64), "a/b"]) assert.throws(() => checkVmName(bad), /not valid/, bad);
});

test("remoteCommand: one argument is a shell line, several are an argv (each quoted); -w prefixes a cd", () => {
  assert.equal(remoteCommand(["cd /host && make test"]), "cd /host && make test");
  assert.equal(remoteCommand(["sh", "-c", "exit 3"]), "sh -c 'exit 3'");
  assert.equal(remoteCommand(["echo", "it's"]), `echo 'it'\\''s'`);
  assert.equal(remoteCommand(["make", "-C", "/host"], "/tmp/a b"), "cd '/tmp/a b' && make -C /host");
  assert.equal(shellQuote(""), "''");
  assert.equal(shellQuote("a=b,c:/d"), "a=b,c:/d");
});

test("sshArgv: the VM's key only, no host key checks or records, batch mode, the user's config ignored", () => {
  const argv = sshArgv({ host: "127.0.0.1", port: 2222, key: "/k/id", user: "root" }, "true");
  const opts = argv.join(" ");
  for (const o of ["-F /dev/null", "-i /k/id", "-p 2222", "IdentitiesOnly=yes", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR", "BatchMode=yes", "-T"]) {
    assert.ok(opts.includes(o), `missing ${o} in ${opts}`);
  }
  assert.deepEqual(argv.slice(-3), ["root@127.0.0.1", "--", "true"]);
  const login = sshArgv({ host: "127.0.0.1", port: 2222, key: "/k/id", user: "runner" }, undefined, { tty: true });
  assert.ok(login.includes("-t"));
  assert.equal(login.at(-1), "runner@127.0.0.1");
});

test("devMetaOf: only well-formed dev meta is trusted", () => {
  const base: RegistryEntry = { id: "0123abcd", name: "v", ownerPid: 1, qemuPid: 2, sshPort: 1, sshBind: "127.0.0.1", startedAt: "", workDir: "/w", consoleLog: "/c", keep: false };
  const ssh = { host: "127.0.0.1", port: 5, key: "/k", user: "root" };
  assert.equal(devMetaOf(base), undefined);
  assert.equal(devMetaOf({ ...base, meta: { dev: { kind: "dev" } } }), undefined);
  assert.equal(devMetaOf({ ...base, meta: { dev: { kind: "dev", ssh: { ...ssh, port: "5" } } } }), undefined);
  assert.deepEqual(devMetaOf({ ...base, meta: { dev: { kind: "dev", ssh } } })?.ssh, ssh);
});

test("civm run --detach waits 3 min for the VM, 20 with --snapshot (a first use makes the snapshot first); an explicit limit wins", () => {
  assert.equal(startTimeoutFor({}), 180_000);
  assert.equal(startTimeoutFor({ snapshot: true }), 20 * 60_000);
  assert.equal(startTimeoutFor({ snapshot: true }, 5_000), 5_000);
});
