// Image specs with arch: arm64: parsing, what mmdebstrap is asked for, the key.
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import YAML from "yaml";
import { ConfigError } from "../../src/errors/index.js";
import { loadImageSpecs } from "../../src/images/spec.js";
import { includedPackages, initramfsModules, planHooks } from "../../src/images/rootfs.js";
import { computeCacheKey } from "../../src/images/cache-key.js";
import type { ImageSpec } from "../../src/images/types.js";
import { tempDir } from "../support/paths.js";

const OPTS = { defaultMirror: "http://mirror.test.invalid/debian" };

async function load(content: unknown): Promise<ImageSpec[]> {
  const dir = tempDir("civm-images-arm64-");
  const file = join(dir, "images.yaml");
  writeFileSync(file, YAML.stringify(content));
  return (await loadImageSpecs(file, OPTS)).images;
}

test("arch: arm64 on a root image: Debian's arm64 kernel by default; a child takes its parent's arch", async () => {
  const images = await load([{ name: "a", arch: "aarch64" }, { name: "b", parent: "a", packages: ["curl"] }, { name: "x" }]);
  const a = images.find((i) => i.name === "a")!;
  const b = images.find((i) => i.name === "b")!;
  const x = images.find((i) => i.name === "x")!;
  assert.equal(a.arch, "arm64");
  assert.equal(a.kernel, "linux-image-arm64");
  assert.equal(b.arch, "arm64");
  assert.equal(x.arch, undefined);
  assert.equal(x.kernel, "linux-image-amd64");
});

test("arch: refused values, arch on a child, and what arm64 images do not support yet, each naming the field", async () => {
  const err = await load([
    { name: "a", arch: "sparc" },
    { name: "b", arch: "arm64", uefi: true, civm: true },
    { name: "c", parent: "b", arch: "arm64" },
  ]).then(() => assert.fail("expected a ConfigError"), (e: unknown) => e);
  assert.ok(err instanceof ConfigError);
  assert.match(err.message, /image "a".*field "arch": must be "x86_64" \(the default; also "amd64"\) or "arm64" \(also "aarch64"\)/);
  assert.match(err.message, /image "b".*field "uefi": is not supported yet for arch: arm64 images/);
  assert.match(err.message, /image "b".*field "civm": is not supported yet for arch: arm64 images/);
  assert.match(err.message, /image "c".*field "arch": only root images \(without "parent"\) take "arch"/);
});

test("mmdebstrap for arm64: --architectures=arm64, no BIOS GRUB, no PIIX IDE module in the initrd; x86_64 unchanged", async () => {
  const [a] = await load([{ name: "a", arch: "arm64" }]);
  const [x] = await load([{ name: "x" }]);
  const args = planHooks(a!, "/hooks").args;
  assert.ok(args.includes("--architectures=arm64"), args.join(" "));
  assert.ok(!planHooks(x!, "/hooks").args.some((s) => s.startsWith("--architectures")));
  assert.ok(!includedPackages(a!).some((p) => p.startsWith("grub")));
  assert.ok(includedPackages(a!).includes("linux-image-arm64"));
  assert.ok(includedPackages(x!).includes("grub-pc-bin"));
  assert.ok(!initramfsModules(a!).includes("ata_piix"));
  assert.ok(initramfsModules(x!).includes("ata_piix"));
});

test("the arch is part of the image's key", async () => {
  const [a] = await load([{ name: "a", arch: "arm64", kernel: "linux-image-amd64" }]);
  const [x] = await load([{ name: "a", kernel: "linux-image-amd64" }]);
  const key = (s: ImageSpec) => computeCacheKey({ spec: s, agentVersion: "1", fileHashes: {} });
  assert.notEqual(key(a!), key(x!));
});
