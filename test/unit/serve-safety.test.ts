// Unsafe serve settings are warned about (or refused), the listener speaks TLS when asked,
// /metrics can have a listener of its own with civm_build_info and the process metrics,
// and every metric the Grafana dashboard in examples/grafana/ queries is exported.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { request as httpsRequest } from "node:https";
import { join } from "node:path";
import { Hono } from "hono";
import { ConfigError } from "../../src/errors/index.js";
import { loadServeConfig } from "../../src/pool/config.js";
import { listen } from "../../src/server/index.js";
import { CIVM_VERSION } from "../../src/version.js";
import { startFakeGitHub } from "../support/fake-github.js";
import { civmEnv, runCivm } from "../support/civm-cli.js";
import { killAfter, spawnServe } from "../support/serve-harness.js";
import { repoRoot, tempDir } from "../support/paths.js";

function configFile(dir: string, extra: Record<string, unknown>): string {
  writeFileSync(join(dir, "disk.img"), "");
  const file = join(dir, `serve-${Math.random().toString(16).slice(2)}.json`);
  writeFileSync(
    file,
    JSON.stringify({
      github: { token: "ghp_example" },
      pools: [{ name: "linux", maxRunners: 1, runner: { image: "./disk.img", organization: "acme", labels: ["linux"] } }],
      ...extra,
    }),
  );
  return file;
}

/** A self-signed certificate for 127.0.0.1 (openssl), PEM texts and files. */
function selfSigned(dir: string): { cert: string; key: string; certFile: string; keyFile: string } {
  const certFile = join(dir, "cert.pem");
  const keyFile = join(dir, "key.pem");
  execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", keyFile, "-out", certFile, "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], { stdio: "ignore" });
  return { cert: readFileSync(certFile, "utf8"), key: readFileSync(keyFile, "utf8"), certFile, keyFile };
}

function httpsGet(url: string, ca: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest(url, { ca }, (res) => {
      let body = "";
      res.on("data", (d) => (body += d));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on("error", reject);
    req.end();
  });
}

test("unsafe settings: short secrets, /metrics and plain HTTP on a public listener, http:// to a remote GitHub are warned about; a loopback config has no warning", async () => {
  const dir = tempDir();
  const unsafe = await loadServeConfig(configFile(dir, { listen: "0.0.0.0:8080", webhookSecret: "short", apiToken: "also-short", github: { token: "t", apiUrl: "http://ghes.example.com/api/v3" } }), { checkImages: false });
  const w = (unsafe.warnings ?? []).join("\n");
  assert.match(w, /"webhookSecret" is 5 characters long on a listener other hosts can reach \("listen": 0\.0\.0\.0:8080\); use 16 or more/);
  assert.match(w, /"apiToken" is 10 characters long/);
  assert.match(w, /GET \/metrics \(no auth\) answers anyone who reaches "listen".*set "metricsListen"/);
  assert.match(w, /plain HTTP: the API token travels in clear/);
  assert.match(w, /"github\.apiUrl" \(http:\/\/ghes\.example\.com\/api\/v3\) is plain HTTP to another host/);

  const safe = await loadServeConfig(configFile(dir, { listen: "127.0.0.1:8080", webhookSecret: "short", apiToken: "x", github: { token: "t", apiUrl: "http://127.0.0.1:9999" } }), { checkImages: false });
  assert.deepEqual(safe.warnings, []);
  const separate = await loadServeConfig(configFile(dir, { listen: "0.0.0.0:8443", metricsListen: "127.0.0.1:9464", tls: { cert: "cert.pem", key: "key.pem" }, webhookSecret: "a".repeat(32), apiToken: "b".repeat(32) }), { checkImages: false }).catch((e: unknown) => e);
  assert.ok(separate instanceof ConfigError, "tls files are checked");
  assert.match(separate.message, /"tls\.cert": cannot read .*cert\.pem \(no such file\)/);
  selfSigned(dir);
  const ok = await loadServeConfig(configFile(dir, { listen: "0.0.0.0:8443", metricsListen: "127.0.0.1:9464", tls: { cert: "cert.pem", key: "key.pem" }, webhookSecret: "a".repeat(32), apiToken: "b".repeat(32) }), { checkImages: false });
  assert.deepEqual(ok.warnings, []);
  assert.deepEqual(ok.metricsListen, { host: "127.0.0.1", port: 9464 });
});

test("maxWebhookBytes above 25 MiB is refused (the body is buffered before its signature is checked); config check prints warnings and exits 0", async () => {
  const dir = tempDir();
  await assert.rejects(loadServeConfig(configFile(dir, { maxWebhookBytes: "100M" }), { checkImages: false }), /"maxWebhookBytes" \(104857600 bytes\) is above 26214400 \(25 MiB\): GitHub never sends more/);
  const e = civmEnv();
  const r = await runCivm(["config", "check", "--no-images", configFile(dir, { listen: "0.0.0.0:8080", apiToken: "short" })], e);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /civm: warning: .*"apiToken" is 5 characters long/);
  assert.match(r.stderr, /valid \(1 pool\)/);
});

