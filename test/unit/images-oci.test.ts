// The pure parts of civm's OCI support: which image strings are references (the rule in
// docs/images.md), default names, WWW-Authenticate parsing, auth files, the tar reader and
// writer, platform selection in an index and where a manifest keeps its disk.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Readable } from "node:stream";
import { ConfigError, EXIT_CODES, ExternalError } from "../../src/errors/index.js";
import { almostOciReference, classifyImageRef, defaultOciImageName, parseOciReference, parsePlatform, requireOciReference } from "../../src/images/oci-ref.js";
import { RegistryClient, lookupCredentials, parseChallenges, registryScheme } from "../../src/images/oci-registry.js";
import { planDisk, selectPlatform, type OciIndex, type OciManifest } from "../../src/images/oci.js";
import { readTar, writeTar, type TarEntry } from "../../src/images/tar.js";
import { resolveImageRef } from "../../src/images/resolve.js";
import { tempDir } from "../support/paths.js";

test("classifyImageRef: paths, stored names and OCI references, by syntax alone", () => {
  const cases: [string, "path" | "stored" | "oci"][] = [
    ["quay.io/lvh-images/kind:bpf-next-main", "oci"],
    ["quay.io/lvh-images/kind@sha256:" + "a".repeat(64), "oci"],
    ["quay.io/lvh-images/kind:6.6@sha256:" + "b".repeat(64), "oci"],
    ["localhost:5000/img:v1", "oci"],
    ["localhost/img:v1", "oci"],
    ["127.0.0.1:5000/a/b/c:latest", "oci"],
    ["ghcr.io/thpham/fireactions-images/ubuntu-24.04:latest", "oci"],
    ["docker.io/library/debian:12", "oci"],
    ["civm-runner", "stored"],
    ["base.qcow2.d", "stored"],
    ["kind_6.6", "stored"],
    ["base.qcow2", "path"],
    ["disk.img", "path"],
    ["images/base.qcow2", "path"],
    ["./quay.io/lvh-images/kind:main", "path"], // "./" forces a path
    ["/var/lib/x.qcow2", "path"],
    ["~/images/x.qcow2", "path"],
    ["quay.io/lvh-images/kind", "path"], // no tag: not a reference
    ["lvh-images/kind:main", "path"], // no registry host
    ["quay.io/LVH/kind:main", "path"], // repositories are lowercase
    ["build.d/disk.qcow2", "path"],
  ];
  for (const [s, kind] of cases) assert.equal(classifyImageRef(s).kind, kind, s);
  const r = parseOciReference("quay.io/lvh-images/kind:6.6@sha256:" + "b".repeat(64))!;
  assert.deepEqual([r.registry, r.repository, r.tag, r.digest], ["quay.io", "lvh-images/kind", "6.6", "sha256:" + "b".repeat(64)]);
  const hub = parseOciReference("docker.io/debian:12")!;
  assert.deepEqual([hub.registry, hub.repository], ["docker.io", "library/debian"]);
});

