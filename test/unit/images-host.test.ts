// civm-host's pieces that need no VM: the built-in spec, the `civm` and `uefi` spec fields
// (validation, cache keys), the civm release (production packages, its install actions), the
// UEFI disk layout (sfdisk on a sparse file) and `civm image export`'s qemu-img arguments.
// The image itself, booted: test/e2e/host-image.test.ts.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import YAML from "yaml";
import { ConfigError } from "../../src/errors/index.js";
import { computeCacheKey } from "../../src/images/cache-key.js";
import { productionPackages, releaseActions, RELEASE_FILES, stageRelease } from "../../src/images/civm-release.js";
import { ESP_LAYOUT, createSparseFile, rootPartitionStart, writePartitionTable } from "../../src/images/disk.js";
import { exportArgs, parseFormat } from "../../src/images/export.js";
import { STAGE2_UEFI, UEFI_PACKAGES, withUefi } from "../../src/images/build.js";
import { loadBuiltinImageSpecs, loadImageSpecs } from "../../src/images/spec.js";
import type { ImageSpec } from "../../src/images/types.js";
import { repoRoot, tempDir } from "../support/paths.js";

const MIRROR = "http://mirror.test.invalid/debian";
const MiB = 1024 ** 2;

test("the built-in civm-host: a root image with civm and UEFI, the packages the issue lists, files that exist", async () => {
  const specs = await loadBuiltinImageSpecs({ defaultMirror: MIRROR });
  const host = specs.find((s) => s.name === "civm-host");
  assert.ok(host, "images/civm-host.yaml is a built-in image");
  assert.equal(host.parent, undefined);
  assert.equal(host.civm, true);
  assert.equal(host.uefi, true);
  assert.equal(host.format, "qcow2");
  assert.equal(host.suite, "bookworm");
  for (const p of ["qemu-system-x86", "qemu-utils", "nftables", "cloud-init", "cloud-guest-utils", "openssh-server", "auditd", "unattended-upgrades", "systemd-timesyncd"]) {
    assert.ok(host.packages.includes(p), `civm-host installs ${p}`);
  }
  const copies = host.actions.filter((a) => a.kind === "copy");
  assert.deepEqual(copies.map((a) => a.kind === "copy" && a.dest), ["/usr/local/sbin/civm-host", "/etc/fireactions/bootstrap.sh"]);
  for (const c of copies) assert.ok(c.kind === "copy" && existsSync(c.srcPath));
  const text = host.actions.map((a) => JSON.stringify(a)).join("\n");
  // The hardening the issue lists, each in the spec.
  for (const s of ["kernel.dmesg_restrict = 1", "kernel.kptr_restrict = 2", "kernel.unprivileged_bpf_disabled = 1", "net.core.bpf_jit_harden = 2", "kernel.yama.ptrace_scope = 1", "kernel.randomize_va_space = 2", "fs.protected_regular = 2", "rp_filter = 1", "accept_redirects = 0", "accept_source_route = 0"]) {
    assert.ok(text.includes(s), `sysctl ${s}`);
  }
  // Applied last (name order across sysctl.d folders: Debian's protect-links.conf sets fifos to 1).
  assert.ok(host.actions.some((a) => a.kind === "write" && a.path === "/etc/sysctl.d/zz-civm-host.conf"));
  assert.match(text, /PasswordAuthentication no/);
  assert.match(text, /PermitRootLogin no/);
  assert.match(text, /tmpfs {5}\/tmp {5}tmpfs rw,nodev,nosuid,noexec/);
  assert.match(text, /\/var\/tmp +\/var\/tmp +none +rw,bind,nodev,nosuid,noexec/);
  assert.match(text, /-w \/etc\/civm\/ -p wa -k civm-config/);
  assert.match(text, /Unattended-Upgrade \\"1\\"/);
  assert.match(text, /datasource_list: \[NoCloud, ConfigDrive, Azure, None\]/);
  // Azure's and other clouds' root-disk drivers go into the initrd.
  assert.match(text, /manual_add_modules hv_vmbus hv_storvsc nvme xen-blkfront/);
  // Modules that must never be blocked.
  const blocklist = host.actions.find((a) => a.kind === "write" && a.path === "/etc/modprobe.d/civm-host-blocklist.conf");
  assert.ok(blocklist && blocklist.kind === "write");
  for (const m of ["kvm", "kvm_intel", "kvm_amd", "vhost", "vhost_net", "tun", "nf_tables", "9p", "9pnet", "9pnet_virtio", "iso9660", "udf", "vfat"]) {
    assert.doesNotMatch(blocklist.content, new RegExp(`^install ${m} `, "m"), `${m} is not blocked`);
  }
  assert.match(blocklist.content, /^install dccp \/bin\/false$/m);
});

