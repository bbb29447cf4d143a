// civm-host on real QEMU (TCG): the image `civm image build civm-host` makes (built once, cached
// by key in <testCacheDir>/store-host), booted through its own bootloader with a NoCloud seed
// (an ISO labelled cidata) holding seed 003's user-data, and a blank second disk:
//
// 1. BIOS (SeaBIOS): bootstrap.sh brings civm serve up with the App and pools.json cloud-init
//    wrote; the fake GitHub on this host (reached through the VM network policy's allow list)
//    hands out the App's installation token and the pool's JIT config; /healthz answers through
//    a port forward and reports civm doctor's verdict (no KVM in here: TCG). Over SSH: the
//    firewall, sysctls, mount options, sshd, auditd, blocked modules, the data disk, the grown
//    root. The runner VM civm serve then boots is TCG inside TCG: the test reports how far it
//    got, it does not wait for a job.
// 2. UEFI (OVMF): a broken pools.json fails the bootstrap with a message naming the file,
//    civm-serve is not running; then civm's own form (/etc/civm/serve.yaml + civm-host
//    bootstrap) brings it up.
// 3. `civm image export` as a fixed VHD (footer, whole MiB) and raw.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { generateKeyPairSync, randomBytes, randomUUID } from "node:crypto";
import { chmodSync, copyFileSync, mkdirSync, openSync, readFileSync, readSync, rmSync, statSync, closeSync } from "node:fs";
import { join } from "node:path";
import { VmRun, type VmResult } from "../../src/vm/index.js";
import { resolvePaths } from "../../src/host/paths.js";
import type { InstanceSpec } from "../../src/config/types.js";
import { parseAllowEntry } from "../../src/net/policy.js";
import { startFakeGitHub, type FakeGitHub } from "../support/fake-github.js";
import { ensureHostImage, HOST_IMAGE, hostStoreDir, ssh, waitForSsh, writeAzureOvfIso, writeConfigDrive, writeSeedIso, type HostImage } from "../support/host-image.js";
import { AZURE_CHASSIS_ASSET_TAG, startFakeAzure, type FakeAzure } from "../support/fake-azure.js";
import { buildTinyGuest } from "../support/tiny-guest.js";
import { freePort } from "../support/net.js";
import { civmBin, tempDir, testQemuUser } from "../support/paths.js";
import { runNode } from "../support/runner-image.js";

/**
 * These run in every suite, CI included: a cold civm-host build is about 7 CPU-minutes (21 min
 * of wall time on the shared 2-core test machine at load 11-14, less on a quiet one), each
 * boot 4-6 CPU-minutes under TCG; docs/benchmarks.md has the figures. CIVM_E2E_HOST=0 skips
 * them (a machine without the time for a cold build), saying so.
 */
const SKIP = process.env.CIVM_E2E_HOST === "0" ? "CIVM_E2E_HOST=0: the civm-host image tests are switched off (docs/hosts.md, Tests)" : false;

/**
 * The Azure datasource boot is opt-in (CIVM_E2E_AZURE=1): one more boot of the host under TCG,
 * more than cold CI's budget allows (docs/benchmarks.md). It needs root (a network namespace).
 */
const AZURE_SKIP = process.env.CIVM_E2E_AZURE === "1" ? false : "CIVM_E2E_AZURE is not 1: the Azure datasource boot is opt-in (docs/hosts.md, Tests)";

/**
 * Waits for cloud-init's last stage (boot-finished is written after runcmd), then prints its
 * status: `cloud-init status --wait` returns as soon as any stage has recorded an error.
 */
const CLOUD_INIT_DONE = "while [ ! -e /var/lib/cloud/instance/boot-finished ]; do sleep 5; done; cloud-init status --long";

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const ORG = "civm-host-org";
const APP_ID = 4242;
const INSTALLATION = 77;
const BOOT_TIMEOUT_MS = 25 * 60_000;

let image: HostImage;
let github: FakeGitHub;
let work: string;
let sshKey: string;
let sshPub: string;
let appKeyPem: string;
let tinyShare: string;

