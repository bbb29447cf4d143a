// Test hosts inside network namespaces the test creates: nothing a test sends leaves them.
// A "host" namespace (where civm and QEMU run, as on a real host) is joined by a veth pair
// to a "world" namespace that holds the addresses a guest probes (169.254.169.254, a private
// 10.x, a TEST-NET "public" address), each answered by a small web server.
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { connect, createServer as createNetServer, type AddressInfo, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

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

/**
 * A network namespace of the test's own holding only its loopback (with extra addresses on it,
 * e.g. a cloud's metadata service), joined to this process by unix sockets: nothing in it can
 * reach any network, and this process serves or reaches what is inside through `expose` and
 * `reach`. QEMU started in it (RunVmRequest.qemuWrapper = `wrap`) gives its guest a user-mode
 * network whose "outside" is this namespace.
 */
export interface IsolatedNs {
  name: string;
  /** A folder of this test's for the unix sockets (removed by close). */
  dir: string;
  /** ["ip", "netns", "exec", name]. */
  wrap: string[];
  /** Connections to addr:port inside the namespace are piped to 127.0.0.1:target.port or the unix socket target.path here. */
  expose(addr: string, port: number, target: { port: number } | { path: string }): Promise<void>;
  /** A port on 127.0.0.1 here whose connections are piped to 127.0.0.1:port inside the namespace. */
  reach(port: number): Promise<number>;
  /** Ends the pipes, removes the namespace and the sockets. */
  close(): Promise<void>;
}

/** Runs in the namespace: one listener piping each connection to another endpoint. */
const PIPE_SCRIPT = `
const net = require("node:net");
const [from, to] = [JSON.parse(process.argv[1]), JSON.parse(process.argv[2])];
const srv = net.createServer((c) => {
  const o = net.connect(to);
  c.pipe(o).pipe(c);
  c.on("error", () => o.destroy());
  o.on("error", () => c.destroy());
});
srv.listen(from, () => console.log("listening"));
`;

export function createIsolatedNs(addresses: string[] = []): IsolatedNs {
  const name = `civmt-${randomBytes(3).toString("hex")}-i`;
  const dir = mkdtempSync(join(tmpdir(), "civm-ns-"));
  const children: ChildProcess[] = [];
  const servers: Server[] = [];
  ip("netns", "add", name);
  try {
    ip("-n", name, "link", "set", "lo", "up");
    for (const a of addresses) ip("-n", name, "addr", "add", a.includes("/") ? a : `${a}/32`, "dev", "lo");
  } catch (e) {
    ip("netns", "del", name);
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
  let n = 0;
  const pipeInNs = (from: object, to: object): Promise<void> => {
    const child = spawn("ip", ["netns", "exec", name, process.execPath, "-e", PIPE_SCRIPT, JSON.stringify(from), JSON.stringify(to)], { stdio: ["ignore", "pipe", "inherit"] });
    children.push(child);
    return new Promise((resolve, reject) => {
      child.stdout!.once("data", () => resolve());
      child.once("exit", (code) => reject(new Error(`pipe in namespace ${name} exited with ${code}`)));
    });
  };
  const listen = (srv: Server, at: number | string): Promise<void> => {
    servers.push(srv);
    return new Promise((resolve, reject) => {
      srv.once("error", reject);
      if (typeof at === "string") srv.listen(at, resolve);
      else srv.listen(at, "127.0.0.1", resolve);
    });
  };
  const pipeTo = (to: { port: number; host?: string } | { path: string }) =>
    createNetServer((c) => {
      const o = "path" in to ? connect(to.path) : connect(to.port, to.host ?? "127.0.0.1");
      c.pipe(o).pipe(c);
      c.on("error", () => o.destroy());
      o.on("error", () => c.destroy());
    });
  return {
    name,
    dir,
    wrap: ["ip", "netns", "exec", name],
    async expose(addr, port, target) {
      const sock = join(dir, `in-${n++}.sock`);
      await listen(pipeTo(target), sock);
      await pipeInNs({ host: addr, port }, { path: sock });
    },
    async reach(port) {
      const sock = join(dir, `out-${n++}.sock`);
      await pipeInNs({ path: sock }, { host: "127.0.0.1", port });
      const srv = pipeTo({ path: sock });
      await listen(srv, 0);
      return (srv.address() as AddressInfo).port;
    },
    async close() {
      for (const c of children) c.kill("SIGKILL");
      await Promise.all(servers.map((s) => new Promise((r) => s.close(() => r(undefined)))));
      try {
        ip("netns", "del", name);
      } catch {
        /* already gone */
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
