// The serial console: civm reads it from QEMU's console socket, redacts it line by line and
// writes the log itself (0600); FileFollower follows a log file for `civm logs --follow`.
import { open, type FileHandle } from "node:fs/promises";
import type { Socket } from "node:net";
import { StringDecoder } from "node:string_decoder";
import { setTimeout as sleep } from "node:timers/promises";

export class FileFollower {
  private offset = 0;
  private timer: NodeJS.Timeout | undefined;
  private reading = false;

  constructor(
    private readonly path: string,
    private readonly onText: (text: string) => void,
    private readonly intervalMs = 100,
  ) {}

  start(): void {
    this.timer = setInterval(() => void this.poll(), this.intervalMs);
  }

  private async poll(): Promise<void> {
    if (this.reading) return;
    this.reading = true;
    let fh: FileHandle | undefined;
    try {
      fh = await open(this.path, "r");
      const buf = Buffer.alloc(64 * 1024);
      for (;;) {
        const { bytesRead } = await fh.read(buf, 0, buf.length, this.offset);
        if (bytesRead <= 0) break;
        this.offset += bytesRead;
        this.onText(buf.subarray(0, bytesRead).toString("utf8"));
      }
    } catch {
      /* not created yet */
    } finally {
      await fh?.close();
      this.reading = false;
    }
  }

  /** Stops following after reading whatever is left. */
  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    while (this.reading) await new Promise((r) => setTimeout(r, 5));
    await this.poll();
  }
}

/** The last `lines` lines of a text, for error reports. */
export function tailLines(text: string, lines = 20): string {
  return text.trimEnd().split("\n").slice(-lines).join("\n");
}

/**
 * Splits a stream of text into lines and redacts each before passing it on, so a secret
 * split across two reads is still found. A line longer than `maxHold` is passed on in
 * pieces; the last `overlap` characters are held back so a secret cut there is still whole
 * in the next piece. end() passes on whatever is left.
 */
export class LineRedactor {
  private buf = "";
  private readonly overlap: number;

  constructor(
    private readonly redact: (text: string) => string,
    private readonly emit: (text: string) => void,
    opts: { longestSecret: number; maxHold?: number },
  ) {
    this.overlap = Math.max(0, opts.longestSecret - 1);
    this.maxHold = Math.max(opts.maxHold ?? 64 * 1024, this.overlap + 1);
  }

  private readonly maxHold: number;

  push(text: string): void {
    this.buf += text;
    const nl = this.buf.lastIndexOf("\n");
    if (nl >= 0) {
      // Whole lines only: a secret never spans a newline (multi-line ones are redacted line by line).
      this.emitNonEmpty(this.redact(this.buf.slice(0, nl + 1)));
      this.buf = this.buf.slice(nl + 1);
    }
    if (this.buf.length > this.maxHold) {
      const r = this.redact(this.buf);
      const cut = r.length - this.overlap;
      this.emitNonEmpty(r.slice(0, cut));
      this.buf = r.slice(cut);
    }
  }

  end(): void {
    this.emitNonEmpty(this.redact(this.buf));
    this.buf = "";
  }

  private emitNonEmpty(t: string): void {
    if (t !== "") this.emit(t);
  }
}

/**
 * Firmware messages meaning nothing on the VM's disks could be booted: SeaBIOS's, OVMF's,
 * and EDK2's boot manager falling back to its built-in shell (AAVMF on arm64 does).
 */
