// Building a small busybox initramfs: find a static busybox, copy kernel modules (in load
// order, decompressed), write a newc cpio and gzip it. Shared by `civm kernel add` and the
// tests' tiny guest.
import { createReadStream, createWriteStream } from "node:fs";
import { chmod, copyFile, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { pipeline } from "node:stream/promises";
import { createGzip } from "node:zlib";
import { run } from "../exec/index.js";
import { aptDownload, extractDeb } from "./debian.js";

export async function gzipFile(src: string, dst: string): Promise<void> {
  await pipeline(createReadStream(src), createGzip({ level: 6 }), createWriteStream(dst));
}

/** Installed busybox-static version, or undefined when it is not installed. */
export async function installedBusybox(): Promise<string | undefined> {
  try {
    const { stdout } = await run("dpkg-query", ["-W", "-f=${Status}\t${Version}", "busybox-static"]);
    const [status, version] = stdout.split("\t");
    return status?.endsWith(" installed") && version ? version : undefined;
  } catch {
    return undefined;
  }
}

/**
 * A static busybox binary: the host's busybox-static when installed, else one downloaded
 * with apt into `scratch` (which the caller removes).
 */
export async function staticBusybox(scratch: string, log: (l: string) => void): Promise<string> {
  if (await installedBusybox()) return "/bin/busybox";
  const dl = await mkdtemp(join(scratch, "bbdl-"));
  log("busybox-static is not installed; apt-get download busybox-static");
  const deb = await aptDownload("busybox-static", dl);
  const root = join(dl, "root");
  await extractDeb(deb, root);
  return join(root, "bin", "busybox");
}

/** Makes the bare initramfs tree: busybox as /bin/busybox and /bin/sh, and the usual mount points. */
export async function busyboxTree(tree: string, busybox: string, extraDirs: readonly string[] = []): Promise<void> {
  for (const d of ["bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "run", "root", ...extraDirs]) {
    await mkdir(join(tree, d), { recursive: true });
  }
  await copyFile(busybox, join(tree, "bin", "busybox"));
  await chmod(join(tree, "bin", "busybox"), 0o755);
  await symlink("busybox", join(tree, "bin", "sh"));
}

/**
 * Copies modules (paths relative to modDir, in load order) into the tree under
 * lib/modules/<kver>/, decompressing .ko.xz/.ko.zst/.ko.gz so busybox insmod can load them.
 * Returns their paths inside the tree (relative, without a leading slash), in the same order.
 */
export async function copyModules(tree: string, modDir: string, kernelVersion: string, modules: readonly string[]): Promise<string[]> {
  const out: string[] = [];
  for (const m of modules) {
    const plain = m.replace(/\.(xz|zst|gz)$/, "");
    const rel = join("lib", "modules", kernelVersion, plain);
    const dst = join(tree, rel);
    await mkdir(dirname(dst), { recursive: true });
    const src = join(modDir, m);
    if (m.endsWith(".xz")) await writeFile(dst, await readRaw("xz", src));
    else if (m.endsWith(".zst")) await writeFile(dst, await readRaw("zstd", src));
    else if (m.endsWith(".gz")) await writeFile(dst, await readRaw("gzip", src));
    else await copyFile(src, dst);
    out.push(rel);
  }
  return out;
}

/** Decompressed bytes of a file (binary-safe, unlike run()'s utf8 stdout). */
async function readRaw(tool: "xz" | "zstd" | "gzip", src: string): Promise<Buffer> {
  const { spawn } = await import("node:child_process");
  return new Promise((resolve, reject) => {
    const child = spawn(tool, ["-dc", src], { stdio: ["ignore", "pipe", "pipe"] });
    const chunks: Buffer[] = [];
    let err = "";
    child.stdout.on("data", (d: Buffer) => chunks.push(d));
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    child.on("error", reject);
    child.on("close", (code) => (code === 0 ? resolve(Buffer.concat(chunks)) : reject(new Error(`${tool} -dc ${src} failed (exit ${code}): ${err.trim()}`))));
  });
}

/** Packs the tree as a gzip'd newc cpio (sorted, owner 0:0, reproducible) into `out`. */
export async function packInitramfs(tree: string, out: string, scratch: string): Promise<void> {
  const { stdout: list } = await run("find", [".", "-mindepth", "1"], { cwd: tree });
  const sorted = list.split("\n").filter(Boolean).sort().join("\n") + "\n";
  const cpioFile = join(scratch, `initrd-${process.pid}-${Date.now()}.cpio`);
  try {
    await run("cpio", ["-o", "-H", "newc", "--owner=0:0", "--reproducible", "--quiet", "-O", cpioFile], { cwd: tree, input: sorted });
    await gzipFile(cpioFile, out);
  } finally {
    await rm(cpioFile, { force: true });
  }
}

/** Reads modules.dep and modules.builtin of lib/modules/<kver> ("" for a missing builtin list). */
export async function readModuleIndex(modDir: string): Promise<{ dep: string; builtin: string }> {
  const [dep, builtin] = await Promise.all([readFile(join(modDir, "modules.dep"), "utf8"), readFile(join(modDir, "modules.builtin"), "utf8").catch(() => "")]);
  return { dep, builtin };
}
