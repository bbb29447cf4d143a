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
/** What the agent says a dev VM lacks for SSH (guest/lib/civm-agent.sh report_ssh_path). */
const AGENT_NO_SSH_PATH = /civm-agent: (network: none|sshd: not )[^\r\n]*/g;
const AGENT_HAS_ADDRESS = /civm-agent: network: (?!none)\S/;

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

/** What a failed SSH probe says about the guest. */
export type SshFailure = "refused" | "no-guest" | "denied" | "other";

/**
 * QEMU's user network accepts the connection on the host port itself, then connects to the
 * guest: when nothing answers there (no address in the guest, no sshd) ssh sees the
 * connection reset or silent at the banner, never "refused".
 */
export function classifySshFailure(stderr: string): SshFailure {
  if (/Connection refused/i.test(stderr)) return "refused";
  if (/Permission denied|Too many authentication failures/i.test(stderr)) return "denied";
  if (/banner exchange|kex_exchange_identification|Connection reset|Connection closed by remote host|closed by .* port/i.test(stderr)) return "no-guest";
  return "other";
}

/** How long SSH may fail the same way, once the guest is known to be up, before wait says why. */
export const SSH_DIAGNOSIS_MS = 15_000;

export function explainSshFailure(kind: SshFailure, t: { host: string; port: number; user: string; key: string }): string {
  switch (kind) {
    case "no-guest":
      return `QEMU accepts connections on ${t.host}:${t.port} but the guest does not answer on port 22: the guest has no network address (the image configures no DHCP client: civm's images need one, e.g. systemd-networkd with DHCP on en*) or no sshd runs in it`;
    case "denied":
      return `sshd in the guest answers but refuses ${t.user} with the key ${t.key}: give the key the image trusts (--ssh-key) and its user (--ssh-user)`;
    case "refused":
      return `nothing listens on ${t.host}:${t.port} (QEMU's SSH forward is gone)`;
    default:
      return "SSH fails";
  }
}

/** Resolves with the milliseconds waited; throws CivmError "timeout" (exit 3) or "qemu" (the VM ended, exit 4). */
export async function waitUntilReady(e: RegistryEntry, dev: DevMeta | undefined, o: WaitOptions): Promise<number> {
  const started = Date.now();
  if (o.mode === "both" && dev?.agent === false) {
    o.log?.(`${e.name}: started with --ssh-key (an image without civm's agent): waiting for SSH alone`);
    o = { ...o, mode: "ssh" };
  }
  const deadline = started + o.timeoutMs;
  const entryFile = join(o.stateDir, STATE_LAYOUT.registry, `${e.id}.json`);
  let consoleText = "";
  let offset = 0;
  // The agent's line is needed unless --ssh; it is read in every mode (it says the guest is up).
  let agentReady = false;
  let keysInstalled = o.mode === "ssh";
  let sshOk = false;
  let lastSsh = "";
  // The same SSH failure since this time (reset when it changes).
  let failing: { kind: SshFailure; since: number; told: number } | undefined;
  const consoleTail = () => `--- console ${e.consoleLog} (tail) ---\n${tailLines(consoleText, 30)}`;
  if (o.mode !== "console" && !dev) throw new CivmError("config", `VM "${e.name}" has no civm-made SSH key (not started with civm run --image); use civm wait --console`);
  for (;;) {
    const chunk = await readFrom(e.consoleLog, offset);
    if (chunk.text) {
      // Keep the last 256 KiB: enough for the tail and for a line split across reads.
      consoleText = (consoleText + chunk.text).slice(-256 * 1024);
      offset = chunk.offset;
    }
    if (!agentReady && consoleText.includes(AGENT_READY)) {
      agentReady = true;
      o.log?.(`${e.name}: agent ready after ${formatSeconds(Date.now() - started)}`);
    }
    const consoleReady = agentReady || o.mode === "ssh";
    keysInstalled ||= consoleReady || consoleText.includes(AGENT_KEYS);
    const failed = AGENT_FAILED.exec(consoleText);
    if (failed && !agentReady) throw new CivmError("qemu", `${e.name}: the guest agent failed: ${failed[0]}`, { details: consoleTail() });
    // The agent looked: no address or no sshd will not heal by waiting.
    const lacks = o.mode === "console" || sshOk ? [] : [...consoleText.matchAll(AGENT_NO_SSH_PATH)].map((m) => m[0].replace(/^civm-agent: /, ""));
    if (lacks.length) {
      throw new CivmError("timeout", `${e.name}: SSH cannot work: the guest agent reports ${lacks.join("; ")}`, { details: consoleTail() });
    }
    if (o.mode === "console" && consoleReady) return Date.now() - started;
    // SSH is tried as soon as the key is in place, while the agent still mounts the folders.
    if (o.mode !== "console" && keysInstalled && !sshOk) {
      const probe = await sshProbe(dev!.ssh, Math.max(1000, Math.min(10_000, deadline - Date.now())));
      sshOk = probe.ok;
      if (!probe.ok) {
        lastSsh = probe.stderr.trim();
        const kind = classifySshFailure(lastSsh);
        if (failing?.kind !== kind) failing = { kind, since: Date.now(), told: Date.now() };
        const why = explainSshFailure(kind, dev!.ssh);
        // Once civm's agent is ready the guest is up: a lasting failure will not heal by waiting.
        // When the agent saw an address and an sshd, "no answer" is an sshd still starting (host
        // keys first; slow on a loaded host): that one waits for the timeout.
        const agentSawPath = AGENT_HAS_ADDRESS.test(consoleText);
        if (agentReady && kind !== "other" && !(kind === "no-guest" && agentSawPath) && Date.now() - failing.since >= SSH_DIAGNOSIS_MS) {
          throw new CivmError("timeout", `${e.name}: the guest agent is ready but SSH does not work: ${why}`, { details: `${lastSsh.split("\n").pop()}\n${consoleTail()}` });
        }
        // Without the agent, booting looks the same for a while: say what it looks like, then go on.
        if (kind !== "other" && Date.now() - failing.told >= 30_000) {
          failing.told = Date.now();
          o.log?.(`${e.name}: still no SSH after ${formatSeconds(Date.now() - started)}: ${why} (or the guest is still booting)`);
        }
      } else failing = undefined;
    }
    if (consoleReady && sshOk) return Date.now() - started;
    if (!existsSync(entryFile) || liveness(e) !== "running") {
      const rest = await readFrom(e.consoleLog, offset);
      consoleText += rest.text;
      throw new CivmError("qemu", `${e.name}: the VM ended before it was ready`, { details: consoleTail() });
    }
    if (Date.now() > deadline) {
      const what = !consoleReady
        ? `the guest agent did not print "${AGENT_READY}"${o.mode === "both" && !consoleText.includes("civm-agent:") ? " (the console shows no civm agent at all: for an image without it, give --ssh-key and --ssh-user)" : ""}`
        : `SSH to ${dev!.ssh.host}:${dev!.ssh.port} does not answer${failing ? `: ${explainSshFailure(failing.kind, dev!.ssh)}` : ""}${lastSsh ? ` (${lastSsh.split("\n").pop()})` : ""}`;
      throw new CivmError("timeout", `${e.name}: not ready after ${formatSeconds(o.timeoutMs)}: ${what}`, { details: consoleTail() });
    }
    await sleep(keysInstalled && !sshOk ? (o.intervalMs ?? 250) : 100);
  }
}
