import { test } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, mkdirSync, renameSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  cacheKeyFor,
  cacheKeysFor,
  canonicalJson,
  computeCacheKey,
  hashPath,
  inputFiles,
  readAgentVersion,
  uuidFromKey,
  type CacheKeyInputs,
} from "../../src/images/cache-key.js";
import { loadImageSpecs, resolveBuildOrder } from "../../src/images/spec.js";
import type { ImageSpec } from "../../src/images/types.js";
import { repoRoot, tempDir } from "../support/paths.js";

function rootSpec(over: Partial<ImageSpec> = {}): ImageSpec {
  return {
    name: "base",
    suite: "bookworm",
    mirror: "http://mirror.test.invalid/debian",
    packages: ["curl", "git"],
    sizeBytes: 4 * 1024 ** 3,
    format: "qcow2",
    kernel: "linux-image-amd64",
    flatten: false,
    actions: [
      { kind: "run", command: "echo hi" },
      { kind: "copy", src: "files/motd", srcPath: "/abs/files/motd", dest: "/etc/motd" },
      { kind: "provision", script: { src: "setup.sh", srcPath: "/abs/setup.sh" } },
    ],
    source: { file: "images.yaml", baseDir: "/abs", index: 0, lvh: false, builtin: false },
    ...over,
  };
}

const HASHES = { "/abs/files/motd": "a".repeat(64), "/abs/setup.sh": "b".repeat(64) };

function key(over: Partial<CacheKeyInputs> = {}): string {
  return computeCacheKey({ spec: rootSpec(), fileHashes: HASHES, agentVersion: "1", ...over });
}

test("the same inputs give the same key (64 hex digits)", () => {
  assert.match(key(), /^[0-9a-f]{64}$/);
  assert.equal(key(), key());
  // Fresh but equal objects, keys in another order.
  const spec = rootSpec();
  const reordered = Object.fromEntries(Object.entries(spec).reverse()) as unknown as ImageSpec;
  assert.equal(computeCacheKey({ spec: reordered, fileHashes: { ...HASHES }, agentVersion: "1" }), key());
});

test("cosmetic fields do not change the key: name, description, comments, where the file is, snapshot: true", () => {
  const base = key();
  assert.equal(key({ spec: rootSpec({ name: "renamed", description: "words" }) }), base);
  assert.equal(key({ spec: rootSpec({ snapshot: true }) }), base);
  assert.equal(key({ spec: rootSpec({ source: { file: "/elsewhere/x.json", baseDir: "/elsewhere", index: 7, lvh: true, builtin: true } }) }), base);
  const commented = rootSpec();
  commented.actions = commented.actions.map((a) => ({ ...a, comment: "why" }));
  assert.equal(key({ spec: commented }), base);
  // Package order and duplicates do not matter to apt.
  assert.equal(key({ spec: rootSpec({ packages: ["git", "curl", "git"] }) }), base);
});

test("changing an action, its order, a package, size or format changes the key", () => {
  const base = key();
  const changed = rootSpec();
  changed.actions = [{ kind: "run", command: "echo bye" }, ...changed.actions.slice(1)];
  assert.notEqual(key({ spec: changed }), base);
  const swapped = rootSpec();
  swapped.actions = [swapped.actions[1], swapped.actions[0], swapped.actions[2]] as ImageSpec["actions"];
  assert.notEqual(key({ spec: swapped }), base);
  assert.notEqual(key({ spec: rootSpec({ packages: ["curl"] }) }), base);
  assert.notEqual(key({ spec: rootSpec({ sizeBytes: 8 * 1024 ** 3 }) }), base);
  assert.notEqual(key({ spec: rootSpec({ format: "vhd" }) }), base);
  assert.notEqual(key({ spec: rootSpec({ suite: "trixie" }) }), base);
  assert.notEqual(key({ spec: rootSpec({ kernel: "linux-image-cloud-amd64" }) }), base);
});

