// `civm serve` timing and GitHub API metrics on the daemon's prom-client registry. The
// reconciler (VM transitions from the state store), the webhook server (job pickup) and
// the GitHub clients (every request) all report here; each metric is created once per
// registry and found again by name, so those parts need only the registry.
import { collectDefaultMetrics, Counter, Gauge, Histogram, type Registry } from "prom-client";
import type { JobRecord, Store, VmRecord, VmState } from "../store/types.js";

/** Seconds: a KVM boot takes a few, a TCG one minutes; the registration timeout is 10 min. */
export const BOOT_BUCKETS = [1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600];
/** Seconds: up to GitHub's 6 h job limit. */
export const JOB_BUCKETS = [1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600];
/** Seconds: a warm runner takes a job in well under a second; a cold TCG boot, minutes. */
export const PICKUP_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600];

export interface ServeMetrics {
  boot: Histogram<"pool">;
  job: Histogram<"pool">;
  pickup: Histogram<"pool">;
  githubRequests: Counter<"route" | "status">;
  githubErrors: Counter<"route">;
  githubRateLimit: Gauge<"target">;
}

/**
 * A getter for metrics made once per registry (prom-client refuses a second metric of the
 * same name on one registry): `make` gets the registry to register with.
 */
export function perRegistry<T>(make: (registers: Registry[]) => T): (registry: Registry) => T {
  const made = new WeakMap<Registry, T>();
  return (registry) => {
    let m = made.get(registry);
    if (m === undefined) {
      m = make([registry]);
      made.set(registry, m);
    }
    return m;
  };
}

/** The metrics of `registry`, created on first use. */
export const serveMetrics = perRegistry((registers): ServeMetrics => ({
    boot: new Histogram({ name: "civm_vm_boot_seconds", help: "Runner VM start until its runner is registered and online (idle or busy)", labelNames: ["pool"], buckets: BOOT_BUCKETS, registers }),
    job: new Histogram({ name: "civm_job_seconds", help: "Runner busy with a job until the job completed or the VM ended", labelNames: ["pool"], buckets: JOB_BUCKETS, registers }),
    pickup: new Histogram({ name: "civm_job_pickup_seconds", help: "Job queued until in progress on a civm runner", labelNames: ["pool"], buckets: PICKUP_BUCKETS, registers }),
    githubRequests: new Counter({ name: "civm_github_api_requests_total", help: "GitHub API requests (each attempt) by route template and HTTP status (0: no response)", labelNames: ["route", "status"], registers }),
    githubErrors: new Counter({ name: "civm_github_api_errors_total", help: "GitHub API requests that failed (4xx/5xx including rate limits, or no response) by route template", labelNames: ["route"], registers }),
    githubRateLimit: new Gauge({ name: "civm_github_rate_limit_remaining", help: "GitHub rate-limit budget left (x-ratelimit-remaining) of the credential polling each target", labelNames: ["target"], registers }),
}));

/** The GitHub clients' request observer (ClientOptions.onRequest). */
export function githubRequestObserver(registry: Registry): (route: string, status: number | undefined) => void {
  const m = serveMetrics(registry);
  return (route, status) => {
    m.githubRequests.inc({ route, status: String(status ?? 0) });
    if (status === undefined || status >= 400) m.githubErrors.inc({ route });
  };
}

const seconds = (ms: number) => Math.max(0, ms) / 1000;

/**
 * Boot time when a VM leaves "starting" for idle or busy (its runner is online), job time
 * when a busy VM finishes: from busy until the job completed (when the store knows it) or
 * the VM ended. VMs a restarted civm finds gone are left out (their end time is unknown).
 */
export function observeVmTransition(m: ServeMetrics, store: Pick<Store, "job">, vm: VmRecord, from: VmState): void {
  if (from === "starting" && (vm.state === "idle" || vm.state === "busy")) {
    const at = vm.state === "idle" ? vm.idleSince : vm.busySince;
    if (at !== undefined) m.boot.observe({ pool: vm.pool }, seconds(at - vm.createdAt));
    return;
  }
  if (from === "busy" && vm.state === "finished" && vm.finishedAt !== undefined && vm.exitReason !== "civm-restarted") {
    const start = vm.busySince ?? vm.startedAt;
    if (start === undefined) return;
    const finishedAt = vm.finishedAt;
    const observe = (job: JobRecord | undefined) => {
      const end = job?.completedAt !== undefined && job.completedAt >= start && job.completedAt <= finishedAt ? job.completedAt : finishedAt;
      m.job.observe({ pool: vm.pool }, seconds(end - start));
    };
    const job = vm.jobId !== undefined ? store.job(vm.jobId) : undefined;
    // The SQLite store answers at once, PostgreSQL later (then without a failure mattering).
    if (job instanceof Promise) job.then(observe, () => observe(undefined));
    else observe(job);
  }
}

/**
 * Pickup latency of a job that went in progress on a civm runner: GitHub's created_at →
 * started_at from the webhook when both are there, else first seen queued → now.
 */
export function pickupSeconds(payload: { created_at?: unknown; started_at?: unknown }, queuedAt: number | undefined, now: number): number | undefined {
  const created = typeof payload.created_at === "string" ? Date.parse(payload.created_at) : NaN;
  const started = typeof payload.started_at === "string" ? Date.parse(payload.started_at) : NaN;
  if (Number.isFinite(created) && Number.isFinite(started) && started >= created) return seconds(started - created);
  if (queuedAt !== undefined) return seconds(now - queuedAt);
  return undefined;
}

/**
 * civm_build_info (version, Node.js) and prom-client's default process metrics
 * (process_cpu_seconds_total, process_resident_memory_bytes, nodejs_eventloop_lag_seconds,
 * ...) on the daemon's registry; once per registry.
 */
export function registerProcessMetrics(registry: Registry, version: string): void {
  if (registry.getSingleMetric("civm_build_info")) return;
  new Gauge({ name: "civm_build_info", help: "Always 1; the labels say which civm and Node.js run", labelNames: ["version", "nodejs"], registers: [registry] }).set({ version, nodejs: process.version }, 1);
  collectDefaultMetrics({ register: registry });
}
