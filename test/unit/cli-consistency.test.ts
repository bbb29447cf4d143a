// The CLI's conventions: `ls` and `list` on every noun, --json lists are arrays, -q prints
// names only, --json on commands that print a result, one-line summaries in `civm --help`,
// the same overwrite flag (--force), and `civm completion bash|zsh|fish`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { Registry } from "prom-client";
import { StateStore } from "../../src/store/index.js";
import { createApp, listen } from "../../src/server/index.js";
import { civmEnv, runCivm } from "../support/civm-cli.js";

const TOKEN = "api-token-for-consistency-test";

/** A stored image "runner-img" (a manifest and an empty disk: listed, not booted). */
function storeImage(stateDir: string, name: string): void {
  const dir = join(stateDir, "images", name);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "disk.qcow2"), "");
  writeFileSync(join(dir, "manifest.json"), JSON.stringify({ name, key: "k", format: "qcow2", disk: "disk.qcow2", sha256: "0".repeat(64), diskBytes: 0, virtualSize: 1 }));
}

test("ls and list on every local noun; --json lists are arrays; -q prints names only; image rm --json", async () => {
  const e = civmEnv();
  storeImage(e.stateDir, "runner-img");
  for (const noun of [[], ["image"], ["kernel"]]) {
    const a = await runCivm([...noun, "ls", "--json"], e);
    const b = await runCivm([...noun, "list", "--json"], e);
    assert.equal(a.code, 0, a.stderr);
    assert.equal(b.code, 0, b.stderr);
    assert.ok(Array.isArray(JSON.parse(a.stdout)), `civm ${noun.join(" ")} ls --json: an array`);
    assert.deepEqual(JSON.parse(a.stdout), JSON.parse(b.stdout));
  }
  assert.equal((await runCivm(["image", "ls", "-q"], e)).stdout, "runner-img\n");
  // Overwriting takes --force, as with kernel add (checked before any download).
  const again = await runCivm(["image", "pull", "http://127.0.0.1:9/runner-img.qcow2"], e);
  assert.equal(again.code, 2, again.stderr);
  assert.match(again.stderr, /an image named "runner-img" is already stored \(civm image ls\); pass --force to replace it/);
  assert.equal((await runCivm(["kernel", "ls", "-q"], e)).stdout, "");
  assert.equal((await runCivm(["ls", "-q"], e)).stdout, "");
  const rm = await runCivm(["image", "rm", "runner-img", "--json"], e);
  assert.equal(rm.code, 0, rm.stderr);
  assert.deepEqual(JSON.parse(rm.stdout), [{ name: "runner-img" }]);
  assert.equal((await runCivm(["image", "ls", "-q"], e)).stdout, "");
});

test("pools, vms and hosts: ls, list and the default; -q names only", async (t) => {
  const store = new StateStore(":memory:");
  store.registerHost({ id: "host-a", address: "http://127.0.0.1:8080", cpus: 8, ramBytes: 16 * 1024 ** 3, pools: ["linux"], version: "0.1.0" });
  const srv = await listen(createApp({ store, hostId: "host-a", deadAfterMs: 3_600_000, pools: [{ name: "linux", labels: ["linux"], minRunners: 0, maxRunners: 2, target: { kind: "org", org: "o" }, groupId: 1 }], webhookSecret: "s", apiToken: TOKEN, maxWebhookBytes: 1024, registry: new Registry() }), "127.0.0.1", 0);
  t.after(() => srv.close());
  store.insertVm({ id: "abcd0001", pool: "linux", name: "linux-abcd0001", imageKey: "k", createdAt: Date.now(), host: "host-a", cpus: 2, ramBytes: 1024 ** 3 });
  const e = civmEnv({ CIVM_API_URL: srv.url, CIVM_API_TOKEN: TOKEN });
  for (const noun of ["pools", "vms", "hosts"]) {
    const outs = await Promise.all([[noun, "--json"], [noun, "ls", "--json"], [noun, "list", "--json"]].map((a) => runCivm(a, e)));
    for (const o of outs) assert.equal(o.code, 0, o.stderr);
    // Compared by name/id: a VM's ageSeconds moves between the calls.
    const keys = outs.map((o) => (JSON.parse(o.stdout) as { name: string; id?: string }[]).map((x) => x.id ?? x.name));
    assert.ok(keys[0]!.length > 0);
    assert.deepEqual(keys[1], keys[0]);
    assert.deepEqual(keys[2], keys[0]);
  }
  assert.equal((await runCivm(["pools", "-q"], e)).stdout, "linux\n");
  assert.equal((await runCivm(["vms", "ls", "-q"], e)).stdout, "abcd0001\n");
  assert.equal((await runCivm(["hosts", "-q"], e)).stdout, "host-a\n");
  const hosts = await runCivm(["hosts"], e);
  assert.equal(hosts.code, 0, hosts.stderr);
  // The host answering is starred; its VM takes 2 of 8 cpus and 1 GiB of 16.
  assert.match(hosts.stdout, /^host-a \*\s+active\s+\S+ ago\s+2\/8\s+1\.0G\/16\.0G\s+1\s+0\s+0\s+-\s+http:\/\/127\.0\.0\.1:8080$/m);
  assert.match((await runCivm(["vms"], e)).stdout, /linux-abcd0001\s+starting\s+-\s+-\s+\S+\s+host-a\s+-/);
});

