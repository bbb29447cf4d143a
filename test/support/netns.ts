// Test hosts inside network namespaces the test creates: nothing a test sends leaves them.
// A "host" namespace (where civm and QEMU run, as on a real host) is joined by a veth pair
// to a "world" namespace that holds the addresses a guest probes (169.254.169.254, a private
// 10.x, a TEST-NET "public" address), each answered by a small web server.
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";

export interface TestNet {
  /** Namespace civm runs in (ip netns exec HOST ...). */
  host: string;
  world: string;
  /** Address of the host namespace on the veth link (not private: a TEST-NET-2 address). */
  hostAddr: string;
  /** Prefix for civm's own command line: ["ip", "netns", "exec", host]. */
  wrap: string[];
  /** Starts a web server in a namespace answering `body` on 0.0.0.0:port; resolves once it listens. */
  serve(ns: string, port: number, body: string, bind?: string): Promise<void>;
  /** nftables tables in the host namespace whose names start with civm_. */
  civmTables(): string[];
  close(): void;
}

function ip(...args: string[]): void {
  execFileSync("ip", args, { stdio: ["ignore", "ignore", "pipe"] });
}

export function createTestNet(): TestNet {
  const tag = randomBytes(3).toString("hex");
  const host = `civmt-${tag}-h`;
  const world = `civmt-${tag}-w`;
  const servers: ChildProcess[] = [];
  ip("netns", "add", host);
  ip("netns", "add", world);
  const close = () => {
    for (const s of servers) s.kill("SIGKILL");
    for (const ns of [host, world]) {
      try {
        ip("netns", "del", ns);
      } catch {
        /* already gone */
      }
    }
  };
  try {
    ip("link", "add", `vh${tag}`, "netns", host, "type", "veth", "peer", "name", `vw${tag}`, "netns", world);
    const inNs = (ns: string, ...a: string[]) => ip("-n", ns, ...a);
    inNs(host, "link", "set", "lo", "up");
    inNs(world, "link", "set", "lo", "up");
    inNs(host, "addr", "add", "198.51.100.1/24", "dev", `vh${tag}`);
    inNs(world, "addr", "add", "198.51.100.2/24", "dev", `vw${tag}`);
    inNs(host, "link", "set", `vh${tag}`, "up");
    inNs(world, "link", "set", `vw${tag}`, "up");
    inNs(host, "route", "add", "default", "via", "198.51.100.2");
    for (const a of ["169.254.169.254/32", "10.99.0.1/32", "203.0.113.7/32"]) inNs(world, "addr", "add", a, "dev", "lo");
  } catch (e) {
    close();
    throw e;
  }
  return {
    host, world, hostAddr: "198.51.100.1", wrap: ["ip", "netns", "exec", host],
    serve(ns, port, body, bind = "0.0.0.0") {
      const script = `require("node:http").createServer((q, r) => r.end(${JSON.stringify(body)})).listen(${port}, ${JSON.stringify(bind)}, () => console.log("listening"))`;
      const child = spawn("ip", ["netns", "exec", ns, process.execPath, "-e", script], { stdio: ["ignore", "pipe", "inherit"] });
      servers.push(child);
      return new Promise((resolve, reject) => {
        child.stdout!.once("data", () => resolve());
        child.once("exit", (code) => reject(new Error(`test web server in ${ns} exited with ${code}`)));
      });
    },
    civmTables() {
      const out = execFileSync("ip", ["netns", "exec", host, "nft", "list", "tables"], { encoding: "utf8" });
      return out.split("\n").filter((l) => /^table inet civm_/.test(l)).map((l) => l.split(" ")[2]!);
    },
    close,
  };
}
