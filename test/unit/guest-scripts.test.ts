// Tests for the guest boot scripts other than the agent (civm-growfs,
// civm-hostkeys, install.sh), the systemd units, and shellcheck over every
// guest script. Like guest-agent.test.ts: temp dir, CIVM_ROOT, and a PATH of
// stubs plus a few harmless real tools.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { rmSync, existsSync, mkdirSync, readFileSync, readdirSync, readlinkSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { repoRoot } from "../support/paths.js";
import { parseCalls, stubSandbox, type StubSandbox } from "../support/stub-path.js";

const GUEST = join(repoRoot, "guest");
const SAFE_TOOLS = ["bash", "sh", "cat", "rm", "readlink", "basename", "dirname", "install", "sed", "ln", "mkdir", "cp", "chmod", "jq", "grep"];

const made: string[] = [];
after(() => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});

/** Temp dir with CIVM_ROOT and a PATH of the given stubs (which log argv) plus SAFE_TOOLS. */
function sandbox(stubs: Record<string, string>): StubSandbox {
  const sb = stubSandbox({ prefix: "civm-guest-scripts-", safeTools: SAFE_TOOLS, stubs });
  made.push(sb.dir);
  return sb;
}

function run(sb: StubSandbox, script: string, args: string[] = [], env: Record<string, string> = {}) {
  const r = spawnSync(script, args, { encoding: "utf8", timeout: 30_000, env: { ...sb.env, ...env } });
  return { status: r.status, out: r.stdout + r.stderr, stdout: r.stdout, calls: parseCalls(sb.calls) };
}

// --- shellcheck ------------------------------------------------------------------

function guestScripts(): string[] {
  const files = ["install.sh"];
  for (const sub of ["bin", "lib"]) for (const f of readdirSync(join(GUEST, sub))) files.push(`${sub}/${f}`);
  return files.sort();
}

test("every guest script is shellcheck-clean (with -x, and as `npm run lint` calls it)", () => {
  const scripts = guestScripts();
  for (const expected of ["bin/civm-agent", "bin/civm-growfs", "bin/civm-hostkeys", "lib/civm-agent.sh", "lib/civm-runner.sh", "install.sh"]) {
    assert.ok(scripts.includes(expected), `${expected} is checked`);
  }
  for (const args of [["-x", ...scripts], scripts]) {
    const r = spawnSync("shellcheck", args, { cwd: GUEST, encoding: "utf8" });
    assert.equal(r.error, undefined, "shellcheck must be installed (apt-get install -y shellcheck)");
    assert.equal(r.status, 0, `shellcheck ${args.join(" ")}:\n${r.stdout}${r.stderr}`);
  }
  const lint = spawnSync("shellcheck", ["guest/install.sh", ...scripts.filter((s) => s !== "install.sh").map((s) => `guest/${s}`)], {
    cwd: repoRoot,
    encoding: "utf8",
  });
  assert.equal(lint.status, 0, `from the repo root:\n${lint.stdout}`);
});

// --- civm-growfs -------------------------------------------------------------------

const GROWFS = join(GUEST, "bin", "civm-growfs");
const GROWFS_STUBS = {
  findmnt: `[ "$*" = "-n -r -o SOURCE,FSTYPE /" ] || exit 1\necho "$STUB_FINDMNT"`,
  growpart: `if [ "\${STUB_GROWPART_STATUS:-0}" = 1 ]; then echo "NOCHANGE: partition $2 is size 1. it cannot be grown"; fi
exit "\${STUB_GROWPART_STATUS:-0}"`,
  resize2fs: `exit 0`,
};

/** sysfs as the kernel lays it out: class/block/<part> links into the disk's directory. */
function fakeSysfsPartition(sb: StubSandbox, disk: string, part: string, num: number): void {
  const real = join(sb.root, "sys/devices/pci0000:00/virtio2/block", disk, part);
  mkdirSync(real, { recursive: true });
  writeFileSync(join(real, "partition"), `${num}\n`);
  mkdirSync(join(sb.root, "sys/class/block"), { recursive: true });
  symlinkSync(real, join(sb.root, "sys/class/block", part));
}

