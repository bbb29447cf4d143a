// arm64 (AArch64) guests on real QEMU: qemu-system-aarch64's virt machine under TCG with the
// arm64 tiny guest (Debian's arm64 kernel and busybox). The guest agent's contract as on
// x86_64: the config disc (a SCSI CD on virtio-scsi) is read and ejected, civm removes the
// medium, the guest runs its command and powers off, civm's exit code says how it ended,
// and nothing is left behind. Three boots (~15 s each under TCG), then a civm serve pool on
// the arm64 guest stored as an image (the pool takes the image's architecture).
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, readFileSync, writeFileSync, chmodSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { civmEnv, runCivm, leftovers, qemuProcessesOf, consoleLogOf, type CivmEnv } from "../support/civm-cli.js";
import { storeTinyGuest } from "../support/tiny-store.js";
import { REPO, SECRET, startServeWithHub } from "../support/serve-harness.js";
import { sendWebhook, workflowJobPayload } from "../support/fake-github.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest({ arch: "arm64" });
});

function assertClean(e: CivmEnv): void {
  assert.deepEqual(leftovers(e), [], "work dirs or registry entries were left behind");
  assert.deepEqual(qemuProcessesOf(e), [], "a QEMU process was left running");
}

/** The QEMU command lines the shim recorded (one per start). */
function qemuArgv(e: CivmEnv): string[] {
  return readFileSync(e.qemuStartsFile, "utf8").trim().split("\n").filter((l) => l.includes("-machine"));
}

function writeInstances(e: CivmEnv, instances: Record<string, unknown>[]): void {
  writeFileSync(join(e.root, "instances.json"), JSON.stringify(instances, null, 2));
}

function tinyArm64(name: string, config: Record<string, unknown>, over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    name, arch: "arm64", image: guest.disk, "cpu-cores": 1, ram: "256M", "timeout-seconds": 180,
    // console=ttyS0 as on x86_64: civm makes it the virt machine's ttyAMA0.
    kernel: guest.kernel, initrd: guest.initrd, cmdline: "console=ttyS0 panic=-1 quiet", config, ...over,
  };
}

test("an arm64 instance boots on virt, reads and ejects its config disc (virtio-scsi), powers off: exit 0, nothing left", async () => {
  const e = civmEnv();
  writeInstances(e, [tinyArm64("arm-1", { tiny: "poweroff", marker: "from-the-config-disc" })]);
  const r = await runCivm(["run", "arm-1"], e);
  assert.equal(r.code, 0, r.stderr);
  const consoleText = consoleLogOf(r.stderr);
  assert.match(consoleText, /tiny-guest: booted \(kernel [^)]*-arm64\)/);
  assert.match(consoleText, /"marker": ?"from-the-config-disc"/);
  assert.match(consoleText, /tiny-guest: eject \/dev\/sr0: ok/);
  // (civm's removal of the medium is checked in the power-button test: here the guest powers
  // off right after its eject, and QEMU may be gone before query-block answers.)
  assert.match(r.stderr, /arm-1: poweroff after [\d.]+ s \(exit 0\)/);
  const argv = qemuArgv(e);
  assert.equal(argv.length, 1);
  assert.match(argv[0]!, /-machine virt,accel=tcg -cpu cortex-a57/);
  assert.match(argv[0]!, /-device virtio-scsi-pci,id=scsi0 -device scsi-cd,drive=cfgdrive,id=cfgcd/);
  assert.match(argv[0]!, /-append console=ttyAMA0 panic=-1 quiet/);
  assertClean(e);
});

test("an arm64 dev VM (--arch arm64) runs a command from a host mount: it runs on aarch64, writes back over 9p, exit 0", async () => {
  const e = civmEnv();
  const share = join(e.root, "share");
  mkdirSync(share);
  chmodSync(share, 0o777);
  writeFileSync(join(share, "tiny-script.sh"), 'echo "machine $(uname -m)"\nuname -m > result.txt\n');
  const r = await runCivm([
    "run", "--image", guest.disk, "--arch", "arm64", "--kernel", guest.kernel, "--initrd", guest.initrd, "--append", "quiet tiny.mode=mounts",
    "--cpus", "1", "--mem", "256M", "--timeout", "180", "--console", "--host-mount", share,
  ], e);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /tiny-guest: script: machine aarch64/);
  assert.equal(readFileSync(join(share, "result.txt"), "utf8").trim(), "aarch64");
  assertClean(e);
});

