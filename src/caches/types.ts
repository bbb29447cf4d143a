// The `caches:` section of the serve config, typed (config.ts validates it), and what the
// running caches report. See docs/caches.md.
import type { AllowRule } from "../net/policy.js";

export interface RegistryMirrorSpec {
  /** The registry jobs name, as containerd's hosts.toml does: "docker.io", "ghcr.io", "registry.corp:5000". */
  registry: string;
  /**
   * civm runs a pull-through cache (CNCF Distribution in proxy mode) of this upstream URL
   * (default: https://registry-1.docker.io for docker.io, https://REGISTRY otherwise).
   * Undefined when `url` names an existing cache.
   */
  upstream: string | undefined;
  /** An existing pull-through cache civm only checks and hands to the guests. */
  url: string | undefined;
  /** Loopback port of the cache civm runs (undefined: a free one, chosen at start). */
  port: number | undefined;
  /** The upstream's credentials (username, password: a secret, passed in the environment). */
  credentials: { username: string; password: string } | undefined;
}

export interface RegistryCacheSpec {
  mirrors: RegistryMirrorSpec[];
  /** Folder of the caches civm runs (one subfolder per registry); undefined: <state>/caches/registry. */
  storage: string | undefined;
  /** Total size of the caches civm runs; the least recently used blobs are evicted above it. */
  maxSizeBytes: number;
}

export interface HttpCacheSpec {
  /** An existing HTTP proxy civm only checks and hands to the guests (then nothing else applies). */
  url: string | undefined;
  /** Squid's cache folder; undefined: <state>/caches/http. */
  storage: string | undefined;
  maxSizeBytes: number;
  /** Largest object Squid keeps. */
  maxObjectBytes: number;
  port: number | undefined;
  /**
   * Destinations the proxy may fetch from although the VM network policy denies them by
   * default (the host, private and link-local ranges): network.allow's forms.
   */
  allow: AllowRule[];
}

export interface CachesSpec {
  registry: RegistryCacheSpec | undefined;
  http: HttpCacheSpec | undefined;
}

export type CacheKind = "registry" | "http";

/**
 * starting: spawned, not answering yet; up: answers its health check; restarting: exited or
 * stopped answering, started again after a backoff; failed: could not start (or an existing
 * service does not answer), retried with a longer backoff; stopped: the daemon stopped it.
 */
export type CacheState = "starting" | "up" | "restarting" | "failed" | "stopped";

/** One cache as `civm caches` and GET /api/caches show it. */
export interface CacheStatus {
  /** "registry/docker.io" or "http". */
  name: string;
  kind: CacheKind;
  /** true: civm runs it; false: an existing service (`url:`) civm only checks. */
  managed: boolean;
  state: CacheState;
  /** Since when it is in this state (ISO time). */
  since: string;
  /** Why it is not up (the child's last words, the failed check). */
  message: string | null;
  /** Where the host reaches it, and where runner VMs do. */
  url: string;
  guestUrl: string;
  /** The registry it mirrors (registry caches). */
  registry?: string;
  /** What a managed cache fetches from (registry caches). */
  upstream?: string;
  pid: number | null;
  restarts: number;
  sizeBytes: number | null;
  maxSizeBytes: number | null;
  /** Since this civm started (managed caches). */
  requests: number;
  hits: number;
  misses: number;
  /** hits / (hits + misses), null before the first request. */
  hitRatio: number | null;
  /** Bytes sent to VMs, and fetched from upstream. */
  servedBytes: number;
  upstreamBytes: number;
}