test("growfs: growpart on the disk and partition of the root device from findmnt, then resize2fs", () => {
  const sb = sandbox(GROWFS_STUBS);
  fakeSysfsPartition(sb, "vda", "vda1", 1);
  const r = run(sb, GROWFS, [], { STUB_FINDMNT: "/dev/vda1 ext4" });
  assert.equal(r.status, 0, r.out);
  assert.deepEqual(r.calls, [
    ["findmnt", "-n", "-r", "-o", "SOURCE,FSTYPE", "/"],
    ["growpart", "/dev/vda", "1"],
    ["resize2fs", "/dev/vda1"],
  ]);
  assert.match(r.stdout, /civm-growfs: grew partition 1 of \/dev\/vda/);
});

test("growfs: nvme naming (nvme0n1p2 -> nvme0n1 2)", () => {
  const sb = sandbox(GROWFS_STUBS);
  fakeSysfsPartition(sb, "nvme0n1", "nvme0n1p2", 2);
  const r = run(sb, GROWFS, [], { STUB_FINDMNT: "/dev/nvme0n1p2 ext4" });
  assert.equal(r.status, 0, r.out);
  assert.deepEqual(r.calls.slice(1), [["growpart", "/dev/nvme0n1", "2"], ["resize2fs", "/dev/nvme0n1p2"]]);
});

test("growfs: an already full-size disk (growpart NOCHANGE) is fine and idempotent", () => {
  const sb = sandbox(GROWFS_STUBS);
  fakeSysfsPartition(sb, "vda", "vda1", 1);
  for (let i = 0; i < 2; i++) {
    const r = run(sb, GROWFS, [], { STUB_FINDMNT: "/dev/vda1 ext4", STUB_GROWPART_STATUS: "1" });
    assert.equal(r.status, 0, r.out);
    assert.match(r.stdout, /already fills the disk/);
  }
  const calls = run(sb, GROWFS, [], { STUB_FINDMNT: "/dev/vda1 ext4", STUB_GROWPART_STATUS: "1" }).calls;
  assert.equal(calls.filter((c) => c[0] === "resize2fs").length, 3, "fs resize still attempted every time");
});

test("growfs: a partition that already reaches the disk's end (sysfs) skips growpart's slow NOCHANGE", () => {
  const sb = sandbox(GROWFS_STUBS);
  fakeSysfsPartition(sb, "vda", "vda1", 1);
  const diskDir = join(sb.root, "sys/devices/pci0000:00/virtio2/block/vda");
  symlinkSync(diskDir, join(sb.root, "sys/class/block/vda"));
  writeFileSync(join(diskDir, "size"), "8388608\n"); // 4 GiB in sectors
  writeFileSync(join(diskDir, "vda1", "start"), "2048\n");
  writeFileSync(join(diskDir, "vda1", "size"), "8386560\n"); // to the last sector
  const r = run(sb, GROWFS, [], { STUB_FINDMNT: "/dev/vda1 ext4" });
  assert.equal(r.status, 0, r.out);
  assert.deepEqual(r.calls.map((c) => c[0]), ["findmnt", "resize2fs"]);
  assert.match(r.stdout, /partition 1 of \/dev\/vda already fills the disk/);
  // A bigger disk (root-disk larger than the image): growpart runs.
  writeFileSync(join(diskDir, "size"), "12582912\n");
  const again = run(sb, GROWFS, [], { STUB_FINDMNT: "/dev/vda1 ext4" }).calls.slice(r.calls.length); // calls accumulate per sandbox
  assert.deepEqual(again.map((c) => c[0]), ["findmnt", "growpart", "resize2fs"]);
});

test("growfs: a growpart error fails the unit and skips resize2fs", () => {
  const sb = sandbox(GROWFS_STUBS);
  fakeSysfsPartition(sb, "vda", "vda1", 1);
  const r = run(sb, GROWFS, [], { STUB_FINDMNT: "/dev/vda1 ext4", STUB_GROWPART_STATUS: "2" });
  assert.notEqual(r.status, 0);
  assert.match(r.stdout, /error: growpart \/dev\/vda 1 failed \(status 2\)/);
  assert.equal(r.calls.some((c) => c[0] === "resize2fs"), false);
});

