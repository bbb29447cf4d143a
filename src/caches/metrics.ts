// The caches' metrics on the daemon's prom-client registry, by cache ("registry/docker.io",
// "http"): requests, hits, misses, bytes (served to VMs, fetched upstream), size, up,
// restarts. Counted by civm from what the caches log, since civm started.
import { Counter, Gauge } from "prom-client";
import { perRegistry } from "../pool/metrics.js";

export interface CacheMetrics {
  up: Gauge<"cache">;
  requests: Counter<"cache">;
  hits: Counter<"cache">;
  misses: Counter<"cache">;
  bytes: Counter<"cache" | "direction">;
  size: Gauge<"cache">;
  restarts: Counter<"cache">;
}

export const cacheMetrics = perRegistry((registers): CacheMetrics => ({
    up: new Gauge({ name: "civm_cache_up", help: "1 when the cache answers its health check", labelNames: ["cache"], registers }),
    requests: new Counter({ name: "civm_cache_requests_total", help: "Requests for content the cache answered (registry: manifest and blob GETs; http: proxied requests, CONNECT tunnels included)", labelNames: ["cache"], registers }),
    hits: new Counter({ name: "civm_cache_hits_total", help: "Requests answered from the cache's storage", labelNames: ["cache"], registers }),
    misses: new Counter({ name: "civm_cache_misses_total", help: "Requests that fetched the content from upstream", labelNames: ["cache"], registers }),
    bytes: new Counter({ name: "civm_cache_bytes_total", help: "Bytes by direction: served (to VMs) or upstream (fetched from the origin)", labelNames: ["cache", "direction"], registers }),
    size: new Gauge({ name: "civm_cache_size_bytes", help: "Bytes the cache holds on disk", labelNames: ["cache"], registers }),
    restarts: new Counter({ name: "civm_cache_restarts_total", help: "Times civm started the cache again after it ended or stopped answering", labelNames: ["cache"], registers }),
}));
