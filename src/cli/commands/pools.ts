// `civm pools [scale NAME N | pause NAME | resume NAME]`, `civm vms`, `civm hosts`, `civm
// reload` and `civm drain`: thin clients of a running `civm serve`'s API (--api-url / CIVM_API_URL,
// --api-token / CIVM_API_TOKEN). `civm logs VM` uses the same client (logs.ts).
import { Option, type Command } from "commander";
import { setTimeout as sleep } from "node:timers/promises";
import { ConfigError, ExternalError } from "../../errors/index.js";
import type { ApiHost, ApiPool } from "../../server/index.js";
import { formatAge, printNames, say, table } from "../output.js";

export interface ApiFlags {
  apiUrl: string;
  apiToken?: string;
  json?: boolean;
  quiet?: boolean;
}

export const DEFAULT_API_URL = "http://127.0.0.1:8080";

export function apiOptions(c: Command, o: { defaultUrl?: boolean; json?: boolean } = {}): Command {
  const url = new Option("--api-url <url>", "the civm serve API").env("CIVM_API_URL");
  c.addOption(o.defaultUrl === false ? url : url.default(DEFAULT_API_URL)).addOption(new Option("--api-token <token>", "bearer token (the serve config's apiToken)").env("CIVM_API_TOKEN"));
  return o.json === false ? c : c.option("--json", "print JSON");
}

/** A malformed --api-url is the user's flag (exit 2), not a service that failed (7). */
export function checkApiUrl(text: string): void {
  let u: URL | undefined;
  try {
    u = new URL(text);
  } catch {
    // reported below
  }
  if (!u || (u.protocol !== "http:" && u.protocol !== "https:")) {
    throw new ConfigError(`--api-url / CIVM_API_URL must be an http(s) URL such as ${DEFAULT_API_URL} (the "listen" address of civm serve), not ${JSON.stringify(text)}`);
  }
}

/** A request to the API; the Response when it answered 2xx, typed errors otherwise (400/404: ConfigError). */
export async function request(flags: ApiFlags, method: "GET" | "POST", path: string, body?: unknown): Promise<Response> {
  checkApiUrl(flags.apiUrl);
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
  if (res.ok) return res;
  const text = await res.text();
  let msg = text;
  try {
    msg = (JSON.parse(text) as { error?: string }).error ?? text;
  } catch {
    // not JSON: the text as it is
  }
  if (res.status === 400 || res.status === 404) throw new ConfigError(`${method} ${path}: ${msg}`, { cause: { status: res.status } });
  throw new ExternalError(`civm serve answered ${method} ${path} with ${res.status}: ${msg}`);
}

export async function call(flags: ApiFlags, method: "GET" | "POST", path: string, body?: unknown): Promise<unknown> {
  const text = await (await request(flags, method, path, body)).text();
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}


function printPools(rows: ApiPool[], json: boolean | undefined, quiet?: boolean): void {
  if (json) {
    process.stdout.write(JSON.stringify(rows, null, 2) + "\n");
    return;
  }
  if (quiet) return printNames(rows.map((p) => p.name));
  const head = ["POOL", "STATE", "MIN", "MAX", "DESIRED", "QUEUED", "STARTING", "IDLE", "BUSY", "FAILURES", "GITHUB"];
  process.stdout.write(table([head, ...rows.map((p) => [...[p.name, p.state, p.minRunners, p.maxRunners, p.desired, p.queued, p.starting, p.idle, p.busy, p.failures].map(String), githubColumn(p.github)])]));
  for (const p of rows) if (p.github?.degraded) say(`pool ${p.name}: GitHub ${p.github.state} since ${p.github.since ?? "?"}: ${p.github.reason ?? "no reason given"}`);
}

/** "ok", or "rate-limited 12m" / "failing 40s" (how long), "(degraded)" past the threshold. */
function githubColumn(g: ApiPool["github"]): string {
  if (!g) return "-";
  if (g.state === "ok") return "ok";
  const since = g.since ? Date.parse(g.since) : NaN;
  const age = Number.isFinite(since) ? ` ${formatAge(Date.now() - since)}` : "";
  return `${g.state}${age}${g.degraded ? " (degraded)" : ""}`;
}

