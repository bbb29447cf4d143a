// Public surface of civm's runner pools: the serve config, label matching, the planners.
export * from "./types.js";
export {
  loadServeConfig,
  summarizeServeConfig,
  parseDuration,
  parseListen,
  poolLabel,
  looksLikeContainerRef,
  SERVE_DEFAULTS,
  type LoadServeOptions,
} from "./config.js";
export { normalizeLabels, labelKey, labelsMatch, registrationLabels, IMPLIED_LABEL } from "./labels.js";
export {
  desiredRunners,
  matchPool,
  queuedByPool,
  planPool,
  planShutdown,
  backoffDelay,
  backoffState,
  DEFAULT_BACKOFF,
  type RunnerState,
  type JobStatus,
  type RunnerView,
  type PoolView,
  type PoolPlan,
  type PlanInput,
  type StopReason,
  type BackoffOptions,
  type PoolHealth,
} from "./plan.js";
export {
  Daemon,
  poolConfigKey,
  poolFieldChanges,
  type DaemonOptions,
  type DaemonLogger,
  type DaemonState,
  type DaemonStatus,
  type PoolChanges,
  type VmLauncher,
  type VmHandle,
  type LaunchRequest,
  type LaunchOutcome,
} from "./daemon.js";
export { settingsChanges, effectiveConfig, restartMessage, type SettingsChanges, type RestartNeeded } from "./reload.js";
export { combineCmdline, poolCmdlineWarnings, splitCmdline, type CombinedCmdline, type DroppedOption } from "./cmdline.js";
export { JobRouter, routeJob, targetCovers, type IgnoreReason, type RoutablePool, type Route } from "./routing.js";
