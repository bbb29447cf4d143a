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
