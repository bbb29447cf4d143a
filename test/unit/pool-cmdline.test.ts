// A pool's kernel options (cmdline / firecracker.kernelArgs) are appended to civm's own
// command line for the image; options that cannot work on the machine are dropped and warned
// about (seed 003's "console=ttyS0 reboot=k panic=1 pci=off" used to replace the whole line).
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { combineCmdline, poolCmdlineWarnings, splitCmdline } from "../../src/pool/cmdline.js";
import { loadServeConfig } from "../../src/pool/config.js";
import { VmRunLauncher } from "../../src/pool/launcher.js";
import { resolvePaths } from "../../src/host/paths.js";
import { STORED_IMAGE_CMDLINE } from "../../src/images/resolve.js";
import { tempDir } from "../support/paths.js";

export const SEED_003_KERNEL_ARGS = "console=ttyS0 reboot=k panic=1 pci=off";

test("seed 003's kernelArgs on the pc machine: civm's root and options stay, pci=off is dropped, panic= is the pool's", () => {
  const r = combineCmdline(STORED_IMAGE_CMDLINE, SEED_003_KERNEL_ARGS, "pc");
  assert.equal(r.cmdline, "root=LABEL=civm-root rw quiet tsc=reliable no_timer_check 8250.nr_uarts=1 console=ttyS0 reboot=k panic=1");
  assert.deepEqual(r.dropped.map((d) => d.option), ["pci=off"]);
  assert.match(r.dropped[0]!.why, /virtio-pci/);
  assert.deepEqual(combineCmdline(STORED_IMAGE_CMDLINE, SEED_003_KERNEL_ARGS, "q35").dropped.map((d) => d.option), ["pci=off"]);
  assert.deepEqual(combineCmdline(STORED_IMAGE_CMDLINE, SEED_003_KERNEL_ARGS, "microvm").dropped, [], "microvm has no PCI to lose");
});

test("combination rules: key=value replaces civm's, console= repeats, ro/rw swap, unusable options go, init arguments stay last", () => {
  const base = "console=ttyS0 root=LABEL=civm-root rw panic=-1 quiet";
  assert.equal(combineCmdline(base, undefined, "pc").cmdline, base, "no pool options: civm's line as it is");
  assert.equal(combineCmdline(base, "root=/dev/vda2 ro", "pc").cmdline, "console=ttyS0 panic=-1 quiet root=/dev/vda2 ro");
  assert.equal(combineCmdline(base, "console=tty0", "pc").cmdline, "console=ttyS0 root=LABEL=civm-root rw panic=-1 quiet console=tty0", "consoles add up");
  assert.equal(combineCmdline(base, "quiet pci=noaer", "pc").cmdline, "console=ttyS0 root=LABEL=civm-root rw panic=-1 quiet pci=noaer", "other pci= options work");
  const odd = combineCmdline(base, 'pci=noaer,off virtio_mmio.device=4K@0xd0000000:5 foo="a b" -- single', "pc");
  assert.deepEqual(odd.dropped.map((d) => d.option), ["pci=noaer,off", "virtio_mmio.device=4K@0xd0000000:5"]);
  assert.equal(odd.cmdline, 'console=ttyS0 root=LABEL=civm-root rw panic=-1 quiet foo="a b" -- single');
  assert.deepEqual(splitCmdline('  a  b="c d"\te '), ["a", 'b="c d"', "e"]);
});

function poolsFile(dir: string, image: string, vm: Record<string, unknown>): string {
  const file = join(dir, "serve.json");
  const pool = { name: "fc", maxRunners: 1, runner: { image, organization: "acme", labels: ["linux"] }, ...vm };
  writeFileSync(file, JSON.stringify({ github: { token: "t" }, pools: [pool] }));
  return file;
}

test("config check's warning names the field and the dropped option; a pool with firmware-boot: true ignores the options", async () => {
  const dir = tempDir();
  mkdirSync(join(dir, "k"));
  for (const f of ["disk.img", "k/disk.img", "k/vmlinuz", "k/initrd.img"]) writeFileSync(join(dir, f), "x");
  const fc = await loadServeConfig(poolsFile(dir, "k/disk.img", { firecracker: { vcpuCount: 2, memSizeMib: 4096, kernelArgs: SEED_003_KERNEL_ARGS } }), { env: {} });
  assert.deepEqual(poolCmdlineWarnings(fc.pools, fc.poolsFile), [
    `${fc.poolsFile}: pool "fc" (#1): "firecracker.kernelArgs" option "pci=off" is dropped: civm's pc machine puts the root disk, the config disc and the network on PCI (virtio-pci); without PCI the guest finds none of them and never boots. The other options are appended to civm's own kernel command line.`,
  ]);
  const own = await loadServeConfig(poolsFile(dir, "disk.img", { cmdline: "quiet", "firmware-boot": true }), { env: {} });
  const [w] = poolCmdlineWarnings(own.pools, own.poolsFile);
  assert.match(w ?? "", /pool "fc" \(#1\): "cmdline" is ignored: "firmware-boot": true boots .*disk\.img through its own boot loader/);
  // A foreign disk without firmware-boot gets them after GRUB's arguments (the launcher's test): no warning.
  const foreign = await loadServeConfig(poolsFile(dir, "disk.img", { cmdline: "quiet" }), { env: {} });
  assert.deepEqual(poolCmdlineWarnings(foreign.pools, foreign.poolsFile), []);
  const none = await loadServeConfig(poolsFile(dir, "k/disk.img", {}), { env: {} });
  assert.deepEqual(poolCmdlineWarnings(none.pools, none.poolsFile), []);

  // What the launcher boots: civm's line for the image plus the kept options.
  const root = tempDir();
  const launcher = new VmRunLauncher({ paths: resolvePaths({ stateDir: join(root, "state"), logsDir: join(root, "logs") }), accel: "tcg", graceSeconds: 1, log: () => {} });
  const spec = await launcher.spec(fc.pools[0]!, "0000000a");
  assert.equal(spec.kernel, join(dir, "k/vmlinuz"));
  assert.equal(spec.cmdline, combineCmdline(STORED_IMAGE_CMDLINE, SEED_003_KERNEL_ARGS, "pc").cmdline);
  assert.match(spec.cmdline ?? "", /root=LABEL=civm-root/);
  assert.doesNotMatch(spec.cmdline ?? "", /pci=off/);
});