before(async () => {
  if (SKIP) return;
  image = await ensureHostImage();
  process.stderr.write(`host-image: civm-host ${image.cached ? "cached" : "built"} in ${image.seconds.toFixed(1)} s\n`);
  work = tempDir("civm-host-e2e-");
  sshKey = join(work, "id_ed25519");
  execFileSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", sshKey]);
  sshPub = readFileSync(`${sshKey}.pub`, "utf8").trim();
  const pair = generateKeyPairSync("rsa", { modulusLength: 2048, publicKeyEncoding: { type: "spki", format: "pem" }, privateKeyEncoding: { type: "pkcs1", format: "pem" } });
  appKeyPem = pair.privateKey;
  github = await startFakeGitHub({ orgs: [ORG], app: { id: APP_ID, publicKey: pair.publicKey, installations: { [ORG]: INSTALLATION } } });
  // The runner image the pool names: the tiny guest, shared read-only into the host over 9p.
  const tiny = await buildTinyGuest();
  tinyShare = join(work, "tiny");
  mkdirSync(tinyShare, { mode: 0o755 });
  copyFileSync(tiny.disk, join(tinyShare, "disk.qcow2"));
  copyFileSync(tiny.kernel, join(tinyShare, "vmlinuz"));
  copyFileSync(tiny.initrd, join(tinyShare, "initrd.img"));
  for (const f of ["disk.qcow2", "vmlinuz", "initrd.img"]) chmodSync(join(tinyShare, f), 0o644);
}, { timeout: 45 * 60_000 }); // a cold build of civm-host: 21 min at load 11-14 here

after(async () => {
  await github?.close();
  if (work) rmSync(work, { recursive: true, force: true });
});

const b64 = (s: string) => Buffer.from(s).toString("base64");

function poolsJson(): string {
  return JSON.stringify([
    {
      name: "default",
      maxRunners: 1,
      minRunners: 1,
      runner: { name: "runner", image: "/srv/civm-test/disk.qcow2", imagePullPolicy: "IfNotPresent", organization: ORG, labels: ["self-hosted", "civm-host", "linux"] },
      firecracker: { vcpuCount: 1, memSizeMib: 256, kernelArgs: "console=ttyS0 reboot=k panic=1 pci=off" },
    },
  ]);
}

/**
 * Seed 003's user-data as its README writes it (the three files and runcmd), plus what the test
 * needs: an SSH key (unless the datasource's metadata brings it), where the fake GitHub is
 * (host.env) and the tiny guest's share (bootcmd mounts it before runcmd).
 */
function seedUserData(pools: string, o: { sshKey: boolean } = { sshKey: true }): string {
  return `#cloud-config
write_files:
  - path: /etc/fireactions/github-app-id
    content: "${APP_ID}"
    permissions: "0600"
  - path: /etc/fireactions/github-private-key.pem
    encoding: b64
    content: ${b64(appKeyPem)}
    permissions: "0600"
  - path: /etc/fireactions/pools.json
    encoding: b64
    content: ${b64(pools)}
    permissions: "0644"
  - path: /etc/civm/host.env
    content: |
      GITHUB_API_URL=http://10.0.2.2:${new URL(github.url).port}
    permissions: "0600"
runcmd:
  - /etc/fireactions/bootstrap.sh
${o.sshKey ? `ssh_authorized_keys:\n  - ${sshPub}\n` : ""}bootcmd:
  - [mkdir, -p, /srv/civm-test]
  - [mount, -t, 9p, -o, "trans=virtio,version=9p2000.L,ro", civmtiny, /srv/civm-test]
`;
}

interface HostVm {
  name: string;
  sshPort: number;
  servePort: number;
  vm: VmRun;
  done: Promise<VmResult>;
  alive: () => boolean;
  console: () => string;
  run: (cmd: string, timeoutMs?: number) => Promise<{ code: number | null; stdout: string; stderr: string }>;
  stop: () => Promise<VmResult>;
}

/**
 * Boots civm-host through its own bootloader with cloud-init's data on a disc: NoCloud (an ISO
 * labelled cidata, libvirt's and Proxmox's form) or ConfigDrive (config-2, OpenStack's form,
 * the SSH key in its meta_data.json), and a blank second disk.
 */