test("civm --help: one line per command; details in the command's own help; --force is the overwrite flag", async () => {
  const e = civmEnv();
  const help = (await runCivm(["--help"], e)).stdout;
  const section = help.slice(help.indexOf("Commands:"), help.indexOf("Exit codes:"));
  const entries = section.split("\n").filter((l) => /^  \S/.test(l));
  assert.ok(entries.length >= 15, section);
  // A summary fits in two 80-column lines (commander wraps the description column).
  const lines = section.split("\n").filter((l) => l.trim() && !l.startsWith("Commands:")).length;
  assert.ok(lines <= entries.length * 2, `summaries longer than two lines:\n${section}`);
  assert.match(help, /^  completion <shell>\s+Print a shell completion script/m);
  assert.match((await runCivm(["ls", "--help"], e)).stdout, /Entries\s+whose\s+civm\s+or\s+QEMU\s+is\s+gone\s+are\s+cleaned\s+up/);
  const kernelAdd = (await runCivm(["kernel", "add", "--help"], e)).stdout;
  assert.match(kernelAdd, /--force\s+replace a stored kernel/);
  assert.match(kernelAdd, /--json/);
  assert.doesNotMatch(kernelAdd, /--replace/, "the old name works but is not advertised");
  for (const cmd of [["run"], ["stop"], ["wait"], ["image", "pull"], ["image", "rm"], ["kernel", "rm"]]) {
    assert.match((await runCivm([...cmd, "--help"], e)).stdout, /--json/, `civm ${cmd.join(" ")} --json`);
  }
});

