// The x86 boot protocol header of a bzImage: whether a file is one, and the kernel release
// it carries (what `uname -r` prints), without booting it.
import { open } from "node:fs/promises";

export interface BzImageInfo {
  /** e.g. "6.1.0-56-amd64" */
  release: string;
  /** The whole version string, e.g. "6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP ..." */
  versionString: string;
}

/** Parses the header from the first bytes of a file (0x8000 bytes hold the version string of any kernel seen so far). Pure. */
export function parseBzImage(head: Buffer): BzImageInfo | undefined {
  if (head.length < 0x210) return undefined;
  if (head.toString("latin1", 0x202, 0x206) !== "HdrS") return undefined;
  const ptr = head.readUInt16LE(0x20e);
  if (ptr === 0) return undefined;
  const start = ptr + 0x200;
  if (start >= head.length) return undefined;
  const end = head.indexOf(0, start);
  const versionString = head.toString("latin1", start, end < 0 ? Math.min(head.length, start + 256) : end).trim();
  const release = versionString.split(/\s+/)[0] ?? "";
  if (!/^\d+\.\d+/.test(release)) return undefined;
  return { release, versionString };
}

export async function readBzImage(path: string): Promise<BzImageInfo | undefined> {
  const fh = await open(path, "r");
  try {
    const buf = Buffer.alloc(0x8000);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    return parseBzImage(buf.subarray(0, bytesRead));
  } finally {
    await fh.close();
  }
}