async function bootHost(o: { name: string; firmware: "bios" | "uefi"; userData: string; datasource: "nocloud" | "configdrive" | "azure"; azure?: FakeAzure }): Promise<HostVm> {
  const dir = join(work, o.name);
  mkdirSync(dir, { mode: 0o755 });
  const stateDir = join(dir, "state");
  mkdirSync(stateDir, { mode: 0o755 });
  const files = join(stateDir, "host-files");
  mkdirSync(files, { mode: 0o755 });
  const instanceId = `civm-host-test-${randomBytes(4).toString("hex")}`;
  const dataDisk = join(files, "data.qcow2");
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", dataDisk, "4G"]);
  const sshPort = await freePort();
  const servePort = await freePort();
  const qemuArgs: string[] = [];
  if (o.datasource === "azure") {
    // As Azure presents a VM: the chassis asset tag cloud-init's ds-identify knows Azure by, and
    // the provisioning disc (ovf-env.xml) as a CD-ROM, which cloud-init ejects when it reports ready.
    const ovf = writeAzureOvfIso(files, { userData: o.userData, hostname: "civm-host-azure", username: "debian" });
    qemuArgs.push("-smbios", `type=3,asset=${AZURE_CHASSIS_ASSET_TAG}`, "-uuid", o.azure!.vmId, "-drive", `file=${ovf},if=none,id=ovfcd,media=cdrom,readonly=on,format=raw`, "-device", "ide-cd,drive=ovfcd,bus=ide.0");
  } else {
    const seed = o.datasource === "nocloud"
      ? writeSeedIso(files, o.userData, instanceId)
      : writeConfigDrive(files, o.userData, { uuid: randomUUID(), hostname: "civm-host-test", publicKeys: { "civm-test": sshPub } });
    qemuArgs.push("-drive", `file=${seed},if=virtio,format=raw,readonly=on`);
  }
  qemuArgs.push("-drive", `file=${dataDisk},if=virtio,format=qcow2`);
  if (o.firmware === "uefi") qemuArgs.push("-bios", "/usr/share/ovmf/OVMF.fd");
  const spec: InstanceSpec = {
    name: o.name, image: image.diskPath, cpus: 2, ramBytes: 3 * GiB, rootDiskBytes: 8 * GiB, timeoutSeconds: 3600,
    sshPort, config: {}, kernel: undefined, initrd: undefined, cmdline: undefined, machine: "pc", qemuArgs,
    network: { mode: "restricted", allow: [parseAllowEntry(`host:${new URL(github.url).port}`)] },
    source: { file: "host-image.test.ts", index: 0 },
  };
  let text = "";
  const vm = new VmRun({
    spec, paths: resolvePaths({ stateDir, logsDir: join(dir, "logs") }), accel: "tcg", graceSeconds: 10,
    extraForwards: [{ proto: "tcp", hostAddr: "127.0.0.1", hostPort: servePort, guestPort: 8080 }],
    mounts: [{ path: tinyShare, tag: "civmtiny", readOnly: true, securityModel: "mapped-xattr" }],
    qemuWritable: [files], qemuUser: testQemuUser,
    // Azure: QEMU in the fake Azure's namespace; its forwards listen there, reached through pipes.
    ...(o.azure ? { qemuWrapper: o.azure.ns.wrap } : {}),
    log: (l) => process.stderr.write(`${o.name}: ${l}\n`),
    onConsole: (t) => (text += t),
  });
  const [sshAt, serveAt] = o.azure ? [await o.azure.ns.reach(sshPort), await o.azure.ns.reach(servePort)] : [sshPort, servePort];
  let ended = false;
  const done = vm.run().finally(() => (ended = true));
  return {
    name: o.name, sshPort: sshAt, servePort: serveAt, vm, done, alive: () => !ended, console: () => text,
    run: (cmd, timeoutMs) => sshRetrying(sshAt, cmd, timeoutMs, () => !ended),
    stop: async () => {
      vm.stop("signal");
      return done;
    },
  };
}

/**
 * ssh, tried again while the connection itself fails (exit 255, nothing printed): cloud-init's
 * first boot restarts sshd with new host keys after the first login can already answer (a
 * local run saw the next command's connection refused right after SSH first answered).
 */
async function sshRetrying(port: number, cmd: string, timeoutMs: number | undefined, alive: () => boolean): Promise<{ code: number | null; stdout: string; stderr: string }> {
  for (let attempt = 1; ; attempt++) {
    const r = await ssh(port, sshKey, cmd, timeoutMs);
    if (r.code !== 255 || r.stdout !== "" || attempt >= 6 || !alive()) return r;
    process.stderr.write(`# ssh to 127.0.0.1:${port} failed (${r.stderr.trim() || "exit 255"}); again in 10 s\n`);
    await new Promise((res) => setTimeout(res, 10_000));
  }
}

/**
 * Runs each command as root in one SSH session and returns each one's output (stdout, stderr
 * where the command redirects it) by name.
 */
