// civm doctor against a PATH of fake tools, a fake /dev/kvm and a fake QEMU probe.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { DISK_FAIL_BYTES, DISK_WARN_BYTES, diskCheck, formatDoctorReport, runDoctor, type DoctorReport } from "../../src/host/doctor.js";
import { tempDir } from "../support/paths.js";

const GiB = 1024 ** 3;

/** Version lines each fake prints (only shell builtins: PATH holds nothing else). */
const FAKES: Record<string, { args: string; out: string; toStderr?: boolean }> = {
  "qemu-img": { args: "--version", out: "qemu-img version 8.2.2 (fake)" },
  xorriso: { args: "-version", out: "xorriso 1.5.6 : RockRidge filesystem manipulator, libburnia project." },
  genisoimage: { args: "--version", out: "genisoimage 1.1.11 (Linux)" },
  nft: { args: "--version", out: "nftables v1.0.6 (Lester Gooch #5)" },
  setpriv: { args: "--version", out: "setpriv from util-linux 2.38.1" },
  mmdebstrap: { args: "--version", out: "mmdebstrap 1.4.3" },
  mke2fs: { args: "-V", out: "mke2fs 1.47.0 (5-Feb-2023)", toStderr: true },
  sfdisk: { args: "--version", out: "sfdisk from util-linux 2.38.1" },
  zstd: { args: "--version", out: "*** Zstandard CLI (64-bit) v1.5.4, by Yann Collet ***" },
  "ssh-keygen": { args: "", out: "" },
  ssh: { args: "-V", out: "OpenSSH_9.2p1 Debian-2, OpenSSL 3.0.11 19 Sep 2023", toStderr: true },
  "dpkg-query": { args: "", out: "1:9.2p1-2+fake" },
  "qemu-system-aarch64": { args: "--version", out: "QEMU emulator version 8.2.2 (fake)" },
};

interface Host {
  bin: string;
  /** A binfmt_misc folder with an enabled qemu-aarch64 entry (arm64 image builds). */
  binfmt: string;
  env: NodeJS.ProcessEnv;
  kvm: string;
  paths: { stateDir: string; logsDir: string };
  remove(tool: string): void;
}

