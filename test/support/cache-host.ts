// civm serve's caches (src/caches/manager.ts) without the rest of the daemon, for tests that
// run them inside a network namespace of their own (ip netns exec NS node cache-host.js ARGS).
// argv[2]: JSON {caches (the serve config's section), stateDir, network (a VM's network
// value)}. Prints one JSON line once the caches are started: {status, guest} (guest: what a VM
// with that network gets: instance.json's config.caches and the allow entries), and then
// "stopped" after SIGTERM has stopped them.
import { Registry } from "prom-client";
import { CacheManager } from "../../src/caches/manager.js";
import { parseCaches } from "../../src/caches/config.js";
import { parseNetworkValue } from "../../src/net/policy.js";

const arg = JSON.parse(process.argv[2] ?? "{}") as { caches: unknown; stateDir: string; network?: unknown };
const parsed = parseCaches(arg.caches, "cache-host", process.cwd());
if (!parsed.value) throw new Error(parsed.problems.join("\n") || "no caches");
const network = parseNetworkValue(arg.network);
if (!network.value) throw new Error(network.problems.join("; "));
const log = (level: string) => (fields: Record<string, unknown>, msg: string) => process.stderr.write(`cache-host ${level}: ${msg} ${JSON.stringify(fields)}\n`);
const manager = new CacheManager({ spec: parsed.value, stateDir: arg.stateDir, registry: new Registry(), logger: { info: log("info"), warn: log("warn"), error: log("error") } });
await manager.start();
const guest = manager.forVm(network.value);
process.stdout.write(JSON.stringify({ status: manager.status(), guest: { config: guest.config, allow: guest.allow.map((a) => a.raw) } }) + "\n");
process.on("SIGTERM", () => {
  void manager.stop().then(() => {
    process.stdout.write("stopped\n");
    process.exit(0);
  });
});
setInterval(() => {}, 1 << 30);