async function collect<K extends string>(host: HostVm, commands: Record<K, string>): Promise<Record<K, string>> {
  const marker = `@@civm-${randomBytes(4).toString("hex")}@@`;
  const script = Object.entries(commands).map(([name, cmd]) => `echo "${marker}${name}"; ${cmd as string}`).join("\n");
  const r = await host.run(`echo ${Buffer.from(script).toString("base64")} | base64 -d | sudo sh`, 5 * 60_000);
  const out = {} as Record<K, string>;
  for (const part of r.stdout.split(marker).slice(1)) {
    const nl = part.indexOf("\n");
    out[part.slice(0, nl) as K] = part.slice(nl + 1);
  }
  for (const name of Object.keys(commands) as K[]) if (out[name] === undefined) assert.fail(`no output for "${name}" (ssh exit ${r.code}): ${r.stdout}${r.stderr}`);
  return out;
}

async function eventually<T>(what: string, timeoutMs: number, f: () => Promise<T | undefined>): Promise<T> {
  const started = Date.now();
  for (;;) {
    const v = await f();
    if (v !== undefined) return v;
    if (Date.now() - started > timeoutMs) throw new Error(`${what}: not within ${timeoutMs / 1000} s`);
    await new Promise((r) => setTimeout(r, 3000));
  }
}