test("an arm64 guest's ejected disc is removed by civm; it honours the power button (virt's GPIO key): a timeout ends it within the grace period, exit 3", async () => {
  const e = civmEnv();
  writeInstances(e, [tinyArm64("arm-acpi", { tiny: "acpi" }, { "timeout-seconds": 15 })]);
  const r = await runCivm(["run", "arm-acpi", "--grace", "120"], e);
  assert.equal(r.code, 3, r.stderr);
  const consoleText = consoleLogOf(r.stderr);
  assert.match(consoleText, /tiny-guest: eject \/dev\/sr0: ok/);
  // The guest stays up after its eject: civm's removal of the medium is seen through.
  assert.match(r.stderr, /medium removed \(confirmed by query-block\)/);
  assert.match(consoleText, /acpi power button pressed/);
  const secs = Number(/timeout after ([\d.]+) s/.exec(r.stderr)?.[1]);
  assert.ok(secs < 120, `the guest powered off on the power button, so the grace period should not have run out (${secs} s)`);
  assertClean(e);
});

test("arch is checked before anything starts: an x86 machine for arm64, an unknown arch, --accel kvm for a foreign guest", async () => {
  const e = civmEnv();
  writeInstances(e, [
    tinyArm64("bad-machine", {}, { machine: "q35" }),
    tinyArm64("bad-arch", {}, { arch: "sparc" }),
  ]);
  const r = await runCivm(["run", "bad-machine"], e);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /instances\.json: instance "bad-machine" \(#1\): "machine" "q35" cannot run an arm64 guest: remove "machine" \(arm64 uses "virt"\) or set it to "virt"/);
  assert.match(r.stderr, /instance "bad-arch" \(#2\): "arch" must be the guest's architecture: "x86_64" \(the default; also "amd64"\) or "arm64" \(also "aarch64"\) \(got "sparc"\)/);
  assert.doesNotMatch(r.stderr, /\n\s+at /, "a stack trace was printed");
  if (process.arch === "x64") {
    writeInstances(e, [tinyArm64("arm-kvm", {})]);
    const k = await runCivm(["run", "arm-kvm", "--accel", "kvm"], e);
    assert.equal(k.code, 2, k.stderr);
    assert.match(k.stderr, /KVM cannot run an arm64 guest on this x86_64 host/);
  }
  assert.equal(qemuArgv(e).length, 0, "QEMU was started for an instance that fails its checks");
  assertClean(e);
});

test("a pool on a stored arm64 image serves a job: its runner VM boots on virt under TCG, registers, runs the job, powers off and is deregistered", { timeout: 600_000 }, async (t) => {
  const pe = civmEnv();
  await storeTinyGuest(pe.stateDir, "tiny-a64", { arch: "arm64" });
  // Pools have no "arch": the stored image's manifest says arm64 (docs/serve.md, runner.image).
  const { gh, s } = await startServeWithHub(t, { e: pe, image: "tiny-a64", pollInterval: 5, shutdownTimeout: 60, pools: [{ minRunners: 0, maxRunners: 1 }] });
  await s.listening();
  const job = gh.addJob({ repository: REPO, labels: ["self-hosted", "tiny"] });
  const q = await sendWebhook(`${s.base}/webhook`, { secret: SECRET, payload: await workflowJobPayload("queued", { id: job.id, runId: job.runId, labels: job.labels, repository: REPO }) });
  assert.equal(q.status, 202);
  await s.poll(async () => gh.state.jobs[0]?.status === "completed", 300_000, "the job to complete");
  await s.poll(async () => (await s.liveVms()).length === 0, 60_000, "the job's VM to finish");
  const finished = (await s.allVms()).filter((v) => v.state === "finished");
  assert.equal(finished.length, 1);
  assert.equal(finished[0]!.exitReason, "poweroff");
  await s.poll(async () => gh.state.runners.size === 0, 10_000, "the runner to be deregistered");
  const argv = qemuArgv(pe);
  assert.equal(argv.length, 1);
  assert.match(argv[0]!, /-machine virt,accel=tcg -cpu cortex-a57/);
  assert.match(argv[0]!, /-append root=LABEL=civm-root rw console=ttyAMA0 panic=-1 quiet tiny\.hub=/);
  await s.stopClean();
});
