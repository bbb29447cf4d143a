// civm serve as a real process against a GitHub that stops answering: SIGTERM still ends it
// within shutdownTimeout plus the documented margin (forced stop 5 s, exit 2 s), whatever
// request is in flight.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { startServeWithHub } from "../support/serve-harness.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

test("civm serve: SIGTERM while a GitHub request hangs exits within shutdownTimeout + 7 s", { timeout: 180_000 }, async (t) => {
  const shutdownTimeout = 2;
  const { gh, s } = await startServeWithHub(t, {
    image: guest.disk,
    pollInterval: 5,
    shutdownTimeout,
    pools: [{ minRunners: 0, maxRunners: 1 }],
    // Every call about the repository's runners and runs hangs: GitHub accepted the connection and never answers.
    setup: (gh) => void gh.delay(/^\/repos\//, Infinity),
  });
  await s.listening();
  await s.poll(() => gh.requests.some((r) => r.path.startsWith("/repos/")), 30_000, "a GitHub request to hang");
  // The API keeps answering while GitHub hangs.
  const pools = await s.pools();
  assert.equal(pools[0]!.name, "tiny");
  const t0 = Date.now();
  const r = await s.stop();
  const took = (Date.now() - t0) / 1000;
  t.diagnostic(`SIGTERM → exit: ${took.toFixed(1)} s (bound ${shutdownTimeout + 7} s)`);
  assert.equal(r.code, 0, `${r.stderr}\n${s.stdout().slice(-4000)}`);
  assert.ok(took <= shutdownTimeout + 7, `exited after ${took.toFixed(1)} s`);
});
