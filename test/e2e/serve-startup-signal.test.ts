// civm serve as a real process: signals during start-up. A daemon is killed (-9) with a
// runner VM up and its QEMU hung (SIGSTOP: it ignores the SIGTERM start-up reconciliation
// sends, which then waits before SIGKILL), so the next daemon's start-up takes a while.
// SIGHUP then (a `systemctl reload`) must neither kill it nor be lost: it reloads once
// started. SIGTERM then: it finishes the clean-up, starts nothing, exits 0, and leaves no
// QEMU, no nftables table, no work dir or registry entry, and the serve lock free.
import { test, before, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { leftovers, qemuProcessesOf, qemuStarts } from "../support/civm-cli.js";
import { logLines, startServeWithHub, type Serve } from "../support/serve-harness.js";
import { lockStateDir } from "../../src/host/serve-lock.js";
import type { RegistryEntry } from "../../src/vm/registry.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

function registryEntries(stateDir: string): RegistryEntry[] {
  const dir = join(stateDir, "registry");
  try {
    return readdirSync(dir)
      .filter((f) => f.endsWith(".json"))
      .map((f) => JSON.parse(readFileSync(join(dir, f), "utf8")) as RegistryEntry);
  } catch {
    return [];
  }
}

const nftTables = () => execFileSync("nft", ["list", "tables"], { encoding: "utf8" });

/**
 * Waits for a runner VM of `s` to run (QMP answered: the registry entry names QEMU's command
 * line), kills the daemon (-9) and hangs the orphan QEMU (SIGSTOP: it ignores the SIGTERM
 * start-up reconciliation sends, which then waits before SIGKILL). Returns the orphan.
 */
async function crashWithHungVm(t: TestContext, s: Serve, known: Set<string>): Promise<{ pid: number; table: string | undefined }> {
  const e = s.e;
  const fresh = () => registryEntries(e.stateDir).filter((r) => !known.has(r.id) && r.state === "running" && r.qemu?.cmdlineSha256 !== undefined);
  await s.poll(() => fresh().length > 0, 120_000, "a runner VM's QEMU to run");
  const entry = fresh()[0]!;
  known.add(entry.id);
  const table = entry.net?.table;
  if (process.getuid?.() === 0) {
    assert.ok(table, "a root civm fences each VM with an nftables table");
    assert.match(nftTables(), new RegExp(`table inet ${table}\\b`));
  }
  s.child.kill("SIGKILL");
  await s.done;
  const pid = entry.qemuPid!;
  process.kill(pid, "SIGSTOP");
  t.after(() => {
    // Still this env's QEMU (not a reused pid): the test failed; do not leave it behind.
    if (qemuProcessesOf(e).includes(pid)) process.kill(pid, "SIGKILL");
  });
  return { pid, table };
}

test("civm serve: SIGHUP during start-up reloads once started; SIGTERM during start-up (while it ends a hung orphan QEMU) finishes the clean-up, starts nothing, exits 0; no QEMU, nftables table or work dir left, lock released", { timeout: 300_000 }, async (t) => {
  const { gh, s: first, restart } = await startServeWithHub(t, { image: guest.disk, pollInterval: 5, shutdownTimeout: 10, pools: [{ minRunners: 1, maxRunners: 1 }] });
  const e = first.e;
  const known = new Set<string>();
  const reconciling = (s: Serve) => s.poll(() => s.stdout().includes("ending orphaned QEMU"), 60_000, "start-up reconciliation to end the orphan");

  // SIGHUP during start-up (systemctl reload while civm starts) neither kills civm nor is lost.
  const orphan1 = await crashWithHungVm(t, first, known);
  const second = restart();
  await reconciling(second);
  second.child.kill("SIGHUP");
  await second.poll(() => logLines(second.stdout()).some((l) => l.msg === "config reloaded" && l.trigger === "SIGHUP"), 60_000, "the reload asked during start-up");
  assert.ok(!qemuProcessesOf(e).includes(orphan1.pid), "the first orphan was ended");

  // SIGTERM during start-up.
  const orphan2 = await crashWithHungVm(t, second, known);
  const startsBefore = qemuStarts(e);
  const jitBefore = gh.requests.filter((r) => r.path.endsWith("/generate-jitconfig")).length;
  const s = restart();
  await reconciling(s);
  const signalledAt = Date.now();
  s.child.kill("SIGTERM");
  const r = await s.done;
  const took = (Date.now() - signalledAt) / 1000;
  t.diagnostic(`SIGTERM during start-up → exit: ${took.toFixed(1)} s`);
  const out = s.stdout();
  assert.equal(r.code, 0, `${r.stderr}\n${out.slice(-4000)}`);
  const msgs = logLines(out).map((l) => l.msg);
  assert.ok(msgs.includes("signal during start-up: finishing the step under way, then exiting"), out.slice(-4000));
  assert.ok(msgs.includes("stopped during start-up"), out.slice(-4000));
  // Start-up reconciliation finished: the old VM is marked finished, its files are gone.
  assert.ok(msgs.some((m) => typeof m === "string" && m.startsWith("VM of a previous civm run is gone")), "the previous run's VM was reconciled");
  // Nothing started: no reconcile pass, no QEMU, no JIT config.
  assert.ok(!msgs.includes("runner VM starting"));
  assert.equal(qemuStarts(e), startsBefore, "no QEMU started after the signal");
  assert.equal(gh.requests.filter((x) => x.path.endsWith("/generate-jitconfig")).length, jitBefore, "no runner registered");
  // Nothing leaked.
  assert.deepEqual(qemuProcessesOf(e), [], "the hung orphan QEMU was ended");
  assert.deepEqual(leftovers(e), []);
  for (const table of [orphan1.table, orphan2.table]) if (table) assert.doesNotMatch(nftTables(), new RegExp(`table inet ${table}\\b`), `the orphan's nftables table ${table} was removed`);
  // The serve lock is free: another daemon could start now.
  lockStateDir(e.stateDir).release();
});
