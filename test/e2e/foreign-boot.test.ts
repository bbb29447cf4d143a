// Foreign images (seed 000-style: GRUB on a BIOS disk, built here without civm) boot their
// own kernel directly: civm reads GRUB's default entry from the image (no mount), caches it
// by the image's identity, and boots it with -kernel/-initrd/-append plus the serial console.
// An image whose GRUB configuration civm cannot read boots through the firmware, saying why;
// so does "firmware-boot": true. A pool on the disk boots it the same way. Real QEMU under TCG; the guest is the tiny guest's kernel and
// init, which read instance.json from the config CD and eject it.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { civmEnv, consoleLogOf, leftovers, qemuProcessesOf, runCivm, type CivmEnv } from "../support/civm-cli.js";
import { buildGrubImage, GRUB_IMAGE_FS_UUID, SAVED_ENTRY_MARK, type GrubImage } from "../support/grub-image.js";
import { sendWebhook, workflowJobPayload } from "../support/fake-github.js";
import { logLines, REPO, SECRET, startServeWithHub } from "../support/serve-harness.js";

let direct: GrubImage;
let hidden: GrubImage;

before(async () => {
  direct = await buildGrubImage("direct");
  hidden = await buildGrubImage("hidden-config");
});

function writeInstances(e: CivmEnv, image: string, over: Record<string, unknown> = {}): void {
  const inst = { name: "foreign", image, "cpu-cores": 1, ram: "256M", "timeout-seconds": 180, config: { tiny: "poweroff", marker: "foreign-config-7d1e" }, ...over };
  writeFileSync(join(e.root, "instances.json"), JSON.stringify([inst]));
}

function qemuArgv(e: CivmEnv): string[] {
  return readFileSync(e.qemuStartsFile, "utf8").trim().split("\n").filter((l) => l.includes("-name"));
}

function assertClean(e: CivmEnv): void {
  assert.deepEqual(leftovers(e), [], "work dirs or registry entries were left behind");
  assert.deepEqual(qemuProcessesOf(e), [], "a QEMU process was left running");
}

test("a GRUB disk (qcow2) boots its own kernel directly: GRUB's saved entry, its kernel in the console, the config disc contract; cached for the next run", async () => {
  const e = civmEnv();
  writeInstances(e, direct.qcow2);
  const r = await runCivm(["run", "foreign"], e);
  assert.equal(r.code, 0, r.stderr);
  const ver = direct.kernelVersion.replace(/\./g, "\\.");
  assert.match(r.stderr, new RegExp(`foreign: booting the image's own kernel ${ver} directly \\(GRUB's default entry "Advanced options for Debian GNU/Linux > Debian GNU/Linux, with Linux ${ver}", partition 1: /boot/grub/grub\\.cfg; read now and cached\\)`));
  const text = consoleLogOf(r.stderr);
  // The image's own kernel, started by QEMU (no SeaBIOS, no GRUB on the console).
  assert.match(text, new RegExp(`tiny-guest: booted \\(kernel ${ver}\\)`));
  assert.doesNotMatch(text, /SeaBIOS|Booting `|Loading Linux/);
  // The config disc contract: {name, config} on the CD, ejected, the medium removed.
  assert.match(text, /tiny-guest: instance\.json: \{.*"name": ?"foreign".*"marker": ?"foreign-config-7d1e"/);
  assert.match(r.stderr, /medium removed \(confirmed by query-block\)/);
  assert.match(r.stderr, /foreign: poweroff after/);
  const [argv] = qemuArgv(e);
  assert.ok(argv, "QEMU was not started");
  const cache = join(e.stateDir, "boot-cache");
  assert.match(argv, new RegExp(`-kernel ${cache}/[0-9a-f]+/vmlinuz -initrd ${cache}/[0-9a-f]+/initrd\\.img`));
  assert.match(argv, new RegExp(`-append BOOT_IMAGE=/boot/vmlinuz-${ver} root=UUID=${GRUB_IMAGE_FS_UUID} ro console=ttyS0,115200n8 panic=-1 quiet ${SAVED_ENTRY_MARK}`));
  assertClean(e);

  // Again: from the cache (one entry), the same boot.
  const again = await runCivm(["run", "foreign"], e);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stderr, /booting the image's own kernel .* directly \(GRUB's default entry "[^"]+", partition 1: \/boot\/grub\/grub\.cfg\); "firmware-boot": true or --firmware-boot/);
  assert.equal(readdirSync(cache).length, 1);
  assertClean(e);

  // An ad-hoc VM of the same disk: the same kernel from the cache, --append after GRUB's arguments; --firmware-boot: none.
  const adHoc = await runCivm(["run", "--image", direct.qcow2, "--print-cmd", "--append", "extra=1"], e);
  assert.equal(adHoc.code, 0, adHoc.stderr);
  assert.match(adHoc.stdout, new RegExp(`-kernel ${cache}/[0-9a-f]+/vmlinuz .*-append "BOOT_IMAGE=[^"]* ${SAVED_ENTRY_MARK} extra=1"`));
  assert.equal(readdirSync(cache).length, 1);
  const adHocFw = await runCivm(["run", "--image", direct.qcow2, "--print-cmd", "--firmware-boot"], e);
  assert.equal(adHocFw.code, 0, adHocFw.stderr);
  assert.doesNotMatch(adHocFw.stdout, /-kernel/);
});

