// Public surface of civm's configuration: instances files, sizes, the config pre-processor.
export * from "./types.js";
export {
  loadInstances,
  selectInstance,
  describeInstance,
  checkInstanceFiles,
  INSTANCE_KEYS,
  NAME_RE,
  type LoadedInstances,
  type LoadOptions,
} from "./instances.js";
export { parseSize, formatSize, SIZE_FORMS } from "./sizes.js";
export { kindOf } from "./kind.js";
export { loadStructuredFile, parseStructuredText } from "./load-file.js";
export { closestMatch, didYouMean, editDistance } from "./suggest.js";
export {
  preprocessConfig,
  preprocessInstanceConfig,
  redact,
  PREPROCESS_FUNCTIONS,
  type PreprocessOptions,
  type PreprocessResult,
} from "./preprocess.js";
