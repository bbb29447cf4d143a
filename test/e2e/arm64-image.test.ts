// The built-in arm64 runner image, civm-runner-arm64 (images/civm-runner.yaml: civm-runner's
// fields with `arch: arm64`), built by civm: mmdebstrap --arch arm64 (the tree's programs
// through qemu-user and binfmt_misc) and the build VM on qemu-system-aarch64's virt machine,
// with civm's own guest agent. Then it runs once as an instance: the agent reads and ejects the
// config disc, the network comes up (systemd-networkd's DHCP), the command runs on aarch64 as
// the runner user, its status comes back and the VM powers off; nothing is left behind.
// Cached by the image's key in <test cache>/store-arm64 (docs/benchmarks.md "arm64 guests").
// Named to sort first among the e2e files: its cold build (~15 min, one core under qemu-user)
// then overlaps the rest of the suite instead of ending it.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { consoleLogOf, leftovers, qemuProcessesOf, runCivm } from "../support/civm-cli.js";
import { ARM64_IMAGE, arm64Env, ensureArm64Image } from "../support/arm64-image.js";

before(async () => {
  const img = await ensureArm64Image();
  console.error(`# ${ARM64_IMAGE}: ${img.cached ? "cached" : "built"} in ${img.seconds.toFixed(1)} s`);
});

test("civm-runner-arm64, built by civm, runs a job on virt: config disc read and ejected, network up, the command on aarch64 as runner, power-off", { timeout: 1_200_000 }, async (t) => {
  const e = arm64Env();
  const manifest = JSON.parse(readFileSync(join(e.stateDir, "images", ARM64_IMAGE, "manifest.json"), "utf8")) as { arch?: string; packages: Record<string, string> };
  assert.equal(manifest.arch, "arm64");
  assert.ok(Object.keys(manifest.packages).some((p) => p.startsWith("linux-image-") && p.endsWith("-arm64")), "the arm64 kernel package is installed");
  assert.ok("openssh-server" in manifest.packages && "systemd-sysv" in manifest.packages, "civm-runner's packages are in it");
  // The job: what it runs on, as whom, and whether DHCP gave it an address (civm-runner's networkd).
  const command = 'echo "machine $(uname -m) $(dpkg --print-architecture) user $(id -un)"; ip -4 -o addr show scope global | grep -q "inet " && echo "network: an address"; exit 3';
  writeFileSync(join(e.root, "instances.json"), JSON.stringify([
    { name: "a64", image: ARM64_IMAGE, arch: "arm64", "cpu-cores": 2, ram: "1G", "timeout-seconds": 900, config: { command } },
    { name: "a64-as-x86", image: ARM64_IMAGE, "timeout-seconds": 600, config: {} },
  ]));
  const started = Date.now();
  const r = await runCivm(["run", "a64"], e);
  t.diagnostic(`civm run of ${ARM64_IMAGE} (TCG, 2 vCPUs, 1 GiB): ${((Date.now() - started) / 1000).toFixed(1)} s`);
  assert.equal(r.code, 0, r.stderr);
  const consoleText = consoleLogOf(r.stderr);
  assert.match(consoleText, /machine aarch64 arm64 user runner/, consoleText);
  assert.match(consoleText, /network: an address/, consoleText);
  assert.match(consoleText, /civm-agent: runner exited with status 3/);
  assert.match(r.stderr, /medium removed \(confirmed by query-block\)/);
  // The image says what it is: an instance without "arch" is refused before anything starts.
  const wrong = await runCivm(["run", "a64-as-x86"], e);
  assert.equal(wrong.code, 2, wrong.stderr);
  assert.match(wrong.stderr, /"image" civm-runner-arm64 is an arm64 image and the instance is x86_64 \(no "arch"\): set "arch": "arm64" \(or civm run --arch arm64\)/);
  assert.deepEqual(leftovers(e).filter((l) => !l.startsWith("vms/.")), []);
  assert.deepEqual(qemuProcessesOf(e), []);
});