test("a copied file's content, the agent version and the parent's key change the key", () => {
  const base = key();
  assert.notEqual(key({ fileHashes: { ...HASHES, "/abs/files/motd": "c".repeat(64) } }), base);
  assert.notEqual(key({ fileHashes: { ...HASHES, "/abs/setup.sh": "c".repeat(64) } }), base);
  assert.notEqual(key({ agentVersion: "2" }), base);

  const child = rootSpec({ name: "child", parent: "base", actions: [{ kind: "run", command: "true" }] });
  delete child.kernel;
  const k1 = computeCacheKey({ spec: child, parentKey: "1".repeat(64), fileHashes: {}, agentVersion: "1" });
  const k2 = computeCacheKey({ spec: child, parentKey: "2".repeat(64), fileHashes: {}, agentVersion: "1" });
  assert.notEqual(k1, k2);
  assert.notEqual(computeCacheKey({ spec: { ...child, flatten: true }, parentKey: "1".repeat(64), fileHashes: {}, agentVersion: "1" }), k1);
  assert.throws(() => computeCacheKey({ spec: child, fileHashes: {}, agentVersion: "1" }), /parent's key is needed/);
  assert.throws(() => key({ fileHashes: {} }), /no content hash for \/abs\/files\/motd/);
});

test("hashPath covers names, modes and contents of a folder, recursively", async () => {
  const dir = tempDir("civm-hash-");
  mkdirSync(join(dir, "tree", "sub"), { recursive: true });
  writeFileSync(join(dir, "tree", "sub", "a.txt"), "a\n");
  writeFileSync(join(dir, "tree", "b.sh"), "#!/bin/sh\n");
  symlinkSync("sub/a.txt", join(dir, "tree", "link"));
  const tree = join(dir, "tree");
  const h0 = await hashPath(tree);
  assert.match(h0, /^[0-9a-f]{64}$/);
  assert.equal(await hashPath(tree), h0);

  writeFileSync(join(dir, "tree", "sub", "a.txt"), "A\n");
  const h1 = await hashPath(tree);
  assert.notEqual(h1, h0, "deep content");
  chmodSync(join(dir, "tree", "b.sh"), 0o755);
  const h2 = await hashPath(tree);
  assert.notEqual(h2, h1, "mode");
  renameSync(join(dir, "tree", "b.sh"), join(dir, "tree", "c.sh"));
  const h3 = await hashPath(tree);
  assert.notEqual(h3, h2, "name");
  writeFileSync(join(dir, "single"), "x");
  const f0 = await hashPath(join(dir, "single"));
  writeFileSync(join(dir, "single"), "y");
  assert.notEqual(await hashPath(join(dir, "single")), f0);
});

test("cacheKeyFor reads the copied files: editing one rebuilds the image and its children", async () => {
  const dir = tempDir("civm-key-");
  mkdirSync(join(dir, "files"));
  writeFileSync(join(dir, "files", "motd"), "v1\n");
  const file = join(dir, "images.yaml");
  writeFileSync(
    file,
    `- name: base
  mirror: http://mirror.test.invalid/debian
  actions:
    - copy: {src: files, dest: /etc/civm/}
- name: child
  parent: base
  actions:
    - run: "true"
- name: other-child
  parent: base
`,
  );
  const load = async () => resolveBuildOrder(await loadImageSpecs(file), "child");
  const chain = await load();
  assert.deepEqual(inputFiles(chain[0] as ImageSpec), [join(dir, "files")]);
  const k1 = await cacheKeysFor(chain, { agentVersion: "1" });
  assert.deepEqual(await cacheKeysFor(await load(), { agentVersion: "1" }), k1, "unchanged");
  writeFileSync(join(dir, "files", "motd"), "v2\n");
  const k2 = await cacheKeysFor(await load(), { agentVersion: "1" });
  assert.notEqual(k2.get("base"), k1.get("base"));
  assert.notEqual(k2.get("child"), k1.get("child"), "a changed parent rebuilds its children");
  // A child's own change leaves the parent's key alone.
  writeFileSync(file, (await import("node:fs")).readFileSync(file, "utf8").replace('run: "true"', 'run: "false"'));
  const k3 = await cacheKeysFor(await load(), { agentVersion: "1" });
  assert.equal(k3.get("base"), k2.get("base"));
  assert.notEqual(k3.get("child"), k2.get("child"));
  assert.equal(await cacheKeyFor(chain[0] as ImageSpec, { agentVersion: "1" }), k2.get("base"));
});

test("the agent version comes from guest/VERSION, or 0 without it", async () => {
  const dir = tempDir("civm-ver-");
  writeFileSync(join(dir, "VERSION"), "7\n");
  const v1 = await readAgentVersion(join(dir, "VERSION"));
  assert.match(v1, /^7\+[0-9a-f]{16}$/, "VERSION plus a hash of the agent's folder");
  // An edit to the agent changes its identity even without a VERSION bump.
  writeFileSync(join(dir, "civm-agent"), "echo changed\n");
  const v2 = await readAgentVersion(join(dir, "VERSION"));
  assert.match(v2, /^7\+/);
  assert.notEqual(v2, v1);
  // Its README is not installed into images: editing it rebuilds nothing.
  writeFileSync(join(dir, "README.md"), "# docs\n");
  assert.equal(await readAgentVersion(join(dir, "VERSION")), v2);
  assert.equal(await readAgentVersion(join(dir, "missing")), "0");
  assert.match(await readAgentVersion(), /^\d+\+[0-9a-f]{16}$/);
});

test("canonicalJson sorts keys at every level; uuidFromKey is a stable v4-shaped UUID", () => {
  assert.equal(canonicalJson({ b: 1, a: { d: [2, { z: 1, y: 2 }], c: null } }), '{"a":{"c":null,"d":[2,{"y":2,"z":1}]},"b":1}');
  const u = uuidFromKey("f".repeat(64));
  assert.match(u, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.equal(uuidFromKey("f".repeat(64)), u);
  assert.notEqual(uuidFromKey("e".repeat(64)), u);
});