test("BIOS boot with seed 003's user-data: civm serve runs with the App and pools, /healthz through a forward, the host is hardened", { timeout: 60 * 60_000, skip: SKIP }, async (t) => {
  const started = Date.now();
  const host = await bootHost({ name: "hostbios", firmware: "bios", userData: seedUserData(poolsJson()), datasource: "nocloud" });
  try {
    const sshSeconds = await waitForSsh(host.sshPort, sshKey, BOOT_TIMEOUT_MS, host.alive);
    t.diagnostic(`SSH answered ${sshSeconds.toFixed(0)} s after start (TCG, SeaBIOS + GRUB)`);
    const ci = await host.run(`${CLOUD_INIT_DONE}; sudo tail -n 60 /var/log/cloud-init-output.log`, 30 * 60_000);
    assert.match(ci.stdout, /status: done/, `cloud-init:\n${ci.stdout}${ci.stderr}`);
    assert.match(ci.stdout, /civm-host: civm serve is running/);
    t.diagnostic(`bootstrap done ${((Date.now() - started) / 1000).toFixed(0)} s after start`);

    const unit = await host.run("systemctl is-active civm-serve; systemctl is-enabled civm-serve");
    assert.equal(unit.stdout.trim(), "active\nenabled");

    // /healthz through the port forward; civm doctor's verdict arrives shortly after start.
    const health = await eventually("/healthz with civm doctor's host part", 10 * 60_000, async () => {
      try {
        const r = await fetch(`http://127.0.0.1:${host.servePort}/healthz`, { signal: AbortSignal.timeout(10_000) });
        const j = (await r.json()) as { ok: boolean; status: string; host?: { ok: boolean; kvm: boolean; accel: string; problems: { name: string }[] } };
        return j.host ? j : undefined;
      } catch {
        return undefined;
      }
    });
    assert.equal(health.ok, true);
    assert.equal(health.host?.kvm, false, "no nested virtualization here: no KVM in the host");
    assert.equal(health.host?.accel, "tcg");
    t.diagnostic(`/healthz host: ${JSON.stringify(health.host)}`);

    // The App's installation token and the pool's minRunners JIT config came from the fake GitHub.
    const why = async () => `fake GitHub saw: ${github.requests.map((r) => `${r.method} ${r.path}`).join(", ") || "nothing"}\n` + (await host.run("sudo journalctl -u civm-serve -n 60 --no-pager -o cat")).stdout;
    await eventually("the installation token request", 5 * 60_000, async () => (github.requests.some((r) => r.method === "POST" && r.path === `/app/installations/${INSTALLATION}/access_tokens`) ? true : undefined)).catch(async (e: Error) => assert.fail(`${e.message}; ${await why()}`));
    await eventually("the pool's JIT config (minRunners: 1 registered)", 10 * 60_000, async () => (github.requests.some((r) => r.method === "POST" && r.path === `/orgs/${ORG}/actions/runners/generate-jitconfig`) ? true : undefined)).catch(async (e: Error) => assert.fail(`${e.message}; ${await why()}`));
    const registeredAt = (Date.now() - started) / 1000;
    t.diagnostic(`runner registered (JIT config) ${registeredAt.toFixed(0)} s after start`);

    // Hardening, as docs/hosts.md lists it. One SSH session collects everything (a session costs
    // 10-30 s under TCG); each item is then a subtest of its own, so one failure does not hide
    // the others (the boot they share is the expensive part).
    const names = [
      "kernel.dmesg_restrict", "kernel.kptr_restrict", "kernel.unprivileged_bpf_disabled", "net.core.bpf_jit_harden", "kernel.yama.ptrace_scope", "kernel.randomize_va_space",
      "fs.protected_hardlinks", "fs.protected_symlinks", "fs.protected_fifos", "fs.protected_regular", "fs.suid_dumpable", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter",
      "net.ipv4.conf.all.accept_redirects", "net.ipv4.conf.all.secure_redirects", "net.ipv4.conf.all.send_redirects", "net.ipv4.conf.all.accept_source_route", "net.ipv6.conf.all.accept_redirects",
      "net.ipv6.conf.all.accept_source_route",
    ];
    const want = ["1", "2", "1", "2", "1", "2", "1", "1", "2", "2", "0", "1", "1", "0", "0", "0", "0", "0", "0"];
    const probe = await collect(host, {
      nft: "nft list table inet civm_host",
      sysctl: `sysctl ${names.join(" ")}`,
      // Each interface's own rp_filter too (the kernel uses the larger of all and the interface's).
      nicRpFilter: "for f in /proc/sys/net/ipv4/conf/en*/rp_filter; do echo \"$f $(cat $f)\"; done",
      mounts: "findmnt -no OPTIONS /tmp; findmnt -no OPTIONS /var/tmp",
      sshd: "sshd -T | grep -Ei '^(passwordauthentication|kbdinteractiveauthentication|permitrootlogin) '",
      audit: "auditctl -l",
      blocked: "modprobe -n -v dccp 2>&1",
      // --show-depends: what a load would run, whether or not the module is loaded already.
      allowed: "for m in kvm tun 9pnet_virtio nf_tables; do modprobe --show-depends $m 2>&1; done",
      upgrades: "apt-config dump APT::Periodic::Unattended-Upgrade; systemctl is-enabled unattended-upgrades apt-daily-upgrade.timer",
      data: "findmnt -no SOURCE,FSTYPE,OPTIONS /var/lib/civm; blkid -s LABEL -o value \"$(findmnt -no SOURCE /var/lib/civm)\"; lsblk -bno SIZE \"$(findmnt -no SOURCE /)\"",
      // The check is a oneshot that may still be probing KVM (QEMU under TCG inside TCG) when the
      // runner registers, and journald can store its last lines after the unit has already left
      // "activating" (CI saw the verdict missing): wait for doctor's closing line itself.
      doctor: "timeout 240 sh -c 'until journalctl -b -u civm-host-check --no-pager -o cat | grep -q \"^civm doctor: \"; do sleep 2; done'; journalctl -b -u civm-host-check --no-pager -o cat",
      agentUnits: "systemctl is-active civm-growfs civm-agent || true",
      initrd: "lsinitramfs /boot/initrd.img-$(uname -r) | grep -oE '(hv_vmbus|hv_storvsc|nvme|xen-blkfront)\\.ko' | sort -u",
    });
    await t.test("firewall: inbound policy drop, SSH and civm serve's port, no forwarding", () => {
      assert.match(probe.nft, /policy drop/, probe.nft);
      assert.match(probe.nft, /elements = \{ 22, 8080 \}/, probe.nft);
      assert.match(probe.nft, /chain forward \{[^}]*policy drop/, probe.nft);
    });
    await t.test("sysctls", () => {
      assert.deepEqual(probe.sysctl.trim().split("\n"), names.map((n, i) => `${n} = ${want[i]}`));
      assert.match(probe.nicRpFilter, /\/en\S+\/rp_filter 1$/m, probe.nicRpFilter);
    });
    await t.test("/tmp and /var/tmp nodev,nosuid,noexec", () => {
      const lines = probe.mounts.trim().split("\n");
      assert.equal(lines.length, 2, probe.mounts);
      for (const line of lines) for (const opt of ["nodev", "nosuid", "noexec"]) assert.ok(line.split(",").includes(opt), `${opt} in ${line}`);
    });
    await t.test("sshd: keys only, no root login", () => {
      assert.match(probe.sshd, /^passwordauthentication no$/m, probe.sshd);
      assert.match(probe.sshd, /^kbdinteractiveauthentication no$/m, probe.sshd);
      assert.match(probe.sshd, /^permitrootlogin no$/m, probe.sshd);
    });
    await t.test("auditd watches civm's config and keys", () => {
      assert.match(probe.audit, /\/etc\/civm\/? .*civm-config/, probe.audit);
      assert.match(probe.audit, /\/etc\/fireactions\/github-private-key\.pem .*civm-keys/, probe.audit);
    });
    await t.test("unused modules blocked, kvm, tun and 9p not", () => {
      assert.match(probe.blocked, /install \/bin\/false/, probe.blocked);
      assert.doesNotMatch(probe.allowed, /\/bin\/false/, probe.allowed);
      assert.match(probe.allowed, /kvm/, probe.allowed);
    });
    await t.test("unattended security upgrades", () => {
      assert.match(probe.upgrades, /APT::Periodic::Unattended-Upgrade "1";/, probe.upgrades);
      assert.doesNotMatch(probe.upgrades, /disabled|masked/, probe.upgrades);
    });
    await t.test("the blank second disk is /var/lib/civm; the root partition grew to the 8 GiB disk", () => {
      const [mnt, label, rootSize] = probe.data.trim().split("\n");
      assert.match(mnt ?? "", /^\/dev\/vd[b-z] ext4 /, probe.data);
      assert.equal(label, "civm-data");
      assert.ok(Number(rootSize) > 7 * GiB, `root partition grown to the disk: ${rootSize} bytes`);
    });
    await t.test("the boot check: /dev/kvm and civm doctor in the journal; the guest agent's units idle", (t) => {
      // QEMU's TCG (-cpu max has SVM) lets kvm_amd load inside, so /dev/kvm may be there; whether
      // a probe boot on it finishes in time depends on the machine. civm doctor must decide.
      assert.match(probe.doctor, /civm-host: KVM: |civm-host: warning: no \/dev\/kvm/, probe.doctor);
      assert.match(probe.doctor, /KVM usable\s+(no|yes):/, probe.doctor);
      t.diagnostic(/KVM usable.*/.exec(probe.doctor)?.[0] ?? "");
      assert.match(probe.doctor, /civm doctor: /, probe.doctor);
      assert.doesNotMatch(probe.agentUnits, /^active/m, "the guest agent's units do not run on a host");
    });
    await t.test("the initrd holds the root-disk drivers of Azure (Hyper-V), NVMe and Xen", () => {
      assert.deepEqual(probe.initrd.trim().split("\n"), ["hv_storvsc.ko", "hv_vmbus.ko", "nvme.ko", "xen-blkfront.ko"]);
    });

    // TCG inside TCG: how far did the runner VM get? Reported, not required.
    const nested = await host.run("sudo sh -c 'ls -1 /var/log/civm/*.log 2>/dev/null | head -n 1 | xargs -r grep -c -e \"tiny-guest:\" -e \"Linux version\"'");
    t.diagnostic(`runner VM inside the host (TCG in TCG), ${((Date.now() - started) / 1000).toFixed(0)} s after start: console lines from its kernel/init so far: ${nested.stdout.trim() || "none (log not there yet)"}`);
  } finally {
    const r = await host.stop();
    t.diagnostic(`host VM ended: ${r.reason}`);
  }
});

