// Follows a growing file (the serial console log) and hands new text to a callback.
import { open, type FileHandle } from "node:fs/promises";

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