export function registerPools(program: Command): void {
  const pools = program.command("pools").description("Pools of a running civm serve (over its API).");
  apiOptions(pools.command("list", { isDefault: true }).alias("ls").description("List pools: state, min/max, desired, queued jobs, runners by state."))
    .option("-q, --quiet", "print names only, one a line")
    .action(async (flags: ApiFlags) => {
      printPools((await call(flags, "GET", "/api/pools")) as ApiPool[], flags.json, flags.quiet);
    });
  apiOptions(pools.command("scale").argument("<name>").argument("<n>", "minRunners, or \"reset\" for the config's value").description("Override a pool's minRunners (idle runners kept on top of demand).")).action(
    async (name: string, n: string, flags: ApiFlags) => {
      const value = n === "reset" ? null : Number(n);
      if (value !== null && !(Number.isInteger(value) && value >= 0)) throw new ConfigError(`N must be a whole number ≥ 0 or "reset" (got ${JSON.stringify(n)})`);
      printPools([(await call(flags, "POST", `/api/pools/${encodeURIComponent(name)}/scale`, { minRunners: value })) as ApiPool], flags.json);
    },
  );
  for (const verb of ["pause", "resume"] as const) {
    apiOptions(pools.command(verb).argument("<name>").description(verb === "pause" ? "Start nothing, stop idle runners; busy ones finish." : "Resume a paused pool.")).action(async (name: string, flags: ApiFlags) => {
      printPools([(await call(flags, "POST", `/api/pools/${encodeURIComponent(name)}/${verb}`)) as ApiPool], flags.json);
    });
  }
  apiOptions(
    program
      .command("reload")
      .description("Make a running civm serve re-read its config file (as SIGHUP does). Added pools start, removed ones drain, changed settings apply, idle runners on an old image or old VM settings are replaced. An invalid config changes nothing: exit 2 with its problems."),
  ).action(async (flags: ApiFlags) => {
    let r: ReloadAnswer;
    try {
      r = (await call(flags, "POST", "/api/reload")) as ReloadAnswer;
    } catch (e) {
      if (e instanceof ConfigError && e.message.startsWith("POST /api/reload: ")) {
        throw new ConfigError(`civm serve kept its previous config; the new one has problems:\n${e.message.slice("POST /api/reload: ".length)}`);
      }
      throw e;
    }
    if (flags.json) {
      process.stdout.write(JSON.stringify(r, null, 2) + "\n");
      return;
    }
    for (const line of describeReload(r)) say(line);
  });

  apiOptions(
    program
      .command("drain")
      .description("Make a running civm serve stop taking work: no new runners, idle ones stop, busy ones finish. It keeps serving the API (state draining, then drained) until --exit, SIGTERM or --cancel. In a fleet the host is recorded as draining: the other hosts take its share."),
  )
    .option("--exit", "exit once no runner VM is left (exit status 0)")
    .option("--wait", "wait until drained (with --exit: until civm serve has exited)")
    .option("--cancel", "end a drain: take work again")
    .action(async (flags: ApiFlags & { exit?: boolean; wait?: boolean; cancel?: boolean }) => {
      if (flags.cancel && (flags.exit || flags.wait)) throw new ConfigError("--cancel cannot be combined with --exit or --wait");
      let st = (flags.cancel ? await call(flags, "POST", "/api/undrain") : await call(flags, "POST", "/api/drain", { exit: flags.exit === true })) as DrainStatus;
      while (flags.wait && st.state !== "drained") {
        await sleep(1000);
        try {
          st = (await call(flags, "GET", "/api/status")) as DrainStatus;
        } catch (e) {
          // With --exit, the server going away is the drain completing.
          if (flags.exit && e instanceof ExternalError && e.message.startsWith("cannot reach")) {
            st = { ...st, state: "exited", runners: { starting: 0, idle: 0, busy: 0 } };
            break;
          }
          throw e;
        }
      }
      if (flags.json) {
        process.stdout.write(JSON.stringify(st, null, 2) + "\n");
        return;
      }
      say(describeDrain(st));
    });

  const vms = program.command("vms").description("Runner VMs of a running civm serve (over its API); in a fleet, every host's.");
  apiOptions(vms.command("list", { isDefault: true }).alias("ls").description("List runner VMs: id, pool, runner name, state, runner id, job, age, host (--all: finished ones too, with their exit reason)."))
    .option("--pool <name>", "only this pool")
    .option("--host <id>", "only the VMs of this host (a fleet)")
    .option("--all", "include finished VMs")
    .option("-q, --quiet", "print VM ids only, one a line")
    .action(async (flags: ApiFlags & { pool?: string; host?: string; all?: boolean }) => {
      const q = new URLSearchParams();
      if (flags.pool) q.set("pool", flags.pool);
      if (flags.host) q.set("host", flags.host);
      if (flags.all) q.set("all", "1");
      const rows = (await call(flags, "GET", `/api/vms${q.size ? `?${q}` : ""}`)) as { id: string; pool: string; name: string; state: string; runnerId: number | null; job: number | null; ageSeconds: number; exitReason: string | null; host?: string | null }[];
      if (flags.json) {
        process.stdout.write(JSON.stringify(rows, null, 2) + "\n");
        return;
      }
      if (flags.quiet) return printNames(rows.map((v) => v.id));
      const head = ["ID", "POOL", "RUNNER", "STATE", "RUNNER ID", "JOB", "AGE", "HOST", "EXIT"];
      process.stdout.write(table([head, ...rows.map((v) => [v.id, v.pool, v.name, v.state, String(v.runnerId ?? "-"), String(v.job ?? "-"), formatAge(v.ageSeconds * 1000), v.host ?? "-", v.exitReason ?? "-"])]));
    });

  const hosts = program.command("hosts").description("Hosts of a civm serve fleet (over any host's API): state, heartbeat, capacity and what their runner VMs take, the targets each polls.");
  apiOptions(hosts.command("list", { isDefault: true }).alias("ls").description("List hosts: id, state (active, draining, stopped, dead), last heartbeat, cpus and memory used of capacity, VMs by state, targets it polls for the fleet."))
    .option("-q, --quiet", "print host ids only, one a line")
    .action(async (flags: ApiFlags) => {
      const rows = (await call(flags, "GET", "/api/hosts")) as ApiHost[];
      if (flags.json) {
        process.stdout.write(JSON.stringify(rows, null, 2) + "\n");
        return;
      }
      if (flags.quiet) return printNames(rows.map((h) => h.id));
      const gib = (n: number) => `${(n / 1024 ** 3).toFixed(1)}G`;
      const head = ["HOST", "STATE", "HEARTBEAT", "CPUS", "MEMORY", "STARTING", "IDLE", "BUSY", "POLLS", "ADDRESS"];
      process.stdout.write(
        table([
          head,
          ...rows.map((h) => [
            `${h.id}${h.self ? " *" : ""}`,
            h.stale ? `${h.state} (stale)` : h.state,
            `${formatAge(h.heartbeatAgeSeconds * 1000)} ago`,
            `${h.usedCpus}/${h.cpus ?? "-"}`,
            `${gib(h.usedRamBytes)}/${h.ramBytes === null ? "-" : gib(h.ramBytes)}`,
            String(h.vms.starting),
            String(h.vms.idle),
            String(h.vms.busy),
            h.polls.join(",") || "-",
            h.address || "-",
          ]),
        ]),
      );
    });
}