const NO_BOOT_RE = /No bootable device\.|No bootable option or device was found|BdsDxe: starting Boot[0-9A-Fa-f]+ "EFI Internal Shell"/;
/** Once one of these is seen a bootloader or kernel runs: its own output is not firmware's. */
const OS_STARTED_RE = /GRUB|Loading Linux|Linux version|EFI stub|Booting `/;
/** Firmware says what it is looking for within its first few KiB; later text is the guest's. */
const FIRMWARE_WINDOW = 64 * 1024;

/**
 * Watches the start of a firmware boot's console for "nothing to boot". Stays quiet once a
 * bootloader or kernel shows up, or after the firmware's window, so a guest that prints the
 * same words later is never stopped for it.
 */
export class NoBootWatch {
  private seen = 0;
  private armed = true;
  private pending = "";

  /** Returns the firmware's message the first time it appears, else undefined. */
  push(text: string): string | undefined {
    if (!this.armed) return undefined;
    this.seen += text.length;
    const t = (this.pending + text).replace(/\x1b\[[0-9;?=]*[A-Za-z]|\x1bc/g, "");
    const nl = t.lastIndexOf("\n");
    this.pending = (nl >= 0 ? t.slice(nl + 1) : t).slice(-256);
    for (const line of t.split("\n")) {
      if (OS_STARTED_RE.test(line)) {
        this.armed = false;
        return undefined;
      }
      if (NO_BOOT_RE.test(line)) {
        this.armed = false;
        return line.replace(/\r/g, "").trim();
      }
    }
    if (this.seen > FIRMWARE_WINDOW) this.armed = false;
    return undefined;
  }
}

/** Above this many bytes not yet on disk, reading the socket pauses (QEMU's serial port waits). */
const MAX_PENDING_BYTES = 1024 * 1024;

export interface ConsoleStreamOptions {
  logPath: string;
  redact: (text: string) => string;
  /** Length of the longest secret (how much of a very long line is held back). */
  longestSecret: number;
  /** The redacted text, in order, as it is written to the log. */
  onText?: (text: string) => void;
}

/**
 * QEMU's serial console from its unix socket chardev to the log file. Nothing reaches the
 * file or onText unredacted. QEMU starts paused (-S): connecting before `cont` loses nothing.
 */
export class ConsoleStream {
  private fh: FileHandle | undefined;
  private socket: Socket | undefined;
  private closed: Promise<void> | undefined;
  private writes: Promise<void> = Promise.resolve();
  private pendingBytes = 0;
  private writeError: Error | undefined;
  private readonly decoder = new StringDecoder("utf8");
  private readonly redactor: LineRedactor;
  private finished = false;

  constructor(private readonly o: ConsoleStreamOptions) {
    this.redactor = new LineRedactor(o.redact, (t) => this.out(t), { longestSecret: o.longestSecret });
  }

  /** Creates the log file (0600, also when it already existed). */
  async openLog(): Promise<void> {
    this.fh = await open(this.o.logPath, "a", 0o600);
    await this.fh.chmod(0o600);
  }

  /** Connects to the console socket, retrying while QEMU has not created it yet. */
  async connect(path: string, isAlive: () => boolean, timeoutMs = 30_000): Promise<void> {
    const { createConnection } = await import("node:net");
    const deadline = Date.now() + timeoutMs;
    let lastErr: unknown;
    for (;;) {
      if (!isAlive()) throw new Error("QEMU exited before its console socket accepted a connection");
      if (Date.now() > deadline) throw new Error(`could not connect to the console socket ${path}: ${(lastErr as Error)?.message ?? "timed out"}`);
      try {
        this.socket = await new Promise<Socket>((resolve, reject) => {
          const s = createConnection(path);
          s.once("error", reject);
          s.once("connect", () => {
            s.off("error", reject);
            resolve(s);
          });
        });
        break;
      } catch (e) {
        lastErr = e;
        await sleep(20);
      }
    }
    const sock = this.socket;
    this.closed = new Promise((resolve) => sock.once("close", () => resolve()));
    sock.on("error", () => {
      /* surfaced as close */
    });
    sock.on("data", (b: Buffer) => this.redactor.push(this.decoder.write(b)));
  }

  /** Sends input to the guest's serial console (lvh's --serial-port). */
  write(data: Buffer): void {
    if (!this.finished) this.socket?.write(data);
  }

  private out(text: string): void {
    this.o.onText?.(text);
    const fh = this.fh;
    if (!fh) return;
    const bytes = Buffer.byteLength(text);
    this.pendingBytes += bytes;
    if (this.pendingBytes > MAX_PENDING_BYTES) this.socket?.pause();
    this.writes = this.writes
      .then(() => fh.write(text))
      .then(
        () => undefined,
        (e: Error) => void (this.writeError ??= e),
      )
      .then(() => {
        this.pendingBytes -= bytes;
        if (this.pendingBytes <= MAX_PENDING_BYTES / 2) this.socket?.resume();
      });
  }

  /**
   * Reads the socket to its end (QEMU closes it when it exits; `waitMs` bounds the wait),
   * passes on what is left and closes the log. Returns the first write error, if any.
   */
  async finish(waitMs = 2_000): Promise<Error | undefined> {
    if (this.finished) return this.writeError;
    this.finished = true;
    if (this.closed) {
      const timer = setTimeout(() => this.socket?.destroy(), waitMs);
      this.socket?.resume();
      await this.closed;
      clearTimeout(timer);
    }
    this.redactor.push(this.decoder.end());
    this.redactor.end();
    await this.writes;
    await this.fh?.close().catch(() => undefined);
    this.fh = undefined;
    return this.writeError;
  }
}
