// Which 9p security model a host folder gets. mapped-xattr keeps the guest's owners and
// modes in user.* xattrs; on a filesystem that may not store them, guest writes would fail
// with EOPNOTSUPP, so those folders get mapped-file (just as safe, with .virtfs_metadata
// folders beside the files). Never passthrough unless asked.
import { statfs } from "node:fs/promises";
import { release } from "node:os";
import type { NinePSecurityModel } from "./argv.js";

/** statfs f_type of filesystems that do not (or not reliably) keep user.* xattrs. */
const NO_USER_XATTR: ReadonlyMap<number, string> = new Map([
  [0x4d44, "vfat"],
  [0x2011bab0, "exfat"],
  [0x858458f6, "ramfs"],
  [0x6969, "nfs"], // only NFS 4.2 with a server that supports them
  [0xfe534d42, "smb2"],
  [0xff534d42, "cifs"],
  [0x65735546, "fuse"], // sshfs and others have none
  [0x01021997, "9p"],
]);
const TMPFS_MAGIC = 0x01021994;

/** Whether a kernel release (uname -r) is at least major.minor. */
export function kernelAtLeast(rel: string, major: number, minor: number): boolean {
  const m = /^(\d+)\.(\d+)/.exec(rel);
  if (!m) return false;
  const [a, b] = [Number(m[1]), Number(m[2])];
  return a > major || (a === major && b >= minor);
}

/** The filesystem's name when it may not keep user.* xattrs, else undefined. Pure. */
export function lacksUserXattrs(fsType: number, kernelRelease: string): string | undefined {
  // tmpfs has user.* xattrs since Linux 6.6.
  if (fsType === TMPFS_MAGIC) return kernelAtLeast(kernelRelease, 6, 6) ? undefined : "tmpfs (before Linux 6.6)";
  return NO_USER_XATTR.get(fsType);
}

export interface ModeChoice {
  model: NinePSecurityModel;
  /** Why mapped-file was chosen (to print). */
  note?: string;
}

/** mapped-xattr, or mapped-file on a filesystem that lacks user xattrs (with the reason). */
export async function securityModelFor(path: string, o: { passthrough?: boolean; kernelRelease?: string } = {}): Promise<ModeChoice> {
  if (o.passthrough) return { model: "passthrough" };
  const st = await statfs(path);
  const fs = lacksUserXattrs(Number(st.type), o.kernelRelease ?? release());
  if (!fs) return { model: "mapped-xattr" };
  return {
    model: "mapped-file",
    note: `${path} is on ${fs}, which may not keep the user.* extended attributes where QEMU's mapped-xattr model stores guest owners and modes; sharing it with security_model=mapped-file instead (as safe: no setuid or device files reach the host; QEMU keeps the guest's view in .virtfs_metadata folders inside it)`,
  };
}
