// civm serve on real QEMU (TCG) with the tiny guest and the fake GitHub: deliveries the
// webhook endpoint must refuse start nothing, and a job whose webhook never came (present only
// in the fake's queued-jobs list) is still served, through the reconciliation poll.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { request } from "node:http";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { qemuProcessesOf, qemuStarts } from "../support/civm-cli.js";
import { sendWebhook, signWebhook, workflowJobPayload } from "../support/fake-github.js";
import { logLines, REPO, SECRET, startServeWithHub } from "../support/serve-harness.js";

let guest: TinyGuest;
before(async () => {
  guest = await buildTinyGuest();
});

/** POSTs `body` to /webhook in chunks without a Content-Length (Transfer-Encoding: chunked). */
function postChunked(url: string, body: string, headers: Record<string, string>): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method: "POST", headers: { ...headers, "transfer-encoding": "chunked" } }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    // The server may answer (and close) before the whole body is sent.
    req.on("error", (e: NodeJS.ErrnoException) => (e.code === "EPIPE" || e.code === "ECONNRESET" ? undefined : reject(e)));
    for (let i = 0; i < body.length; i += 16 * 1024) req.write(body.slice(i, i + 16 * 1024));
    req.end();
  });
}

const metric = (text: string, result: string) => Number(new RegExp(`^civm_webhook_deliveries_total\\{result="${result}"\\} (\\d+)`, "m").exec(text)?.[1] ?? 0);

test("civm serve: bad signature, malformed JSON, oversized body → 401, 400, 413 and no VM; a job only in GitHub's queued list is served through the poll", { timeout: 420_000 }, async (t) => {
  const { gh, hub, s } = await startServeWithHub(t, { image: guest.disk, pollInterval: 5, maxWebhookBytes: "64K", pools: [{ minRunners: 0, maxRunners: 2 }] });
  await s.listening();

  // --- refused deliveries ------------------------------------------------------------------
  const url = `${s.base}/webhook`;
  const job = { id: 4242, runId: 99, labels: ["self-hosted", "tiny"], repository: REPO };
  const queued = await workflowJobPayload("queued", job);
  const raw = JSON.stringify(queued);
  const headers = (b: string, secret = SECRET) => ({ "content-type": "application/json", "x-github-event": "workflow_job", "x-github-delivery": crypto.randomUUID(), "x-hub-signature-256": signWebhook(b, secret) });

  const wrongSecret = await sendWebhook(url, { payload: queued, secret: "not-the-secret" });
  assert.equal(wrongSecret.status, 401, wrongSecret.body);
  assert.equal(JSON.parse(wrongSecret.body).result, "bad-signature");
  const unsigned = await sendWebhook(url, { payload: queued, signature: null });
  assert.equal(unsigned.status, 401, unsigned.body);
  // Signed with the right secret, but over a different body than the one sent.
  const tampered = await sendWebhook(url, { payload: queued, rawBody: raw.replace('"tiny"', '"tinY"'), signature: signWebhook(raw, SECRET) });
  assert.equal(tampered.status, 401, tampered.body);

  const malformedBody = raw.slice(0, raw.length / 2); // cut in the middle: not JSON
  const malformed = await sendWebhook(url, { payload: undefined, rawBody: malformedBody, secret: SECRET });
  assert.equal(malformed.status, 400, malformed.body);
  assert.equal(JSON.parse(malformed.body).result, "malformed");

  // 64 KiB limit: a correctly signed, valid queued payload padded past it, with a Content-Length ...
  const big = JSON.stringify({ ...queued, padding: "x".repeat(100 * 1024) });
  const tooLarge = await sendWebhook(url, { payload: undefined, rawBody: big, secret: SECRET });
  assert.equal(tooLarge.status, 413, tooLarge.body);
  assert.equal(JSON.parse(tooLarge.body).result, "too-large");
  // ... and streamed without one (the limit holds while reading).
  assert.equal(await postChunked(url, big, headers(big)), 413);

  // Give the reconciler two passes and a poll (pollInterval 5 s): nothing may start.
  await new Promise((r) => setTimeout(r, 12_000));
  assert.deepEqual(await s.allVms(), [], "no VM recorded");
  assert.equal(gh.requests.filter((r) => r.path.endsWith("/generate-jitconfig")).length, 0, "no JIT config requested");
  assert.equal(gh.state.runners.size, 0);
  assert.deepEqual(qemuProcessesOf(s.e), []);
  assert.equal(qemuStarts(s.e), 0, "QEMU never started");
  const pool = (await s.pools())[0]!;
  assert.equal(pool.queued, 0, "no job recorded from a refused delivery");
  assert.equal(pool.desired, 0);
  const metrics = await (await fetch(`${s.base}/metrics`)).text();
  assert.equal(metric(metrics, "bad-signature"), 3);
  assert.equal(metric(metrics, "malformed"), 1);
  assert.equal(metric(metrics, "too-large"), 2);
  assert.equal(metric(metrics, "accepted"), 0);

  // --- a lost webhook: the job exists only in GitHub's queued list ----------------------------
  const lost = gh.addJob({ repository: REPO, labels: ["self-hosted", "tiny"] });
  const queuedAt = Date.now();
  await s.poll(async () => (await s.liveVms()).length === 1, 60_000, "the poll to start a runner VM for the job");
  const startedAfter = Date.now() - queuedAt;
  await s.poll(() => lost.status === "completed", 240_000, "the polled job to be run and completed");
  const ran = lost.runnerName!;
  assert.match(ran, /^tiny-[0-9a-f]{8}$/, "a civm runner took the job");
  assert.deepEqual(hub.events.filter((x) => x.startsWith("job")), [`job ${lost.id} ${ran}`]);
  // The job's VM powers off, its runner is deregistered, the pool (minRunners 0) is empty again.
  await s.poll(async () => (await s.allVms()).some((v) => v.name === ran && v.state === "finished"), 60_000, "the job's VM to finish");
  const vms = await s.allVms();
  assert.equal(vms.length, 1, "exactly one VM for one job");
  assert.equal(vms[0]!.exitReason, "poweroff");
  assert.equal(vms[0]!.job, lost.id);
  await s.poll(() => gh.runner(ran) === undefined, 15_000, "the runner to be deregistered");
  await s.poll(async () => (await s.liveVms()).length === 0, 30_000, "no live VM (minRunners 0)");
  const found = logLines(s.stdout()).find((l) => l.msg === "queued job found by polling");
  assert.ok(found, "the job was found by polling");
  assert.equal(found.job, lost.id);
  assert.equal(found.pool, "tiny");
  t.diagnostic(`polled job: VM started ${(startedAfter / 1000).toFixed(1)} s after it was queued (pollInterval 5 s)`);

  await s.stopClean();
});
