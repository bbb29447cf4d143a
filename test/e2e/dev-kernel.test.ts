// civm kernel add + civm run --kernel on civm-runner (real QEMU, TCG): a second Debian kernel,
// fetched with apt by its meta-package name, boots the image with civm's generated initrd;
// `uname -r` in the guest is that kernel's release and one of its modules loads (the modules
// come over 9p). The kernel cannot be removed while a VM uses it.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { runCivm } from "../support/civm-cli.js";
import { ensureRunnerImage, runnerEnv, uniqueName, RUNNER_IMAGE, type RunnerImage } from "../support/runner-image.js";
import { entryOf, tracesOf } from "../support/dev-vm.js";

let runner: RunnerImage;
before(async () => {
  runner = await ensureRunnerImage();
});

/** The versioned linux-image-* package a meta-package points to on this host's apt. */
function dependsOn(meta: string): string | undefined {
  try {
    const out = execFileSync("apt-cache", ["depends", meta], { encoding: "utf8" });
    return /^\s*Depends:\s*(linux-image-[^\s<>]+)/m.exec(out)?.[1];
  } catch {
    return undefined;
  }
}

test("--kernel: a second Debian kernel (apt) boots civm-runner; uname -r is its release and its modules load", async (t) => {
  const e = runnerEnv();
  t.after(() => rmSync(e.root, { recursive: true, force: true }));
  const manifest = JSON.parse(readFileSync(join(runner.stateDir, "images", RUNNER_IMAGE, "manifest.json"), "utf8")) as { packages: Record<string, string> };
  const imageKernels = Object.keys(manifest.packages).filter((p) => /^linux-image-\d/.test(p));
  const choice = ["linux-image-amd64", "linux-image-cloud-amd64"]
    .map((meta) => ({ meta, pkg: dependsOn(meta) }))
    .find((c) => c.pkg && !imageKernels.includes(c.pkg));
  assert.ok(choice?.pkg, `apt offers no kernel other than the image's (${imageKernels.join(", ")})`);
  const release = choice.pkg.replace(/^linux-image-/, "");
  t.diagnostic(`image kernel: ${imageKernels.join(", ")}; booting ${choice.meta} -> ${choice.pkg}`);

  const kname = uniqueName("kt");
  t.after(async () => {
    await runCivm(["kernel", "rm", kname], e, { cwd: "/" });
  });
  const t0 = Date.now();
  const add = await runCivm(["kernel", "add", kname, choice.meta], e);
  assert.equal(add.code, 0, add.stderr);
  t.diagnostic(`civm kernel add ${choice.meta}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  assert.match(add.stderr, new RegExp(`${choice.meta} depends on ${choice.pkg}`));
  const kdir = add.stdout.trim();
  for (const f of ["vmlinuz", "initrd.img", "manifest.json", "modules.img"]) {
    assert.ok(existsSync(join(kdir, f)), `${f} missing in ${kdir}`);
  }
  const ls = await runCivm(["kernel", "ls"], e);
  assert.match(ls.stdout, new RegExp(`^${kname}\\s+${release.replace(/\./g, "\\.")}\\s+yes\\s+${choice.pkg}`, "m"));
  const again = await runCivm(["kernel", "add", kname, choice.meta], e);
  assert.equal(again.code, 2);
  assert.match(again.stderr, /already stored/);

  const name = uniqueName("dv-kern");
  t.after(async () => {
    if (entryOf(e, name)) await runCivm(["stop", "--force", name], e, { cwd: "/" });
  });
  const hostDir = join(e.root, "tree");
  mkdirSync(hostDir);
  chmodSync(hostDir, 0o777); // QEMU runs as civm-qemu: a rw share must be writable by it
  writeFileSync(join(hostDir, "Makefile"), "test:\n\t@echo kernel-tests-passed on $$(uname -r)\n");
  const run = await runCivm(["run", "--image", RUNNER_IMAGE, "--kernel", kname, "--name", name, "--detach", "--wait", "--mem", "1G", "--host-mount", hostDir], e);
  const entry = entryOf(e, name);
  const consoleText = entry && existsSync(entry.consoleLog) ? readFileSync(entry.consoleLog, "utf8") : "";
  assert.equal(run.code, 0, `${run.stderr}\n${consoleText.split("\n").slice(-40).join("\n")}`);
  assert.ok(entry);
  assert.match(consoleText, new RegExp(`civm-initrd: modules of ${release.replace(/\./g, "\\.")} mounted from /dev/vd[a-z] \\(civm-modules\\)`));

  const uname = await runCivm(["exec", name, "--", "uname", "-r"], e);
  assert.equal(uname.code, 0, uname.stderr);
  assert.equal(uname.stdout.trim(), release);
  assert.ok(!imageKernels.includes(`linux-image-${uname.stdout.trim()}`), "the guest runs the image's own kernel");
  const mod = await runCivm(["exec", name, "--", "modprobe dummy && lsmod | grep -w '^dummy' && ip link add civmtest0 type dummy && ip -o link show civmtest0"], e);
  assert.equal(mod.code, 0, mod.stderr + mod.stdout);
  assert.match(mod.stdout, /^dummy\s+\d+/m);
  assert.match(mod.stdout, /civmtest0/);

  // The host folder over 9p: the 9p modules are loaded on demand from the modules disk.
  const make = await runCivm(["exec", name, "--", "cd /host && grep -c . Makefile && lsmod | grep -c '^9p '"], e);
  assert.equal(make.code, 0, make.stderr);
  assert.equal(make.stdout, "2\n1\n");

  const busy = await runCivm(["kernel", "rm", kname], e);
  assert.equal(busy.code, 2);
  assert.match(busy.stderr, new RegExp(`kernel ${kname} is in use by ${name}`));

  const stop = await runCivm(["stop", name], e);
  assert.equal(stop.code, 0, stop.stderr);
  assert.deepEqual(tracesOf(e, name, entry.ownerPid), []);
  const rm = await runCivm(["kernel", "rm", kname], e);
  assert.equal(rm.code, 0, rm.stderr);
  assert.equal(existsSync(kdir), false);
});

test("a kernel without virtio-9p (Debian cloud): its modules still load (modules disk); --host-mount is refused before anything starts", async (t) => {
  const e = runnerEnv();
  t.after(() => rmSync(e.root, { recursive: true, force: true }));
  const pkg = dependsOn("linux-image-cloud-amd64");
  if (!pkg) {
    t.skip("apt has no linux-image-cloud-amd64");
    return;
  }
  const release = pkg.replace(/^linux-image-/, "");
  const kname = uniqueName("ktc");
  t.after(async () => {
    await runCivm(["kernel", "rm", kname], e, { cwd: "/" });
  });
  const add = await runCivm(["kernel", "add", kname, pkg, "--json"], e);
  assert.equal(add.code, 0, add.stderr);
  assert.match(add.stderr, /has no virtio-9p/);
  const added = JSON.parse(add.stdout) as { name: string; release: string; modules: boolean; dir: string };
  assert.deepEqual([added.name, added.release], [kname, release], "civm kernel add --json: the stored kernel");

  const refused = await runCivm(["run", "--image", RUNNER_IMAGE, "--kernel", kname, "--detach", "--host-mount", e.root, "--name", `${kname}-x`], e);
  assert.equal(refused.code, 2, refused.stderr);
  assert.match(refused.stderr, /--host-mount needs virtio-9p in the guest kernel/);

  const name = uniqueName("dv-cloud");
  t.after(async () => {
    if (entryOf(e, name)) await runCivm(["stop", "--force", name], e, { cwd: "/" });
  });
  const run = await runCivm(["run", "--image", RUNNER_IMAGE, "--kernel", kname, "--name", name, "--detach", "--wait", "--mem", "1G"], e);
  const entry = entryOf(e, name);
  assert.equal(run.code, 0, `${run.stderr}\n${entry && existsSync(entry.consoleLog) ? readFileSync(entry.consoleLog, "utf8").split("\n").slice(-40).join("\n") : ""}`);
  assert.ok(entry);
  const r = await runCivm(["exec", name, "--", "uname -r && modprobe dummy && lsmod | grep -c '^dummy '"], e);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, `${release}\n1\n`);
  const stop = await runCivm(["stop", name], e);
  assert.equal(stop.code, 0, stop.stderr);
  assert.deepEqual(tracesOf(e, name, entry.ownerPid), []);
});