test("almost-references get a hint; requireOciReference names the fix; a push needs a tag", () => {
  assert.match(almostOciReference("quay.io/lvh-images/kind")!, /without a tag: write quay\.io\/lvh-images\/kind:latest .* or \.\/quay\.io\/lvh-images\/kind for a local path/);
  assert.match(almostOciReference("quay.io/LVH/kind:main")!, /is not a valid reference \(repository names are lowercase/);
  assert.equal(almostOciReference("images/base.qcow2"), undefined);
  assert.throws(() => requireOciReference("kind:main", "civm image pull"), (e: unknown) => e instanceof ConfigError && /is not an OCI reference; write REGISTRY\/REPOSITORY:TAG/.test(e.message));
  assert.throws(() => requireOciReference("quay.io/a/b@sha256:" + "c".repeat(64), "civm image push", { needTag: true }), /a push needs a tag/);
});

test("default names: REPO-TAG, or REPO-DIGEST12; platforms", () => {
  assert.equal(defaultOciImageName(parseOciReference("quay.io/lvh-images/kind:bpf-next-main")!), "kind-bpf-next-main");
  assert.equal(defaultOciImageName(parseOciReference("quay.io/lvh-images/kind:6.6-20260106.135428")!), "kind-6.6-20260106.135428");
  assert.equal(defaultOciImageName(parseOciReference("quay.io/x/root:Main_X")!), "root-main_x");
  assert.equal(defaultOciImageName(parseOciReference("quay.io/x/root@sha256:" + "0123456789ab".repeat(5) + "cdef")!), "root-0123456789ab");
  assert.deepEqual(parsePlatform("linux/arm64/v8"), { os: "linux", architecture: "arm64", variant: "v8" });
  assert.deepEqual(parsePlatform("amd64"), { os: "linux", architecture: "amd64" });
  assert.throws(() => parsePlatform("linux/"), /is not a platform; write OS\/ARCH/);
});

test("WWW-Authenticate: Bearer and Basic challenges with quoted parameters; plain HTTP only for loopback and listed registries", () => {
  assert.deepEqual(parseChallenges('Bearer realm="https://quay.io/v2/auth",service="quay.io",scope="repository:lvh-images/kind:pull"'), [
    { scheme: "bearer", params: { realm: "https://quay.io/v2/auth", service: "quay.io", scope: "repository:lvh-images/kind:pull" } },
  ]);
  assert.deepEqual(parseChallenges('Basic realm="Registry Realm"'), [{ scheme: "basic", params: { realm: "Registry Realm" } }]);
  assert.deepEqual(parseChallenges('Bearer realm="https://a/token", error="insufficient_scope"').map((c) => c.params.error), ["insufficient_scope"]);
  assert.equal(registryScheme("127.0.0.1:5000", {}), "http");
  assert.equal(registryScheme("localhost:5000", {}), "http");
  assert.equal(registryScheme("quay.io", {}), "https");
  assert.equal(registryScheme("reg.lan:5000", { CIVM_INSECURE_REGISTRIES: "other, reg.lan:5000" }), "http");
});

test("auth files: docker's and podman's format, the explicit file alone, docker.io's keys, helpers named, broken files explained", () => {
  const dir = tempDir();
  const file = join(dir, "auth.json");
  writeFileSync(file, JSON.stringify({ auths: { "https://quay.io": { auth: Buffer.from("robot+x:s3cret:with:colons").toString("base64") }, "reg.lan:5000": { username: "u", password: "p" }, "https://index.docker.io/v1/": { auth: Buffer.from("hub:pw").toString("base64") } }, credHelpers: { "ghcr.io": "gh" } }));
  assert.deepEqual(lookupCredentials("quay.io", file).credentials, { username: "robot+x", password: "s3cret:with:colons" });
  assert.deepEqual(lookupCredentials("reg.lan:5000", file).credentials, { username: "u", password: "p" });
  assert.deepEqual(lookupCredentials("docker.io", file).credentials, { username: "hub", password: "pw" });
  const gh = lookupCredentials("ghcr.io", file);
  assert.equal(gh.credentials, undefined);
  assert.match(gh.helper!, /docker-credential-gh/);
  // Without a flag: $CIVM_REGISTRY_AUTH_FILE, else the default files (missing ones skipped).
  const home = tempDir();
  mkdirSync(join(home, ".docker"));
  writeFileSync(join(home, ".docker", "config.json"), JSON.stringify({ auths: { "quay.io": { auth: Buffer.from("d:c").toString("base64") } } }));
  assert.deepEqual(lookupCredentials("quay.io", undefined, { HOME: home }).credentials, { username: "d", password: "c" });
  assert.deepEqual(lookupCredentials("quay.io", undefined, { HOME: home, CIVM_REGISTRY_AUTH_FILE: file }).credentials, { username: "robot+x", password: "s3cret:with:colons" });
  assert.equal(lookupCredentials("quay.io", undefined, { HOME: tempDir() }).credentials, undefined);
  assert.throws(() => lookupCredentials("quay.io", join(dir, "missing.json")), /does not exist \(from --auth-file\)/);
  writeFileSync(join(dir, "bad.json"), "{ not json");
  assert.throws(() => lookupCredentials("quay.io", join(dir, "bad.json")), /is not valid JSON/);
  writeFileSync(join(dir, "oauth.json"), JSON.stringify({ auths: { "quay.io": { identitytoken: "xyz" } } }));
  assert.throws(() => lookupCredentials("quay.io", join(dir, "oauth.json")), /holds an identity token/);
  writeFileSync(join(dir, "half.json"), JSON.stringify({ auths: { "quay.io": { auth: Buffer.from("nocolon").toString("base64") } } }));
  assert.throws(
    () => lookupCredentials("quay.io", join(dir, "half.json")),
    (e: unknown) => e instanceof ConfigError && !e.message.includes("nocolon"),
    "an error never quotes what the file holds",
  );
});

async function entriesOf(tar: Buffer, want: (e: TarEntry) => boolean, chunk = 700): Promise<{ entries: TarEntry[]; content: Map<string, Buffer> }> {
  const entries: TarEntry[] = [];
  const content = new Map<string, Buffer>();
  const pieces: Buffer[] = [];
  for (let i = 0; i < tar.length; i += chunk) pieces.push(tar.subarray(i, i + chunk));
  await readTar(Readable.from(pieces), (e) => {
    entries.push(e);
    if (!want(e)) return undefined;
    const parts: Buffer[] = [];
    return { write: (b) => void parts.push(Buffer.from(b)), end: () => void content.set(e.path, Buffer.concat(parts)) };
  }, "test");
  return { entries, content };
}

test("tar: GNU tar's archives read in odd-sized pieces (long names, pax, dirs, symlinks); civm's writer read back by GNU tar", async () => {
  const dir = tempDir();
  const long = `data/images/${"n".repeat(120)}.qcow2.zst`;
  mkdirSync(join(dir, "data", "images"), { recursive: true });
  writeFileSync(join(dir, long), Buffer.alloc(1500, 7));
  writeFileSync(join(dir, "data", "images", "base.qcow2.zst"), "base");
  execFileSync("ln", ["-s", "/etc/passwd", join(dir, "data", "images", "link.qcow2.zst")]);
  for (const format of ["gnu", "posix", "ustar"]) {
    if (format === "ustar") continue; // the 120-character name does not fit ustar
    const tar = execFileSync("tar", ["-C", dir, `--format=${format}`, "--sort=name", "-cf", "-", "data"]);
    const { entries, content } = await entriesOf(tar, (e) => e.path.endsWith(".zst"));
    assert.deepEqual(entries.map((e) => `${e.type} ${e.path}`), ["dir data", "dir data/images", "file data/images/base.qcow2.zst", "symlink data/images/link.qcow2.zst", `file ${long}`], format);
    assert.equal(content.get(long)?.length, 1500);
    assert.equal(content.get("data/images/base.qcow2.zst")?.toString(), "base");
    assert.equal(content.has("data/images/link.qcow2.zst"), false, "a symlink's target is never content");
  }
  // Broken archives: a bad checksum, and a stream cut in the middle of a file.
  const good = execFileSync("tar", ["-C", dir, "-cf", "-", "data/images/base.qcow2.zst"]);
  const bad = Buffer.from(good);
  bad[0] = bad[0]! ^ 0x20;
  await assert.rejects(entriesOf(bad, () => false), /checksum is wrong/);
  await assert.rejects(entriesOf(good.subarray(0, 514), () => false), /ends in the middle of data\/images\/base\.qcow2\.zst/);

  // civm's writer: GNU tar lists and extracts it (pax for the long name).
  const out: Buffer[] = [];
  for await (const b of writeTar([
    { path: "data", type: "dir", mtime: 1_700_000_000 },
    { path: "data/images", type: "dir", mtime: 1_700_000_000 },
    { path: long, type: "file", size: 3, content: async function* () { yield Buffer.from("abc"); }, mtime: 1_700_000_000 },
  ])) out.push(b);
  const written = Buffer.concat(out);
  assert.equal(written.length % 512, 0);
  assert.deepEqual(execFileSync("tar", ["-tf", "-"], { input: written }).toString().trim().split("\n"), ["data/", "data/images/", long]);
  assert.equal(execFileSync("tar", ["-xOf", "-", long], { input: written }).toString(), "abc");
  const back = await entriesOf(written, () => true);
  assert.equal(back.content.get(long)?.toString(), "abc");
});

const d = (n: number, extra: Record<string, unknown> = {}) => ({ mediaType: "application/vnd.oci.image.manifest.v1+json", digest: `sha256:${String(n).repeat(64).slice(0, 64)}`, size: 100, ...extra });

test("selectPlatform: the host's entry, attestation manifests skipped, a missing platform listed", () => {
  const index: OciIndex = {
    schemaVersion: 2,
    manifests: [
      d(1, { platform: { os: "unknown", architecture: "unknown" }, annotations: { "vnd.docker.reference.type": "attestation-manifest" } }),
      d(2, { platform: { os: "linux", architecture: "amd64" } }),
      d(3, { platform: { os: "linux", architecture: "arm64", variant: "v8" } }),
    ],
  };
  assert.equal(selectPlatform(index, { os: "linux", architecture: "amd64" }, "x").digest, d(2).digest);
  assert.equal(selectPlatform(index, { os: "linux", architecture: "arm64" }, "x").digest, d(3).digest);
  assert.throws(() => selectPlatform(index, { os: "linux", architecture: "riscv64" }, "quay.io/a/b:c"), /quay\.io\/a\/b:c has no image for linux\/riscv64 \(it has linux\/amd64, linux\/arm64\/v8\)/);
  assert.equal(selectPlatform({ schemaVersion: 2, manifests: [d(4)] }, { os: "linux", architecture: "amd64" }, "x").digest, d(4).digest, "one entry without a platform");
});

test("planDisk: an artifact by its title (--file picks), tar layers otherwise, other media types refused", () => {
  const layer = (mediaType: string, title?: string) => ({ mediaType, digest: d(5).digest, size: 1, ...(title ? { annotations: { "org.opencontainers.image.title": title } } : {}) });
  const m = (layers: ReturnType<typeof layer>[]): OciManifest => ({ schemaVersion: 2, config: layer("application/vnd.oci.empty.v1+json"), layers });
  const two = m([layer("application/vnd.oci.image.layer.v1.tar", "base.qcow2.zst"), layer("application/octet-stream", "kind.qcow2")]);
  assert.deepEqual(planDisk(two, undefined, "x"), { layout: "artifact", layer: two.layers[0], file: "base.qcow2.zst" });
  assert.equal((planDisk(two, "kind", "x") as { file: string }).file, "kind.qcow2");
  assert.throws(() => planDisk(two, "other", "x"), /holds no disk named other \(it has base\.qcow2\.zst, kind\.qcow2\)/);
  const lvh = m([layer("application/vnd.oci.image.layer.v1.tar+gzip"), layer("application/vnd.docker.image.rootfs.diff.tar.gzip"), layer("application/vnd.oci.image.layer.v1.tar+zstd")]);
  assert.equal(planDisk(lvh, undefined, "x").layout, "layer");
  assert.throws(() => planDisk(m([layer("application/vnd.example.thing")]), undefined, "x"), /layer media type application\/vnd\.example\.thing is neither a tar layer/);
  assert.throws(() => planDisk(m([layer("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")]), undefined, "x"), /foreign \(non-distributable\) layers/);
  assert.throws(() => planDisk(m([]), undefined, "x"), /has no layers/);
});

test("resolveImageRef: a path stays a path, a stored name that is missing lists the store, ~ is the home folder", async () => {
  const state = join(tempDir(), "state");
  assert.deepEqual(await resolveImageRef("disk.img", { stateDir: state, baseDir: "/srv" }), { kind: "path", path: "/srv/disk.img" });
  assert.deepEqual(await resolveImageRef("~/x.qcow2", { stateDir: state, baseDir: "/srv", env: { HOME: "/home/u" } }), { kind: "path", path: "/home/u/x.qcow2" });
  await assert.rejects(resolveImageRef("civm-runner", { stateDir: state, baseDir: "/srv" }), /no stored image named civm-runner .*civm image build civm-runner/);
});

test("a 404: for a manifest it is the user's reference (ConfigError, exit 2), for a blob the manifest names it is the registry's fault (ExternalError, exit 7)", async (t) => {
  const { createServer } = await import("node:http");
  const server = createServer((req, res) => {
    res.writeHead(404, { "content-type": "application/json" });
    res.end(JSON.stringify({ errors: [{ code: req.url?.includes("/blobs/") ? "BLOB_UNKNOWN" : "MANIFEST_UNKNOWN", message: "unknown" }] }));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => server.close());
  const port = (server.address() as import("node:net").AddressInfo).port;
  const client = new RegistryClient({ ref: { registry: `127.0.0.1:${port}`, repository: "lvh/kind" }, env: {} });
  const manifest = await client.request("/v2/lvh/kind/manifests/main", { what: "manifest 127.0.0.1/lvh/kind:main" }).catch((e: unknown) => e);
  assert.ok(manifest instanceof ConfigError, String(manifest));
  assert.match((manifest as Error).message, /HTTP 404.*check the repository and tag/);
  const blob = await client.request(`/v2/lvh/kind/blobs/sha256:${"a".repeat(64)}`, { what: "layer 1 of 1", blob: true }).catch((e: unknown) => e);
  assert.ok(blob instanceof ExternalError, String(blob));
  assert.equal(EXIT_CODES[(blob as ExternalError).code], 7);
  assert.match((blob as Error).message, /HTTP 404.*BLOB_UNKNOWN.*does not have it.*push the image again/);
});
