// OCI images end to end against a local registry (Debian's docker-registry on a loopback
// port, started here) behind a recording proxy: little-vm-helper's layout (an index over
// linux/amd64 and linux/arm64 with attestation manifests, busybox layer, a layer of
// data/images/*.qcow2.zst), zstd layers, artifacts, whiteouts; digest mismatches of a blob
// and of a manifest tampered in the registry's storage are refused with nothing stored;
// token auth (WWW-Authenticate Bearer, a fake token server, credentials from a file);
// push then pull round trip of the tiny guest, booted once on QEMU from its reference; a
// pool's image by reference under each imagePullPolicy.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { civmEnv, runCivm, startCivm, waitFor, type CivmEnv } from "../support/civm-cli.js";
import { OCI, pushImage, pushManifest, startProxy, startRegistry, tamper, type LocalRegistry, type RegistryProxy } from "../support/oci-registry.js";
import { civmBin, tempDir } from "../support/paths.js";
import { buildTinyGuest } from "../support/tiny-guest.js";
import { ImageStore } from "../../src/images/store.js";
import { VmRunLauncher } from "../../src/pool/launcher.js";
import type { PoolSpec } from "../../src/pool/types.js";
import { DEFAULT_NETWORK } from "../../src/net/policy.js";
import { resolvePaths } from "../../src/host/paths.js";

let reg: LocalRegistry;
let proxy: RegistryProxy;
let work: string;
const disks: Record<string, { path: string; sha: string }> = {};
let lvhIndex: string;
let lvhAmd64: string;

