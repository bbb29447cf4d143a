// The tests' tiny guest as a stored image ("tiny" in a state dir's image store), for what
// only stored images have: memory snapshots (docs/images.md "Snapshots"). The files are
// hard links to (or copies of) the cached tiny guest; the manifest is written by hand, the
// way the store's commit() would, with the tiny guest's cache hash as its key.
import { copyFile, link, mkdir, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { buildTinyGuest, type TinyGuest } from "./tiny-guest.js";

export const TINY_IMAGE = "tiny";

async function place(from: string, to: string): Promise<void> {
  await link(from, to).catch(() => copyFile(from, to));
}

/** Stores the tiny guest (x86_64, or the arm64 one) as image `name` in stateDir's store (once per state dir). */
export async function storeTinyGuest(stateDir: string, name = TINY_IMAGE, o: { arch?: "arm64" } = {}): Promise<{ guest: TinyGuest; dir: string }> {
  const guest = await buildTinyGuest(o.arch ? { arch: o.arch } : {});
  const dir = join(stateDir, "images", name);
  await mkdir(dir, { recursive: true, mode: 0o755 });
  await place(guest.disk, join(dir, "disk.qcow2"));
  await place(guest.kernel, join(dir, "vmlinuz"));
  await place(guest.initrd, join(dir, "initrd.img"));
  const disk = await stat(join(dir, "disk.qcow2"));
  const key = guest.dir.split("/").pop()!.padEnd(64, "0");
  const manifest = {
    name, key, format: "qcow2", disk: "disk.qcow2", kernel: "vmlinuz", initrd: "initrd.img",
    sha256: key, diskBytes: disk.size, virtualSize: 64 * 1024 ** 2, packages: {}, buildSeconds: 0,
    createdAt: new Date().toISOString(), source: "build", ...(o.arch ? { arch: o.arch } : {}),
  };
  await writeFile(join(dir, "manifest.json"), JSON.stringify(manifest, null, 2) + "\n");
  return { guest, dir };
}
