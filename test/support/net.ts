// Small network helpers shared by tests and benchmarks.
import { createServer } from "node:net";

/** A free TCP port on 127.0.0.1 (bound, read, closed again; another process could take it meanwhile). */
export async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const port = (srv.address() as { port: number }).port;
  await new Promise((r) => srv.close(r));
  return port;
}
