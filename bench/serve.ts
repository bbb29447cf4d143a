// `civm serve` (issue 4) on real QEMU with the tiny guest in runner mode against the fake
// GitHub (test/support/serve-harness.ts), four measures:
//   warm:    with an idle runner waiting, a queued webhook → a runner takes the job (the fake
//            marks it busy). The tiny guest's runner polls for work once a second (a real
//            runner long-polls), so up to 1 s of this is the pretend runner's own loop.
//   cold:    minRunners 0: webhook → QEMU exec (civm: JIT config, work dir, spawn) → runner
//            registered (guest boot, DHCP, registration) → job taken.
//   replace: maxRunners 2, a backlog of ~0 s jobs kept queued for --replace-seconds: VMs
//            finished per minute, and civm's gap from one VM's exit to its replacement's start.
//   rss:     --vms tiny VMs (128 MiB each) registered and idle: the daemon's VmRSS, and the
//            sum over its QEMU processes separately.
// Usage: npm run build && node dist/bench/serve.js [--runs 5] [--replace-seconds 120]
//          [--vms 20] [--only warm,cold,replace,rss] [--out FILE] [--log-dir DIR]
import { readFileSync, rmSync, writeFileSync, chmodSync } from "node:fs";
import { join } from "node:path";
import { buildTinyGuest } from "../test/support/tiny-guest.js";
import { civmEnv, qemuProcessesOf, type CivmEnv } from "../test/support/civm-cli.js";
import { sendWebhook, startFakeGitHub, workflowJobPayload, type FakeGitHub, type FakeJob } from "../test/support/fake-github.js";
import { freePort } from "../test/support/net.js";
import { logLines, REPO, SECRET, serveConfig, startHub, startServe, rssKiB, type Hub, type PoolOptions, type Serve } from "../test/support/serve-harness.js";
import { benchArg } from "./args.js";

const runs = Number(benchArg("runs", "5")) || 5;
const replaceSeconds = Number(benchArg("replace-seconds", "120")) || 120;
const vmCount = Number(benchArg("vms", "20")) || 20;
const only = new Set(benchArg("only", "warm,cold,replace,rss").split(","));
const out = process.argv.includes("--out") ? benchArg("out", "") : undefined;
/** Keep each daemon's JSON log as DIR/serve-<scenario>.log. */
const logDir = process.argv.includes("--log-dir") ? benchArg("log-dir", "") : undefined;

function stats(xs: number[]): { n: number; median: number; p95: number; min: number; max: number } | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const at = (q: number) => s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
  const r = (x: number) => Math.round(x * 1000) / 1000;
  return { n: s.length, median: r(at(0.5)), p95: r(at(0.95)), min: r(s[0]!), max: r(s[s.length - 1]!) };
}
const loadavg = () => readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).map(Number);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const log = (m: string) => process.stderr.write(`[bench serve] ${m}\n`);

const guest = await buildTinyGuest();

interface Ctx {
  gh: FakeGitHub;
  hub: Hub;
  s: Serve;
  e: CivmEnv;
  /** Wall-clock ms of each QEMU exec (a wrapper stamps it just before exec). */
  qemuExecs(): number[];
  queue(): Promise<FakeJob>;
}

/** A daemon with one tiny pool; `fn` runs against it; then SIGTERM and cleanup. */
async function withServe<T>(scenario: string, pool: PoolOptions, fn: (c: Ctx) => Promise<T>, extra: { shutdownTimeout?: number } = {}): Promise<T> {
  const gh = await startFakeGitHub();
  const port = await freePort();
  const hub = await startHub(gh, () => `http://127.0.0.1:${port}/webhook`);
  const e = civmEnv();
  const stamps = join(e.root, "qemu-exec-stamps");
  // Same as civmEnv's wrapper, plus the wall clock (ns) just before QEMU's exec (same pid).
  writeFileSync(join(e.shimDir, "qemu-system-x86_64"), `#!/bin/sh\ndate +%s%N >> ${stamps}\nexec /usr/bin/qemu-system-x86_64 "$@"\n`);
  chmodSync(join(e.shimDir, "qemu-system-x86_64"), 0o755);
  const s = startServe({ e, port, config: serveConfig({ port, gh, hub, image: guest.disk, pollInterval: 30, shutdownTimeout: extra.shutdownTimeout ?? 60, pools: [pool] }) });
  try {
    await s.poll(async () => (await fetch(`${s.base}/healthz`).then((r) => r.ok).catch(() => false)), 60_000, "civm serve to listen");
    const ctx: Ctx = {
      gh, hub, s, e,
      qemuExecs: () => {
        try {
          return readFileSync(stamps, "utf8").trim().split("\n").filter(Boolean).map((l) => Number(BigInt(l) / 1_000_000n));
        } catch {
          return [];
        }
      },
      queue: async () => {
        const job = gh.addJob({ repository: REPO, labels: ["self-hosted", "tiny"] });
        const r = await sendWebhook(`${s.base}/webhook`, { secret: SECRET, payload: await workflowJobPayload("queued", { id: job.id, runId: job.runId, labels: job.labels, repository: REPO }) });
        if (r.status !== 202) throw new Error(`webhook answered ${r.status}: ${r.body}`);
        return job;
      },
    };
    return await fn(ctx);
  } finally {
    const r = await s.stop();
    if (r.code !== 0) log(`civm serve exited ${r.code}: ${r.stderr.slice(-2000)}`);
    if (logDir) writeFileSync(join(logDir, `serve-${scenario}.log`), s.stdout());
    await hub.close();
    await gh.close();
    const left = qemuProcessesOf(e);
    if (left.length) log(`QEMU processes left: ${left.join(" ")}`);
    rmSync(e.root, { recursive: true, force: true });
  }
}

