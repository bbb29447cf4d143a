// Public surface of the caches civm serve runs for its runner VMs (docs/caches.md).
export * from "./types.js";
export { parseCaches, cacheSecrets, summarizeCaches, defaultUpstream, CACHES_DEFAULTS } from "./config.js";
export { CacheManager, DEFAULT_CACHE_USER, type CacheManagerOptions, type CacheLogger } from "./manager.js";
export { guestCaches, guestEndpoint, launchWithCaches, noProxyFor, withCacheAccess, GUEST_HOST, type GuestCaches, type OfferedCache } from "./inject.js";
