// `civm pools [scale NAME N | pause NAME | resume NAME]` and `civm vms`: thin clients of a
// running `civm serve`'s API (--api-url / CIVM_API_URL, --api-token / CIVM_API_TOKEN).
import { Option, type Command } from "commander";
import { ConfigError, ExternalError } from "../../errors/index.js";
import { formatAge, table } from "../output.js";

interface ApiFlags {
  apiUrl: string;
  apiToken?: string;
  json?: boolean;
}

function apiOptions(c: Command): Command {
  return c
    .addOption(new Option("--api-url <url>", "the civm serve API").env("CIVM_API_URL").default("http://127.0.0.1:8080"))
    .addOption(new Option("--api-token <token>", "bearer token (the serve config's apiToken)").env("CIVM_API_TOKEN"))
    .option("--json", "print JSON");
}

async function call(flags: ApiFlags, method: "GET" | "POST", path: string, body?: unknown): Promise<unknown> {
  if (!flags.apiToken) throw new ConfigError("no API token: pass --api-token or set CIVM_API_TOKEN (the apiToken of the civm serve config)");
  const url = `${flags.apiUrl.replace(/\/+$/, "")}${path}`;
  let res: Response;
  try {
    res = await fetch(url, {
      method,
      headers: { authorization: `Bearer ${flags.apiToken}`, ...(body !== undefined ? { "content-type": "application/json" } : {}) },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    });
  } catch (e) {
    throw new ExternalError(`cannot reach civm serve at ${flags.apiUrl}: ${(e as Error).cause instanceof Error ? ((e as Error).cause as Error).message : (e as Error).message} (is it running? --api-url / CIVM_API_URL)`);
  }
  const text = await res.text();
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    data = text;
  }
  if (!res.ok) {
    const msg = (data as { error?: string } | undefined)?.error ?? text;
    if (res.status === 400 || res.status === 404) throw new ConfigError(`${method} ${path}: ${msg}`);
    throw new ExternalError(`civm serve answered ${method} ${path} with ${res.status}: ${msg}`);
  }
  return data;
}

interface PoolRow {
  name: string;
  state: string;
  minRunners: number;
  maxRunners: number;
  desired: number;
  queued: number;
  starting: number;
  idle: number;
  busy: number;
  failures: number;
}

function printPools(rows: PoolRow[], json: boolean | undefined): void {
  if (json) {
    process.stdout.write(JSON.stringify(rows, null, 2) + "\n");
    return;
  }
  const head = ["POOL", "STATE", "MIN", "MAX", "DESIRED", "QUEUED", "STARTING", "IDLE", "BUSY", "FAILURES"];
  process.stdout.write(table([head, ...rows.map((p) => [p.name, p.state, p.minRunners, p.maxRunners, p.desired, p.queued, p.starting, p.idle, p.busy, p.failures].map(String))]));
}

export function registerPools(program: Command): void {
  const pools = program.command("pools").description("Pools of a running civm serve (over its API).");
  apiOptions(pools.command("list", { isDefault: true }).description("List pools: state, min/max, desired, queued jobs, runners by state.")).action(async (flags: ApiFlags) => {
    printPools((await call(flags, "GET", "/api/pools")) as PoolRow[], flags.json);
  });
  apiOptions(pools.command("scale").argument("<name>").argument("<n>", "minRunners, or \"reset\" for the config's value").description("Override a pool's minRunners (idle runners kept on top of demand).")).action(
    async (name: string, n: string, flags: ApiFlags) => {
      const value = n === "reset" ? null : Number(n);
      if (value !== null && !(Number.isInteger(value) && value >= 0)) throw new ConfigError(`N must be a whole number ≥ 0 or "reset" (got ${JSON.stringify(n)})`);
      printPools([(await call(flags, "POST", `/api/pools/${encodeURIComponent(name)}/scale`, { minRunners: value })) as PoolRow], flags.json);
    },
  );
  for (const verb of ["pause", "resume"] as const) {
    apiOptions(pools.command(verb).argument("<name>").description(verb === "pause" ? "Start nothing, stop idle runners; busy ones finish." : "Resume a paused pool.")).action(async (name: string, flags: ApiFlags) => {
      printPools([(await call(flags, "POST", `/api/pools/${encodeURIComponent(name)}/${verb}`)) as PoolRow], flags.json);
    });
  }
  apiOptions(program.command("vms").description("Runner VMs of a running civm serve (over its API)."))
    .option("--pool <name>", "only this pool")
    .option("--all", "include finished VMs")
    .action(async (flags: ApiFlags & { pool?: string; all?: boolean }) => {
      const q = new URLSearchParams();
      if (flags.pool) q.set("pool", flags.pool);
      if (flags.all) q.set("all", "1");
      const rows = (await call(flags, "GET", `/api/vms${q.size ? `?${q}` : ""}`)) as { id: string; pool: string; name: string; state: string; runnerId: number | null; job: number | null; ageSeconds: number; exitReason: string | null }[];
      if (flags.json) {
        process.stdout.write(JSON.stringify(rows, null, 2) + "\n");
        return;
      }
      const head = ["ID", "POOL", "RUNNER", "STATE", "RUNNER ID", "JOB", "AGE", "EXIT"];
      process.stdout.write(table([head, ...rows.map((v) => [v.id, v.pool, v.name, v.state, String(v.runnerId ?? "-"), String(v.job ?? "-"), formatAge(v.ageSeconds * 1000), v.exitReason ?? "-"])]));
    });
}
