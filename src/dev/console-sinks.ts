// lvh's console flags for dev VMs: --console-log-file FILE (the console, as civm's own log
// has it: redacted) and --serial-port PORT (the console over TCP, both ways, as lvh's
// `-serial telnet:localhost:PORT,server,nowait`; any telnet or nc client works). civm keeps
// owning QEMU's console socket: both are fed from it, so its log, the no-boot watch and these
// see the same text.
import { createServer, type Server, type Socket } from "node:net";
import { open, type FileHandle } from "node:fs/promises";
import { CivmError } from "../errors/index.js";

export interface ConsoleSinkOptions {
  /** Absolute path; appended to, created 0600. */
  logFile?: string;
  /** TCP listener for an interactive console. */
  serial?: { host: string; port: number };
  log: (line: string) => void;
}

export interface ConsoleSinks {
  /** Console text (redacted), in order. */
  onText: (text: string) => void;
  /** Given the writer to the guest's console once civm is connected to it. */
  onInput: (write: (data: Buffer) => void) => void;
  close: () => Promise<void>;
}

export async function openConsoleSinks(o: ConsoleSinkOptions): Promise<ConsoleSinks> {
  let fh: FileHandle | undefined;
  let writes: Promise<unknown> = Promise.resolve();
  if (o.logFile) {
    try {
      fh = await open(o.logFile, "a", 0o600);
    } catch (e) {
      throw new CivmError("config", `--console-log-file ${o.logFile}: cannot write it (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); give a file in a folder that exists and is writable`);
    }
  }
  const clients = new Set<Socket>();
  let toGuest: ((data: Buffer) => void) | undefined;
  let server: Server | undefined;
  if (o.serial) {
    const srv = createServer((sock) => {
      clients.add(sock);
      sock.on("data", (d: Buffer) => toGuest?.(d));
      sock.on("error", () => sock.destroy());
      sock.on("close", () => clients.delete(sock));
    });
    await new Promise<void>((resolve, reject) => {
      srv.once("error", (e: NodeJS.ErrnoException) =>
        reject(new CivmError("host", `--serial-port ${o.serial!.port}: cannot listen on ${o.serial!.host}:${o.serial!.port} (${e.code ?? e.message}); pick a free port`)),
      );
      srv.listen(o.serial!.port, o.serial!.host, () => resolve());
    });
    server = srv;
    o.log(`serial console on ${o.serial.host}:${o.serial.port} (telnet or nc; what you type goes to the guest's console)`);
  }
  return {
    onText: (text) => {
      if (fh) {
        const f = fh;
        writes = writes.then(() => f.write(text)).catch(() => undefined);
      }
      for (const c of clients) c.write(text);
    },
    onInput: (write) => {
      toGuest = write;
    },
    close: async () => {
      for (const c of clients) c.destroy();
      if (server) await new Promise<void>((resolve) => server!.close(() => resolve()));
      await writes;
      await fh?.close().catch(() => undefined);
    },
  };
}
