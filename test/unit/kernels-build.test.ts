// civm kernel build's pure parts: lvh's kernels.json (the real file, test/fixtures/lvh-images),
// one-paragraph errors naming file and field, url forms, what did not take after olddefconfig,
// the cache key, and a local folder's checks.
import test from "node:test";
import assert from "node:assert/strict";
import { readFileSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseLvhKernels, kconfigArgs } from "../../src/kernels/lvh.js";
import { parseKernelUrl, fingerprintSource } from "../../src/kernels/source.js";
import { buildKey, notApplied } from "../../src/kernels/build.js";
import { repoRoot, tempDir } from "../support/paths.js";

const LVH = join(repoRoot, "test", "fixtures", "lvh-images", "_data", "kernels.json");

test("lvh's own kernels.json parses: every entry, common_opts, option forms", () => {
  const k = parseLvhKernels(readFileSync(LVH, "utf8"), "kernels.json");
  assert.ok(k.kernels.length >= 10);
  const bpf = k.kernels.find((x) => x.name === "bpf-next")!;
  assert.deepEqual(bpf.opts, [{ op: "enable", name: "CONFIG_NETKIT" }, { op: "enable", name: "CONFIG_FUSE_FS" }]);
  assert.deepEqual(bpf.baseConfig, ["defconfig"]);
  assert.ok(k.commonOpts.some((o) => o.op === "module" && o.name === "CONFIG_TLS"));
  assert.ok(k.commonOpts.some((o) => o.name === "IP_MULTIPLE_TABLES"), "names without CONFIG_ are kept (scripts/config adds it)");
  assert.deepEqual(kconfigArgs({ op: "set-val", name: "CONFIG_NR_CPUS", value: "4" }), ["--set-val", "CONFIG_NR_CPUS", "4"]);
  assert.deepEqual(parseKernelUrl(bpf.url!, "/x", "w"), { kind: "git", repo: "git://git.kernel.org/pub/scm/linux/kernel/git/bpf/bpf-next.git", ref: "master", depth: 1 });
  const net = k.kernels.find((x) => x.name === "bpf-net")!;
  assert.deepEqual(parseKernelUrl(net.url!, "/x", "w"), { kind: "git", repo: "git://git.kernel.org/pub/scm/linux/kernel/git/bpf/bpf-next.git", ref: "net", depth: 1 });
});

test("bad kernels.json entries: one error naming the file, the field and the fix", () => {
  const bad = (entry: unknown, re: RegExp, extra: Record<string, unknown> = {}) =>
    assert.throws(() => parseLvhKernels(JSON.stringify({ kernels: [{ name: "ok" }, entry], ...extra }), "k.json"), (e: Error & { exitCode?: number }) => {
      assert.equal(e.exitCode, 2);
      assert.match(e.message, re);
      assert.doesNotMatch(e.message, /\n/, "one paragraph");
      return true;
    });
  bad({ name: "a", opts: [["--enabel", "CONFIG_X"]] }, /^k\.json: field "kernels\[1\]\.opts\[0\]\[0\]": "--enabel" is not a scripts\/config flag civm applies; did you mean "--enable"\?/);
  bad({ name: "a", opts: [["--enable"]] }, /field "kernels\[1\]\.opts\[0\]": --enable takes one option name, got 0 argument\(s\); write \["--enable", "CONFIG_NAME"\]/);
  bad({ name: "a", opts: [["--set-val", "CONFIG_X"]] }, /--set-val takes an option name and a value/);
  bad({ name: "a", opts: [["--enable", "CONFIG X"]] }, /field "kernels\[1\]\.opts\[0\]\[1\]": "CONFIG X" is not a kernel option name/);
  bad({ name: "a", opts: "CONFIG_X" }, /field "kernels\[1\]\.opts": "CONFIG_X" is not a list; write it as a list of scripts\/config argument lists/);
  bad({ name: "a", ops: [] }, /field "kernels\[1\]\.ops": unknown key in kernel "a"; did you mean "opts"\?/);
  bad({ name: "a", url: 3 }, /field "kernels\[1\]\.url": must be a string; give a git URL/);
  bad({ name: "a", base_config: ["tinyconfig", "rm -rf /"] }, /field "kernels\[1\]\.base_config": "rm -rf \/" is not a make config target/);
  bad({ name: "ok" }, /field "kernels\[1\]\.name": kernel "ok" is defined twice/);
  bad({ name: "a" }, /field "common_opt": unknown key in kernels\.json; did you mean "common_opts"\?/, { common_opt: [] });
});