test("a GRUB disk whose grub.cfg civm cannot find boots through the firmware, with the reason; --firmware-boot skips the lookup", async () => {
  const e = civmEnv();
  writeInstances(e, hidden.raw);
  const r = await runCivm(["run", "foreign"], e);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /foreign: booting through the firmware \(SeaBIOS, then the image's own bootloader\): civm cannot boot .*disk\.raw's kernel directly: no GRUB configuration \(\/boot\/grub\/grub\.cfg or \/grub\/grub\.cfg\) on partition 1/);
  const text = consoleLogOf(r.stderr);
  // GRUB (its own prefix, /grub-alt) chose grubenv's entry and loaded the kernel itself.
  assert.match(text, /Booting `Debian GNU\/Linux, with Linux/);
  assert.match(text, new RegExp(`tiny-guest: booted \\(kernel ${hidden.kernelVersion.replace(/\./g, "\\.")}\\)`));
  assert.match(text, /"marker": ?"foreign-config-7d1e"/);
  assert.doesNotMatch(qemuArgv(e)[0]!, /(^|\s)-kernel\s/);
  assertClean(e);

  // The reason is cached with the image's identity; --firmware-boot does not even look.
  const f = civmEnv();
  writeInstances(f, direct.raw);
  const fw = await runCivm(["run", "foreign", "--firmware-boot"], f);
  assert.equal(fw.code, 0, fw.stderr);
  assert.doesNotMatch(fw.stderr, /booting the image's own kernel|booting through the firmware/);
  assert.doesNotMatch(qemuArgv(f)[0]!, /(^|\s)-kernel\s/);
  assert.match(consoleLogOf(fw.stderr), /Booting `Debian GNU\/Linux, with Linux/);
  assertClean(f);
});

test("a pool whose image is a GRUB disk boots its own kernel directly (the pool's cmdline after GRUB's arguments) and serves a job", { timeout: 600_000 }, async (t) => {
  const pe = civmEnv();
  const { gh, s } = await startServeWithHub(t, { e: pe, image: direct.qcow2, pollInterval: 5, shutdownTimeout: 60, pools: [{ minRunners: 0, maxRunners: 1 }] });
  await s.listening();
  const job = gh.addJob({ repository: REPO, labels: ["self-hosted", "tiny"] });
  const q = await sendWebhook(`${s.base}/webhook`, { secret: SECRET, payload: await workflowJobPayload("queued", { id: job.id, runId: job.runId, labels: job.labels, repository: REPO }) });
  assert.equal(q.status, 202);
  await s.poll(async () => gh.state.jobs.find((j) => j.id === job.id)?.status === "completed", 300_000, "the job to complete");
  await s.poll(async () => (await s.liveVms()).length === 0, 60_000, "the VM to finish");
  const [vm] = (await s.allVms()).filter((v) => v.state === "finished");
  assert.equal(vm?.exitReason, "poweroff");
  const msgs = logLines(s.stdout()).map((l) => String(l.msg ?? ""));
  const ver = direct.kernelVersion.replace(/\./g, "\\.");
  assert.ok(msgs.some((m) => new RegExp(`booting the image's own kernel ${ver} directly \\(GRUB's default entry`).test(m)), msgs.join("\n"));
  const [argv] = qemuArgv(pe);
  assert.match(argv ?? "", new RegExp(`-kernel ${join(pe.stateDir, "boot-cache")}/[0-9a-f]+/vmlinuz`));
  assert.match(argv ?? "", new RegExp(`-append BOOT_IMAGE=/boot/vmlinuz-${ver} root=UUID=${GRUB_IMAGE_FS_UUID} ro .*${SAVED_ENTRY_MARK}.* tiny\\.hub=10\\.0\\.2\\.2:\\d+`));
  await s.stopClean();
});
