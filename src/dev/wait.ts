// civm wait: until a dev VM is usable. By default the guest agent must have printed
// "civm-agent: ready" on the console (key installed, host folders mounted) and SSH must run
// `true` with the VM's key; --ssh checks SSH alone, --console the agent's line alone. SSH is
// first tried when the agent reports the key installed, so the SSH handshake overlaps the
// agent's 9p mounts.
import { existsSync } from "node:fs";
import { open } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { CivmError } from "../errors/index.js";
import { STATE_LAYOUT } from "../host/paths.js";
import { liveness, type RegistryEntry } from "../vm/registry.js";
import { tailLines } from "../vm/console.js";
import { formatSeconds } from "../vm/format.js";
import type { DevMeta } from "./meta.js";
import { sshProbe } from "./ssh.js";

export type WaitMode = "both" | "ssh" | "console";

export const AGENT_READY = "civm-agent: ready";
/** The agent installed the keys: SSH can work from here, while it still mounts the host folders. */
const AGENT_KEYS = "civm-agent: installed ";
const AGENT_FAILED = /civm-agent: error: .*|civm-agent: powering off/;

export interface WaitOptions {
  mode: WaitMode;
  timeoutMs: number;
  stateDir: string;
  /** Poll interval between SSH attempts. */
  intervalMs?: number;
  log?: (line: string) => void;
}

/** Reads a growing file from an offset (returns the new text and offset). */
async function readFrom(path: string, offset: number): Promise<{ text: string; offset: number }> {
  let fh;
  try {
    fh = await open(path, "r");
    const chunks: Buffer[] = [];
    const buf = Buffer.alloc(64 * 1024);
    let off = offset;
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, off);
      if (bytesRead <= 0) break;
      chunks.push(Buffer.from(buf.subarray(0, bytesRead)));
      off += bytesRead;
    }
    return { text: Buffer.concat(chunks).toString("utf8"), offset: off };
  } catch {
    return { text: "", offset };
  } finally {
    await fh?.close();
  }
}

/** Resolves with the milliseconds waited; throws CivmError "timeout" (exit 3) or "qemu" (the VM ended, exit 4). */
export async function waitUntilReady(e: RegistryEntry, dev: DevMeta | undefined, o: WaitOptions): Promise<number> {
  const started = Date.now();
  const deadline = started + o.timeoutMs;
  const entryFile = join(o.stateDir, STATE_LAYOUT.registry, `${e.id}.json`);
  let consoleText = "";
  let offset = 0;
  let consoleReady = o.mode === "ssh";
  let keysInstalled = o.mode === "ssh";
  let sshOk = false;
  let lastSsh = "";
  const consoleTail = () => `--- console ${e.consoleLog} (tail) ---\n${tailLines(consoleText, 30)}`;
  if (o.mode !== "console" && !dev) throw new CivmError("config", `VM "${e.name}" has no civm-made SSH key (not started with civm run --image); use civm wait --console`);
  for (;;) {
    const chunk = await readFrom(e.consoleLog, offset);
    if (chunk.text) {
      // Keep the last 256 KiB: enough for the tail and for a line split across reads.
      consoleText = (consoleText + chunk.text).slice(-256 * 1024);
      offset = chunk.offset;
    }
    if (!consoleReady && consoleText.includes(AGENT_READY)) {
      consoleReady = true;
      o.log?.(`${e.name}: agent ready after ${formatSeconds(Date.now() - started)}`);
    }
    keysInstalled ||= consoleReady || consoleText.includes(AGENT_KEYS);
    const failed = AGENT_FAILED.exec(consoleText);
    if (failed && !consoleReady) throw new CivmError("qemu", `${e.name}: the guest agent failed: ${failed[0]}`, { details: consoleTail() });
    if (o.mode === "console" && consoleReady) return Date.now() - started;
    // SSH is tried as soon as the key is in place, while the agent still mounts the folders.
    if (o.mode !== "console" && keysInstalled && !sshOk) {
      const probe = await sshProbe(dev!.ssh, Math.max(1000, Math.min(10_000, deadline - Date.now())));
      sshOk = probe.ok;
      if (!probe.ok) lastSsh = probe.stderr.trim();
    }
    if (consoleReady && sshOk) return Date.now() - started;
    if (!existsSync(entryFile) || liveness(e) !== "running") {
      const rest = await readFrom(e.consoleLog, offset);
      consoleText += rest.text;
      throw new CivmError("qemu", `${e.name}: the VM ended before it was ready`, { details: consoleTail() });
    }
    if (Date.now() > deadline) {
      const what = !consoleReady ? `the guest agent did not print "${AGENT_READY}"` : `SSH to ${dev!.ssh.host}:${dev!.ssh.port} does not answer${lastSsh ? ` (${lastSsh.split("\n").pop()})` : ""}`;
      throw new CivmError("timeout", `${e.name}: not ready after ${formatSeconds(o.timeoutMs)}: ${what}`, { details: consoleTail() });
    }
    await sleep(keysInstalled && !sshOk ? (o.intervalMs ?? 250) : 100);
  }
}
