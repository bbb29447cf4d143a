// One error hierarchy for civm: a stable code, a user-facing message, an optional cause.
// The CLI maps codes to exit statuses (see EXIT_CODES and docs/exit-codes.md); nothing
// below the CLI exits the process.

export const EXIT_CODES = {
  ok: 0,
  internal: 1,
  config: 2,
  timeout: 3,
  qemu: 4,
  signal: 5,
  reboot: 6,
  external: 7,
  host: 8,
  /** civm run: the firmware found nothing to boot (EXIT_CODE_OF_REASON["no-boot"]). */
  "no-boot": 9,
} as const;

export type ErrorCode = keyof typeof EXIT_CODES;

export class CivmError extends Error {
  readonly code: ErrorCode;
  /** Extra lines shown under the message (e.g. the tail of a log). */
  readonly details: string | undefined;

  constructor(code: ErrorCode, message: string, opts: { cause?: unknown; details?: string } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = "CivmError";
    this.code = code;
    this.details = opts.details;
  }

  get exitCode(): number {
    return EXIT_CODES[this.code];
  }
}

/** A user's file or flag is wrong: exit 2, nothing started. */
export class ConfigError extends CivmError {
  constructor(message: string, opts: { cause?: unknown; details?: string } = {}) {
    super("config", message, opts);
    this.name = "ConfigError";
  }
}

/** The host lacks something civm needs (a tool, a free port, disk space): exit 8. */
export class HostError extends CivmError {
  constructor(message: string, opts: { cause?: unknown; details?: string } = {}) {
    super("host", message, opts);
    this.name = "HostError";
  }
}

/** A service civm calls (GitHub) failed: exit 7. */
export class ExternalError extends CivmError {
  constructor(message: string, opts: { cause?: unknown; details?: string } = {}) {
    super("external", message, opts);
    this.name = "ExternalError";
  }
}

export function isCivmError(e: unknown): e is CivmError {
  return e instanceof CivmError;
}

/** Message of any thrown value, without a stack. */
export function messageOf(e: unknown): string {
  if (e instanceof Error) return e.message;
  return String(e);
}