test("UEFI boot from a ConfigDrive (config-2): the SSH key from its metadata; a broken pools.json fails the bootstrap naming the file, civm-serve not running; civm's own serve.yaml then brings it up", { timeout: 60 * 60_000, skip: SKIP }, async (t) => {
  const host = await bootHost({ name: "hostuefi", firmware: "uefi", userData: seedUserData('[{"name": "default", "maxRunners": 1,,}]', { sshKey: false }), datasource: "configdrive" });
  try {
    // SSH answering at all shows the ConfigDrive was read: the key is only in its meta_data.json.
    const sshSeconds = await waitForSsh(host.sshPort, sshKey, BOOT_TIMEOUT_MS, host.alive);
    t.diagnostic(`SSH answered ${sshSeconds.toFixed(0)} s after start (TCG, OVMF + GRUB, ConfigDrive)`);
    assert.match((await host.run("test -d /sys/firmware/efi && echo uefi")).stdout, /uefi/, "booted through UEFI");
    const ds = await host.run(`${CLOUD_INIT_DONE} >/dev/null; cat /run/cloud-init/result.json`, 30 * 60_000);
    assert.match(ds.stdout, /"datasource": "DataSourceConfigDrive \[net,ver=2\]\[source=\/dev\/vd[a-z]\]"/, `ssh exit ${ds.code}: ${ds.stdout}${ds.stderr}`);
    const ci = await host.run(`${CLOUD_INIT_DONE}; sudo cat /var/log/cloud-init-output.log`, 30 * 60_000);
    assert.match(ci.stdout, /status: error/, ci.stdout);
    assert.match(ci.stdout, /\/etc\/fireactions\/pools\.json/);
    assert.match(ci.stdout, /civm-host: error: \/etc\/civm\/serve\.yaml \(and the files it names\) did not pass "civm config check"/);
    assert.match(ci.stdout, /civm-serve is not running/);
    const unit = await host.run("systemctl is-active civm-serve; systemctl is-enabled civm-serve");
    assert.match(unit.stdout, /^inactive\ndisabled/);

    // civm's own form: serve.yaml (and a pools file) written, then civm-host bootstrap.
    const yaml = [
      "listen: 0.0.0.0:8080",
      "github:",
      `  apiUrl: http://10.0.2.2:${new URL(github.url).port}`,
      `  appId: ${APP_ID}`,
      "  privateKeyFile: /etc/fireactions/github-private-key.pem",
      "pools: /etc/civm/pools.json",
    ].join("\n");
    const write = await host.run(`printf '%s\\n' '${yaml}' | sudo tee /etc/civm/serve.yaml >/dev/null && printf '%s' '${poolsJson().replace(/"minRunners":1/, '"minRunners":0')}' | sudo tee /etc/civm/pools.json >/dev/null && sudo civm-host bootstrap --civm`, 15 * 60_000);
    assert.equal(write.code, 0, write.stdout + write.stderr);
    assert.match(write.stdout, /civm serve is running/);
    assert.match((await host.run("systemctl is-active civm-serve")).stdout, /^active/);
    const r = await fetch(`http://127.0.0.1:${host.servePort}/healthz`, { signal: AbortSignal.timeout(20_000) });
    assert.equal(r.status, 200);
  } finally {
    await host.stop();
  }
});