function sha(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

/** A 16 MiB qcow2 holding data (pattern), and its .zst beside it. */
function makeDisk(dir: string, name: string, pattern: string): void {
  mkdirSync(dir, { recursive: true });
  const f = join(dir, `${name}.qcow2`);
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", f, "16M"]);
  execFileSync("qemu-io", ["-f", "qcow2", "-c", `write -P ${pattern} 0 512k`, "-c", `write -P ${pattern} 4M 64k`, f], { stdio: "ignore" });
  disks[name] = { path: f, sha: sha(f) };
  execFileSync("zstd", ["-q", "-k", f, "-o", `${f}.zst`]);
}

/** GNU tar of `paths` under `root` (an implementation independent of civm's reader). */
function tarOf(root: string, paths: string[]): Buffer {
  return execFileSync("tar", ["-C", root, "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "-cf", "-", ...paths], { maxBuffer: 256 << 20 });
}

function zstd(b: Buffer): Buffer {
  return execFileSync("zstd", ["-q", "-c"], { input: b, maxBuffer: 256 << 20 });
}

function stored(e: CivmEnv): { name: string; sha256: string; diskPath: string; oci?: Record<string, string>; kernel?: string }[] {
  const r = execFileSync(process.execPath, [civmBin, "image", "ls", "--json"], { env: e.env });
  return JSON.parse(r.toString());
}

/** Nothing in the store: no image, no pending folder, no refs. */
function assertNothingStored(e: CivmEnv, why: string): void {
  const images = join(e.stateDir, "images");
  assert.deepEqual(existsSync(images) ? readdirSync(images) : [], [], `${why}: the images dir holds something`);
  assert.equal(existsSync(join(e.stateDir, "oci", "refs.json")), false, `${why}: refs.json written`);
}

const blobGets = (from: number) => proxy.requests.slice(from).filter((r) => r.method === "GET" && r.path.includes("/blobs/")).length;

before(async () => {
  reg = await startRegistry();
  proxy = await startProxy(reg);
  work = tempDir("civm-oci-fixtures-");
  // lvh's root-images: busybox, then data/images/{base,kind}.qcow2.zst; arm64 has its own disk.
  makeDisk(join(work, "lvh", "data", "images"), "base", "0x11");
  makeDisk(join(work, "lvh", "data", "images"), "kind", "0x22");
  makeDisk(join(work, "arm", "data", "images"), "armbase", "0x33");
  for (const d of ["lvh", "arm"]) for (const f of readdirSync(join(work, d, "data", "images"))) if (f.endsWith(".qcow2")) execFileSync("rm", [join(work, d, "data", "images", f)]);
  mkdirSync(join(work, "bb", "bin"), { recursive: true });
  writeFileSync(join(work, "bb", "bin", "busybox"), "not really busybox\n");
  const busybox = { mediaType: OCI.layerGzip, data: gzipSync(tarOf(join(work, "bb"), ["bin"])) };
  const repo = "lvh-images/root-images";
  const amd64 = await pushImage(reg.url, repo, "amd64-only", { layers: [busybox, { mediaType: OCI.layerGzip, data: gzipSync(tarOf(join(work, "lvh"), ["data"])) }] });
  const arm64 = await pushImage(reg.url, repo, "arm64-only", { arch: "arm64", layers: [busybox, { mediaType: OCI.layerGzip, data: gzipSync(tarOf(join(work, "arm"), ["data"])) }] });
  const attest = await pushImage(reg.url, repo, "attestation", { config: { mediaType: OCI.empty, data: Buffer.from("{}") }, layers: [{ mediaType: "application/vnd.in-toto+json", data: Buffer.from("{}") }] });
  const index = JSON.stringify({
    schemaVersion: 2,
    mediaType: OCI.index,
    manifests: [
      { mediaType: OCI.manifest, digest: amd64.digest, size: amd64.size, platform: { architecture: "amd64", os: "linux" } },
      { mediaType: OCI.manifest, digest: arm64.digest, size: arm64.size, platform: { architecture: "arm64", os: "linux" } },
      { mediaType: OCI.manifest, digest: attest.digest, size: attest.size, platform: { architecture: "unknown", os: "unknown" }, annotations: { "vnd.docker.reference.digest": amd64.digest, "vnd.docker.reference.type": "attestation-manifest" } },
    ],
  });
  lvhIndex = (await pushManifest(reg.url, repo, "main", OCI.index, index)).digest;
  lvhAmd64 = amd64.digest;

  makeDisk(join(work, "z", "data", "images"), "plain", "0x55");
  execFileSync("rm", [join(work, "z", "data", "images", "plain.qcow2.zst")]);
  await pushImage(reg.url, "civm/zstd", "v1", { layers: [{ mediaType: OCI.layerZstd, data: zstd(tarOf(join(work, "z"), ["data"])) }] });
  makeDisk(join(work, "a"), "artifact", "0x66");
  await pushImage(reg.url, "civm/artifact", "v1", {
    artifactType: "application/vnd.civm.test.disk",
    config: { mediaType: OCI.empty, data: Buffer.from("{}") },
    layers: [{ mediaType: OCI.layer, data: readFileSync(join(work, "a", "artifact.qcow2.zst")), annotations: { "org.opencontainers.image.title": "artifact.qcow2.zst" } }],
  });
});

after(async () => {
  await proxy?.close();
  await reg?.close();
});

test("lvh's layout: index → linux/amd64 → layers → data/images/base.qcow2.zst (the first, as lvh); cached by digest; --file, --platform, wrong platform; --image REF from the store", async () => {
  const e = civmEnv();
  const ref = `${proxy.host}/lvh-images/root-images:main`;
  const r = await runCivm(["image", "pull", ref, "--json"], e);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /holds 2 disks; took base\.qcow2\.zst \(the first, as lvh does\); others: kind\.qcow2\.zst/);
  assert.match(r.stderr, /layer 2\/2: /, "download progress");
  const out = JSON.parse(r.stdout);
  assert.equal(out.name, "root-images-main");
  assert.equal(out.digest, lvhAmd64);
  assert.equal(out.status, "pulled");
  assert.equal(out.sha256, disks.base!.sha, "the disk is base.qcow2, decompressed");
  const img = stored(e).find((i) => i.name === "root-images-main")!;
  assert.deepEqual(
    { digest: img.oci!.digest, index: img.oci!.index, platform: img.oci!.platform, file: img.oci!.file, layout: img.oci!.layout },
    { digest: lvhAmd64, index: lvhIndex, platform: "linux/amd64", file: "base.qcow2.zst", layout: "layer" },
  );

  // Same digest again: nothing downloaded.
  let mark = proxy.requests.length;
  const again = await runCivm(["image", "pull", ref], e);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stderr, /up to date: root-images-main/);
  assert.equal(blobGets(mark), 0, "a stored digest downloads no blob");

  // --image REF: from the store (refs.json), no request at all.
  mark = proxy.requests.length;
  const dev = await runCivm(["run", "--image", ref, "--print-cmd"], e);
  assert.equal(dev.code, 0, dev.stderr);
  assert.match(dev.stdout, /^qemu-system-x86_64 .*-drive file=/);
  assert.doesNotMatch(dev.stderr, /pulling/);
  assert.equal(proxy.requests.length - mark, 0, "a pulled tag resolves without the registry");

  const kind = await runCivm(["image", "pull", ref, "--file", "kind", "--name", "kind", "--json"], e);
  assert.equal(kind.code, 0, kind.stderr);
  assert.equal(JSON.parse(kind.stdout).sha256, disks.kind!.sha);
  const arm = await runCivm(["image", "pull", ref, "--platform", "linux/arm64", "--name", "arm", "--json"], e);
  assert.equal(arm.code, 0, arm.stderr);
  assert.equal(JSON.parse(arm.stdout).sha256, disks.armbase!.sha);

  const none = await runCivm(["image", "pull", ref, "--platform", "linux/s390x"], e);
  assert.equal(none.code, 2, none.stderr);
  assert.match(none.stderr, /has no image for linux\/s390x \(it has linux\/amd64, linux\/arm64\)/);
  const single = await runCivm(["image", "pull", `${proxy.host}/lvh-images/root-images:arm64-only`], e);
  assert.equal(single.code, 2, single.stderr);
  assert.match(single.stderr, /is a linux\/arm64 image, not linux\/amd64; pass --platform linux\/arm64/);
  const missing = await runCivm(["image", "pull", ref, "--file", "nope"], e);
  assert.equal(missing.code, 2, missing.stderr);
  assert.match(missing.stderr, /holds no disk named nope \(it has base\.qcow2\.zst, kind\.qcow2\.zst\)/);

  // By digest: the index's digest, and a digest the registry does not have.
  const byDigest = await runCivm(["image", "pull", `${proxy.host}/lvh-images/root-images@${lvhIndex}`, "--json"], e);
  assert.equal(byDigest.code, 0, byDigest.stderr);
  assert.equal(JSON.parse(byDigest.stdout).status, "up-to-date");
  const unknown = await runCivm(["image", "pull", `${proxy.host}/lvh-images/root-images@sha256:${"0".repeat(64)}`], e);
  assert.equal(unknown.code, 2, unknown.stderr);
  assert.match(unknown.stderr, /HTTP 404.*MANIFEST_UNKNOWN.*check the repository and tag/);
  const names = stored(e).map((i) => i.name).sort();
  assert.deepEqual(names, ["arm", "kind", "root-images-main"]);
});

test("zstd layers, artifacts (a blob titled *.qcow2.zst) and whiteouts", async () => {
  const e = civmEnv();
  // tar+zstd layer holding an uncompressed qcow2 (pushed in before()).
  const z = await runCivm(["image", "pull", `${proxy.host}/civm/zstd:v1`, "--json"], e);
  assert.equal(z.code, 0, z.stderr);
  assert.equal(JSON.parse(z.stdout).sha256, disks.plain!.sha);

  // ORAS-style artifact: the blob is the .qcow2.zst itself (pushed in before()).
  const a = await runCivm(["image", "pull", `${proxy.host}/civm/artifact:v1`, "--json"], e);
  assert.equal(a.code, 0, a.stderr);
  assert.equal(JSON.parse(a.stdout).sha256, disks.artifact!.sha);
  assert.equal(stored(e).find((i) => i.name === "artifact-v1")!.oci!.layout, "artifact");

  // A later layer whites out base.qcow2.zst: kind is the first disk left.
  const wh = join(work, "wh", "data", "images");
  mkdirSync(wh, { recursive: true });
  writeFileSync(join(wh, ".wh.base.qcow2.zst"), "");
  await pushImage(reg.url, "civm/whiteout", "v1", {
    layers: [
      { mediaType: OCI.layerGzip, data: gzipSync(tarOf(join(work, "lvh"), ["data"])) },
      { mediaType: OCI.layer, data: tarOf(join(work, "wh"), ["data"]) },
    ],
  });
  const w = await runCivm(["image", "pull", `${proxy.host}/civm/whiteout:v1`, "--json"], e);
  assert.equal(w.code, 0, w.stderr);
  assert.equal(JSON.parse(w.stdout).sha256, disks.kind!.sha);

  // No disk anywhere: said so.
  await pushImage(reg.url, "civm/nodisk", "v1", { layers: [{ mediaType: OCI.layerGzip, data: gzipSync(tarOf(join(work, "bb"), ["bin"])) }] });
  const n = await runCivm(["image", "pull", `${proxy.host}/civm/nodisk:v1`], e);
  assert.equal(n.code, 2, n.stderr);
  assert.match(n.stderr, /holds no disk image: civm looked in its 1 layer for data\/images\/NAME\.qcow2\[\.zst\]/);
});

test("digest mismatch: a tampered blob and a tampered manifest are refused, nothing is stored", async () => {
  const e = civmEnv();
  makeDisk(join(work, "t", "data", "images"), "tampered", "0x77");
  execFileSync("rm", [join(work, "t", "data", "images", "tampered.qcow2")]);
  const img = await pushImage(reg.url, "civm/tampered", "v1", { layers: [{ mediaType: OCI.layerGzip, data: gzipSync(tarOf(join(work, "t"), ["data"])) }] });
  const layer = (JSON.parse(img.manifest) as { layers: { digest: string; size: number }[] }).layers[0]!;
  tamper(reg.blobFile(layer.digest), Math.floor(layer.size / 2));
  const r = await runCivm(["image", "pull", `${proxy.host}/civm/tampered:v1`], e);
  assert.equal(r.code, 7, r.stderr);
  assert.match(r.stderr, new RegExp(`layer 1 of 1 .*: the registry sent content whose digest is sha256:[0-9a-f]{64}, not ${layer.digest} \\(the manifest's descriptor\\); refused, nothing was stored`));
  assertNothingStored(e, "tampered blob");

  // A manifest whose stored bytes changed (valid JSON still): by tag (Docker-Content-Digest) and by digest.
  const m = await pushImage(reg.url, "civm/tampered-manifest", "v1", { layers: [{ mediaType: OCI.layerGzip, data: gzipSync(tarOf(join(work, "lvh"), ["data"])) }], annotations: { note: "aaaa" } });
  const file = reg.blobFile(m.digest);
  writeFileSync(file, readFileSync(file, "utf8").replace('"note":"aaaa"', '"note":"bbbb"'));
  const byTag = await runCivm(["image", "pull", `${proxy.host}/civm/tampered-manifest:v1`], e);
  assert.equal(byTag.code, 7, byTag.stderr);
  assert.match(byTag.stderr, new RegExp(`manifest of .*: the registry sent content whose digest is sha256:[0-9a-f]{64}, not ${m.digest} \\(the registry's Docker-Content-Digest header\\); refused`));
  const byDigest = await runCivm(["image", "pull", `${proxy.host}/civm/tampered-manifest@${m.digest}`], e);
  assert.equal(byDigest.code, 7, byDigest.stderr);
  assert.match(byDigest.stderr, /\(the digest in the reference\); refused, nothing was stored/);
  assertNothingStored(e, "tampered manifest");
});

test("Ctrl-C during a pull: exit 5, the pending image removed, nothing stored", async (t) => {
  const slow = await startProxy(reg, { slowBlobs: true });
  t.after(() => slow.close());
  // 2 MiB that do not compress: 128 pieces of 16 KiB, 100 ms apart.
  const dir = join(work, "slow", "data", "images");
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(work, "slow", "random.raw"), randomBytes(2 << 20));
  execFileSync("qemu-img", ["convert", "-q", "-f", "raw", "-O", "qcow2", join(work, "slow", "random.raw"), join(dir, "slow.qcow2")]);
  await pushImage(reg.url, "civm/slow", "v1", { layers: [{ mediaType: OCI.layer, data: tarOf(join(work, "slow"), ["data"]) }] });
  const e = civmEnv();
  const p = startCivm(["image", "pull", `${slow.host}/civm/slow:v1`], e);
  await waitFor(() => /layer 1\/1: /.test(p.stderrSoFar()) || p.child.exitCode !== null, 60_000, "the download to start");
  p.child.kill("SIGINT");
  const r = await p.done;
  assert.equal(r.code, 5, r.stderr);
  assert.match(r.stderr, /SIGINT: the pull of .* was interrupted; nothing was stored/);
  assertNothingStored(e, "interrupted pull");
});

