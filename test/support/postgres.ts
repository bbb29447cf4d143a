// A throwaway PostgreSQL server for the fleet tests: Debian's postgresql package
// (scripts/install-deps.sh), a cluster made with initdb in a temporary folder, listening on
// 127.0.0.1 on a free port and a unix socket in that folder, run as an unprivileged user
// (the package's "postgres" user when the tests run as root), removed by stop().
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { chownSync, existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type pg from "pg";
import { freePort } from "./net.js";

export interface TestPostgres {
  port: number;
  /** postgres://civm@127.0.0.1:PORT/DB (trust authentication: no password). */
  url(db?: string): string;
  /** A new empty database; its URL. */
  createDatabase(name: string): Promise<string>;
  /** Runs SQL on a database and returns the rows. */
  query<T = Record<string, unknown>>(db: string, sql: string, args?: unknown[]): Promise<T[]>;
  /** Stops the server (fast shutdown: sessions are ended) and starts it again on the same port and data. */
  restart(o?: { downMs?: number }): Promise<void>;
  /** Stops the server and removes the cluster. */
  stop(): Promise<void>;
  /** The server's log so far (for failure messages). */
  log(): string;
}

/** The newest installed PostgreSQL's bin folder (/usr/lib/postgresql/N/bin). */
export function postgresBin(): string {
  const base = "/usr/lib/postgresql";
  const versions = existsSync(base) ? readdirSync(base).filter((d) => /^\d+$/.test(d)).sort((a, b) => Number(b) - Number(a)) : [];
  const bin = versions.map((v) => join(base, v, "bin")).find((d) => existsSync(join(d, "initdb")));
  if (!bin) throw new Error("PostgreSQL is not installed (no /usr/lib/postgresql/N/bin/initdb): run scripts/install-deps.sh (Debian package postgresql)");
  return bin;
}

const pgDriver = () => createRequire(import.meta.url)("pg") as typeof pg;

export async function startPostgres(): Promise<TestPostgres> {
  const bin = postgresBin();
  const root = process.getuid?.() === 0;
  const dir = mkdtempSync(join(tmpdir(), "civm-pg-"));
  const user = root ? "postgres" : undefined;
  // As root the cluster belongs to the unprivileged "postgres" user (PostgreSQL refuses root).
  const asUser = (cmd: string, args: string[]): [string, string[]] => (user ? ["setpriv", ["--reuid", user, "--regid", user, "--init-groups", "--", cmd, ...args]] : [cmd, args]);
  if (user) chownSync(dir, Number(execFileSync("id", ["-u", user]).toString().trim()), Number(execFileSync("id", ["-g", user]).toString().trim()));
  const data = join(dir, "data");
  const [c, a] = asUser(join(bin, "initdb"), ["-D", data, "-U", "civm", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"]);
  execFileSync(c, a, { stdio: "pipe" });
  const port = await freePort();
  let child: ChildProcess | undefined;
  let logText = "";
  const start = async () => {
    const [cmd, args] = asUser(join(bin, "postgres"), [
      "-D", data, "-p", String(port), "-k", dir, "-c", "listen_addresses=127.0.0.1",
      "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=32MB",
    ]);
    const p = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    p.stdout!.on("data", (d) => (logText += d));
    p.stderr!.on("data", (d) => (logText += d));
    child = p;
    const end = Date.now() + 30_000;
    for (;;) {
      if (p.exitCode !== null) throw new Error(`postgres exited (${p.exitCode}):\n${logText}`);
      const client = new (pgDriver().Client)({ connectionString: url("postgres"), connectionTimeoutMillis: 1000 });
      try {
        await client.connect();
        await client.end();
        return;
      } catch {
        await client.end().catch(() => {});
        if (Date.now() > end) throw new Error(`postgres did not accept connections within 30 s:\n${logText}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  };
  const halt = async () => {
    const p = child;
    if (!p || p.exitCode !== null) return;
    const exited = new Promise((r) => p.once("exit", r));
    p.kill("SIGINT"); // fast shutdown: sessions end, as in a restart
    await Promise.race([exited, new Promise((r) => setTimeout(r, 15_000))]);
    if (p.exitCode === null) p.kill("SIGKILL");
    await exited;
  };
  const url = (db = "postgres") => `postgres://civm@127.0.0.1:${port}/${db}`;
  const query = async <T>(db: string, sql: string, args: unknown[] = []): Promise<T[]> => {
    const client = new (pgDriver().Client)({ connectionString: url(db) });
    await client.connect();
    try {
      return (await client.query(sql, args)).rows as T[];
    } finally {
      await client.end();
    }
  };
  try {
    await start();
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
  return {
    port,
    url,
    query,
    createDatabase: async (name) => {
      await query("postgres", `CREATE DATABASE ${name}`);
      return url(name);
    },
    restart: async (o = {}) => {
      await halt();
      await new Promise((r) => setTimeout(r, o.downMs ?? 0));
      await start();
    },
    stop: async () => {
      await halt();
      rmSync(dir, { recursive: true, force: true });
    },
    log: () => logText,
  };
}
