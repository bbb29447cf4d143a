// A spec's parent that is only a stored image (src/images/stored-parent.ts): a temp state dir
// holds the parent (a real qcow2 and manifest.json through ImageStore), the child's spec names
// it. What it inherits, its key, the errors for old, damaged, pulled and missing parents, and
// the builder using it as it is (no VM: every image here is up to date or refused).
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import YAML from "yaml";
import { ConfigError } from "../../src/errors/index.js";
import { buildImage, type BuildEvent } from "../../src/images/build.js";
import { cacheKeyFor, cacheKeysFor } from "../../src/images/cache-key.js";
import { loadImageSpecs, resolveBuildOrder, type LoadImageOptions } from "../../src/images/spec.js";
import { ImageStore, type ManifestInput } from "../../src/images/store.js";
import { tempDir } from "../support/paths.js";
import { imageByName, specLoadError } from "../support/image-specs.js";

const MIRROR = "http://mirror.test.invalid/debian";
const PARENT_MIRROR = "http://parent-mirror.test.invalid/debian";
const KEY = "a".repeat(64);

interface Fixture {
  dir: string;
  stateDir: string;
  store: ImageStore;
  opts: LoadImageOptions;
}

function fixture(): Fixture {
  const dir = tempDir("civm-stored-parent-");
  const stateDir = join(dir, "state");
  return { dir, stateDir, store: new ImageStore(stateDir), opts: { defaultMirror: MIRROR, stateDir } };
}

/** A built image in the store: a qcow2 of `size`, a kernel and an initrd, the manifest given. */
async function storeParent(f: Fixture, name: string, over: Partial<ManifestInput> = {}, size = "6G"): Promise<void> {
  const p = await f.store.begin(name);
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", join(p.dir, "disk.qcow2"), size]);
  writeFileSync(join(p.dir, "vmlinuz"), "kernel");
  writeFileSync(join(p.dir, "initrd.img"), "initrd");
  await p.commit({
    name, key: KEY, format: "qcow2", disk: "disk.qcow2", kernel: "vmlinuz", initrd: "initrd.img",
    packages: {}, buildSeconds: 1, createdAt: new Date().toISOString(), source: "build",
    suite: "trixie", mirror: PARENT_MIRROR, ...over,
  });
}

function manifestPath(f: Fixture, name: string): string {
  return join(f.store.pathOf(name), "manifest.json");
}

function spec(f: Fixture, entries: unknown[]): string {
  const file = join(f.dir, "images.yaml");
  writeFileSync(file, YAML.stringify(entries));
  return file;
}

const CHILD = { name: "kernel-on-base", parent: "base", packages: ["git"], actions: [{ run: "true" }] };

const configError = specLoadError;
const byName = imageByName;

test("a stored parent: the child inherits suite, mirror, size and arch from its manifest; its key builds on the parent's key", async () => {
  const f = fixture();
  await storeParent(f, "base", { arch: "arm64" });
  const file = spec(f, [CHILD]);
  const loaded = await loadImageSpecs(file, f.opts);
  assert.deepEqual(loaded.images.map((i) => i.name), ["base", "kernel-on-base"], "the stored parent comes first");
  const base = byName(loaded.images, "base");
  assert.deepEqual(base.stored, { key: KEY, manifest: manifestPath(f, "base") });
  assert.equal(base.source.file, manifestPath(f, "base"));
  const child = byName(loaded.images, "kernel-on-base");
  assert.equal(child.parent, "base");
  assert.equal(child.suite, "trixie");
  assert.equal(child.mirror, PARENT_MIRROR, "the parent's mirror, not the default one");
  assert.equal(child.sizeBytes, 6 * 1024 ** 3, "the parent's disk size");
  assert.equal(child.arch, "arm64");
  assert.equal(child.flatten, false);

  const chain = resolveBuildOrder(loaded, "kernel-on-base");
  assert.deepEqual(chain.map((i) => i.name), ["base", "kernel-on-base"]);
  const keys = await cacheKeysFor(chain, { agentVersion: "1" });
  assert.equal(keys.get("base"), KEY, "the stored key, not one computed from a spec");
  assert.equal(keys.get("kernel-on-base"), await cacheKeyFor(child, { parentKey: KEY, agentVersion: "1" }));

  // The parent rebuilt (another key): the child's key changes with it.
  await storeParent(f, "base", { arch: "arm64", key: "b".repeat(64) });
  const again = resolveBuildOrder(await loadImageSpecs(file, f.opts), "kernel-on-base");
  const keys2 = await cacheKeysFor(again, { agentVersion: "1" });
  assert.equal(keys2.get("base"), "b".repeat(64));
  assert.notEqual(keys2.get("kernel-on-base"), keys.get("kernel-on-base"));
});