function poolSpec(ref: string, imagePullPolicy: PoolSpec["runner"]["imagePullPolicy"]): PoolSpec {
  return {
    name: "oci",
    index: 0,
    maxRunners: 1,
    minRunners: 0,
    runner: { namePrefix: "oci", image: { ref, kind: "oci" }, imagePullPolicy, target: { kind: "org", org: "o" }, labels: ["linux"], groupId: 1, registration: "jit", workFolder: "_work" },
    vm: { cpus: 1, ramBytes: 256 << 20, rootDiskBytes: undefined, timeoutSeconds: 60, cmdline: undefined, network: DEFAULT_NETWORK },
    idleTimeoutSeconds: 60,
  };
}

test("token auth: anonymous push refused with the fix named; credentials from --auth-file or CIVM_REGISTRY_AUTH_FILE; wrong ones refused; the password reaches only the token server", async (t) => {
  const password = "pa55-w0rd-4-civm-test";
  const auth = await startProxy(reg, { auth: { username: "robot", password, anonymousPull: false } });
  t.after(() => auth.close());
  const home = tempDir("civm-oci-home-"); // no ~/.docker/config.json to fall back on
  const e = civmEnv({ HOME: home, DOCKER_CONFIG: join(home, ".docker"), XDG_RUNTIME_DIR: "", REGISTRY_AUTH_FILE: "" });
  const pull = await runCivm(["image", "pull", `${proxy.host}/civm/zstd:v1`, "--name", "src"], e);
  assert.equal(pull.code, 0, pull.stderr);
  const ref = `${auth.host}/private/disk:v1`;

  const anon = await runCivm(["image", "push", "src", ref], e);
  assert.equal(anon.code, 2, anon.stderr);
  assert.match(anon.stderr, /denied anonymous push access to private\/disk \(HTTP 401\), and no credentials for it were found \(looked in .*\)\..*--auth-file FILE or set CIVM_REGISTRY_AUTH_FILE/);

  const file = join(e.root, "auth.json");
  writeFileSync(file, JSON.stringify({ auths: { [auth.host]: { auth: Buffer.from(`robot:${password}`).toString("base64") } } }), { mode: 0o600 });
  const pushed = await runCivm(["image", "push", "src", ref, "--auth-file", file, "--json"], e);
  assert.equal(pushed.code, 0, pushed.stderr);
  const digest = JSON.parse(pushed.stdout).digest as string;

  const anonPull = await runCivm(["image", "pull", ref], e);
  assert.equal(anonPull.code, 2, anonPull.stderr);
  assert.match(anonPull.stderr, /denied anonymous pull access to private\/disk/);
  const e2 = civmEnv({ HOME: home, CIVM_REGISTRY_AUTH_FILE: file });
  const pulled = await runCivm(["image", "pull", ref, "--json"], e2);
  assert.equal(pulled.code, 0, pulled.stderr);
  assert.equal(JSON.parse(pulled.stdout).digest, digest);
  assert.equal(JSON.parse(pulled.stdout).sha256, disks.plain!.sha);

  const wrong = join(e.root, "wrong.json");
  writeFileSync(wrong, JSON.stringify({ auths: { [`http://${auth.host}`]: { username: "robot", password: "not-it" } } }), { mode: 0o600 });
  const bad = await runCivm(["image", "pull", ref, "--auth-file", wrong], civmEnv({ HOME: home }));
  assert.equal(bad.code, 2, bad.stderr);
  assert.match(bad.stderr, /refused the credentials for .* from .*wrong\.json \(HTTP 401\)/);
  const absent = await runCivm(["image", "pull", ref, "--auth-file", join(e.root, "nope.json")], e);
  assert.equal(absent.code, 2);
  assert.match(absent.stderr, /the registry auth file .*nope\.json does not exist \(from --auth-file\)/);

  // Where the password went: Basic only to the token server, Bearer only to the registry; never printed or stored.
  const basic = `Basic ${Buffer.from(`robot:${password}`).toString("base64")}`;
  assert.ok(auth.tokenRequests.some((r) => r.authorization === basic));
  assert.ok(auth.requests.every((r) => r.authorization === undefined || r.authorization.startsWith("Bearer ")), "the registry saw a password");
  for (const out of [anon, pushed, anonPull, pulled, bad]) assert.ok(!(out.stdout + out.stderr).includes(password) && !(out.stdout + out.stderr).includes(basic.slice(6)));
  const grep = (dir: string): string[] =>
    readdirSync(dir, { withFileTypes: true }).flatMap((d) => {
      const p = join(dir, d.name);
      if (d.isDirectory()) return grep(p);
      return d.isFile() && statSync(p).size < 1 << 20 && readFileSync(p, "latin1").includes(password) ? [p] : [];
    });
  assert.deepEqual([...grep(e.stateDir), ...grep(e2.stateDir)], [], "the password was written into the state dir");

  // Pools use the same path: IfNotPresent pulls (with credentials from the env), Never does not.
  const paths = resolvePaths({ stateDir: join(e2.root, "pool-state"), logsDir: join(e2.root, "pool-logs") });
  const lines: string[] = [];
  process.env.CIVM_REGISTRY_AUTH_FILE = file;
  t.after(() => delete process.env.CIVM_REGISTRY_AUTH_FILE);
  const launcher = new VmRunLauncher({ paths, accel: "tcg", graceSeconds: 1, log: (l) => lines.push(l), ociRecheckMs: 0 });
  await assert.rejects(launcher.imageKey(poolSpec(ref, "Never")), /has not been pulled \(pull policy Never\); run civm image pull/);
  const key = await launcher.imageKey(poolSpec(ref, "IfNotPresent"));
  assert.ok(key.startsWith(`oci:${ref}:${digest}:`), key);
  assert.ok(lines.some((l) => l.startsWith(`pulling ${ref}`)), lines.join("\n"));
  assert.equal(await launcher.imageKey(poolSpec(ref, "Never")), key, "Never: what is stored");
  const spec = await launcher.spec(poolSpec(ref, "IfNotPresent"), "00000000");
  assert.equal(spec.image, join(paths.stateDir, "images", "disk-v1", "disk.qcow2"));
  // Always: the tag moved to another image; the key follows (idle runners get replaced).
  await runCivm(["image", "pull", `${proxy.host}/civm/artifact:v1`, "--name", "other"], e);
  assert.equal((await runCivm(["image", "push", "other", ref, "--auth-file", file], e)).code, 0);
  const moved = await launcher.imageKey(poolSpec(ref, "Always"));
  assert.notEqual(moved, key);
  assert.ok(moved.includes(`:${JSON.parse((await runCivm(["image", "push", "other", ref, "--auth-file", file, "--json"], e)).stdout).digest}:`));
  assert.equal(await launcher.imageKey(poolSpec(ref, "IfNotPresent")), moved, "the store now holds the new digest for the tag");
});

