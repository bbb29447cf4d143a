// Upstream fireactions' config.yaml (snake_case) is read by civm serve's config loader:
// translated key by key, with every key civm does not use named in one warning.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadServeConfig } from "../../src/pool/config.js";
import { isFireactionsConfig } from "../../src/pool/fireactions.js";
import { civmEnv, runCivm } from "../support/civm-cli.js";
import { tempDir } from "../support/paths.js";

function keyPem(dir: string): string {
  const file = join(dir, "app.pem");
  execFileSync("openssl", ["genrsa", "-out", file, "2048"], { stdio: "ignore" });
  return file;
}

/** fireactions' documented config.yaml layout (docs/reference/configuration.md), with a disk image. */
function fireactionsYaml(dir: string, image: string): string {
  const pem = execFileSync("cat", [keyPem(dir)], { encoding: "utf8" });
  return `bind_address: 127.0.0.1:8080
basic_auth_enabled: true
basic_auth_users:
  admin: hunter2
debug: false
log_level: info
metrics:
  enabled: true
  address: 127.0.0.1:8081
github:
  app_id: 12345
  app_private_key: |
${pem.trim().split("\n").map((l) => `    ${l}`).join("\n")}
apiToken: a-civm-api-token-of-some-length
pools:
- name: fa-2vcpu-2gb
  replicas: 3
  shutdown_on_exit: true
  runner:
    name: fa-2vcpu-2gb
    image: ${image}
    image_pull_policy: IfNotPresent
    group_id: 1
    organization: acme
    labels: [self-hosted, fa-2vcpu-2gb]
  firecracker:
    binary_path: firecracker
    kernel_image_path: /var/lib/fireactions/vmlinux
    kernel_args: "console=ttyS0 reboot=k panic=1"
    machine_config:
      mem_size_mib: 2048
      vcpu_count: 2
    metadata:
      example1: value1
- name: fa-big
  max_runners: 4
  min_runners: 1
  runner:
    image: ${image}
    image_pull_policy: Never
    group_id: 2
    organization: acme
    labels: [self-hosted, fa-big]
  firecracker:
    machine_config:
      mem_size_mib: 8192
      vcpu_count: 4
`;
}

test("a fireactions config.yaml is translated: listen, metricsListen, the App, replicas as min = max, max_runners/min_runners, machine_config; ignored keys named in one warning", async () => {
  const dir = tempDir();
  writeFileSync(join(dir, "runner.qcow2"), "");
  const file = join(dir, "config.yaml");
  writeFileSync(file, fireactionsYaml(dir, "./runner.qcow2"));
  const c = await loadServeConfig(file, { checkImages: true });
  assert.deepEqual(c.listen, { host: "127.0.0.1", port: 8080 });
  assert.deepEqual(c.metricsListen, { host: "127.0.0.1", port: 8081 });
  assert.equal(c.github.auth.kind, "app");
  assert.equal(c.github.auth.kind === "app" && c.github.auth.appId, 12345);
  assert.equal(c.apiToken, "a-civm-api-token-of-some-length", "civm keys sit next to fireactions' ones");
  const [a, b] = c.pools;
  assert.deepEqual([a!.name, a!.minRunners, a!.maxRunners, a!.vm.cpus, a!.vm.ramBytes / 1024 ** 2, a!.vm.cmdline, a!.runner.groupId], ["fa-2vcpu-2gb", 3, 3, 2, 2048, "console=ttyS0 reboot=k panic=1", 1]);
  assert.deepEqual([b!.name, b!.minRunners, b!.maxRunners, b!.vm.cpus, b!.vm.ramBytes / 1024 ** 2, b!.runner.namePrefix, b!.runner.imagePullPolicy, b!.runner.groupId], ["fa-big", 1, 4, 4, 8192, "fa-big", "Never", 2]);
  const notes = (c.warnings ?? []).filter((w) => w.includes("fireactions"));
  assert.equal(notes.length, 1, "one message");
  for (const key of ["basic_auth_enabled", "basic_auth_users", "log_level", "debug", "pools[0].firecracker.binary_path", "pools[0].firecracker.kernel_image_path", "pools[0].firecracker.metadata"]) {
    assert.ok(notes[0]!.includes(key), `${key} named in: ${notes[0]}`);
  }
  assert.doesNotMatch(notes[0]!, /hunter2|PRIVATE KEY/, "no values");
});

test("civm config check on a fireactions config.yaml: exit 0 with the warning; an OCI image it may not pull is a clear error (exit 2)", async () => {
  const e = civmEnv();
  writeFileSync(join(e.root, "runner.qcow2"), "");
  const ok = join(e.root, "config.yaml");
  writeFileSync(ok, fireactionsYaml(e.root, "./runner.qcow2"));
  const r = await runCivm(["config", "check", ok], e);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /civm: warning: .*config\.yaml: read as a fireactions config\.yaml; civm does not use basic_auth_enabled/);
  assert.match(r.stdout, /pool fa-2vcpu-2gb: 3\.\.3 runners/);

  const upstream = join(e.root, "upstream.yaml");
  writeFileSync(upstream, fireactionsYaml(e.root, "ghcr.io/hostinger/fireactions/runner:ubuntu-20.04-x64-2.310.2"));
  const bad = await runCivm(["config", "check", upstream], e);
  assert.equal(bad.code, 2, bad.stderr);
  // Its pools name an OCI reference: pulled on first use, except where image_pull_policy is Never.
  assert.doesNotMatch(bad.stderr, /pool "fa-2vcpu-2gb" \(#1\): "runner\.image"/);
  assert.match(bad.stderr, /pool "fa-big" \(#2\): "runner\.image" "ghcr\.io\/hostinger\/fireactions\/runner:ubuntu-20\.04-x64-2\.310\.2" has not been pulled and "runner\.imagePullPolicy" is "Never"/);
});

test("civm's own configs are not mistaken for fireactions'", () => {
  assert.equal(isFireactionsConfig({ listen: ":8080", github: { appId: 1 }, pools: [{ name: "a", maxRunners: 1 }] }), false);
  assert.equal(isFireactionsConfig({ bind_address: ":8080" }), true);
  assert.equal(isFireactionsConfig({ pools: [{ name: "a", replicas: 1 }] }), true);
});