test("Azure: ovf-env.xml on a CD, the instance metadata service and the wireserver faked in a namespace of the test's: the custom data (seed 003's user-data) runs, the SSH key comes from IMDS, provisioning is reported ready, civm serve runs", { timeout: 60 * 60_000, skip: SKIP || AZURE_SKIP }, async (t) => {
  const started = Date.now();
  // The guest's 10.0.2.2:PORT is 127.0.0.1:PORT in the namespace, piped to the fake GitHub here.
  const ghPort = Number(new URL(github.url).port);
  const seenBefore = github.requests.length;
  const azure = await startFakeAzure({ adminUsername: "debian", computerName: "civm-host-azure", publicKeys: [sshPub], expose: [{ addr: "127.0.0.1", port: ghPort, to: ghPort }] });
  t.after(() => azure.close());
  // No nested runner VM (minRunners 0): this boot is about the datasource.
  const host = await bootHost({ name: "hostazure", firmware: "bios", userData: seedUserData(poolsJson().replace(/"minRunners":1/, '"minRunners":0'), { sshKey: false }), datasource: "azure", azure });
  try {
    // SSH answering shows the IMDS key was installed: it is in neither the user-data nor the OVF.
    const sshSeconds = await waitForSsh(host.sshPort, sshKey, BOOT_TIMEOUT_MS, host.alive);
    t.diagnostic(`SSH answered ${sshSeconds.toFixed(0)} s after start (TCG, SeaBIOS + GRUB, Azure datasource)`);
    const ci = await host.run(`${CLOUD_INIT_DONE}; cat /run/cloud-init/result.json; hostname; cat /var/lib/cloud/data/instance-id; sudo tail -n 40 /var/log/cloud-init-output.log`, 30 * 60_000);
    const why = () => `${ci.stdout}${ci.stderr}\nfake Azure saw: ${azure.requests.map((r) => `${r.service} ${r.method} ${r.url}`).join(", ") || "nothing"}`;
    assert.match(ci.stdout, /status: done/, why());
    assert.match(ci.stdout, /"datasource": "DataSourceAzure \[seed=\/dev\/sr\d\]"/, why());
    assert.match(ci.stdout, /^civm-host-azure$/m, `the host name from the OVF and IMDS: ${why()}`);
    assert.match(ci.stdout, /civm-host: civm serve is running/, why());
    t.diagnostic(`cloud-init and the bootstrap done ${((Date.now() - started) / 1000).toFixed(0)} s after start`);
    assert.ok(azure.requests.some((r) => r.service === "imds" && r.url.startsWith("/metadata/instance?") && r.headers.metadata === "true"), why());
    assert.ok(azure.requests.some((r) => r.service === "wireserver" && r.method === "GET" && r.url.includes("comp=goalstate")), why());
    const ready = azure.healthReports();
    assert.ok(ready.length >= 1 && ready.every((x) => /<State>Ready<\/State>/.test(x)), `provisioning reported ready: ${ready.join("\n") || "no health report"}; ${why()}`);
    // cloud-init's instance id on Azure is the VM's SMBIOS uuid (Azure's vmId).
    assert.match(ci.stdout, new RegExp(`^${azure.vmId}$`, "m"), why());

    const unit = await host.run("systemctl is-active civm-serve; systemctl is-enabled civm-serve");
    assert.equal(unit.stdout.trim(), "active\nenabled");
    const r = await fetch(`http://127.0.0.1:${host.servePort}/healthz`, { signal: AbortSignal.timeout(20_000) });
    assert.equal(r.status, 200);
    await eventually("the installation token request", 5 * 60_000, async () => (github.requests.slice(seenBefore).some((q) => q.method === "POST" && q.path === `/app/installations/${INSTALLATION}/access_tokens`) ? true : undefined));
    t.diagnostic(`the whole Azure boot: ${((Date.now() - started) / 1000).toFixed(0)} s`);
  } catch (e) {
    process.stderr.write(`hostazure: console (last 8000 characters):\n${host.console().slice(-8000)}\nfake Azure saw: ${azure.requests.map((r) => `${r.service} ${r.method} ${r.url}`).join(", ") || "nothing"}\n`);
    throw e;
  } finally {
    await host.stop();
  }
});

