// Typed, validated `civm serve` configuration: what pool/config.ts hands to the daemon.
// Types only; loading and validation live in config.ts.
import type { NetworkSpec } from "../net/policy.js";
import type { RunnerTarget } from "../github/registration-token.js";
import type { LogRetention } from "../host/log-retention.js";
import type { CachesSpec } from "../caches/types.js";

export type ImagePullPolicy = "IfNotPresent" | "Always" | "Never";

/** How a runner VM gets its registration: a single-use JIT config (default) or a registration token. */
export type RegistrationMode = "jit" | "token";

export interface PoolImage {
  /** As written in the config. */
  ref: string;
  /**
   * "stored": a civm image in the store (re-resolved before each VM start); "path": a disk
   * file; "oci": an OCI reference, pulled into the store as runner.imagePullPolicy says.
   */
  kind: "stored" | "path" | "oci";
  /** Absolute disk path for kind "path". */
  path?: string;
}

export interface PoolSpec {
  name: string;
  /** 0-based position in the pools list (messages show #index+1). */
  index: number;
  maxRunners: number;
  /** Idle runners kept on top of demand (ARC semantics), not a total. */
  minRunners: number;
  runner: {
    /** Prefix of runner names: `<namePrefix>-<vm id>`. */
    namePrefix: string;
    image: PoolImage;
    imagePullPolicy: ImagePullPolicy;
    target: RunnerTarget;
    /** Labels as written (used for the JIT config; "self-hosted" added there if missing). */
    labels: string[];
    /** Runner group id (GitHub's default group is 1). */
    groupId: number;
    registration: RegistrationMode;
    /** Folder the runner works in, inside the guest. */
    workFolder: string;
  };
  vm: {
    cpus: number;
    ramBytes: number;
    rootDiskBytes: number | undefined;
    timeoutSeconds: number;
    /** Kernel command line (firecracker.kernelArgs or cmdline); undefined = the image's default. */
    cmdline: string | undefined;
    /** What the runner's guest may reach (docs/security.md). */
    network: NetworkSpec;
    /**
     * `start`: "snapshot" restores from the image's memory snapshot (made on first use),
     * "boot" always boots; unset: restore when a matching snapshot exists (docs/images.md).
     */
    start?: "snapshot" | "boot";
    /**
     * `firmware-boot: true`: boot through SeaBIOS and the image's bootloader, never its kernel
     * directly (a stored image's, or a foreign GRUB disk's read by images/foreign-boot.ts).
     */
    firmwareBoot?: boolean;
  };
  /** Idle runners above desired are stopped after this long idle. */
  idleTimeoutSeconds: number;
  /** Where vm.cmdline came from, for messages (outside `vm`: not a VM setting). */
  cmdlineFrom?: "cmdline" | "firecracker.kernelArgs";
}

export type GitHubAuthConfig =
  | { kind: "app"; appId: number; privateKey: string; privateKeyFile: string | undefined; installationId: number | undefined }
  | { kind: "token"; token: string };

/** Where civm serve keeps its state: SQLite in the state dir (one host), or a fleet's PostgreSQL. */
export type StoreConfig = { kind: "sqlite"; where: string } | { kind: "postgres"; url: string; where: string };

/** This host in the fleet (`fleet:`); undefined fields take their defaults at start. */
export interface FleetConfig {
  hostId: string | undefined;
  address: string | undefined;
  cpus: number | undefined;
  ramBytes: number | undefined;
  heartbeatSeconds: number;
  deadAfterSeconds: number;
  placementGraceSeconds: number;
}

/** How civm serve deals with GitHub's answers (the `github:` keys besides the credentials). */
export interface GitHubLimits {
  /** A GitHub call, its retries included, fails after this long (s; `github.requestTimeout`). */
  requestTimeoutSeconds: number;
  /** A target failing or rate-limited this long is reported degraded (s; `github.degradedAfter`). */
  degradedAfterSeconds: number;
  /** An organization's repository list is read again after this long (s; `github.repositoryListCache`). */
  repositoryListCacheSeconds: number;
  /** Share of the rate limit polling leaves for JIT configs and deregistration (%; `github.rateLimitReserve`). */
  rateLimitReservePercent: number;
}

export interface ServeConfig {
  /** The config file as the caller named it. */
  file: string;
  baseDir: string;
  listen: { host: string; port: number };
  /** undefined: civm's default state dir. */
  stateDir: string | undefined;
  store: StoreConfig;
  fleet: FleetConfig;
  github: { apiUrl: string; auth: GitHubAuthConfig };
  githubLimits: GitHubLimits;
  webhookSecret: string | undefined;
  apiToken: string | undefined;
  /** Seconds between reconciliation polls of GitHub (queued jobs, runners). */
  pollIntervalSeconds: number;
  /** SIGTERM: how long to wait for busy runners before giving up on them. */
  shutdownTimeoutSeconds: number;
  /** Finished VMs, completed jobs and webhook deliveries older than this are pruned (hourly). */
  retentionSeconds: number;
  /** Largest webhook body accepted; larger gets 413. */
  maxWebhookBytes: number;
  /** Console and supervisor log retention in the logs dir (applied with the hourly pruning). */
  logs: LogRetention;
  /** The unprivileged user QEMU runs as (undefined: civm-qemu, created on demand). */
  qemuUser: string | undefined;
  /** Where the pools came from (the config file itself, or a separate pools file). */
  poolsFile: string;
  pools: PoolSpec[];
  /** Every resolved ${{ fn:arg }} value and the private key: redact before logging. */
  secrets: string[];
  /** A listener of its own for GET /metrics (then the main one does not serve it). */
  metricsListen?: { host: string; port: number } | undefined;
  /** HTTPS on the main listener: PEM certificate (chain) and key, read at load. */
  tls?: { certFile: string; keyFile: string; cert: string; key: string } | undefined;
  /** Settings that work but are unsafe (config check and start-up print them). */
  warnings?: string[];
  /** Registry and HTTP caches for the runner VMs (docs/caches.md). */
  caches?: CachesSpec | undefined;
}