test("a parent in the file or among the built-in images wins over a stored one of the same name", async () => {
  const f = fixture();
  await storeParent(f, "base");
  const loaded = await loadImageSpecs(spec(f, [{ name: "base" }, CHILD]), f.opts);
  assert.equal(byName(loaded.images, "base").stored, undefined);
  assert.equal(byName(loaded.images, "kernel-on-base").mirror, MIRROR);
  await storeParent(f, "civm-runner");
  const runner = await loadImageSpecs(spec(f, [{ name: "mine", parent: "civm-runner" }]), f.opts);
  assert.equal(byName(runner.images, "civm-runner").source.builtin, true);
  assert.equal(byName(runner.images, "civm-runner").stored, undefined);
});

test("a child smaller than its stored parent is refused like any child", async () => {
  const f = fixture();
  await storeParent(f, "base");
  const msg = await configError(spec(f, [{ ...CHILD, size: "4G" }]), f.opts);
  assert.match(msg, /image "kernel-on-base" \(#1\): field "size": 4G is smaller than its parent "base" \(6G\)/);
});

test("a stored parent whose manifest predates suite and mirror: one paragraph naming the file, the entry, the field and the fix", async () => {
  const f = fixture();
  await storeParent(f, "base");
  const m = JSON.parse(readFileSync(manifestPath(f, "base"), "utf8")) as Record<string, unknown>;
  delete m.suite;
  delete m.mirror;
  writeFileSync(manifestPath(f, "base"), JSON.stringify(m));
  const file = spec(f, [CHILD]);
  const msg = await configError(file, f.opts);
  assert.equal(msg.split("\n").length, 1, msg);
  assert.ok(msg.startsWith(`${file}: image "kernel-on-base" (#1): field "parent": the stored image "base" cannot be a parent yet: its manifest ${manifestPath(f, "base")} does not record "suite" and "mirror"`), msg);
  assert.match(msg, /build the parent first with `civm image build base -f FILE` \(FILE: the spec file it is defined in\)/);
  assert.match(msg, /an image that is up to date is not rebuilt: its manifest gets the missing fields/);
});

test("a damaged stored parent (bad JSON, its disk gone, no manifest) is named with what is wrong and the fix", async () => {
  const f = fixture();
  await storeParent(f, "base");
  const file = spec(f, [CHILD]);
  writeFileSync(manifestPath(f, "base"), "{ not json");
  let msg = await configError(file, f.opts);
  assert.match(msg, new RegExp(`^${escape(file)}: image "kernel-on-base" \\(#1\\): field "parent": the stored image "base" cannot be a parent: ${escape(manifestPath(f, "base"))} is not valid JSON`));
  assert.match(msg, /build the parent first with `civm image build base -f FILE`/);

  await storeParent(f, "base");
  rmSync(join(f.store.pathOf("base"), "disk.qcow2"));
  msg = await configError(file, f.opts);
  assert.match(msg, /field "parent": the stored image "base" cannot be a parent: its disk .*disk\.qcow2 is missing; build the parent first/);

  rmSync(manifestPath(f, "base"));
  msg = await configError(file, f.opts);
  assert.match(msg, /field "parent": the stored image "base" cannot be a parent: .*base has no manifest\.json/);
});

test("a pulled image, or one without a kernel and initrd, cannot be a parent", async () => {
  const f = fixture();
  const p = await f.store.begin("base");
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", join(p.dir, "disk.qcow2"), "64M"]);
  await p.commit({ name: "base", key: `sha256:${KEY}`, format: "qcow2", disk: "disk.qcow2", packages: {}, buildSeconds: 1, createdAt: new Date().toISOString(), source: "pull" });
  const file = spec(f, [CHILD]);
  assert.match(await configError(file, f.opts), /field "parent": the stored image "base" was pulled \(civm image pull\), not built by civm/);
  await storeParent(f, "base", { kernel: undefined, initrd: undefined });
  assert.match(await configError(file, f.opts), /field "parent": the stored image "base" has no kernel and initrd beside its disk/);
});

test("a parent that is nowhere: the file, the built-in images and the stored images are named", async () => {
  const f = fixture();
  await storeParent(f, "other");
  const file = spec(f, [{ name: "child", parent: "nowhere-at-all" }]);
  const msg = await configError(file, f.opts);
  assert.match(msg, new RegExp(`field "parent": no image named "nowhere-at-all" in ${escape(file)}, among the built-in images \\([^)]*civm-runner[^)]*\\) or among the images stored in ${escape(f.store.dir)} \\(other\\)`));
  assert.match(msg, /; define it in the file, build it first from the file that defines it \(civm image build nowhere-at-all -f FILE\) or remove "parent"/);
  // A close stored name is suggested.
  assert.match(await configError(spec(f, [{ name: "child", parent: "othr" }]), f.opts), /no image named "othr" .*; did you mean "other"\?/);
  // An empty store says so.
  const empty = fixture();
  assert.match(await configError(spec(empty, [{ name: "child", parent: "base" }]), { ...empty.opts, builtins: false }), new RegExp(`no image named "base" in .* or among the images stored in ${escape(empty.store.dir)} \\(none\\)`));
});

const silent = { log: () => {}, accel: "tcg" as const };

test("building the child's chain uses the stored parent as it is; --force on it is refused", async () => {
  const f = fixture();
  await storeParent(f, "base");
  const loaded = await loadImageSpecs(spec(f, [CHILD]), f.opts);
  const events: BuildEvent[] = [];
  // The stored parent alone: "cached", never built, nothing written.
  const before = readFileSync(manifestPath(f, "base"), "utf8");
  const out = await buildImage({ name: "base", specs: loaded, store: f.store, paths: { stateDir: f.stateDir, logsDir: f.dir }, ...silent, onEvent: (e) => events.push(e) });
  assert.deepEqual(out.map((o) => [o.image, o.status, o.key]), [["base", "cached", KEY]]);
  assert.match(events[0]?.message ?? "", /base is a stored image, used as it is \(key aaaaaaaaaaaa\)/);
  assert.equal(readFileSync(manifestPath(f, "base"), "utf8"), before);
  await assert.rejects(
    buildImage({ name: "base", specs: loaded, store: f.store, paths: { stateDir: f.stateDir, logsDir: f.dir }, ...silent, force: true }),
    (e: unknown) => e instanceof ConfigError && /base is a stored image that .*images\.yaml does not define, so it cannot be rebuilt from it; rebuild it from the spec file that defines it: civm image build base -f FILE --force/.test(e.message),
  );
  // The child up to date (its key on the parent's): nothing is built, the parent is not touched.
  const chain = resolveBuildOrder(loaded, "kernel-on-base");
  const childKey = (await cacheKeysFor(chain)).get("kernel-on-base") as string;
  const p = await f.store.begin("kernel-on-base");
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", join(f.store.pathOf("base"), "disk.qcow2"), join(p.dir, "disk.qcow2")]);
  await p.commit({ name: "kernel-on-base", key: childKey, format: "qcow2", disk: "disk.qcow2", parent: "base", parentKey: KEY, packages: {}, buildSeconds: 1, createdAt: new Date().toISOString(), source: "build", suite: "trixie", mirror: PARENT_MIRROR });
  const built = await buildImage({ name: "kernel-on-base", specs: loaded, store: f.store, paths: { stateDir: f.stateDir, logsDir: f.dir }, ...silent });
  assert.deepEqual(built.map((o) => [o.image, o.status]), [["base", "cached"], ["kernel-on-base", "cached"]]);
  // The parent replaced after the spec was loaded: its key in the child's is stale, so the build stops.
  await storeParent(f, "base", { key: "c".repeat(64) });
  await assert.rejects(
    buildImage({ name: "kernel-on-base", specs: loaded, store: f.store, paths: { stateDir: f.stateDir, logsDir: f.dir }, ...silent }),
    (e: unknown) => e instanceof ConfigError && /the stored image base was replaced since the spec was loaded .*; run the build again/.test(e.message),
  );
});

test("an up-to-date image whose manifest predates suite and mirror gets them; one with another key is left alone", async () => {
  const f = fixture();
  const file = spec(f, [{ name: "base", suite: "bookworm" }]);
  const loaded = await loadImageSpecs(file, f.opts);
  const key = (await cacheKeysFor(resolveBuildOrder(loaded, "base"))).get("base") as string;
  await storeParent(f, "base", { key, suite: undefined, mirror: undefined });
  assert.equal(await f.store.addSpecFields("base", "d".repeat(64), { suite: "x", mirror: "y" }), false, "another key: not this build's image");
  const out = await buildImage({ name: "base", specs: loaded, store: f.store, paths: { stateDir: f.stateDir, logsDir: f.dir }, ...silent });
  assert.equal(out[0]?.status, "cached");
  assert.equal(out[0]?.stored.manifest.suite, "bookworm");
  const m = JSON.parse(readFileSync(manifestPath(f, "base"), "utf8")) as Record<string, unknown>;
  assert.equal(m.suite, "bookworm");
  assert.equal(m.mirror, MIRROR);
  assert.equal(m.key, key);
  // Recorded fields are never changed.
  assert.equal(await f.store.addSpecFields("base", key, { suite: "trixie", mirror: PARENT_MIRROR }), false);
  assert.equal((JSON.parse(readFileSync(manifestPath(f, "base"), "utf8")) as Record<string, unknown>).suite, "bookworm");
  // Now a spec in another file can build on it.
  const child = await loadImageSpecs(spec(f, [CHILD]), f.opts);
  assert.equal(byName(child.images, "kernel-on-base").suite, "bookworm");
});

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
