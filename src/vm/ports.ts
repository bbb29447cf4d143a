// Host ports: check that a forward's port is free before QEMU is started, so that a port
// in use is a clear error rather than a QEMU failure. node:net and node:dgram load when a
// VM has forwards (not on every civm start, see docs/benchmarks.md).
import { HostError } from "../errors/index.js";

export async function checkPortFree(addr: string, port: number, proto: "tcp" | "udp" = "tcp", what = "port"): Promise<void> {
  const failure = (e: NodeJS.ErrnoException) =>
    new HostError(
      e.code === "EADDRINUSE"
        ? `${what} ${addr}:${port}/${proto} is already in use on this host; stop what holds it (ss -ltnp 'sport = :${port}') or choose another port.`
        : `cannot listen on ${addr}:${port}/${proto} for ${what}: ${e.message}`,
    );
  if (proto === "udp") {
    const { createSocket } = await import("node:dgram");
    return new Promise((resolve, reject) => {
      const s = createSocket(addr.includes(":") ? "udp6" : "udp4");
      s.once("error", (e) => reject(failure(e)));
      s.bind(port, addr, () => s.close(() => resolve()));
    });
  }
  const { createServer } = await import("node:net");
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", (e) => reject(failure(e)));
    srv.listen({ port, host: addr, exclusive: true }, () => srv.close(() => resolve()));
  });
}
