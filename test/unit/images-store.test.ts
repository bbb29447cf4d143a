// The image store with real qcow2 files (qemu-img create): commit and replace, what counts as
// an image, require()'s message, remove() and backing chains, sweepStale, interrupted commits.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ConfigError, CivmError } from "../../src/errors/index.js";
import {
  ImageStore,
  commitHooks,
  formatImageTable,
  sweepStale,
  type ManifestInput,
  type StoredImage,
} from "../../src/images/store.js";
import { repoRoot, tempDir } from "../support/paths.js";

const MiB = 1024 * 1024;

function newStore(): ImageStore {
  return new ImageStore(join(tempDir("civm-store-"), "state"));
}

function qcow2(path: string, size = "16M", backing?: string): void {
  const args = ["create", "-q", "-f", "qcow2", ...(backing ? ["-F", "qcow2", "-b", backing] : []), path, ...(backing ? [] : [size])];
  execFileSync("qemu-img", args);
}

function sha256(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

function manifest(name: string, over: Partial<ManifestInput> = {}): ManifestInput {
  return {
    name,
    key: "k".repeat(64),
    format: "qcow2",
    disk: "disk.qcow2",
    packages: { bash: "5.2.15-2+b7" },
    buildSeconds: 1.5,
    createdAt: new Date().toISOString(),
    source: "build",
    ...over,
  };
}

/** begin + a 16M qcow2 (+ kernel/initrd) + commit. */
async function storeImage(store: ImageStore, name: string, over: Partial<ManifestInput> = {}, size = "16M"): Promise<StoredImage> {
  const p = await store.begin(name);
  qcow2(join(p.dir, "disk.qcow2"), size);
  return p.commit(manifest(name, over));
}

function entries(store: ImageStore): string[] {
  return existsSync(store.dir) ? readdirSync(store.dir).sort() : [];
}

async function deadPid(): Promise<number> {
  const r = spawnSync("true");
  assert.equal(r.status, 0);
  assert.ok(r.pid);
  return r.pid;
}

test("begin → commit stores the disk with a manifest (sha256, sizes) under <state>/images/<name>", async () => {
  const store = newStore();
  const p = await store.begin("base");
  assert.match(p.dir, /[/]images[/]\.tmp-base-[0-9a-f]+$/);
  assert.equal(statSync(p.dir).mode & 0o777, 0o755);
  assert.equal(JSON.parse(readFileSync(join(p.dir, ".owner"), "utf8")).pid, process.pid);
  qcow2(join(p.dir, "disk.qcow2"), "16M");
  writeFileSync(join(p.dir, "vmlinuz"), "kernel");
  writeFileSync(join(p.dir, "initrd.img"), "initrd");
  const expectedSha = sha256(join(p.dir, "disk.qcow2"));
  const expectedBytes = statSync(join(p.dir, "disk.qcow2")).size;

  const img = await p.commit(manifest("base", { kernel: "vmlinuz", initrd: "initrd.img" }));
  assert.equal(img.dir, join(store.dir, "base"));
  assert.equal(img.diskPath, join(store.dir, "base", "disk.qcow2"));
  assert.equal(img.kernelPath, join(store.dir, "base", "vmlinuz"));
  assert.equal(img.initrdPath, join(store.dir, "base", "initrd.img"));
  assert.equal(img.manifest.sha256, expectedSha);
  assert.equal(img.manifest.diskBytes, expectedBytes);
  assert.equal(img.manifest.virtualSize, 16 * MiB);
  assert.equal(img.manifest.backing, undefined);
  assert.deepEqual(img.manifest.packages, { bash: "5.2.15-2+b7" });
  assert.equal(existsSync(p.dir), false, "the .tmp- folder became the image");
  assert.equal(existsSync(join(img.dir, ".owner")), false);
  assert.deepEqual(entries(store), ["base"]);

  const onDisk = JSON.parse(readFileSync(join(img.dir, "manifest.json"), "utf8"));
  assert.deepEqual(onDisk, img.manifest);
  assert.deepEqual(await store.get("base"), img);
  assert.deepEqual((await store.list()).map((i) => i.name), ["base"]);
});

test("commit over an existing image replaces it atomically and leaves no .old-/.tmp- folder", async () => {
  const store = newStore();
  const first = await storeImage(store, "img", { key: "a".repeat(64) }, "16M");
  const second = await storeImage(store, "img", { key: "b".repeat(64) }, "32M");
  assert.equal(second.dir, first.dir, "the path of a committed image is stable");
  const got = await store.get("img");
  assert.equal(got?.manifest.key, "b".repeat(64));
  assert.equal(got?.manifest.virtualSize, 32 * MiB);
  assert.equal(got?.manifest.sha256, sha256(got!.diskPath));
  assert.deepEqual(entries(store), ["img"]);
});

test("a failed commit leaves the previous image untouched and removes the pending folder", async () => {
  const store = newStore();
  await storeImage(store, "img", { key: "a".repeat(64) });
  const p = await store.begin("img");
  qcow2(join(p.dir, "disk.qcow2"), "32M");
  commitHooks.beforeManifest = () => {
    throw new Error("boom");
  };
  try {
    await assert.rejects(p.commit(manifest("img", { key: "b".repeat(64) })), /boom/);
  } finally {
    delete commitHooks.beforeManifest;
  }
  assert.equal((await store.get("img"))?.manifest.key, "a".repeat(64));
  assert.deepEqual(entries(store), ["img"]);
  // A disk the manifest names but that was never written: refused, nothing left.
  const q = await store.begin("other");
  await assert.rejects(q.commit(manifest("other")), /disk\.qcow2 is missing/);
  assert.deepEqual(entries(store), ["img"]);
});

test("list() and get() see only <name> folders with a manifest and its disk, never .tmp-/.old- folders", async () => {
  const store = newStore();
  const good = await storeImage(store, "good");
  const goodManifest = readFileSync(join(good.dir, "manifest.json"), "utf8");
  // Complete-looking copies under temporary names.
  for (const d of [".tmp-good-1234abcd", ".old-good-1234abcd", ".tmp-x-00000000"]) {
    mkdirSync(join(store.dir, d));
    qcow2(join(store.dir, d, "disk.qcow2"));
    writeFileSync(join(store.dir, d, "manifest.json"), goodManifest.replace('"good"', JSON.stringify(d)));
  }
  mkdirSync(join(store.dir, "nomanifest"));
  qcow2(join(store.dir, "nomanifest", "disk.qcow2"));
  mkdirSync(join(store.dir, "nodisk"));
  writeFileSync(join(store.dir, "nodisk", "manifest.json"), goodManifest.replace('"good"', '"nodisk"'));
  mkdirSync(join(store.dir, "garbage"));
  qcow2(join(store.dir, "garbage", "disk.qcow2"));
  writeFileSync(join(store.dir, "garbage", "manifest.json"), "{ not json");
  // A folder renamed by hand: its manifest names another image.
  mkdirSync(join(store.dir, "renamed"));
  qcow2(join(store.dir, "renamed", "disk.qcow2"));
  writeFileSync(join(store.dir, "renamed", "manifest.json"), goodManifest);
  mkdirSync(join(store.dir, "Upper"));
  writeFileSync(join(store.dir, "Upper", "manifest.json"), goodManifest.replace('"good"', '"Upper"'));

  assert.deepEqual((await store.list()).map((i) => i.name), ["good"]);
  for (const n of [".tmp-good-1234abcd", ".old-good-1234abcd", "nomanifest", "nodisk", "garbage", "renamed", "Upper", "../state"]) {
    assert.equal(await store.get(n), undefined, n);
  }
  assert.ok(await store.get("good"));
  assert.deepEqual(await new ImageStore(tempDir()).list(), [], "no images folder yet");
});

test("require() names the stored images, suggests a close one and how to build it", async () => {
  const store = newStore();
  await storeImage(store, "civm-runner");
  await storeImage(store, "debian-12");
  const err = await store.require("civm-runer").then(
    () => assert.fail("resolved"),
    (e: unknown) => e,
  );
  assert.ok(err instanceof ConfigError);
  const msg = (err as Error).message;
  assert.match(msg, /no stored image named civm-runer/);
  assert.match(msg, /did you mean "civm-runner"/);
  assert.match(msg, /stored images: civm-runner, debian-12/);
  assert.match(msg, /civm image ls lists them/);
  assert.match(msg, /build it with civm image build civm-runer/);
  assert.equal((await store.require("debian-12")).name, "debian-12");

  const empty = newStore();
  await assert.rejects(empty.require("x"), (e: unknown) => e instanceof ConfigError && /no images are stored/.test((e as Error).message));
  await assert.rejects(store.require("Bad Name"), (e: unknown) => e instanceof ConfigError && /not valid/.test((e as Error).message));
  await assert.rejects(store.begin("-x"), ConfigError);
});

test("remove() deletes an image, refuses an absent one and a parent with a backing-chain child", async () => {
  const store = newStore();
  const parent = await storeImage(store, "base");
  // A child as the builder makes it: a qcow2 overlay on the parent's committed path.
  const p = await store.begin("child");
  qcow2(join(p.dir, "disk.qcow2"), undefined, parent.diskPath);
  const child = await p.commit(manifest("child", { parent: "base", parentKey: parent.manifest.key }));
  assert.equal(child.manifest.backing, parent.diskPath);
  // A flattened child names the parent but does not use a chain: no obstacle.
  await storeImage(store, "flat", { parent: "base" });

  assert.deepEqual((await store.dependents("base")).map((i) => i.name), ["child"]);
  await assert.rejects(store.remove("base"), (e: unknown) => {
    assert.ok(e instanceof ConfigError);
    assert.match((e as Error).message, /image base is the base of child/);
    assert.match((e as Error).message, /civm image rm child/);
    assert.doesNotMatch((e as Error).message, /flat/);
    return true;
  });
  assert.ok(await store.get("base"), "refused: still stored");

  await assert.rejects(store.remove("nope"), (e: unknown) => e instanceof ConfigError && /no stored image named nope/.test((e as Error).message));
  await store.remove("child");
  await store.remove("base");
  assert.deepEqual(entries(store), ["flat"]);
  assert.equal(await store.get("base"), undefined);
});

test("commit refuses a disk backed by a .tmp- path (children must reference the committed path)", async () => {
  const store = newStore();
  const parentPending = await store.begin("base");
  qcow2(join(parentPending.dir, "disk.qcow2"));
  const p = await store.begin("child");
  qcow2(join(p.dir, "disk.qcow2"), undefined, join(parentPending.dir, "disk.qcow2"));
  await assert.rejects(p.commit(manifest("child", { parent: "base" })), (e: unknown) => e instanceof CivmError && /temporary/.test((e as Error).message));
  assert.equal(existsSync(p.dir), false);
  await parentPending.abort();
  assert.deepEqual(entries(store), []);
});

test("a commit killed before manifest.json is written leaves no image; sweepStale removes its folder", async () => {
  const store = newStore();
  const storeJs = join(repoRoot, "dist", "src", "images", "store.js");
  const script = `
    import { ImageStore, commitHooks } from ${JSON.stringify(storeJs)};
    import { execFileSync } from "node:child_process";
    const store = new ImageStore(process.argv[1]);
    const p = await store.begin("crash");
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", p.dir + "/disk.qcow2", "16M"]);
    commitHooks.beforeManifest = () => process.kill(process.pid, "SIGKILL");
    await p.commit({ name: "crash", key: "x", format: "qcow2", disk: "disk.qcow2", packages: {}, buildSeconds: 0, createdAt: new Date().toISOString(), source: "build" });
  `;
  const r = spawnSync(process.execPath, ["--input-type=module", "-e", script, join(store.dir, "..")], { encoding: "utf8" });
  assert.equal(r.signal, "SIGKILL", r.stderr);
  const left = entries(store);
  assert.equal(left.length, 1);
  assert.match(left[0]!, /^\.tmp-crash-/);
  assert.ok(existsSync(join(store.dir, left[0]!, "disk.qcow2")), "the disk was written");
  assert.equal(existsSync(join(store.dir, left[0]!, "manifest.json")), false);
  assert.equal(await store.get("crash"), undefined);
  assert.deepEqual(await store.list(), []);
  await assert.rejects(store.require("crash"), ConfigError);

  const swept = await sweepStale(store);
  assert.deepEqual(swept.removed, [left[0]]);
  assert.deepEqual(entries(store), []);
});

test("sweepStale: removes folders of dead owners and old unowned ones, keeps live and fresh ones, restores a half-swapped image", async () => {
  const store = newStore();
  const kept = await storeImage(store, "kept");
  const mine = await store.begin("building"); // this process: alive
  const dead = await deadPid();
  const mk = (name: string, owner?: string, ageMs = 0): string => {
    const dir = join(store.dir, name);
    mkdirSync(dir);
    writeFileSync(join(dir, "disk.qcow2"), "x");
    if (owner !== undefined) writeFileSync(join(dir, ".owner"), owner);
    if (ageMs) {
      const t = new Date(Date.now() - ageMs);
      for (const p of owner !== undefined ? [join(dir, ".owner"), dir] : [dir]) utimesSync(p, t, t);
    }
    return dir;
  };
  mk(".tmp-deadowner-00000001", JSON.stringify({ pid: dead }));
  mk(".tmp-deadbare-00000002", `${dead}\n`);
  mk(".tmp-oldunowned-00000003", undefined, 2 * 3600_000);
  mk(".tmp-freshunowned-00000004");
  mk(".old-gone-00000005", JSON.stringify({ pid: dead }));
  // This process under another start time: the pid was reused, so the owner is dead.
  mk(".tmp-reused-00000006", JSON.stringify({ pid: process.pid, start: "1" }));
  // A live owner whose start time cannot be checked is trusted for an hour only.
  mk(".tmp-liveold-00000007", JSON.stringify({ pid: process.pid }), 2 * 3600_000);
  mk(".tmp-livefresh-00000008", JSON.stringify({ pid: process.pid }));
  // A replace that died between its renames: the old image is aside and <name> is missing.
  const half = mk(".old-halfswap-00000009", JSON.stringify({ pid: dead }));
  writeFileSync(join(half, "manifest.json"), readFileSync(join(kept.dir, "manifest.json"), "utf8").replace('"kept"', '"halfswap"'));
  writeFileSync(join(half, "disk.qcow2"), readFileSync(kept.diskPath));
  // Not ours to touch.
  mkdirSync(join(store.dir, "nomanifest"));

  const r = await sweepStale(store);
  assert.deepEqual(r.removed.sort(), [
    ".old-gone-00000005",
    ".tmp-deadbare-00000002",
    ".tmp-deadowner-00000001",
    ".tmp-liveold-00000007",
    ".tmp-oldunowned-00000003",
    ".tmp-reused-00000006",
  ]);
  assert.deepEqual(r.restored, ["halfswap"]);
  const after = entries(store);
  assert.deepEqual(after, [".tmp-freshunowned-00000004", ".tmp-livefresh-00000008", mine.dir.split("/").pop()!, "halfswap", "kept", "nomanifest"].sort());
  assert.deepEqual((await store.list()).map((i) => i.name), ["halfswap", "kept"]);
  assert.equal(existsSync(join(store.dir, "halfswap", ".owner")), false);
  // Still usable: the live pending image commits.
  qcow2(join(mine.dir, "disk.qcow2"));
  await mine.commit(manifest("building"));
  assert.ok(await store.get("building"));
  // maxAgeMs applies to the unowned fresh one.
  const r2 = await sweepStale(store, { maxAgeMs: 0, now: Date.now() + 1000 });
  assert.ok(r2.removed.includes(".tmp-freshunowned-00000004"));
  assert.ok(r2.removed.includes(".tmp-livefresh-00000008"));
});

test("formatImageTable: NAME KEY(12) FORMAT SIZE VIRTUAL AGE", async () => {
  const now = Date.parse("2025-01-02T00:00:00Z");
  const img = (name: string, key: string, diskBytes: number, virtualSize: number, createdAt: string): StoredImage => ({
    name,
    dir: `/s/${name}`,
    diskPath: `/s/${name}/disk.qcow2`,
    manifest: { name, key, format: "qcow2", disk: "disk.qcow2", sha256: "0".repeat(64), diskBytes, virtualSize, packages: {}, buildSeconds: 1, createdAt, source: "build" },
  });
  const out = formatImageTable(
    [
      img("civm-runner", "0123456789abcdef0123", 734 * MiB, 4 * 1024 * MiB, "2025-01-01T21:00:00Z"),
      img("pulled", "sha256:fedcba9876543210", 1536 * MiB, 10 * 1024 * MiB, "2024-12-30T00:00:00Z"),
    ],
    now,
  );
  const lines = out.trimEnd().split("\n").map((l) => l.split(/\s+/));
  assert.deepEqual(lines, [
    ["NAME", "KEY", "FORMAT", "SIZE", "VIRTUAL", "AGE"],
    ["civm-runner", "0123456789ab", "qcow2", "734M", "4G", "3h"],
    ["pulled", "fedcba987654", "qcow2", "1.5G", "10G", "3d"],
  ]);
  assert.equal(formatImageTable([], now).trim(), "NAME  KEY  FORMAT  SIZE  VIRTUAL  AGE");
});