test("civm image export: a fixed VHD (valid footer, whole MiB) and raw, the image's virtual size", { timeout: 30 * 60_000, skip: SKIP }, async () => {
  const out = tempDir("civm-host-export-");
  try {
    const env = { ...process.env, CIVM_STATE_DIR: hostStoreDir, CIVM_LOGS_DIR: join(out, "logs") };
    const vhd = join(out, "civm-host.vhd");
    const r = await runNode([civmBin, "image", "export", HOST_IMAGE, "--format", "vhd", "-o", vhd, "-q", "--json"], env);
    assert.equal(r.code, 0, r.stderr);
    const info = JSON.parse(execFileSync("qemu-img", ["info", "-f", "vpc", "--output", "json", vhd], { encoding: "utf8" })) as { "virtual-size": number };
    const virtual = (JSON.parse(execFileSync("qemu-img", ["info", "--output", "json", image.diskPath], { encoding: "utf8" })) as { "virtual-size": number })["virtual-size"];
    assert.equal(info["virtual-size"], virtual);
    assert.equal(info["virtual-size"] % MiB, 0, "Azure: a whole number of MiB");
    // The fixed VHD is the disk plus a 512-byte footer: cookie "conectix", disk type 2 (fixed),
    // current size = the virtual size.
    const size = statSync(vhd).size;
    assert.equal(size, virtual + 512);
    const footer = Buffer.alloc(512);
    const fd = openSync(vhd, "r");
    readSync(fd, footer, 0, 512, size - 512);
    closeSync(fd);
    assert.equal(footer.subarray(0, 8).toString("latin1"), "conectix");
    assert.equal(footer.readUInt32BE(60), 2, "disk type: fixed");
    assert.equal(Number(footer.readBigUInt64BE(48)), virtual, "footer's current size");
    // Refused without --force, then raw.
    const again = await runNode([civmBin, "image", "export", HOST_IMAGE, "--format", "vhd", "-o", vhd, "-q"], env);
    assert.equal(again.code, 2);
    assert.match(again.stderr, /already exists; pass --force/);
    rmSync(vhd);
    const raw = join(out, "civm-host.raw");
    const r2 = await runNode([civmBin, "image", "export", HOST_IMAGE, "--format", "raw", "-o", raw, "-q"], env);
    assert.equal(r2.code, 0, r2.stderr);
    assert.equal(statSync(raw).size, virtual);
    assert.match(execFileSync("sfdisk", ["-d", raw], { encoding: "utf8" }), /type=ef/);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});
