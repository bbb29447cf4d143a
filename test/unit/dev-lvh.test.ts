// lvh users' habits in civm run --image and wait (issue 17): units, aliases, names, SSH diagnosis, console sinks.
import test from "node:test";
import assert from "node:assert/strict";
import { connect } from "node:net";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { tmpdir } from "node:os";
import { memFlag, cpuKindFlag, MIN_MEM_BYTES } from "../../src/dev/plan.js";
import { foldLvhAliases } from "../../src/cli/commands/run.js";
import { resolveBuildOrder } from "../../src/images/spec.js";
import { lvhImageName } from "../../src/images/lvh.js";
import { classifySshFailure, explainSshFailure, SSH_DIAGNOSIS_MS, waitUntilReady } from "../../src/dev/wait.js";
import type { RegistryEntry } from "../../src/vm/registry.js";
import type { DevMeta } from "../../src/dev/meta.js";
import { openConsoleSinks } from "../../src/dev/console-sinks.js";
import { sshOverride } from "../../src/dev/meta.js";
import { freePort } from "../../src/dev/ssh.js";
import type { ImageSpec } from "../../src/images/types.js";

test("--mem: a bare number is MiB as in QEMU and lvh (4096 is 4 GiB); units as before; under 64 MiB refused", () => {
  assert.equal(memFlag("4096"), 4 * 1024 ** 3);
  assert.equal(memFlag("64"), MIN_MEM_BYTES);
  assert.equal(memFlag("4G"), 4 * 1024 ** 3);
  assert.equal(memFlag("512M"), 512 * 1024 ** 2);
  for (const bad of ["63", "0", "1M", "4096K", "lots"]) {
    assert.throws(() => memFlag(bad), (e: Error & { exitCode?: number }) => e.exitCode === 2 && /--mem/.test(e.message), bad);
  }
  assert.throws(() => memFlag("32"), /at least 64 MiB.*4096 is 4 GiB/);
});

test("--cpu-kind: a QEMU CPU model, features allowed, nothing else", () => {
  assert.equal(cpuKindFlag("qemu64"), "qemu64");
  assert.equal(cpuKindFlag("max,-vmx,+ssse3"), "max,-vmx,+ssse3");
  assert.throws(() => cpuKindFlag("max -enable-kvm"), /not a QEMU CPU model/);
  assert.throws(() => cpuKindFlag(""), /not a QEMU CPU model/);
});

test("lvh's flag names fold into civm's; both given must agree", () => {
  const base = () => ({ hostMount: [], port: [], allow: [], grace: "30", sshBind: "127.0.0.1", waitTimeout: "600", hwAccel: true }) as Parameters<typeof foldLvhAliases>[0];
  const a = { ...base(), cpu: "4", daemonize: true, qemuCmdPrint: true };
  foldLvhAliases(a);
  assert.equal(a.cpus, "4");
  assert.equal(a.detach, true);
  assert.equal(a.printCmd, true);
  const b = { ...base(), hwAccel: false };
  foldLvhAliases(b);
  assert.equal(b.accel, "tcg");
  const c = { ...base(), qemuDisableKvm: true };
  foldLvhAliases(c);
  assert.equal(c.accel, "tcg");
  assert.throws(() => foldLvhAliases({ ...base(), cpu: "4", cpus: "2" }), /--cpu and --cpus are the same setting/);
  assert.throws(() => foldLvhAliases({ ...base(), hwAccel: false, accel: "kvm" }), /contradict/);
  const same = { ...base(), cpu: "2", cpus: "2" };
  foldLvhAliases(same);
  assert.equal(same.cpus, "2");
});

test("image names with lvh's extension: base.qcow2 is the image base", () => {
  assert.equal(lvhImageName("base.qcow2"), "base");
  assert.equal(lvhImageName("kind.img"), "kind");
  assert.equal(lvhImageName("civm-runner"), "civm-runner");
  const spec = { name: "base", packages: [], actions: [] } as unknown as ImageSpec;
  assert.deepEqual(resolveBuildOrder([spec], "base.qcow2").map((s) => s.name), ["base"]);
  assert.throws(() => resolveBuildOrder([spec], "other.qcow2"), /no image named "other.qcow2"/);
});

test("wait: SSH failures are told apart, and each says what is missing", () => {
  assert.equal(classifySshFailure("Connection timed out during banner exchange\nConnection to 127.0.0.1 port 2222 timed out"), "no-guest");
  assert.equal(classifySshFailure("kex_exchange_identification: read: Connection reset by peer"), "no-guest");
  assert.equal(classifySshFailure("ssh: connect to host 127.0.0.1 port 2222: Connection refused"), "refused");
  assert.equal(classifySshFailure("root@127.0.0.1: Permission denied (publickey)."), "denied");
  assert.equal(classifySshFailure("something else"), "other");
  const t = { host: "127.0.0.1", port: 2222, user: "root", key: "/k" };
  assert.match(explainSshFailure("no-guest", t), /no network address .*DHCP.* or no sshd/);
  assert.match(explainSshFailure("denied", t), /--ssh-key.*--ssh-user/);
  assert.ok(SSH_DIAGNOSIS_MS <= 30_000, "wait must say within seconds, not after its whole timeout");
});

