// Opens the store the serve config names: SQLite in the state dir (the default, one host) or
// the fleet's PostgreSQL (loaded only then).
import { StateStore } from "./index.js";
import type { Store } from "./types.js";

export async function openStore(o: { url: string | undefined; stateDir: string; hostId: string }): Promise<Store & { applied?: number }> {
  if (o.url === undefined) return new StateStore(o.stateDir);
  const { PostgresStore } = await import("./postgres.js");
  return PostgresStore.open(o.url, { host: o.hostId });
}
