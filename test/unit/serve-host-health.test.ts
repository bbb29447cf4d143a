// /healthz's `host` part: civm doctor's verdict, as civm serve reports it (src/pool/serve.ts
// doctorHealth, src/server createApp hostHealth). On a booted civm-host: test/e2e/host-image.test.ts.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Registry } from "prom-client";
import { StateStore } from "../../src/store/index.js";
import { createApp, type HostHealth } from "../../src/server/index.js";
import { doctorHealth } from "../../src/pool/serve.js";
import type { DoctorReport } from "../../src/host/doctor.js";

test("doctorHealth: ok, accel, kvm, and only the checks that did not pass", () => {
  const report: DoctorReport = {
    ok: true,
    accel: { accel: "tcg", reason: "/dev/kvm does not exist", cached: false },
    checks: [
      { name: "qemu-system-x86_64", ok: true, status: "pass", severity: "required", detail: "8.2" },
      { name: "kvm", ok: false, status: "warn", severity: "optional", detail: "/dev/kvm does not exist", fix: "use a machine with KVM" },
    ],
  };
  const h = doctorHealth(report, new Date("2026-01-02T03:04:05Z"));
  assert.deepEqual(h, {
    ok: true, accel: "tcg", kvm: false, checkedAt: "2026-01-02T03:04:05.000Z",
    problems: [{ name: "kvm", status: "warn", detail: "/dev/kvm does not exist", fix: "use a machine with KVM" }],
  });
  assert.equal(doctorHealth({ ok: false, checks: [] }).accel, undefined);
});

test("/healthz: no host part until doctor has run, then it is there; status stays about serving", async () => {
  let host: HostHealth | undefined;
  const app = createApp({ store: new StateStore(":memory:"), pools: [], webhookSecret: undefined, apiToken: undefined, maxWebhookBytes: 1024, registry: new Registry(), hostHealth: () => host });
  const before = (await (await app.request("/healthz")).json()) as Record<string, unknown>;
  assert.deepEqual(before, { ok: true, status: "ok" });
  host = { ok: false, accel: "tcg", kvm: false, checkedAt: "2026-01-02T03:04:05.000Z", problems: [{ name: "mmdebstrap", status: "fail", detail: "not found" }] };
  const r = await app.request("/healthz");
  assert.equal(r.status, 200);
  assert.deepEqual(await r.json(), { ok: true, status: "ok", host });
});
