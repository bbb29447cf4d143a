// The config drive: an ISO 9660 image labelled "instance-configuration" (Joliet + Rock
// Ridge) holding one file, instance.json = {"name", "config"}. The content is rendered as
// data first; only then written. It may hold secrets: every file is 0600 and lives in the
// VM's private work dir, which is deleted with the VM.
import { mkdir, writeFile, rm, chmod } from "node:fs/promises";
import { dirname, join } from "node:path";
import { run, which } from "../exec/index.js";
import { HostError } from "../errors/index.js";
import type { JsonValue } from "../config/types.js";

export const CONFIG_DRIVE_LABEL = "instance-configuration";
export const INSTANCE_FILE = "instance.json";

export interface ConfigDriveEntry {
  /** Relative path inside the ISO (folders are created). */
  path: string;
  content: string | Buffer;
}

/** instance.json: {name, config}, and for a VM restored from a snapshot `restore` (guest/README.md). */
export function renderConfigDrive(name: string, config: JsonValue, restore?: { rtcLagMicros?: number }): ConfigDriveEntry[] {
  return [{ path: INSTANCE_FILE, content: JSON.stringify(restore ? { name, config, restore } : { name, config }, null, 2) + "\n" }];
}

/** Writes the entries as an ISO at `isoPath`, staging them in `stagingDir` (removed after). */
export async function writeConfigDrive(entries: ConfigDriveEntry[], isoPath: string, stagingDir: string): Promise<void> {
  await mkdir(stagingDir, { mode: 0o700 });
  try {
    for (const e of entries) {
      const dest = join(stagingDir, e.path);
      await mkdir(dirname(dest), { recursive: true, mode: 0o700 });
      await writeFile(dest, e.content, { mode: 0o600 });
    }
    // genisoimage starts in a few ms, xorriso in ~100 ms: prefer it when both are there.
    const tool = (await which("genisoimage")) ? "genisoimage" : (await which("xorriso")) ? "xorriso" : undefined;
    if (!tool) throw new HostError("Neither xorriso nor genisoimage is installed; civm needs one to write the config drive. Install it with: apt-get install -y xorriso");
    const mkisofs = ["-V", CONFIG_DRIVE_LABEL, "-J", "-R", "-quiet", "-o", isoPath, stagingDir];
    await run(tool, tool === "xorriso" ? ["-as", "mkisofs", ...mkisofs] : mkisofs, { failCode: "host" });
    await chmod(isoPath, 0o600);
  } finally {
    await rm(stagingDir, { recursive: true, force: true });
  }
}
