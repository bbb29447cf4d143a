// Built images are cached by their key (src/images/cache-key.ts), and the key sees the
// builder's own code only through IMAGE_BUILDER_VERSION. A change to what the builder puts
// into every image that forgets the bump lets old images pass for new ones (it happened: the
// reverted PVH builder's version number came back and its cached images were reused). This
// test fingerprints that code. When it fails: bump IMAGE_BUILDER_VERSION (never reuse a
// number) and record the new fingerprint below.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { CLEAN_ROOT_SCRIPT, STAGE2_BOOTLOADER, STAGE2_EPILOGUE, withGuestAgent } from "../../src/images/build.js";
import { IMAGE_BUILDER_VERSION } from "../../src/images/cache-key.js";
import { DISK_LAYOUT } from "../../src/images/disk.js";
import { BASE_PACKAGES, INITRAMFS_MODULES, initramfsScript, planHooks } from "../../src/images/rootfs.js";
import type { ImageSpec } from "../../src/images/types.js";

const RECORDED: Record<number, string> = {
  3: "a132b4e1c3050782d1e38eb12c5565208941e3deb2cad8a50242eb95bd30cc24",
  4: "a11863308e546b987cf97578f9fce9fd32a48c6fa09349baa283bd649eaea8a9",
  5: "461cf8888b394e59bbcd57c46335c84f2d4d33ed06fdc3d67891a11a2307ca54",
};

const bare: ImageSpec = {
  name: "fingerprint",
  suite: "bookworm",
  mirror: "http://deb.debian.org/debian",
  packages: [],
  sizeBytes: 2 * 1024 ** 3,
  format: "qcow2",
  kernel: "linux-image-amd64",
  flatten: false,
  actions: [],
  source: { file: "images.yaml", baseDir: "/abs", index: 0, lvh: false, builtin: false },
};

function builderFingerprint(): string {
  const hooks = planHooks(bare, "/hooks", "/apt-cache");
  const content = {
    basePackages: BASE_PACKAGES,
    agentPackages: withGuestAgent(bare).packages,
    initramfsModules: INITRAMFS_MODULES,
    initramfs: initramfsScript(),
    mmdebstrap: hooks.args,
    hooks: hooks.files.map((f) => [f.name, f.text, f.data ?? null]),
    disk: DISK_LAYOUT,
    bootloader: STAGE2_BOOTLOADER,
    epilogue: STAGE2_EPILOGUE,
    cleanRoot: CLEAN_ROOT_SCRIPT,
  };
  return createHash("sha256").update(JSON.stringify(content)).digest("hex");
}

test("what the builder writes into every image is unchanged for this IMAGE_BUILDER_VERSION", () => {
  const now = builderFingerprint();
  assert.equal(
    RECORDED[IMAGE_BUILDER_VERSION],
    now,
    `The builder's image content changed (fingerprint ${now}) but IMAGE_BUILDER_VERSION is still ${IMAGE_BUILDER_VERSION}: ` +
      `cached images would be reused. Bump it in src/images/cache-key.ts and record the fingerprint in this test.`,
  );
  const numbers = Object.keys(RECORDED).map(Number);
  assert.equal(Math.max(...numbers), IMAGE_BUILDER_VERSION, "record the fingerprint of the newest builder version");
});
