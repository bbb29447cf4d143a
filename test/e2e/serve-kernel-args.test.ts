// Seed 003's pools.json gives each pool Firecracker's kernel command line
// ("console=ttyS0 reboot=k panic=1 pci=off"). civm appends it to its own command line and
// drops pci=off (the pc machine's disk, config disc and network are virtio-pci): the runner
// boots, finds its config disc, reaches the hub and registers. Used as the whole command
// line it never would.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { logLines, startServeWithHub } from "../support/serve-harness.js";

const SEED_003_KERNEL_ARGS = "console=ttyS0 reboot=k panic=1 pci=off";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

test("civm serve: a pool with seed 003's firecracker.kernelArgs boots (pci=off dropped with a warning) and its runner registers", { timeout: 420_000 }, async (t) => {
  const { gh, hub, s } = await startServeWithHub(t, { image: guest.disk, pollInterval: 5, shutdownTimeout: 60, pools: [{ minRunners: 1, maxRunners: 1, kernelArgs: SEED_003_KERNEL_ARGS }] });
  await s.poll(async () => (await s.liveVms()).some((v) => v.state === "idle"), 240_000, "the runner to boot and register");
  const [vm] = await s.liveVms();
  assert.ok(hub.events.includes(`register ${vm!.name}`), hub.events.join("\n"));
  assert.equal(gh.runner(vm!.name)?.status, "online");
  const warned = logLines(s.stdout()).filter((l) => l.level === "warn" && typeof l.msg === "string" && l.msg.includes('"firecracker.kernelArgs" option "pci=off" is dropped'));
  assert.equal(warned.length, 1, s.stdout().slice(-4000));

  await s.stopClean();
});
