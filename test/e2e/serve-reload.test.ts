// civm serve on real QEMU (TCG): a config reload that changes the pool's image replaces the
// idle runners (their VMs stop, new ones boot the new image) while a busy runner keeps
// running on the old image until its job is done; then SIGTERM.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { civmEnv } from "../support/civm-cli.js";
import { logLines, startServeWithHub, type ApiVm } from "../support/serve-harness.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

/** A copy of the tiny guest (disk with vmlinuz and initrd.img beside it) in `dir`. */
function imageCopy(dir: string): string {
  mkdirSync(dir, { recursive: true });
  for (const f of ["disk.qcow2", "vmlinuz", "initrd.img"]) copyFileSync(join(guest.dir, f), join(dir, f));
  return join(dir, "disk.qcow2");
}

test("civm serve: reload with a new image replaces idle runners; the busy one finishes on the old image", { timeout: 900_000 }, async (t) => {
  const e = civmEnv();
  const imageA = imageCopy(join(e.root, "image-a"));
  const imageB = imageCopy(join(e.root, "image-b"));
  const { gh, hub, s, config } = await startServeWithHub(t, { e, image: imageA, pollInterval: 5, shutdownTimeout: 120, pools: [{ minRunners: 2, maxRunners: 3 }] });

  await s.poll(async () => (await s.liveVms()).filter((v) => v.state === "idle").length === 2, 240_000, "two idle runners on image A");
  const [busy, idle] = (await s.liveVms()) as [ApiVm, ApiVm];
  // GitHub gives `busy` a job (the hub then keeps its guest waiting until finish()).
  gh.setRunner(busy.name, { busy: true });
  await s.poll(async () => (await s.liveVms()).find((v) => v.id === busy.id)?.state === "busy", 60_000, "civm to see the busy runner");

  // Reload: the pool now boots image B.
  writeFileSync(s.configFile, JSON.stringify(config({ image: imageB }), null, 2));
  const r = await s.post<{ pools: { changed: { name: string; fields: string[]; replaceIdle: boolean }[] } }>("/api/reload");
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.deepEqual(r.body.pools.changed, [{ name: "tiny", fields: ["runner.image"], replaceIdle: true }]);
  const reloadedAt = Date.now();

  // The idle runner (and any runner that was idle on image A) is replaced; the busy one stays.
  await s.poll(async () => (await s.allVms()).find((v) => v.id === idle.id)?.exitReason === "stopped:image-change", 120_000, "the idle runner on image A to be replaced");
  // Image A is gone from disk now: any VM that still tried to boot it would fail, so the new
  // runners coming online prove they booted image B (the busy VM keeps its open files).
  rmSync(join(e.root, "image-a"), { recursive: true, force: true });
  await s.poll(async () => {
    const live = await s.liveVms();
    return live.filter((v) => v.state === "idle" && v.ageSeconds * 1000 <= Date.now() - reloadedAt + 2000).length === 2;
  }, 300_000, "two idle runners on image B");
  const now = await s.liveVms();
  assert.equal(now.find((v) => v.id === busy.id)?.state, "busy", "the busy runner keeps running on image A");
  assert.equal((await s.pools())[0]?.failures, 0, "no boot failed (nothing booted the removed image A)");

  // Its job ends: its VM powers off and it is deregistered.
  gh.setRunner(busy.name, { busy: false });
  hub.finish(busy.name);
  await s.poll(async () => (await s.allVms()).find((v) => v.id === busy.id)?.state === "finished", 120_000, "the busy runner's VM to finish");
  const done = (await s.allVms()).find((v) => v.id === busy.id)!;
  assert.equal(done.exitReason, "poweroff");
  await s.poll(() => gh.runner(busy.name) === undefined, 30_000, "the busy runner to be deregistered");
  const reasons = (await s.allVms()).filter((v) => v.state === "finished").map((v) => v.exitReason);
  assert.ok(!reasons.some((x) => x && !["stopped:image-change", "poweroff"].includes(x)), `unexpected exits: ${reasons.join(", ")}`);

  await s.stopClean();
  assert.equal(gh.state.runners.size, 0, "every runner deregistered");
  assert.ok(logLines(s.stdout()).some((l) => l.msg === "pools reloaded"));
});