/** Waits until the pool is steady at `idle` idle runners and nothing else. */
async function steady(s: Serve, idle: number): Promise<void> {
  await s.poll(async () => {
    const live = await s.liveVms();
    return live.length === idle && live.every((v) => v.state === "idle");
  }, 600_000, `${idle} idle runner(s) and nothing else`);
}

const report: Record<string, unknown> = { date: new Date().toISOString(), runs, loadavgStart: loadavg() };

if (only.has("warm")) {
  log(`warm pickup: ${runs} runs`);
  const la0 = loadavg();
  const pickups: number[] = [];
  let coldTook = 0;
  await withServe("warm", { minRunners: 1, maxRunners: 2, idleTimeout: 0 }, async ({ s, hub, queue }) => {
    for (let i = 0; i < runs; i++) {
      await steady(s, 1);
      const idleBefore = (await s.liveVms()).map((v) => v.name);
      const t0 = Date.now();
      const job = await queue();
      await s.poll(() => job.status !== "queued", 120_000, "the job to be taken");
      const ms = hub.tookJobAt.get(job.runnerName!)! - t0;
      if (!idleBefore.includes(job.runnerName!)) coldTook++;
      pickups.push(ms);
      log(`warm ${i + 1}/${runs}: taken by ${job.runnerName} after ${ms} ms`);
      await s.poll(async () => (await s.allVms()).some((v) => v.name === job.runnerName && v.state === "finished"), 120_000, "the job's VM to finish");
    }
  });
  report.warm = { pickupMs: stats(pickups), takenByANewVm: coldTook, loadavg: [la0, loadavg()] };
}

if (only.has("cold")) {
  log(`cold start: ${runs} runs`);
  const la0 = loadavg();
  const rows: { toQemuMs: number; bootToRegisteredMs: number; registeredToJobMs: number; totalMs: number }[] = [];
  await withServe("cold", { minRunners: 0, maxRunners: 1, idleTimeout: 0 }, async ({ s, hub, queue, qemuExecs }) => {
    for (let i = 0; i < runs; i++) {
      await s.poll(async () => (await s.liveVms()).length === 0, 120_000, "no live VM");
      const execsBefore = qemuExecs().length;
      const t0 = Date.now();
      const job = await queue();
      await s.poll(() => job.status !== "queued", 600_000, "the job to be taken");
      const name = job.runnerName!;
      const exec = qemuExecs()[execsBefore]!;
      const reg = hub.registeredAt.get(name)!;
      const took = hub.tookJobAt.get(name)!;
      const row = { toQemuMs: exec - t0, bootToRegisteredMs: reg - exec, registeredToJobMs: took - reg, totalMs: took - t0 };
      rows.push(row);
      log(`cold ${i + 1}/${runs}: webhook→QEMU ${row.toQemuMs} ms, QEMU→registered ${row.bootToRegisteredMs} ms, registered→job ${row.registeredToJobMs} ms`);
      await s.poll(async () => (await s.allVms()).some((v) => v.name === name && v.state === "finished"), 120_000, "the job's VM to finish");
    }
  });
  report.cold = {
    webhookToQemuExecMs: stats(rows.map((r) => r.toQemuMs)),
    qemuExecToRunnerRegisteredMs: stats(rows.map((r) => r.bootToRegisteredMs)),
    registeredToJobTakenMs: stats(rows.map((r) => r.registeredToJobMs)),
    webhookToJobTakenMs: stats(rows.map((r) => r.totalMs)),
    loadavg: [la0, loadavg()],
  };
}

