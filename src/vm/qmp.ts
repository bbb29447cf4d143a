// A small QMP client: connect to QEMU's control socket, negotiate capabilities,
// run commands (one at a time, matched by id) and surface asynchronous events.
import type { Socket } from "node:net";
import { EventEmitter } from "node:events";
import { setTimeout as sleep } from "node:timers/promises";

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export class QmpError extends Error {
  constructor(
    message: string,
    readonly qmpClass?: string,
  ) {
    super(message);
    this.name = "QmpError";
  }
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  command: string;
}

/** Events: "event" (QmpEvent), "close" (). */
export class QmpClient extends EventEmitter {
  private socket: Socket | undefined;
  private buffer = "";
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private greeted: ((v: unknown) => void) | undefined;
  private closed = false;

  /** Connects, retrying while the socket does not exist yet (QEMU is starting). */
  static async connect(path: string, opts: { timeoutMs?: number; isAlive?: () => boolean } = {}): Promise<QmpClient> {
    const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
    let lastErr: unknown;
    while (Date.now() < deadline) {
      if (opts.isAlive && !opts.isAlive()) throw new QmpError("QEMU exited before its QMP socket accepted a connection");
      const client = new QmpClient();
      try {
        await client.open(path);
        return client;
      } catch (e) {
        lastErr = e;
        client.close();
        await sleep(20);
      }
    }
    throw new QmpError(`could not connect to QMP socket ${path}: ${(lastErr as Error)?.message ?? "timed out"}`);
  }

  private async open(path: string): Promise<void> {
    // Loaded here, once QEMU runs, rather than before civm spawns it (docs/benchmarks.md).
    const { createConnection } = await import("node:net");
    return new Promise((resolve, reject) => {
      const sock = createConnection(path);
      this.socket = sock;
      sock.setEncoding("utf8");
      const onError = (e: Error) => reject(e);
      sock.once("error", onError);
      sock.on("data", (d: string) => this.onData(d));
      sock.on("close", () => this.onClose());
      this.greeted = () => {
        sock.off("error", onError);
        sock.on("error", () => {
          /* surfaced through close */
        });
        this.execute("qmp_capabilities").then(() => resolve(), reject);
      };
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf("\n")) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return; // QEMU only sends JSON; ignore anything else
    }
    if ("QMP" in msg) {
      const g = this.greeted;
      this.greeted = undefined;
      g?.(msg);
      return;
    }
    if (typeof msg.event === "string") {
      this.emit("event", msg as unknown as QmpEvent);
      return;
    }
    const id = typeof msg.id === "string" ? msg.id : undefined;
    const p = id ? this.pending.get(id) : undefined;
    if (!p || !id) return;
    this.pending.delete(id);
    if ("error" in msg) {
      const err = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(`QMP ${p.command} failed: ${err.desc ?? "unknown error"}`, err.class));
    } else {
      p.resolve(msg.return);
    }
  }

  private onClose(): void {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.pending.values()) p.reject(new QmpError(`QMP connection closed during ${p.command}`));
    this.pending.clear();
    this.emit("close");
  }

  get isClosed(): boolean {
    return this.closed;
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closed || !this.socket) return Promise.reject(new QmpError(`QMP connection is closed (${command})`));
    const id = `civm-${this.nextId++}`;
    const msg = JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id });
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, command });
      this.socket!.write(msg + "\n");
    });
  }

  close(): void {
    this.socket?.destroy();
    this.onClose();
  }
}
