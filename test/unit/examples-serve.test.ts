// The serve configs in examples/serve/ pass `civm config check` (with /etc/civm/ files made
// in a temp dir): valid, and without an unsafe-setting warning; the fireactions one has its
// single "keys civm does not use" warning.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { civmEnv, runCivm } from "../support/civm-cli.js";
import { repoRoot } from "../support/paths.js";

test("examples/serve/*.yaml pass civm config check", { timeout: 60_000 }, async () => {
  const e = civmEnv();
  const etc = join(e.root, "etc", "civm");
  mkdirSync(join(etc, "tls"), { recursive: true });
  execFileSync("openssl", ["genrsa", "-out", join(etc, "github-app.pem"), "2048"], { stdio: "ignore" });
  execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", join(etc, "tls", "privkey.pem"), "-out", join(etc, "tls", "fullchain.pem"), "-days", "1", "-subj", "/CN=runners.example.com"], { stdio: "ignore" });
  writeFileSync(join(etc, "webhook-secret"), "0123456789abcdef0123456789abcdef\n");
  writeFileSync(join(etc, "api-token"), "fedcba9876543210fedcba9876543210\n");
  writeFileSync(join(etc, "pg-password"), "pg-secret-0123456789\n");
  const dir = join(repoRoot, "examples", "serve");
  copyFileSync(join(dir, "pools.json"), join(etc, "pools.json"));
  const files = readdirSync(dir).filter((f) => f.endsWith(".yaml"));
  assert.ok(files.length >= 3, files.join(", "));
  for (const f of files) {
    const copy = join(e.root, f);
    writeFileSync(copy, readFileSync(join(dir, f), "utf8").replaceAll("/etc/civm/", `${etc}/`));
    const r = await runCivm(["config", "check", "--no-images", copy], e);
    assert.equal(r.code, 0, `${f}: ${r.stderr}`);
    const warnings = r.stderr.split("\n").filter((l) => l.startsWith("civm: warning:"));
    if (f.startsWith("fireactions")) {
      assert.equal(warnings.length, 1, `${f}: ${r.stderr}`);
      assert.match(warnings[0]!, /read as a fireactions config\.yaml; civm does not use log_level .*kernel_image_path/);
    } else {
      assert.deepEqual(warnings, [], `${f}: no unsafe setting`);
    }
  }
});
