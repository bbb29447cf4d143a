// What a reload may change besides the pools: applied at once, or kept until a restart.
import { test } from "node:test";
import assert from "node:assert/strict";
import { effectiveConfig, restartMessage, settingsChanges } from "../../src/pool/reload.js";
import type { ServeConfig } from "../../src/pool/types.js";

function config(over: Partial<ServeConfig> = {}): ServeConfig {
  return {
    file: "serve.yaml",
    baseDir: "/etc/civm",
    listen: { host: "127.0.0.1", port: 8080 },
    stateDir: undefined,
    store: { kind: "sqlite", where: "sqlite" },
    fleet: { hostId: undefined, address: undefined, cpus: undefined, ramBytes: undefined, heartbeatSeconds: 10, deadAfterSeconds: 60, placementGraceSeconds: 15 },
    github: { apiUrl: "https://api.github.com", auth: { kind: "token", token: "ghp_old_secret" } },
    githubLimits: { requestTimeoutSeconds: 30, degradedAfterSeconds: 300, repositoryListCacheSeconds: 600, rateLimitReservePercent: 10 },
    webhookSecret: "hook",
    apiToken: "api",
    pollIntervalSeconds: 60,
    shutdownTimeoutSeconds: 3600,
    retentionSeconds: 7 * 86400,
    maxWebhookBytes: 1024,
    logs: { keepDays: 14, maxBytes: 1024 ** 3 },
    qemuUser: undefined,
    poolsFile: "serve.yaml",
    pools: [],
    secrets: ["ghp_old_secret"],
    ...over,
  };
}

test("unchanged settings: nothing applied, no restart needed", () => {
  assert.deepEqual(settingsChanges(config(), config(), "/var/lib/civm"), { applied: [], restartNeeded: [] });
  assert.equal(restartMessage([]), undefined);
});

test("credentials, secrets, limits and intervals apply; listen, stateDir and apiUrl need a restart and keep their running values", () => {
  const next = config({
    listen: { host: "::1", port: 9090 },
    stateDir: "/srv/civm",
    github: { apiUrl: "https://ghe.example.com/api/v3", auth: { kind: "token", token: "ghp_new_secret" } },
    webhookSecret: "hook2",
    apiToken: "api2",
    pollIntervalSeconds: 30,
    shutdownTimeoutSeconds: 60,
    retentionSeconds: 86400,
    maxWebhookBytes: 2048,
  });
  const c = settingsChanges(config(), next, "/var/lib/civm");
  assert.deepEqual(c.applied, ["github credentials", "webhookSecret", "apiToken", "pollInterval", "shutdownTimeout", "retention", "maxWebhookBytes"]);
  assert.deepEqual(c.restartNeeded, [
    { field: "listen", running: "127.0.0.1:8080", configured: "[::1]:9090" },
    { field: "stateDir", running: "/var/lib/civm", configured: "/srv/civm" },
    { field: "github.apiUrl", running: "https://api.github.com", configured: "https://ghe.example.com/api/v3" },
  ]);
  const msg = restartMessage(c.restartNeeded)!;
  assert.match(msg, /^restart civm serve to apply listen \(running 127\.0\.0\.1:8080, configured \[::1\]:9090\), stateDir .*, github\.apiUrl .*; until then the running values stay\.$/);
  for (const s of ["ghp_old_secret", "ghp_new_secret", "hook2", "api2"]) assert.ok(!JSON.stringify(c).includes(s) && !msg.includes(s), "a secret in the answer");
  const eff = effectiveConfig(config(), next);
  assert.deepEqual(eff.listen, { host: "127.0.0.1", port: 8080 });
  assert.equal(eff.stateDir, undefined);
  assert.equal(eff.github.apiUrl, "https://api.github.com");
  assert.deepEqual(eff.github.auth, { kind: "token", token: "ghp_new_secret" });
  assert.equal(eff.apiToken, "api2");
  // A second reload compares with the running values: listen still needs a restart.
  assert.deepEqual(settingsChanges(eff, next, "/var/lib/civm").restartNeeded.map((r) => r.field), ["listen", "stateDir", "github.apiUrl"]);
  assert.deepEqual(settingsChanges(eff, next, "/var/lib/civm").applied, []);
});

test("a GitHub App key rotation counts as new credentials", () => {
  const app = (key: string): ServeConfig["github"] => ({ apiUrl: "https://api.github.com", auth: { kind: "app", appId: 1, privateKey: key, privateKeyFile: "/k.pem", installationId: undefined } });
  assert.deepEqual(settingsChanges(config({ github: app("A") }), config({ github: app("B") }), "/x").applied, ["github credentials"]);
});

test("the GitHub thresholds apply on a reload, and reach the daemon's settings", async () => {
  const { daemonSettings } = await import("../../src/pool/reload.js");
  const next = config({ githubLimits: { requestTimeoutSeconds: 5, degradedAfterSeconds: 60, repositoryListCacheSeconds: 0, rateLimitReservePercent: 20 } });
  assert.deepEqual(settingsChanges(config(), next, "/x").applied, ["github.requestTimeout", "github.degradedAfter", "github.repositoryListCache", "github.rateLimitReserve"]);
  assert.deepEqual(effectiveConfig(config(), next).githubLimits, next.githubLimits);
  assert.deepEqual(daemonSettings(next), { pollIntervalMs: 60_000, shutdownTimeoutMs: 3_600_000, retentionMs: 7 * 86400_000, githubDegradedAfterMs: 60_000, repoListTtlMs: 0, budgetReserveShare: 0.2 });
});

test("store and fleet changes need a restart; a store URL is shown without its password", () => {
  const pg = (pass: string) => ({ kind: "postgres" as const, url: `postgres://civm:${pass}@db/civm`, where: "postgres://civm:***@db/civm" });
  const running = config({ store: pg("old-pass") });
  const r = settingsChanges(running, config({ store: pg("new-pass"), fleet: { ...running.fleet, deadAfterSeconds: 90 } }), "/var/lib/civm");
  assert.deepEqual(r.restartNeeded.map((x) => x.field), ["store", "fleet"]);
  assert.doesNotMatch(JSON.stringify(r), /old-pass|new-pass/);
  const eff = effectiveConfig(running, config({ store: { kind: "sqlite", where: "sqlite" } }));
  assert.equal(eff.store.kind, "postgres", "the running store stays");
});