test("wait --ssh and wait: what the agent reports missing (no address, no sshd) ends the wait at once", async () => {
  const dir = mkdtempSync(join(tmpdir(), "civm-lvh-"));
  try {
    const log = join(dir, "console.log");
    writeFileSync(log, [
      "civm-agent: installed 1 authorized key(s) for root",
      "civm-agent: network: none: no address on any interface after 10s (the image configures no DHCP client: ...)",
      "civm-agent: sshd: not installed (add openssh-server to the image's packages)",
      "civm-agent: ready", "",
    ].join("\r\n"));
    const entry = { id: "x1", name: "dev-x", consoleLog: log } as unknown as RegistryEntry;
    // Nothing listens on this port: had wait tried SSH, it would have said "refused" instead.
    const dev = { ssh: { host: "127.0.0.1", port: await freePort("127.0.0.1"), user: "root", key: join(dir, "k") } } as unknown as DevMeta;
    for (const mode of ["ssh", "both"] as const) {
      const t0 = Date.now();
      await assert.rejects(waitUntilReady(entry, dev, { mode, timeoutMs: 60_000, stateDir: dir }), (e: Error & { code?: string }) => {
        assert.equal(e.code, "timeout");
        assert.match(e.message, /SSH cannot work: the guest agent reports network: none: no address .*; sshd: not installed \(add openssh-server/);
        return true;
      });
      assert.ok(Date.now() - t0 < 5_000, `${mode}: at once, not after the timeout`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("--ssh-key must be readable; --ssh-user must be a user name", () => {
  const dir = mkdtempSync(join(tmpdir(), "civm-lvh-"));
  try {
    assert.throws(() => sshOverride({ sshKey: "nope" }, dir), /--ssh-key nope: .* is not a readable file/);
    assert.throws(() => sshOverride({ sshUser: "a b" }, dir), /not a user name/);
    assert.deepEqual(sshOverride({ sshUser: "manage" }, dir), { user: "manage" });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("console sinks: --console-log-file gets the text; --serial-port serves it and takes input", async () => {
  const dir = mkdtempSync(join(tmpdir(), "civm-lvh-"));
  const port = await freePort("127.0.0.1");
  const lines: string[] = [];
  const sinks = await openConsoleSinks({ logFile: join(dir, "console.txt"), serial: { host: "127.0.0.1", port }, log: (l) => lines.push(l) });
  try {
    assert.match(lines.join("\n"), new RegExp(`serial console on 127.0.0.1:${port}`));
    const input: Buffer[] = [];
    sinks.onInput((d) => input.push(d));
    const client = connect(port, "127.0.0.1");
    await new Promise((r) => client.once("connect", r));
    let got = "";
    client.on("data", (d) => (got += d));
    await new Promise((r) => setTimeout(r, 50));
    sinks.onText("login: ");
    client.write("root\n");
    for (let i = 0; i < 100 && (!got.includes("login:") || !input.length); i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(got, "login: ");
    assert.equal(Buffer.concat(input).toString(), "root\n");
    client.destroy();
  } finally {
    await sinks.close();
  }
  assert.equal(readFileSync(join(dir, "console.txt"), "utf8"), "login: ");
  // The port is released.
  const again = await openConsoleSinks({ serial: { host: "127.0.0.1", port }, log: () => {} });
  await again.close();
  await assert.rejects(openConsoleSinks({ logFile: join(dir, "no", "such", "f"), log: () => {} }), /--console-log-file .*cannot write it/);
  rmSync(dir, { recursive: true, force: true });
});

test("wait: civm's agent is ready but the guest does not answer SSH (no network): wait says so within seconds, not after its timeout", { timeout: 120_000 }, async () => {
  const { createServer } = await import("node:net");
  const { mkdirSync, writeFileSync } = await import("node:fs");
  const { execFileSync } = await import("node:child_process");
  const { waitUntilReady, AGENT_READY } = await import("../../src/dev/wait.js");
  const dir = mkdtempSync(join(tmpdir(), "civm-lvh-wait-"));
  // What QEMU's user network does when the guest has no address: accept, then drop.
  const srv = createServer((s) => s.destroy());
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", () => r()));
  const port = (srv.address() as { port: number }).port;
  try {
    const key = join(dir, "k");
    execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", key]);
    const consoleLog = join(dir, "console.log");
    writeFileSync(consoleLog, `civm-agent: installed 1 key for root\n${AGENT_READY}\n`);
    mkdirSync(join(dir, "registry"));
    const entry = { id: "0badc0de", name: "nonet", ownerPid: process.pid, qemuPid: undefined, sshPort: port, sshBind: "127.0.0.1", startedAt: new Date().toISOString(), workDir: dir, consoleLog, keep: false };
    writeFileSync(join(dir, "registry", `${entry.id}.json`), JSON.stringify(entry));
    const dev = { kind: "dev" as const, ssh: { host: "127.0.0.1", port, key, user: "root" }, forwards: [], mounts: [], image: "base", detached: true, graceSeconds: 5 };
    const t0 = Date.now();
    await assert.rejects(
      waitUntilReady(entry, dev, { mode: "both", timeoutMs: 90_000, stateDir: dir }),
      (e: Error & { exitCode?: number }) => e.exitCode === 3 && /the guest agent is ready but SSH does not work: .*guest does not answer on port 22: the guest has no network address/.test(e.message),
    );
    const took = Date.now() - t0;
    assert.ok(took >= SSH_DIAGNOSIS_MS && took < 45_000, `wait told after ${took} ms`);
  } finally {
    srv.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
