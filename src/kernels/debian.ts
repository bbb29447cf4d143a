// Debian kernel packages through apt: which linux-image-* a meta-package points to, a
// package's candidate version, downloading and unpacking a .deb. Used by `civm kernel add`
// and by the tests' tiny guest.
import { chmod, readdir } from "node:fs/promises";
import { join } from "node:path";
import { run } from "../exec/index.js";
import { ConfigError } from "../errors/index.js";

/** A Debian package name (policy: lowercase letters, digits, + - .; at least two characters). */
export const DEB_PACKAGE_RE = /^[a-z0-9][a-z0-9+.-]+$/;

/**
 * The versioned linux-image-* package a meta-package (linux-image-amd64,
 * linux-image-cloud-amd64) depends on; undefined when apt names none. A versioned package
 * name is returned as it is.
 */
export async function dependsOnKernelPackage(meta: string, aptOptions: readonly string[] = []): Promise<string | undefined> {
  const { stdout } = await run("apt-cache", [...aptOptions, "depends", meta]).catch(() => ({ stdout: "" }));
  for (const line of stdout.split("\n")) {
    const m = /^\s*Depends:\s*(linux-image-[^\s<>]+)/.exec(line);
    if (m?.[1]) return m[1];
  }
  return undefined;
}

/** Candidate version of a package (apt-cache show); throws a ConfigError when apt does not know it. */
export async function packageVersion(pkg: string, aptOptions: readonly string[] = []): Promise<string> {
  let stdout = "";
  try {
    ({ stdout } = await run("apt-cache", [...aptOptions, "show", "--no-all-versions", pkg]));
  } catch {
    /* unknown package: apt-cache exits 100 */
  }
  const m = /^Version:\s*(\S+)/m.exec(stdout);
  if (!m?.[1]) {
    throw new ConfigError(`apt knows no package "${pkg}" (apt-cache show ${pkg}); run apt-get update, or list kernels with: apt-cache search --names-only '^linux-image-'`);
  }
  return m[1];
}

/**
 * apt-get download PKG into dir; returns the .deb's path. aptOptions: `-o` settings, e.g.
 * another architecture's own package lists (see foreignAptOptions).
 */
export async function aptDownload(pkg: string, dir: string, aptOptions: readonly string[] = []): Promise<string> {
  // _apt must be able to write into the download dir or apt warns and downloads as root.
  await chmod(dir, 0o777);
  await run("apt-get", [...aptOptions, "download", pkg], { cwd: dir, timeoutMs: 600_000, failCode: "host" });
  const deb = (await readdir(dir)).find((f) => f.startsWith(`${pkg}_`) && f.endsWith(".deb"));
  if (!deb) throw new Error(`apt-get download ${pkg} left no .deb in ${dir}`);
  return join(dir, deb);
}

/** dpkg-deb -x DEB DIR. */
export async function extractDeb(deb: string, dir: string): Promise<void> {
  await run("dpkg-deb", ["-x", deb, dir], { failCode: "host", timeoutMs: 600_000 });
}

/** Fields of a .deb's control file (Package, Version, ...). */
export async function debFields(deb: string): Promise<Record<string, string>> {
  const { stdout } = await run("dpkg-deb", ["-f", deb]);
  const out: Record<string, string> = {};
  for (const line of stdout.split("\n")) {
    const m = /^([A-Za-z0-9-]+):\s*(.*)$/.exec(line);
    if (m?.[1]) out[m[1]] = m[2] ?? "";
  }
  return out;
}

/**
 * apt settings for another architecture's packages (e.g. arm64 on an amd64 host) without
 * touching the host's dpkg (no `dpkg --add-architecture`): the host's sources, but package
 * lists, cache and an empty dpkg status of their own under `dir`. Run `apt-get update` with
 * them once (foreignAptUpdate) before asking apt-cache or downloading.
 */
export function foreignAptOptions(dir: string, debianArch: string): string[] {
  return [
    "-o", `Dir::State::Lists=${join(dir, "lists")}`,
    "-o", `Dir::Cache=${join(dir, "cache")}`,
    "-o", `Dir::State::status=${join(dir, "status")}`,
    "-o", `APT::Architecture=${debianArch}`,
    "-o", `APT::Architectures::=${debianArch}`,
    "-o", "APT::Sandbox::User=root",
  ];
}

/** apt-get update for foreignAptOptions(dir, arch): makes the folders, fetches that architecture's lists. */
export async function foreignAptUpdate(dir: string, debianArch: string): Promise<string[]> {
  const { mkdir, writeFile } = await import("node:fs/promises");
  await mkdir(join(dir, "lists", "partial"), { recursive: true });
  await mkdir(join(dir, "cache", "archives", "partial"), { recursive: true });
  await writeFile(join(dir, "status"), "");
  const opts = foreignAptOptions(dir, debianArch);
  await run("apt-get", [...opts, "update"], { timeoutMs: 600_000, failCode: "host" });
  return opts;
}
