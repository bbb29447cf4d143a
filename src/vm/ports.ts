// Host ports: check that a forward's port is free before QEMU is started, so that a port
// in use is a clear error rather than a QEMU failure.
import { createServer } from "node:net";
import { createSocket } from "node:dgram";
import { HostError } from "../errors/index.js";

export function checkPortFree(addr: string, port: number, proto: "tcp" | "udp" = "tcp", what = "port"): Promise<void> {
  return new Promise((resolve, reject) => {
    const fail = (e: NodeJS.ErrnoException) =>
      reject(
        new HostError(
          e.code === "EADDRINUSE"
            ? `${what} ${addr}:${port}/${proto} is already in use on this host; stop what holds it (ss -ltnp 'sport = :${port}') or choose another port.`
            : `cannot listen on ${addr}:${port}/${proto} for ${what}: ${e.message}`,
        ),
      );
    if (proto === "udp") {
      const s = createSocket(addr.includes(":") ? "udp6" : "udp4");
      s.once("error", fail);
      s.bind(port, addr, () => s.close(() => resolve()));
      return;
    }
    const srv = createServer();
    srv.once("error", fail);
    srv.listen({ port, host: addr, exclusive: true }, () => srv.close(() => resolve()));
  });
}