test("growfs: whole-disk root skips growpart; non-ext filesystems are not resized", () => {
  const sb = sandbox(GROWFS_STUBS);
  const whole = run(sb, GROWFS, [], { STUB_FINDMNT: "/dev/vdb ext4" });
  assert.equal(whole.status, 0, whole.out);
  assert.deepEqual(whole.calls.slice(1), [["resize2fs", "/dev/vdb"]]);

  const sb2 = sandbox(GROWFS_STUBS);
  fakeSysfsPartition(sb2, "vda", "vda1", 1);
  const xfs = run(sb2, GROWFS, [], { STUB_FINDMNT: "/dev/vda1 xfs" });
  assert.equal(xfs.status, 0, xfs.out);
  assert.deepEqual(xfs.calls.slice(1), [["growpart", "/dev/vda", "1"]]);
});

// --- civm-hostkeys -------------------------------------------------------------------

const HOSTKEYS = join(GUEST, "bin", "civm-hostkeys");
const HOSTKEYS_STUBS = {
  // -t TYPE ... -f PATH records which old keys were still there, then creates that key pair.
  "ssh-keygen": `case "$1" in
-q)
  while [ $# -gt 1 ]; do [ "$1" = -f ] && key=$2; shift; done
  ssh=\${key%/*}
  for f in "$ssh"/ssh_host_*; do [ ! -e "$f" ] || echo "left over: \${f##*/}"; done >>"$STUB_CALLS.leftover"
  echo new >"$key"
  echo new >"$key.pub"
  ;;
-l) echo "256 SHA256:fakefingerprint root@vm (ED25519)" ;;
esac`,
};