test("civm and uefi: booleans, root images only; a child keeps its parent's", async () => {
  const dir = tempDir("civm-images-host-");
  const file = join(dir, "images.yaml");
  writeFileSync(file, YAML.stringify([{ name: "base", civm: "yes", uefi: 1 }, { name: "kid", parent: "base", civm: true, uefi: true }]));
  await assert.rejects(loadImageSpecs(file, { defaultMirror: MIRROR, builtins: false }), (e: unknown) => {
    assert.ok(e instanceof ConfigError);
    assert.match(e.message, /image "base" \(#1\): field "civm": must be true \(install civm itself/);
    assert.match(e.message, /image "base" \(#1\): field "uefi": must be true \(the disk also boots under UEFI/);
    assert.match(e.message, /image "kid" \(#2\): field "civm": only root images/);
    assert.match(e.message, /image "kid" \(#2\): field "uefi": only root images/);
    return true;
  });
  writeFileSync(file, YAML.stringify([{ name: "base", uefi: true }, { name: "kid", parent: "base" }]));
  const loaded = await loadImageSpecs(file, { defaultMirror: MIRROR, builtins: false });
  assert.equal(loaded.images[0]?.uefi, true);
  assert.equal(loaded.images[0]?.civm, undefined);
});

function spec(over: Partial<ImageSpec> = {}): ImageSpec {
  return {
    name: "h", suite: "bookworm", mirror: MIRROR, packages: [], sizeBytes: 4 * 1024 ** 3, format: "qcow2",
    kernel: "linux-image-amd64", flatten: false, actions: [],
    source: { file: "images.yaml", baseDir: "/abs", index: 0, lvh: false, builtin: false },
    ...over,
  };
}

test("cache key: uefi and the civm release are inputs; images without them keep their keys", () => {
  const base = { fileHashes: {}, agentVersion: "6+abc" };
  const plain = computeCacheKey({ ...base, spec: spec() });
  // Unset fields are left out of the key document, so existing images are not rebuilt.
  assert.equal(computeCacheKey({ ...base, spec: spec({ uefi: undefined, civm: undefined }) }), plain);
  assert.notEqual(computeCacheKey({ ...base, spec: spec({ uefi: true }) }), plain);
  const withCivm = (release: string) => computeCacheKey({ ...base, spec: spec({ civm: true }), civmRelease: release });
  assert.notEqual(withCivm("aaa nodejs=20.1:amd64"), plain);
  assert.notEqual(withCivm("aaa nodejs=20.1:amd64"), withCivm("bbb nodejs=20.1:amd64"), "a new civm build rebuilds the image");
  assert.notEqual(withCivm("aaa nodejs=20.1:amd64"), withCivm("aaa nodejs=20.2:amd64"), "a new Node.js package rebuilds the image");
  assert.throws(() => computeCacheKey({ ...base, spec: spec({ civm: true }) }), /civm release's identity is needed/);
});

test("the release's node_modules: package-lock's production packages that are installed, no dev or linked ones", () => {
  const lock = JSON.stringify({
    lockfileVersion: 3,
    packages: {
      "": { name: "civm" },
      "node_modules/yaml": {},
      "node_modules/better-sqlite3": {},
      "node_modules/typescript": { dev: true },
      "node_modules/linked": { link: true },
      "node_modules/absent": {},
    },
  });
  const got = productionPackages(lock, "/nonexistent-root");
  assert.deepEqual(got, [], "nothing is installed under a root that does not exist");
  const real = productionPackages(execFileSync("cat", [join(repoRoot, "package-lock.json")], { encoding: "utf8" }), repoRoot);
  assert.ok(real.includes("node_modules/better-sqlite3") && real.includes("node_modules/yaml"));
  assert.ok(!real.includes("node_modules/typescript") && !real.includes("node_modules/esbuild"), "dev dependencies stay out");
  assert.throws(() => productionPackages("{}", "/r"), /lockfile version 2 or later/);
  assert.deepEqual([...RELEASE_FILES].sort(), ["bin", "dist/bundle", "guest", "images", "package-lock.json", "package.json", "packaging"]);
});

test("the release takes the current bundle's files (dist/bundle/files.json), not the chunks earlier builds leave beside them; no list is a ConfigError", async () => {
  const root = tempDir("civm-release-");
  for (const d of ["bin", "guest", "images", "packaging", "dist/bundle", "dist/src/cli"]) mkdirSync(join(root, d), { recursive: true });
  writeFileSync(join(root, "package.json"), "{}");
  writeFileSync(join(root, "package-lock.json"), JSON.stringify({ lockfileVersion: 3, packages: { "": {} } }));
  writeFileSync(join(root, "dist/src/cli/main.js"), "");
  for (const f of ["main.js", "chunk-NEW.js", "chunk-OLD.js"]) writeFileSync(join(root, "dist/bundle", f), f);
  await assert.rejects(stageRelease(join(root, "out"), "images/civm-host.yaml", root), (e: unknown) => e instanceof ConfigError && /files\.json is missing.*npm run build/.test(e.message));
  writeFileSync(join(root, "dist/bundle/files.json"), JSON.stringify(["chunk-NEW.js", "main.js"]));
  const staged = await stageRelease(join(root, "out"), "images/civm-host.yaml", root);
  assert.deepEqual(readdirSync(join(staged, "dist/bundle")).sort(), ["chunk-NEW.js", "files.json", "main.js"]);
});

test("the release's actions: the host's Node.js package (held), /opt/civm, /usr/local/bin/civm, and a check that civm and its SQLite module load", () => {
  const acts = releaseActions("/w/civm", "/w/nodejs.deb", { package: "nodejs", version: "20.20.2-1nodesource1", arch: "amd64", binary: "/usr/bin/node" });
  const text = acts.map((a) => JSON.stringify(a)).join("\n");
  assert.match(text, /apt-get install -y -q --no-install-recommends \/var\/cache\/civm-nodejs\.deb/);
  assert.match(text, /apt-mark hold nodejs/);
  assert.ok(acts.some((a) => a.kind === "copy" && a.srcPath === "/w/civm" && a.dest === "/opt/civm"));
  assert.match(text, /ln -sfn \/opt\/civm\/bin\/civm \/usr\/local\/bin\/civm/);
  assert.match(text, /civm --version/);
  assert.match(text, /require\(\\"better-sqlite3\\"\)/);
});

test("uefi: GRUB's EFI modules and mkfs.vfat are added; the ESP is partition 2 at 1 MiB, the root partition 1 after it, last on the disk", async () => {
  assert.deepEqual(withUefi(spec()).packages, []);
  assert.deepEqual(withUefi(spec({ uefi: true, packages: ["curl"] })).packages, ["curl", ...UEFI_PACKAGES]);
  assert.match(STAGE2_UEFI.join("\n"), /grub-install --target=x86_64-efi --efi-directory=\/boot\/efi --removable --no-nvram/);
  assert.equal(rootPartitionStart(false), MiB);
  assert.equal(rootPartitionStart(true), 64 * MiB);
  const file = join(tempDir("civm-images-host-"), "disk.raw");
  await createSparseFile(file, 256 * MiB);
  await writePartitionTable(file, 256 * MiB, undefined, true);
  const table = JSON.parse(execFileSync("sfdisk", ["--json", file], { encoding: "utf8" })) as { partitiontable: { partitions: { node: string; start: number; size: number; type: string; bootable?: boolean }[] } };
  const [root, esp] = table.partitiontable.partitions;
  assert.ok(root && esp);
  assert.match(root.node, /1$/);
  assert.equal(root.start * 512, 64 * MiB);
  assert.equal((root.start + root.size) * 512, 256 * MiB, "the root partition ends at the disk's end (it can grow)");
  assert.equal(root.type, "83");
  assert.equal(root.bootable, true);
  assert.match(esp.node, new RegExp(`${ESP_LAYOUT.partitionNumber}$`));
  assert.equal(esp.start * 512, MiB);
  assert.equal(esp.size * 512, ESP_LAYOUT.sizeBytes);
  assert.equal(esp.type, "ef");
});

test("civm image export: a fixed VHD keeps the exact size (force_size); formats are checked", () => {
  assert.deepEqual(exportArgs({ path: "/s/disk.qcow2", format: "qcow2" }, "vhd", "/o.vhd"), [
    "convert", "-p", "-f", "qcow2", "-O", "vpc", "-o", "subformat=fixed,force_size=on", "/s/disk.qcow2", "/o.vhd",
  ]);
  assert.deepEqual(exportArgs({ path: "/s/disk.vhd", format: "vhd" }, "raw", "/o.raw"), ["convert", "-p", "-f", "vpc", "-O", "raw", "/s/disk.vhd", "/o.raw"]);
  assert.equal(parseFormat("raw"), "raw");
  assert.throws(() => parseFormat("vmdk"), /--format "vmdk": must be one of qcow2, raw, vhd/);
});

test("an installed civm (npm's \"files\") carries what the built-in specs read and what civm: true ships", async () => {
  const files = (JSON.parse(execFileSync("cat", [join(repoRoot, "package.json")], { encoding: "utf8" })) as { files: string[] }).files;
  const shipped = (rel: string) => files.some((f) => rel === f || rel.startsWith(`${f}/`));
  const specs = await loadBuiltinImageSpecs({ defaultMirror: MIRROR });
  for (const s of specs) {
    for (const a of s.actions) {
      if (a.kind !== "copy" && !(a.kind === "provision" && a.script)) continue;
      const src = a.kind === "copy" ? a.srcPath : (a.script as { srcPath: string }).srcPath;
      const rel = src.slice(repoRoot.length + 1);
      assert.ok(shipped(rel), `${s.name} reads ${rel}, which package.json "files" leaves out`);
    }
  }
  for (const rel of RELEASE_FILES.filter((f) => f !== "package.json" && f !== "package-lock.json")) assert.ok(shipped(rel), `${rel} is shipped`);
});
