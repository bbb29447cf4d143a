// The one helper through which civm runs external programs (qemu-img, xorriso, ...).
// A failure becomes a CivmError naming the program, its arguments and what it printed.
import { spawn } from "node:child_process";
import { CivmError, HostError, type ErrorCode } from "../errors/index.js";

/** Debian package that provides each program civm calls; used in hints. */
export const PACKAGE_OF: Record<string, string> = {
  "qemu-system-x86_64": "qemu-system-x86",
  "qemu-system-aarch64": "qemu-system-arm",
  "qemu-img": "qemu-utils",
  xorriso: "xorriso",
  genisoimage: "genisoimage",
  mmdebstrap: "mmdebstrap",
  mke2fs: "e2fsprogs",
  "ssh-keygen": "openssh-client",
  ssh: "openssh-client",
  zstd: "zstd",
  "apt-get": "apt",
  "dpkg-deb": "dpkg",
  "dpkg-query": "dpkg",
  "dpkg-repack": "dpkg-repack",
  sfdisk: "fdisk",
  debugfs: "e2fsprogs",
  depmod: "kmod",
  cpio: "cpio",
  xz: "xz-utils",
  unshare: "util-linux",
  setpriv: "util-linux",
  nft: "nftables",
  useradd: "passwd",
  "docker-registry": "docker-registry",
  squid: "squid",
};

export interface RunOptions {
  /** Data written to stdin, then closed. */
  input?: string | Buffer;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Error code when the program exits non-zero (default "internal"). */
  failCode?: ErrorCode;
  /** Kill the program after this many ms. */
  timeoutMs?: number;
  /** Called with each chunk of stderr as it arrives (progress). */
  onStderr?: (chunk: string) => void;
  onStdout?: (chunk: string) => void;
  /** Ends the program (SIGTERM, SIGKILL 10 s later) and rejects with the signal's reason. */
  signal?: AbortSignal;
}

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number;
}

function tail(text: string, lines = 15): string {
  const all = text.trimEnd().split("\n");
  return all.slice(-lines).join("\n");
}

export function describeCommand(program: string, args: readonly string[]): string {
  return [program, ...args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : JSON.stringify(a))).join(" ");
}

export class ToolError extends CivmError {
  readonly program: string;
  readonly exitStatus: number | null;
  readonly stderr: string;
  constructor(code: ErrorCode, program: string, args: readonly string[], status: number | null, stderr: string, why: string) {
    super(code, `${program} ${why}: ${describeCommand(program, args)}`, {
      details: stderr.trim() ? tail(stderr) : undefined,
    });
    this.name = "ToolError";
    this.program = program;
    this.exitStatus = status;
    this.stderr = stderr;
  }
}

export function missingProgram(program: string): HostError {
  const pkg = PACKAGE_OF[program];
  return new HostError(
    `${program} is not installed or not on PATH.` + (pkg ? ` Install it with: apt-get install -y ${pkg}` : ""),
  );
}

/** Runs a program to completion; rejects with a ToolError on a non-zero exit. */
export function run(program: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    if (opts.signal?.aborted) return reject(abortReason(opts.signal));
    const child = spawn(program, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: ["pipe", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    let timedOut = false;
    const timer =
      opts.timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            child.kill("SIGKILL");
          }, opts.timeoutMs);
    // An interrupted build: the program gets SIGTERM (mmdebstrap cleans up after itself), then SIGKILL.
    let killTimer: NodeJS.Timeout | undefined;
    const onAbort = () => {
      child.kill("SIGTERM");
      killTimer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    };
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    child.stdout.setEncoding("utf8").on("data", (d: string) => {
      stdout += d;
      opts.onStdout?.(d);
    });
    child.stderr.setEncoding("utf8").on("data", (d: string) => {
      stderr += d;
      opts.onStderr?.(d);
    });
    const settle = () => {
      if (timer) clearTimeout(timer);
      if (killTimer) clearTimeout(killTimer);
      opts.signal?.removeEventListener("abort", onAbort);
    };
    child.on("error", (err: NodeJS.ErrnoException) => {
      settle();
      reject(err.code === "ENOENT" ? missingProgram(program) : err);
    });
    child.on("close", (code, signal) => {
      settle();
      if (opts.signal?.aborted) {
        reject(abortReason(opts.signal));
      } else if (timedOut) {
        reject(new ToolError(opts.failCode ?? "internal", program, args, null, stderr, `timed out after ${opts.timeoutMs} ms`));
      } else if (code === 0) {
        resolve({ stdout, stderr, code });
      } else {
        const why = signal ? `was killed by ${signal}` : `failed (exit ${code})`;
        reject(new ToolError(opts.failCode ?? "internal", program, args, code, stderr, why));
      }
    });
    child.stdin.on("error", () => {
      /* the program may exit before reading its input */
    });
    child.stdin.end(opts.input ?? "");
  });
}

/** The reason an AbortSignal carries, as an Error (a CivmError "signal" from the CLI). */
function abortReason(signal: AbortSignal): Error {
  const r: unknown = signal.reason;
  return r instanceof Error ? r : new CivmError("signal", String(r ?? "interrupted"));
}

/** Finds a program on PATH; undefined when absent. */
export async function which(program: string): Promise<string | undefined> {
  const { access, constants } = await import("node:fs/promises");
  const { delimiter, join } = await import("node:path");
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    if (!dir) continue;
    const p = join(dir, program);
    try {
      await access(p, constants.X_OK);
      return p;
    } catch {
      /* keep looking */
    }
  }
  return undefined;
}