if (only.has("replace")) {
  log(`replacements: ${replaceSeconds} s with maxRunners 2`);
  const la0 = loadavg();
  report.replace = await withServe("replace", { minRunners: 0, maxRunners: 2, idleTimeout: 0 }, async ({ s, gh, queue }) => {
    const t0 = Date.now();
    const end = t0 + replaceSeconds * 1000;
    // Keep a backlog of 3 queued jobs (each announced by its webhook).
    while (Date.now() < end) {
      const queued = gh.state.jobs.filter((j) => j.status === "queued").length;
      for (let i = queued; i < 3; i++) await queue();
      await sleep(250);
    }
    const lines = logLines(s.stdout());
    const at = (l: Record<string, unknown>) => Date.parse(String(l.time));
    const finished = lines.filter((l) => l.msg === "runner VM finished" && at(l) >= t0 && at(l) <= end).map(at);
    const starts = lines.filter((l) => l.msg === "runner VM starting").map(at).sort((a, b) => a - b);
    // civm's replacement gap: a VM's exit handled (runner deregistered) → the next VM starting.
    const gaps = finished.map((f) => (starts.find((x) => x >= f) ?? NaN) - f).filter((g) => Number.isFinite(g));
    const steadyPerMin = finished.length >= 2 ? ((finished.length - 1) / ((finished[finished.length - 1]! - finished[0]!) / 60_000)) : null;
    const vms = (await s.allVms()).filter((v) => v.state === "finished");
    const poweroffs = vms.filter((v) => v.exitReason === "poweroff").length;
    log(`replace: ${finished.length} VMs finished in ${replaceSeconds} s`);
    return {
      windowSeconds: replaceSeconds,
      vmsFinished: finished.length,
      jobsCompleted: gh.state.jobs.filter((j) => j.status === "completed").length,
      perMinuteOverWindow: Math.round((finished.length / (replaceSeconds / 60)) * 100) / 100,
      perMinuteFirstToLastExit: steadyPerMin === null ? null : Math.round(steadyPerMin * 100) / 100,
      exitToNextStartMs: stats(gaps),
      finishedByPoweroff: poweroffs,
      loadavg: [la0, loadavg()],
    };
  }, { shutdownTimeout: 30 });
}

if (only.has("rss")) {
  log(`rss: ${vmCount} VMs of 128 MiB`);
  const la0 = loadavg();
  report.rss = await withServe("rss", { minRunners: 0, maxRunners: vmCount, idleTimeout: 3600, ram: "128M" }, async ({ s, gh, hub, e }) => {
    await sleep(5000);
    const idleRss = rssKiB(s.pid)!;
    const t0 = Date.now();
    const r = await s.post(`/api/pools/tiny/scale`, { minRunners: vmCount });
    if (r.status !== 200) throw new Error(`scale answered ${r.status}`);
    await s.poll(() => hub.registeredAt.size >= vmCount, 1_200_000, `${vmCount} registrations`);
    const allRegisteredS = (Date.now() - t0) / 1000;
    await s.poll(async () => (await s.liveVms()).filter((v) => v.state === "idle").length === vmCount, 300_000, `${vmCount} idle runners in civm`);
    const samples: { daemon: number; qemuSum: number; qemuCount: number }[] = [];
    for (let i = 0; i < 5; i++) {
      const pids = qemuProcessesOf(e);
      samples.push({ daemon: rssKiB(s.pid)!, qemuSum: pids.reduce((a, p) => a + (rssKiB(p) ?? 0), 0), qemuCount: pids.length });
      await sleep(2000);
    }
    const online = [...gh.state.runners.values()].filter((x) => x.status === "online").length;
    const la = loadavg();
    log(`rss: daemon ${samples.map((x) => x.daemon).join(",")} KiB, QEMU sum ${samples.map((x) => x.qemuSum).join(",")} KiB`);
    return {
      vms: vmCount,
      registeredInFake: hub.registeredAt.size,
      onlineInFake: online,
      qemuProcesses: samples[0]!.qemuCount,
      secondsUntilAllRegistered: Math.round(allRegisteredS * 10) / 10,
      daemonRssIdleMiB: Math.round((idleRss / 1024) * 10) / 10,
      daemonRssMiB: stats(samples.map((x) => x.daemon / 1024)),
      qemuRssSumMiB: stats(samples.map((x) => x.qemuSum / 1024)),
      qemuRssPerVmMiB: Math.round((samples[0]!.qemuSum / samples[0]!.qemuCount / 1024) * 10) / 10,
      loadavg: [la0, la],
    };
  });
}

report.loadavgEnd = loadavg();
const text = JSON.stringify(report, null, 2);
process.stdout.write(text + "\n");
if (out) writeFileSync(out, text + "\n");