test("tls on the listener: HTTPS with the configured certificate", async (t) => {
  const dir = tempDir();
  const { cert, key } = selfSigned(dir);
  const app = new Hono();
  app.get("/healthz", (c) => c.json({ ok: true }));
  const srv = await listen(app, "127.0.0.1", 0, { tls: { cert, key } });
  t.after(() => srv.close());
  assert.match(srv.url, /^https:\/\/127\.0\.0\.1:\d+$/);
  const r = await httpsGet(`${srv.url}/healthz`, cert);
  assert.equal(r.status, 200);
  assert.deepEqual(JSON.parse(r.body), { ok: true });
  await assert.rejects(fetch(`${srv.url.replace("https:", "http:")}/healthz`), "plain HTTP is not answered");
});

test("civm serve with tls and metricsListen: /metrics only on its own listener, with civm_build_info and process metrics; every metric the Grafana dashboard queries is exported", { timeout: 60_000 }, async (t) => {
  const gh = await startFakeGitHub();
  t.after(() => gh.close());
  const e = civmEnv();
  const { cert } = selfSigned(e.root);
  writeFileSync(join(e.root, "disk.img"), "");
  const cfg = join(e.root, "serve.json");
  writeFileSync(
    cfg,
    JSON.stringify({
      listen: "127.0.0.1:0",
      metricsListen: "127.0.0.1:0",
      tls: { cert: "cert.pem", key: "key.pem" },
      github: { apiUrl: gh.url, token: gh.validToken },
      // A fireactions key: its warning must reach the start-up log.
      log_level: "info",
      pools: [{ name: "linux", maxRunners: 1, runner: { image: "./disk.img", repository: "rust-lang-ci/rust", labels: ["linux"] } }],
    }),
  );
  const serve = spawnServe(["--config", cfg, "--accel", "tcg"], e);
  killAfter(t, serve);
  const started = await serve.listening();
  assert.match(started.url, /^https:/);
  const warned = serve.stdout().split("\n").filter((l) => l.includes('"level":"warn"')).map((l) => JSON.parse(l) as { msg: string });
  assert.ok(warned.some((w) => /read as a fireactions config\.yaml; civm does not use log_level/.test(w.msg)), `start-up warnings: ${JSON.stringify(warned)}`);
  assert.equal((await httpsGet(`${started.url}/healthz`, cert)).status, 200);
  assert.equal((await httpsGet(`${started.url}/metrics`, cert)).status, 404, "no /metrics on the main listener");
  const metrics = await (await fetch(`${started.metricsUrl}/metrics`)).text();
  assert.match(metrics, new RegExp(`^civm_build_info\\{version="${CIVM_VERSION.replace(/\./g, "\\.")}",nodejs="${process.version}"\\} 1$`, "m"));
  assert.match(metrics, /^process_cpu_seconds_total /m);

  const exported = new Set([...metrics.matchAll(/^# TYPE (\S+) (\S+)$/gm)].flatMap(([, name, type]) => (type === "histogram" ? [`${name}_bucket`, `${name}_sum`, `${name}_count`] : type === "summary" ? [name!, `${name}_sum`, `${name}_count`] : [name!])));
  const dir = join(repoRoot, "examples", "grafana");
  const dashboards = readdirSync(dir).filter((f) => f.endsWith(".json"));
  assert.ok(dashboards.length > 0);
  for (const f of dashboards) {
    const text = readFileSync(join(dir, f), "utf8");
    const exprs = [...text.matchAll(/"(?:expr|query)": "((?:[^"\\]|\\.)*)"/g)].map((m) => JSON.parse(`"${m[1]}"`) as string);
    assert.ok(exprs.length > 5, `${f}: queries found`);
    for (const expr of exprs) {
      // Metric names: what is left after strings, selectors, ranges, by/without clauses and function calls.
      const bare = expr.replace(/"[^"]*"/g, '""').replace(/\{[^}]*\}/g, "{}").replace(/\[[^\]]*\]/g, "").replace(/\b(?:by|without)\s*\([^)]*\)/g, "").replace(/label_values\(([^,]+),[^)]*\)/g, "$1");
      for (const [name] of bare.matchAll(/\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()/g)) {
        if (name === "prometheus") continue; // the datasource variable's query
        assert.ok(exported.has(name), `${f}: ${JSON.stringify(expr)} names ${name}, which civm serve does not export`);
      }
    }
  }
});
