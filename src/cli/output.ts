// How the CLI talks to people: one prefix, errors as one paragraph, exit codes from the
// error's code. Stack traces only with CIVM_DEBUG=1 (a user's mistake never shows one).
import { CivmError, EXIT_CODES } from "../errors/index.js";

/**
 * An AbortSignal that fires on the first SIGINT/SIGTERM (a transfer or build ends cleanly:
 * its pending files removed, its children ended, exit 5) until release() is called. Later
 * signals do not kill civm halfway through that clean-up (which would orphan the children).
 */
export function abortOnSignals(what: string): { signal: AbortSignal; release(): void } {
  const controller = new AbortController();
  const onSignal = (sig: NodeJS.Signals) => {
    if (controller.signal.aborted) say(`${sig} again: still cleaning up, one moment`);
    else controller.abort(new CivmError("signal", `${sig}: ${what}`));
  };
  process.on("SIGINT", onSignal).on("SIGTERM", onSignal);
  return { signal: controller.signal, release: () => void process.off("SIGINT", onSignal).off("SIGTERM", onSignal) };
}

export function say(line: string): void {
  process.stderr.write(`civm: ${line}\n`);
}

let progressShown = false;
let lastPlainProgress = 0;

/**
 * Progress of a transfer on stderr: on a terminal one line rewritten in place, elsewhere
 * (CI logs) a plain line every 10 s. "layer 2/2: 120M of 900M, 40M/s".
 */
export function progressLine(format: (n: number) => string = (n) => `${Math.round(n / 1048576)} MiB`): (p: { what: string; bytes: number; total: number; bytesPerSecond: number }) => void {
  return (p) => {
    const rate = p.bytesPerSecond > 0 ? `, ${format(p.bytesPerSecond)}/s` : "";
    const text = `${p.what}: ${format(p.bytes)} of ${format(p.total)}${rate}`;
    if (process.stderr.isTTY) {
      progressShown = true;
      process.stderr.write(`\rcivm: ${text}\x1b[K`);
      return;
    }
    const now = Date.now();
    if (now - lastPlainProgress < 10_000 && p.bytes < p.total) return;
    lastPlainProgress = now;
    process.stderr.write(`civm: ${text}\n`);
  };
}

/** Ends a progress line (a terminal's in-place line gets its newline). */
export function clearProgress(): void {
  if (progressShown) process.stderr.write("\n");
  progressShown = false;
}

export function warn(line: string): void {
  process.stderr.write(`civm: warning: ${line}\n`);
}

/** Prints an error and returns the exit code for it. */
export function reportError(e: unknown): number {
  if (e instanceof CivmError) {
    process.stderr.write(`civm: error: ${e.message}\n`);
    if (e.details) process.stderr.write(e.details.replace(/^/gm, "  ") + "\n");
    if (process.env.CIVM_DEBUG === "1" && e.stack) process.stderr.write(e.stack + "\n");
    return e.exitCode;
  }
  const host = hostProblem(e);
  if (host) {
    process.stderr.write(`civm: error: ${host}\n`);
    return EXIT_CODES.host;
  }
  const err = e as Error;
  process.stderr.write(`civm: internal error: ${err?.message ?? String(e)}\n`);
  process.stderr.write(process.env.CIVM_DEBUG === "1" && err?.stack ? err.stack + "\n" : "civm: (set CIVM_DEBUG=1 for a stack trace, and please report this)\n");
  return EXIT_CODES.internal;
}

export function table(rows: string[][]): string {
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join("  ")).join("\n") + "\n";
}

export function formatAge(ms: number): string {
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${s % 60}s`;
  return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
}

// A file system refusal on a path civm was pointed at (a state dir that is a file, a
// read-only or full disk) is the host's problem (exit 8), not a bug in civm.
const HOST_ERRNOS: Record<string, string> = {
  ENOTDIR: "a part of the path is a file, not a directory",
  EACCES: "permission denied",
  EPERM: "operation not permitted",
  EROFS: "the file system is read-only",
  ENOSPC: "no space left on the device",
  EDQUOT: "disk quota exceeded",
};

function hostProblem(e: unknown): string | undefined {
  const err = e as NodeJS.ErrnoException | undefined;
  const why = err?.code ? HOST_ERRNOS[err.code] : undefined;
  if (!why || typeof err?.path !== "string") return undefined;
  return `cannot use ${err.path}: ${why}. Check --state-dir / CIVM_STATE_DIR and --logs-dir / CIVM_LOGS_DIR (they must be directories civm may write).`;
}

/** --json output: one JSON value on stdout (lists are always arrays). */
export function printJson(v: unknown): void {
  process.stdout.write(JSON.stringify(v, null, 2) + "\n");
}

/** -q: names only, one a line (for scripts: civm ls -q | xargs civm stop). */
export function printNames(names: readonly string[]): void {
  if (names.length) process.stdout.write(names.join("\n") + "\n");
}