interface ReloadAnswer {
  file: string;
  pools: { added: string[]; removed: string[]; changed: { name: string; fields: string[]; replaceIdle: boolean }[]; unchanged: string[] };
  applied: string[];
  restartNeeded: { field: string; running: string; configured: string }[];
  message?: string;
}

function describeReload(r: ReloadAnswer): string[] {
  const out = [`reloaded ${r.file}`];
  const p = r.pools;
  if (p.added.length) out.push(`pools added: ${p.added.join(", ")}`);
  if (p.removed.length) out.push(`pools removed: ${p.removed.join(", ")} (idle runners stop, busy ones finish, then the pool is gone)`);
  for (const c of p.changed) out.push(`pool ${c.name} changed: ${c.fields.join(", ")}${c.replaceIdle ? " (idle runners are replaced; busy ones finish as they are)" : ""}`);
  if (!p.added.length && !p.removed.length && !p.changed.length) out.push("pools: no change");
  if (r.applied.length) out.push(`applied: ${r.applied.join(", ")}`);
  if (r.message) out.push(r.message);
  return out;
}

interface DrainStatus {
  state: string;
  exitWhenDrained?: boolean;
  runners: { starting: number; idle: number; busy: number };
}

function describeDrain(st: DrainStatus): string {
  const n = st.runners;
  const left = `${n.busy} busy, ${n.idle} idle, ${n.starting} starting`;
  switch (st.state) {
    case "serving":
      return `civm serve is taking work (${left}).`;
    case "exited":
      return "civm serve drained and exited.";
    case "drained":
      return st.exitWhenDrained ? "civm serve is drained and exiting." : "civm serve is drained: no runner VM left; it keeps serving the API (civm drain --cancel takes work again).";
    default:
      return `civm serve is ${st.state} (${left}); busy runners finish their jobs${st.exitWhenDrained ? ", then it exits" : "; it keeps serving the API afterwards"}.`;
  }
}