test("url forms: git (lvh's ?depth and #ref), tarballs by URL or path, folders relative to kernels.json", () => {
  assert.deepEqual(parseKernelUrl("https://github.com/torvalds/linux.git#v6.6", "/k", "w"), { kind: "git", repo: "https://github.com/torvalds/linux.git", ref: "v6.6", depth: undefined });
  assert.deepEqual(parseKernelUrl("git@github.com:me/linux.git#dev", "/k", "w"), { kind: "git", repo: "git@github.com:me/linux.git", ref: "dev", depth: undefined });
  assert.deepEqual(parseKernelUrl("https://cdn.kernel.org/pub/linux/kernel/v6.x/linux-6.6.1.tar.xz", "/k", "w"), { kind: "tarball-url", url: "https://cdn.kernel.org/pub/linux/kernel/v6.x/linux-6.6.1.tar.xz" });
  assert.deepEqual(parseKernelUrl("/usr/src/linux-source-6.1.tar.xz", "/k", "w"), { kind: "tarball", path: "/usr/src/linux-source-6.1.tar.xz" });
  assert.deepEqual(parseKernelUrl("../linux", "/work/k", "w"), { kind: "dir", path: "/work/linux" });
  assert.deepEqual(parseKernelUrl("file:///src/linux", "/k", "w"), { kind: "dir", path: "/src/linux" });
  assert.throws(() => parseKernelUrl("http://example.org/linux", "/k", "k.json: field \"kernels[0].url\""), /k\.json: field "kernels\[0\]\.url": .*plain http URL that names no tarball; give a git URL/);
  assert.throws(() => parseKernelUrl("ftp://x/linux.git", "/k", "w"), /URL scheme "ftp:" is not supported/);
  assert.throws(() => parseKernelUrl("git://x/l.git?depth=zero", "/k", "w"), /only query lvh's URLs take is \?depth=N/);
});

test("a local folder must be a Linux tree; its fingerprint follows its files", async () => {
  const dir = tempDir();
  await assert.rejects(fingerprintSource({ kind: "dir", path: join(dir, "nope") }, "k.json: field \"kernels[0].url\""), /k\.json: field "kernels\[0\]\.url": .*nope is not a folder/);
  await assert.rejects(fingerprintSource({ kind: "dir", path: dir }, "w"), /is not a Linux source tree \(no Makefile, Kconfig and scripts\/config\)/);
  mkdirSync(join(dir, "scripts"));
  for (const f of ["Makefile", "Kconfig", "scripts/config"]) writeFileSync(join(dir, f), "x");
  const a = await fingerprintSource({ kind: "dir", path: dir }, "w");
  assert.equal(await fingerprintSource({ kind: "dir", path: dir }, "w"), a, "same files, same fingerprint");
  writeFileSync(join(dir, "Makefile"), "changed, longer");
  assert.notEqual(await fingerprintSource({ kind: "dir", path: dir }, "w"), a);
  await assert.rejects(fingerprintSource({ kind: "tarball", path: join(dir, "l.tar.xz") }, "w"), /is not a file \(a kernel source tarball\)/);
});

test("what did not take after olddefconfig; the key follows source, options and compiler", () => {
  const ops = [
    { op: "enable", name: "CONFIG_A" }, { op: "module", name: "B" }, { op: "module", name: "CONFIG_C" },
    { op: "disable", name: "CONFIG_GONE" }, { op: "set-val", name: "CONFIG_N", value: "4" }, { op: "enable", name: "CONFIG_LOST" },
  ] as const;
  const config = "CONFIG_A=y\nCONFIG_B=m\nCONFIG_C=y\nCONFIG_N=8\n# CONFIG_LOST is not set\n";
  assert.deepEqual(notApplied([...ops], config), ["CONFIG_N=4 (is 8)", "CONFIG_LOST=y (is not set)"]);
  const entry = { name: "k", opts: [...ops], extraMakeArgs: [], baseConfig: ["defconfig"] };
  const k = buildKey({ source: "sha256:1", entry, commonOpts: [], cc: "gcc 12" });
  assert.equal(buildKey({ source: "sha256:1", entry, commonOpts: [], cc: "gcc 12" }), k);
  assert.notEqual(buildKey({ source: "sha256:2", entry, commonOpts: [], cc: "gcc 12" }), k);
  assert.notEqual(buildKey({ source: "sha256:1", entry: { ...entry, baseConfig: ["tinyconfig"] }, commonOpts: [], cc: "gcc 12" }), k);
  assert.notEqual(buildKey({ source: "sha256:1", entry, commonOpts: [{ op: "disable", name: "X" }], cc: "gcc 12" }), k);
  assert.notEqual(buildKey({ source: "sha256:1", entry, commonOpts: [], cc: "gcc 13" }), k);
});

test("install-kernel: a kernel that is not stored is an error naming the image and field; no action, no expansion", async () => {
  const { expandInstallKernels } = await import("../../src/images/install-kernel.js");
  const dir = tempDir();
  const spec = {
    name: "img", parent: "base", actions: [{ kind: "run", command: "true" }, { kind: "install-kernel", kernel: "bpf-next" }],
    source: { file: "images.yaml", baseDir: dir, index: 0, lvh: false, builtin: false },
  } as unknown as import("../../src/images/types.js").ImageSpec;
  await assert.rejects(expandInstallKernels([spec], join(dir, "state"), join(dir, "stage")), (e: Error & { exitCode?: number }) => {
    assert.equal(e.exitCode, 2);
    assert.match(e.message, /field "actions\[1\]\.install-kernel": no kernel named "bpf-next"; no kernels are stored\. Add one with/);
    return true;
  });
  const plain = { ...spec, actions: [{ kind: "run", command: "true" }] } as typeof spec;
  assert.deepEqual(await expandInstallKernels([plain], join(dir, "state"), join(dir, "stage")), [plain]);
});
