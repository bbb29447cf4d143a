// `civm logs VM [-f]`: a VM's serial console log. Dev VMs (civm run --detach) are read from
// the local state dir; runner VMs of a running `civm serve` come over its API when
// --api-url or CIVM_API_URL is given (GET /api/vms/ID/log, polled from the last offset
// with -f until the VM has finished). A VM the API does not know is looked up locally.
import { Option, type Command } from "commander";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { pathsFrom } from "../global.js";
import { say } from "../output.js";
import { MAX_DURATION_SECONDS } from "../../config/durations.js";
import { ConfigError } from "../../errors/index.js";
import { STATE_LAYOUT } from "../../host/paths.js";
import { FileFollower } from "../../vm/console.js";
import { liveness } from "../../vm/registry.js";
import { request, type ApiFlags } from "./pools.js";

interface LogsFlags {
  follow?: boolean;
  supervisor?: boolean;
  apiUrl?: string;
  apiToken?: string;
  interval: string;
}

export function registerLogs(program: Command): void {
  program
    .command("logs")
    .description(
      "Print a VM's serial console log (a running VM by name or id; for a VM that is gone, its newest log). -f follows it until the VM ends. With --api-url (or CIVM_API_URL): a runner VM of civm serve, by VM id or runner name (civm vms).",
    )
    .argument("<name>", "VM name (or id); with --api-url a runner VM's id or runner name")
    .option("-f, --follow", "keep printing what the guest writes until the VM ends (or Ctrl-C)")
    .option("--supervisor", "print the background supervisor's log instead (civm run --detach)")
    .addOption(new Option("--api-url <url>", "read a runner VM's log from this civm serve API").env("CIVM_API_URL"))
    .addOption(new Option("--api-token <token>", "bearer token (the serve config's apiToken)").env("CIVM_API_TOKEN"))
    .addOption(new Option("--interval <seconds>", "with --api-url -f: how often to ask for new output").default("1"))
    .action(async (name: string, flags: LogsFlags, cmd: Command) => {
      if (flags.apiUrl && !flags.supervisor) {
        const interval = Number(flags.interval);
        if (!(interval > 0) || interval > MAX_DURATION_SECONDS) throw new ConfigError(`--interval ${JSON.stringify(flags.interval)} is not accepted: --interval must be a positive number of seconds, at most ${MAX_DURATION_SECONDS} (about 24.8 days, the longest a timer can wait).`);
        if (await apiLogs(name, { apiUrl: flags.apiUrl, ...(flags.apiToken ? { apiToken: flags.apiToken } : {}) }, flags.follow === true, interval * 1000)) return;
      }
      await localLogs(name, flags, cmd);
    });
}

/** Prints a runner VM's log from the API; false when the API has no such VM (try a dev VM). */
async function apiLogs(name: string, api: ApiFlags, follow: boolean, intervalMs: number): Promise<boolean> {
  let offset = 0;
  let interrupted = false;
  if (follow) process.once("SIGINT", () => (interrupted = true));
  for (;;) {
    let res: Response;
    try {
      res = await request(api, "GET", `/api/vms/${encodeURIComponent(name)}/log?offset=${offset}`);
    } catch (e) {
      if (offset === 0 && e instanceof ConfigError && (e.cause as { status?: number } | undefined)?.status === 404) return false;
      throw e;
    }
    const text = await res.text();
    if (text) process.stdout.write(text);
    offset = Number(res.headers.get("x-civm-log-offset") ?? offset + Buffer.byteLength(text));
    if (res.headers.get("x-civm-log-more") === "1") continue;
    if (!follow || interrupted || res.headers.get("x-civm-vm-state") === "finished") return true;
    await sleep(intervalMs);
    if (interrupted) return true;
  }
}

async function localLogs(name: string, flags: LogsFlags, cmd: Command): Promise<void> {
  const paths = pathsFrom(cmd);
  const { findVm, devMetaOf, lastConsoleLog } = await import("../../dev/index.js");
  let entry;
  try {
    entry = await findVm(paths.stateDir, name);
  } catch (e) {
    const last = flags.supervisor ? undefined : await lastConsoleLog(paths.logsDir, name);
    if (!last) {
      const notFound = e instanceof ConfigError && e.message.startsWith("no running VM named");
      if (notFound && !flags.apiUrl) throw new ConfigError(`${e.message} (for a runner VM of civm serve, pass --api-url or set CIVM_API_URL)`, { cause: e });
      if (notFound && flags.apiUrl) throw new ConfigError(`${e.message}; civm serve at ${flags.apiUrl} has no runner VM ${JSON.stringify(name)} either (civm vms --all)`, { cause: e });
      throw e;
    }
    if (flags.follow) say(`${name} is not running; printing its last console log ${last}`);
    process.stdout.write(await readFile(last));
    return;
  }
  let path = entry.consoleLog;
  if (flags.supervisor) {
    const s = devMetaOf(entry)?.supervisorLog;
    if (!s) throw new ConfigError(`${entry.name} has no supervisor (it was not started with civm run --detach)`);
    path = s;
  }
  if (!flags.follow) {
    if (existsSync(path)) process.stdout.write(await readFile(path));
    return;
  }
  const follower = new FileFollower(path, (t) => process.stdout.write(t));
  follower.start();
  const entryFile = join(paths.stateDir, STATE_LAYOUT.registry, `${entry.id}.json`);
  let interrupted = false;
  process.once("SIGINT", () => (interrupted = true));
  while (!interrupted && existsSync(entryFile) && liveness(entry) === "running") await sleep(200);
  await follower.stop();
}