function fakeHost(opts: { qemuVersion?: string; kvmMode?: "ok" | "hang" | "fail" } = {}): Host {
  const root = tempDir("civm-doctor-");
  const bin = join(root, "bin");
  const write = (name: string, body: string): void => writeFileSync(join(bin, name), `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  mkdirSync(bin);
  for (const [name, f] of Object.entries(FAKES)) write(name, `echo "${f.out}"${f.toStderr ? " >&2" : ""}\nexit 0`);
  writeFileSync(join(root, "kvm-mode"), opts.kvmMode ?? "ok");
  write(
    "qemu-system-x86_64",
    `if [ "$1" = --version ]; then echo "${opts.qemuVersion ?? "QEMU emulator version 8.2.2 (fake)"}"; exit 0; fi
read -r mode <"${root}/kvm-mode"
case "$mode" in ok) exit 33 ;; hang) exec /bin/sleep 60 ;; *) echo "qemu: kvm broken" >&2; exit 1 ;; esac`,
  );
  const kvm = join(root, "kvm");
  writeFileSync(kvm, "");
  const binfmt = join(root, "binfmt");
  mkdirSync(binfmt);
  writeFileSync(join(binfmt, "status"), "enabled\n");
  writeFileSync(join(binfmt, "qemu-aarch64"), "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\n");
  return {
    bin,
    binfmt,
    env: { PATH: bin },
    kvm,
    paths: { stateDir: join(root, "state"), logsDir: join(root, "logs") },
    remove: (tool) => rmSync(join(bin, tool)),
  };
}

function byName(r: DoctorReport, name: string) {
  const c = r.checks.find((x) => x.name === name);
  assert.ok(c, `no check named ${name}: ${r.checks.map((x) => x.name).join(", ")}`);
  return c;
}

async function doctor(h: Host, env: NodeJS.ProcessEnv = {}): Promise<DoctorReport> {
  // An x86_64 host with what arm64 guests need (the firmware "exists"): foreignArchChecks has tests of its own.
  return runDoctor({ paths: h.paths, env: { ...h.env, ...env }, kvmDevice: h.kvm, probeTimeoutMs: 2000, hostNodeArch: "x64", binfmtDir: h.binfmt, fileExists: async () => true });
}

test("everything present, KVM probe ok: ready; versions shown; second run uses the KVM cache", async () => {
  const h = fakeHost();
  const r = await doctor(h);
  assert.equal(r.ok, true, formatDoctorReport(r));
  for (const c of r.checks) assert.equal(c.status, "pass", `${c.name}: ${c.detail}`);
  assert.match(byName(r, "qemu-system-x86_64").detail, /^QEMU emulator version 8\.2\.2 \(fake\), .*qemu-system-x86_64$/);
  assert.match(byName(r, "qemu-img").detail, /qemu-img version 8\.2\.2/);
  assert.match(byName(r, "xorriso").detail, /^xorriso 1\.5\.6/);
  assert.match(byName(r, "mke2fs").detail, /mke2fs 1\.47\.0/, "version printed on stderr is found too");
  assert.match(byName(r, "zstd").detail, /^Zstandard CLI \(64-bit\) v1\.5\.4/);
  assert.match(byName(r, "ssh-keygen").detail, /openssh-client 1:9\.2p1-2\+fake/, "no version flag: package version");
  assert.match(byName(r, "QEMU >= 6.1").detail, /found 8\.2\.2/);
  assert.match(byName(r, "KVM usable").detail, /^yes: KVM probe boot finished in .*probed just now/);
  assert.equal(r.accel?.accel, "kvm");
  assert.match(byName(r, "state dir writable").detail, /does not exist yet|is writable/);
  assert.match(byName(r, "logs dir writable").detail, /does not exist yet; it will be created in/);

  const r2 = await doctor(h);
  assert.match(byName(r2, "KVM usable").detail, /cached result from \d+ s ago/);
  const text = formatDoctorReport(r2);
  assert.match(text, /^ok {4}qemu-system-x86_64 +QEMU emulator version 8\.2\.2/m);
  assert.match(text, /civm doctor: ready; VMs will use KVM\n$/);
});

test("missing mmdebstrap is a warning with an apt-get fix; the report stays ok", async () => {
  const h = fakeHost();
  h.remove("mmdebstrap");
  const r = await doctor(h);
  const c = byName(r, "mmdebstrap");
  assert.equal(c.status, "warn");
  assert.equal(c.severity, "optional");
  assert.equal(c.ok, false);
  assert.match(c.detail, /needed only to build images/);
  assert.equal(c.fix, "apt-get install -y mmdebstrap");
  assert.equal(r.ok, true);
  const text = formatDoctorReport(r);
  assert.match(text, /^WARN {2}mmdebstrap +mmdebstrap not found on PATH/m);
  assert.match(text, /^ +fix: apt-get install -y mmdebstrap$/m);
  assert.match(text, /civm doctor: ready \(1 warning\)/);
});

test("missing qemu-img fails the report, with the Debian package to install", async () => {
  const h = fakeHost();
  h.remove("qemu-img");
  const r = await doctor(h);
  const c = byName(r, "qemu-img");
  assert.equal(c.status, "fail");
  assert.equal(c.fix, "apt-get install -y qemu-utils");
  assert.equal(r.ok, false);
  assert.match(formatDoctorReport(r), /civm doctor: NOT ready: 1 failed check/);
});

test("missing nft (the network policy) fails the report with nftables to install", async () => {
  const h = fakeHost();
  h.remove("nft");
  const r = await doctor(h);
  const c = byName(r, "nft");
  assert.equal(c.status, "fail");
  assert.equal(c.fix, "apt-get install -y nftables");
  assert.equal(r.ok, false);
});

test("missing qemu-system-x86_64: failed, no version check, KVM cannot be probed", async () => {
  const h = fakeHost();
  h.remove("qemu-system-x86_64");
  const r = await doctor(h);
  assert.equal(byName(r, "qemu-system-x86_64").fix, "apt-get install -y qemu-system-x86");
  assert.equal(r.checks.some((c) => c.name.startsWith("QEMU >=")), false);
  assert.match(byName(r, "KVM usable").detail, /qemu-system-x86_64 is missing/);
  assert.equal(r.ok, false);
});

test("genisoimage stands in for xorriso; with neither the check fails", async () => {
  const h = fakeHost();
  h.remove("xorriso");
  const r = await doctor(h);
  const c = byName(r, "xorriso");
  assert.equal(c.status, "pass");
  assert.match(c.detail, /genisoimage 1\.1\.11.*xorriso is absent; genisoimage is used instead/);
  h.remove("genisoimage");
  const r2 = await doctor(h);
  assert.equal(byName(r2, "xorriso").status, "fail");
  assert.match(byName(r2, "xorriso").detail, /xorriso or genisoimage not found/);
  assert.equal(byName(r2, "xorriso").fix, "apt-get install -y xorriso");
});

test("QEMU older than 6.1 fails; 6.1.0 passes", async () => {
  const old = await doctor(fakeHost({ qemuVersion: "QEMU emulator version 6.0.1 (old)" }));
  assert.equal(byName(old, "QEMU >= 6.1").status, "fail");
  assert.match(byName(old, "QEMU >= 6.1").detail, /found 6\.0\.1/);
  assert.equal(old.ok, false);
  const ok = await doctor(fakeHost({ qemuVersion: "QEMU emulator version 6.1.0" }));
  assert.equal(byName(ok, "QEMU >= 6.1").status, "pass");
});

test("no /dev/kvm: warnings only, TCG 5-10x slower", async () => {
  const h = fakeHost();
  rmSync(h.kvm);
  const r = await doctor(h);
  assert.equal(byName(r, h.kvm).status, "warn");
  const k = byName(r, "KVM usable");
  assert.equal(k.status, "warn");
  assert.match(k.detail, /does not exist.*TCG.*5-10x slower/);
  assert.equal(r.ok, true);
  assert.match(formatDoctorReport(r), /VMs will use TCG/);
});

test("a hanging KVM probe: warning naming nested virtualisation; then cached", async () => {
  const h = fakeHost({ kvmMode: "hang" });
  const r = await doctor(h);
  const k = byName(r, "KVM usable");
  assert.equal(k.status, "warn");
  assert.match(k.detail, /did not finish within 2 s \(nested virtualisation\?\); probed just now\. Guests run under TCG/);
  assert.match(k.fix ?? "", /nested virtualisation/);
  const r2 = await doctor(h);
  assert.match(byName(r2, "KVM usable").detail, /cached result from/);
});

test("CIVM_ACCEL=tcg: not probed, says it is forced", async () => {
  const h = fakeHost({ kvmMode: "hang" });
  const r = await doctor(h, { CIVM_ACCEL: "tcg" });
  const k = byName(r, "KVM usable");
  assert.match(k.detail, /forced by CIVM_ACCEL=tcg; not probed/);
  assert.equal(k.fix, "unset CIVM_ACCEL to let civm probe KVM");
});

test("disk thresholds: fail below 2 GiB, warn below 10 GiB", () => {
  assert.equal(DISK_FAIL_BYTES, 2 * GiB);
  assert.equal(DISK_WARN_BYTES, 10 * GiB);
  assert.equal(diskCheck("/s", 1 * GiB).status, "fail");
  assert.match(diskCheck("/s", 1 * GiB).detail, /1\.0 GiB free in \/s; civm needs at least 2 GiB/);
  assert.equal(diskCheck("/s", 5 * GiB).status, "warn");
  assert.equal(diskCheck("/s", 10 * GiB).status, "pass");
  assert.equal(diskCheck("/s", 300 * 1024 ** 2).detail.startsWith("300 MiB free"), true);
});

test("a state dir that cannot be created fails", async () => {
  const h = fakeHost();
  const file = join(tempDir(), "not-a-dir");
  writeFileSync(file, "");
  const r = await runDoctor({ paths: { stateDir: join(file, "state"), logsDir: join(file, "logs") }, env: { ...h.env, CIVM_ACCEL: "tcg" }, kvmDevice: h.kvm });
  assert.equal(byName(r, "state dir writable").status, "fail");
  assert.match(byName(r, "state dir writable").detail, /not a directory/);
  assert.equal(r.ok, false);
});