test("hostkeys: removes the old host keys, makes new ed25519 and ECDSA keys (no slow RSA), prints fingerprints", () => {
  const sb = sandbox(HOSTKEYS_STUBS);
  const ssh = join(sb.root, "etc/ssh");
  mkdirSync(ssh, { recursive: true });
  for (const f of ["ssh_host_rsa_key", "ssh_host_rsa_key.pub", "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]) {
    writeFileSync(join(ssh, f), "baked into the image\n");
  }
  writeFileSync(join(ssh, "sshd_config"), "keep me\n");
  const r = run(sb, HOSTKEYS);
  assert.equal(r.status, 0, r.out);
  const keygens = r.calls.filter((c) => c[0] === "ssh-keygen" && c.includes("-t"));
  assert.deepEqual(keygens.map((c) => c[c.indexOf("-t") + 1]), ["ed25519", "ecdsa"]);
  assert.deepEqual(keygens.map((c) => c[c.indexOf("-f") + 1]), [join(ssh, "ssh_host_ed25519_key"), join(ssh, "ssh_host_ecdsa_key")]);
  for (const c of keygens) assert.equal(c[c.indexOf("-N") + 1], "", "host keys have no passphrase");
  const leftover = existsSync(`${sb.calls}.leftover`) ? readFileSync(`${sb.calls}.leftover`, "utf8") : "";
  assert.doesNotMatch(leftover, /rsa|baked/, "old keys gone before new ones are made");
  assert.deepEqual(readdirSync(ssh).sort(), ["ssh_host_ecdsa_key", "ssh_host_ecdsa_key.pub", "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "sshd_config"]);
  assert.equal(readFileSync(join(ssh, "ssh_host_ed25519_key"), "utf8"), "new\n");
  assert.equal(readFileSync(join(ssh, "sshd_config"), "utf8"), "keep me\n");
  assert.ok(r.calls.some((c) => c[0] === "ssh-keygen" && c[1] === "-l" && c[3] === join(ssh, "ssh_host_ed25519_key.pub")));
  assert.match(r.stdout, /civm-hostkeys: host key 256 SHA256:fakefingerprint/);
});

test("hostkeys: a failing ssh-keygen fails the unit", () => {
  const sb = sandbox({ "ssh-keygen": "exit 1" });
  mkdirSync(join(sb.root, "etc/ssh"), { recursive: true });
  const r = run(sb, HOSTKEYS);
  assert.notEqual(r.status, 0);
  assert.match(r.stdout, /error: ssh-keygen -t ed25519 failed/);
});

// --- install.sh and units -------------------------------------------------------------

const UNITS = ["civm-agent.service", "civm-growfs.service", "civm-hostkeys.service"];

test("install.sh lays out files with modes and enables units via wants symlinks", () => {
  const sb = sandbox({});
  const r = run(sb, join(GUEST, "install.sh"), [sb.root]);
  assert.equal(r.status, 0, r.out);
  const mode = (p: string) => statSync(join(sb.root, p)).mode & 0o777;
  for (const bin of ["civm-agent", "civm-growfs", "civm-hostkeys"]) {
    assert.equal(mode(`usr/local/sbin/${bin}`), 0o755, bin);
    assert.equal(readFileSync(join(sb.root, "usr/local/sbin", bin), "utf8"), readFileSync(join(GUEST, "bin", bin), "utf8"));
  }
  assert.equal(mode("usr/local/lib/civm/civm-agent.sh"), 0o644);
  assert.equal(mode("usr/local/lib/civm/civm-runner.sh"), 0o755);
  assert.equal(readFileSync(join(sb.root, "usr/local/lib/civm/VERSION"), "utf8"), readFileSync(join(GUEST, "VERSION"), "utf8"));
  for (const unit of UNITS) {
    assert.equal(mode(`etc/systemd/system/${unit}`), 0o644, unit);
    const link = join(sb.root, "etc/systemd/system/multi-user.target.wants", unit);
    assert.equal(readlinkSync(link), `/etc/systemd/system/${unit}`, `${unit} enabled`);
  }
  // Re-running (image rebuilds) must work too.
  assert.equal(run(sb, join(GUEST, "install.sh"), [sb.root]).status, 0);
  assert.notEqual(run(sb, join(GUEST, "install.sh"), []).status, 0, "refuses to run without a root");
});

test("install.sh: DHCP with systemd-networkd when the image has it, nothing when it brings its own network", () => {
  const sb = sandbox({});
  const units = join(sb.root, "lib/systemd/system");
  mkdirSync(units, { recursive: true });
  for (const u of ["systemd-networkd.service", "systemd-networkd.socket", "systemd-networkd-wait-online.service"]) writeFileSync(join(units, u), "");
  const r = run(sb, join(GUEST, "install.sh"), [sb.root]);
  assert.equal(r.status, 0, r.out);
  assert.match(r.out, /DHCP on en\*\/eth\* with systemd-networkd/);
  assert.match(readFileSync(join(sb.root, "etc/systemd/network/99-civm-dhcp.network"), "utf8"), /^Name=en\* eth\*$[\s\S]*^DHCP=yes$/m);
  const etc = join(sb.root, "etc/systemd/system");
  assert.equal(readlinkSync(join(etc, "multi-user.target.wants/systemd-networkd.service")), "/lib/systemd/system/systemd-networkd.service");
  assert.equal(readlinkSync(join(etc, "sockets.target.wants/systemd-networkd.socket")), "/lib/systemd/system/systemd-networkd.socket");
  assert.equal(readlinkSync(join(etc, "network-online.target.wants/systemd-networkd-wait-online.service")), "/lib/systemd/system/systemd-networkd-wait-online.service");
  assert.match(readFileSync(join(etc, "systemd-networkd-wait-online.service.d/00-civm.conf"), "utf8"), /--any --timeout=20/);

  const nm = sandbox({});
  mkdirSync(join(nm.root, "lib/systemd/system"), { recursive: true });
  writeFileSync(join(nm.root, "lib/systemd/system/systemd-networkd.service"), "");
  mkdirSync(join(nm.root, "usr/sbin"), { recursive: true });
  writeFileSync(join(nm.root, "usr/sbin/NetworkManager"), "");
  assert.match(run(nm, join(GUEST, "install.sh"), [nm.root]).out, /NetworkManager is installed: leaving the network to it/);
  assert.equal(existsSync(join(nm.root, "etc/systemd/network/99-civm-dhcp.network")), false);

  const ifup = sandbox({});
  mkdirSync(join(ifup.root, "lib/systemd/system"), { recursive: true });
  writeFileSync(join(ifup.root, "lib/systemd/system/systemd-networkd.service"), "");
  mkdirSync(join(ifup.root, "sbin"), { recursive: true });
  writeFileSync(join(ifup.root, "sbin/ifup"), "");
  mkdirSync(join(ifup.root, "etc/network"), { recursive: true });
  writeFileSync(join(ifup.root, "etc/network/interfaces"), "auto lo\niface lo inet loopback\n");
  assert.match(run(ifup, join(GUEST, "install.sh"), [ifup.root]).out, /DHCP on en/, "ifupdown with only lo configures nothing");
  writeFileSync(join(ifup.root, "etc/network/interfaces"), "auto lo\niface lo inet loopback\nauto ens3\niface ens3 inet dhcp\n");
  assert.match(run(ifup, join(GUEST, "install.sh"), [ifup.root]).out, /ifupdown configures interfaces/);

  const none = sandbox({});
  assert.match(run(none, join(GUEST, "install.sh"), [none.root]).out, /warning: systemd-networkd is not installed/);
});

test("the installed civm-agent finds its library and powers off when there is no CD-ROM", () => {
  const sb = sandbox({ blkid: "exit 2", sleep: "exit 0", sync: "exit 0", poweroff: "exit 0" });
  assert.equal(run(sb, join(GUEST, "install.sh"), [sb.root]).status, 0);
  const r = run(sb, join(sb.root, "usr/local/sbin/civm-agent"), [], { CIVM_WAIT_SECONDS: "1" });
  const version = readFileSync(join(GUEST, "VERSION"), "utf8").trim();
  assert.match(r.stdout, new RegExp(`civm-agent: starting \\(guest runtime version ${version}\\)`));
  assert.match(r.stdout, /error: no CD-ROM labelled instance-configuration appeared within 1s/);
  assert.deepEqual(r.calls.at(-1), ["poweroff", "-f"]);
});

function unit(name: string): string {
  return readFileSync(join(GUEST, "systemd", name), "utf8");
}

test("units: ordering, commands and console output", () => {
  const hostkeys = unit("civm-hostkeys.service");
  assert.match(hostkeys, /^Before=.*\bssh\.service\b/m);
  assert.match(hostkeys, /^ExecStart=\/usr\/local\/sbin\/civm-hostkeys$/m);
  assert.match(hostkeys, /^Type=oneshot$/m);

  const growfs = unit("civm-growfs.service");
  assert.match(growfs, /^ExecStart=\/usr\/local\/sbin\/civm-growfs$/m);
  assert.match(growfs, /^Type=oneshot$/m);

  const agent = unit("civm-agent.service");
  const after = (agent.match(/^After=(.*)$/m)?.[1] ?? "").split(/\s+/);
  // A CI job does not need sshd: waiting for host keys and ssh cost ~7 s of boot. The agent
  // waits for the network and growfs itself, after reading the CD-ROM (wait_for_boot_units).
  for (const dep of ["civm-hostkeys.service", "ssh.service", "network-online.target", "civm-growfs.service"]) {
    assert.ok(!after.includes(dep), `agent must not wait for ${dep}`);
  }
  assert.match(agent, /^Wants=network-online\.target civm-growfs\.service$/m);
  assert.match(agent, /^ExecStart=\/usr\/local\/sbin\/civm-agent$/m);
  assert.match(agent, /^StandardOutput=journal\+console$/m);
  assert.match(agent, /^Restart=no$/m);
  for (const name of UNITS) assert.match(unit(name), /^WantedBy=multi-user\.target$/m, name);
});