test("--json prints JSON, not just a flag in --help: image pull (an object), kernel rm (an array)", async (t) => {
  const e = civmEnv();
  const disk = join(e.root, "small.qcow2");
  execFileSync("qemu-img", ["create", "-f", "qcow2", disk, "16M"], { stdio: "ignore" });
  const body = readFileSync(disk);
  const files: Record<string, Buffer> = { "/small.qcow2": body, "/small.qcow2.sha256": Buffer.from(`${createHash("sha256").update(body).digest("hex")}  small.qcow2\n`) };
  const srv = createHttpServer((req, res) => {
    const f = files[req.url ?? ""];
    if (!f) return res.writeHead(404).end();
    res.writeHead(200, { "content-length": f.length }).end(f);
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  t.after(() => srv.close());
  const url = `http://127.0.0.1:${(srv.address() as AddressInfo).port}/small.qcow2`;
  const pull = await runCivm(["image", "pull", url, "-q", "--json"], e);
  assert.equal(pull.code, 0, pull.stderr);
  const pulled = JSON.parse(pull.stdout) as { name: string; diskPath: string; sha256: string };
  assert.equal(pulled.name, "small");
  assert.ok(existsSync(pulled.diskPath), pulled.diskPath);
  assert.equal(pulled.sha256, createHash("sha256").update(body).digest("hex"));
  // A stored kernel: its folder with a manifest (kernel add's product; not booted here).
  const k = join(e.stateDir, "kernels", "k1");
  mkdirSync(k, { recursive: true });
  writeFileSync(join(k, "manifest.json"), JSON.stringify({ name: "k1", release: "6.1.0-test", source: "test", hasModules: false, initrdModules: [], ninep: false }));
  const rm = await runCivm(["kernel", "rm", "k1", "--json"], e);
  assert.equal(rm.code, 0, rm.stderr);
  assert.deepEqual(JSON.parse(rm.stdout), [{ name: "k1" }]);
  assert.equal(existsSync(k), false);
});

test("civm run --image --print-cmd --json prints one JSON object", async () => {
  const e = civmEnv();
  const disk = join(e.root, "d.qcow2");
  execFileSync("qemu-img", ["create", "-f", "qcow2", disk, "64M"], { stdio: "ignore" });
  const r = await runCivm(["run", "--image", disk, "--name", "jsontest", "--print-cmd", "--json"], e);
  assert.equal(r.code, 0, r.stderr);
  const o = JSON.parse(r.stdout) as { name: string; binary: string; args: string[] };
  assert.equal(o.name, "jsontest");
  assert.match(o.binary, /qemu-system-x86_64$/);
  assert.ok(o.args.includes("-nodefaults"));
  const both = await runCivm(["run", "--image", disk, "--console", "--json"], e);
  assert.equal(both.code, 2);
  assert.match(both.stderr, /--json and --console both write to stdout/);
});

test("civm completion bash|zsh|fish: scripts generated from the command tree", async () => {
  const e = civmEnv();
  const bash = await runCivm(["completion", "bash"], e);
  assert.equal(bash.code, 0, bash.stderr);
  const file = join(e.root, "civm.bash");
  writeFileSync(file, bash.stdout);
  execFileSync("bash", ["-n", file]);
  const complete = (words: string[]) =>
    execFileSync("bash", ["-c", `source ${file}; COMP_WORDS=(${words.map((w) => `'${w}'`).join(" ")}); COMP_CWORD=${words.length - 1}; _civm; echo "\${COMPREPLY[*]}"`], { encoding: "utf8" }).trim();
  assert.equal(complete(["civm", "--state-dir", "/x", "image", "l"]), "ls list");
  assert.equal(complete(["civm", "kernel", "add", "--f"]), "--force");
  assert.match(complete(["civm", "comp"]), /^completion$/);
  const zsh = await runCivm(["completion", "zsh"], e);
  assert.match(zsh.stdout, /^#compdef civm\n/);
  assert.match(zsh.stdout, /bashcompinit/);
  const fish = await runCivm(["completion", "fish"], e);
  assert.match(fish.stdout, /^complete -c civm -n __fish_use_subcommand -a serve -d 'Keep pools of single-use GitHub Actions runner VMs'$/m);
  assert.match(fish.stdout, /^complete -c civm -n '__fish_seen_subcommand_from image; and not __fish_seen_subcommand_from build ls list path rm export pull push' -a ls/m);
  assert.equal((await runCivm(["completion", "tcsh"], e)).code, 2);
});

test("civm --version and civm_build_info use CIVM_VERSION, which is package.json's version", async () => {
  const { CIVM_VERSION } = await import("../../src/version.js");
  const { readFileSync } = await import("node:fs");
  const { repoRoot } = await import("../support/paths.js");
  assert.equal(CIVM_VERSION, (JSON.parse(readFileSync(join(repoRoot, "package.json"), "utf8")) as { version: string }).version);
  assert.equal((await runCivm(["--version"], civmEnv())).stdout.trim(), CIVM_VERSION);
});

test("civm --help | head -1: the reader leaving early is no crash (no EPIPE stack trace), exit 0", async () => {
  const { spawn } = await import("node:child_process");
  const { civmBin } = await import("../support/paths.js");
  const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
    const p = spawn(process.execPath, [civmBin, "--help"], { stdio: ["ignore", "pipe", "pipe"] });
    let stderr = "";
    p.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    // Like head -1: read the first chunk, then close the pipe before civm has written the rest.
    p.stdout.once("data", () => p.stdout.destroy());
    p.on("close", (code) => resolve({ code, stderr }));
  });
  assert.doesNotMatch(r.stderr, /EPIPE|Unhandled 'error' event|at \S+\.js:\d+/);
  assert.equal(r.code, 0, r.stderr);
});
