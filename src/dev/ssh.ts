// SSH to dev VMs: a key pair per VM, the ssh command line civm uses (host keys change at
// every boot by design, so they are neither checked nor recorded), quoting of remote
// commands, a probe, and picking a free host port.
import { spawn } from "node:child_process";
import { mkdir, readFile } from "node:fs/promises";
import { createServer } from "node:net";
import { join } from "node:path";
import { run } from "../exec/index.js";
import { HostError } from "../errors/index.js";

export interface SshTarget {
  host: string;
  port: number;
  /** Private key file. */
  key: string;
  user: string;
}

/** Folder inside the VM's work dir that holds its key pair. */
export const SSH_DIR = "ssh";
export const SSH_KEY_FILE = "id_ed25519";

/** Options of every ssh civm runs (before the destination). */
export function sshOptions(t: SshTarget, extra: { connectTimeout?: number } = {}): string[] {
  return [
    "-F", "/dev/null", // the user's ~/.ssh/config has no say (ControlMaster, ProxyJump, ...)
    "-i", t.key,
    "-p", String(t.port),
    "-o", "IdentitiesOnly=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
    "-o", `ConnectTimeout=${extra.connectTimeout ?? 10}`,
    // X25519 first: OpenSSH 9's default post-quantum kex costs ~150 ms more per connection
    // in a TCG guest, and these connections do not check host keys anyway.
    "-o", "KexAlgorithms=^curve25519-sha256,curve25519-sha256@libssh.org",
    "-o", "ServerAliveInterval=15",
    "-o", "ServerAliveCountMax=4",
  ];
}

/** Quotes one word for a POSIX shell. */
export function shellQuote(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/**
 * The remote command line for `civm exec NAME -- ARGS...`: one argument is a shell command
 * line as it is (`civm exec vm -- 'cd /host && make'`); several are an argv, each quoted
 * (`civm exec vm -- sh -c 'exit 3'`). `cwd` prefixes a `cd`.
 */
export function remoteCommand(argv: readonly string[], cwd?: string): string {
  const cmd = argv.length === 1 ? argv[0]! : argv.map(shellQuote).join(" ");
  return cwd ? `cd ${shellQuote(cwd)} && ${cmd}` : cmd;
}

/** Full ssh argv for running `remote` (or a login shell when undefined). */
export function sshArgv(t: SshTarget, remote: string | undefined, opts: { tty?: boolean; connectTimeout?: number } = {}): string[] {
  return [...sshOptions(t, opts), ...(opts.tty ? ["-t"] : ["-T"]), `${t.user}@${t.host}`, ...(remote !== undefined ? ["--", remote] : [])];
}

/** Makes <workDir>/ssh/id_ed25519(.pub); returns the private key path and the public key line. */
export async function makeKeyPair(workDir: string, comment: string): Promise<{ privateKey: string; publicKey: string }> {
  const dir = join(workDir, SSH_DIR);
  await mkdir(dir, { mode: 0o700 });
  const privateKey = join(dir, SSH_KEY_FILE);
  await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", privateKey], { failCode: "host" });
  const publicKey = (await readFile(`${privateKey}.pub`, "utf8")).trim();
  return { privateKey, publicKey };
}

/** A TCP port on `addr` that is free right now (the kernel picks it). */
export function freePort(addr: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", (e) => reject(new HostError(`cannot find a free port on ${addr}: ${e.message}`)));
    srv.listen({ port: 0, host: addr, exclusive: true }, () => {
      const a = srv.address();
      const port = typeof a === "object" && a ? a.port : 0;
      srv.close(() => (port ? resolve(port) : reject(new HostError(`cannot find a free port on ${addr}`))));
    });
  });
}

/** Runs `true` over SSH; resolves to whether it succeeded (never throws). */
export function sshProbe(t: SshTarget, timeoutMs = 15_000): Promise<{ ok: boolean; stderr: string }> {
  return new Promise((resolve) => {
    let stderr = "";
    let child;
    try {
      child = spawn("ssh", sshArgv(t, "true", { connectTimeout: Math.max(1, Math.ceil(timeoutMs / 1000)) }), { stdio: ["ignore", "ignore", "pipe"] });
    } catch (e) {
      resolve({ ok: false, stderr: (e as Error).message });
      return;
    }
    // ssh's own ConnectTimeout covers the banner exchange too and says so on stderr; this is
    // the backstop, a little later so that ssh's message comes first.
    let killed = false;
    const timer = setTimeout(() => {
      killed = true;
      child.kill("SIGKILL");
    }, timeoutMs + 3_000);
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr = (stderr + d).slice(-2000)));
    child.on("error", (e) => {
      clearTimeout(timer);
      resolve({ ok: false, stderr: e.message });
    });
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ ok: code === 0, stderr: killed && !stderr.trim() ? `no answer during banner exchange within ${Math.round(timeoutMs / 1000)} s (ssh ended by civm)` : stderr });
    });
  });
}