test("push then pull round trip of the tiny guest (disk, kernel, initrd), booted once on QEMU from its reference", { timeout: 600_000 }, async () => {
  const guest = await buildTinyGuest();
  const e = civmEnv();
  const store = new ImageStore(e.stateDir);
  const pending = await store.begin("tiny");
  copyFileSync(guest.disk, join(pending.dir, "disk.qcow2"));
  copyFileSync(guest.kernel, join(pending.dir, "vmlinuz"));
  copyFileSync(guest.initrd, join(pending.dir, "initrd.img"));
  for (const f of ["disk.qcow2", "vmlinuz", "initrd.img"]) chmodSync(join(pending.dir, f), 0o644);
  const original = await pending.commit({ name: "tiny", key: "e2e-tiny", format: "qcow2", disk: "disk.qcow2", kernel: "vmlinuz", initrd: "initrd.img", packages: {}, buildSeconds: 0, createdAt: "2026-01-02T03:04:05.000Z", source: "build" });
  const ref = `${proxy.host}/civm/tiny:v1`;
  const first = await runCivm(["image", "push", "tiny", ref, "--json"], e);
  assert.equal(first.code, 0, first.stderr);
  const again = await runCivm(["image", "push", "tiny", ref, "--json"], e);
  assert.equal(again.code, 0, again.stderr);
  assert.equal(JSON.parse(again.stdout).digest, JSON.parse(first.stdout).digest, "pushing the same image twice gives the same digest");
  assert.match(again.stderr, /the registry has the layer already/);
  assert.equal((await runCivm(["image", "rm", "tiny"], e)).code, 0);

  writeFileSync(
    join(e.root, "instances.json"),
    JSON.stringify([{ name: "vm-oci", image: ref, "cpu-cores": 1, ram: "256M", "timeout-seconds": 120, config: { tiny: "poweroff" } }]),
  );
  const r = await runCivm(["run", "vm-oci"], e);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, new RegExp(`pulling ${ref.replace(/\./g, "\\.")} \\(linux/amd64`));
  assert.match(r.stderr, /vm-oci: poweroff after [\d.]+ s \(exit 0\)/);
  const pulled = stored(e).find((i) => i.name === "tiny-v1")!;
  assert.equal(pulled.sha256, original.manifest.sha256, "the disk came back bit for bit");
  assert.equal(sha(join(e.stateDir, "images", "tiny-v1", "vmlinuz")), sha(guest.kernel));
  assert.equal(sha(join(e.stateDir, "images", "tiny-v1", "initrd.img")), sha(guest.initrd));
});
