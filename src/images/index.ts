// civm image build, stage 1: spec loading, cache keys, root tree (mmdebstrap) and disk assembly.
export * from "./types.js";
export {
  loadImageSpecs,
  loadBuiltinImageSpecs,
  builtinSpecFiles,
  resolveBuildOrder,
  describeImage,
  DEFAULT_SUITE,
  DEFAULT_KERNEL,
  DEFAULT_SIZE_BYTES,
  type LoadImageOptions,
} from "./spec.js";
export { isLvhForm, translateLvhImage, LVH_SUPPORTED_TYPES } from "./lvh.js";
export { hostDebianMirror, readAptSources } from "./mirror.js";
export {
  computeCacheKey,
  cacheKeyFor,
  cacheKeysFor,
  canonicalJson,
  hashPath,
  inputFiles,
  readAgentVersion,
  uuidFromKey,
  IMAGE_BUILDER_VERSION,
  type CacheKeyInputs,
} from "./cache-key.js";
export {
  buildRootTree,
  planHooks,
  includedPackages,
  describeAction,
  listPackages,
  findKernelRelease,
  removeTree,
  BASE_PACKAGES,
  INITRAMFS_MODULES,
  ROOT_LABEL,
  type BuildRootTreeOptions,
  type RootTree,
  type RootfsProgress,
  type RootfsStep,
} from "./rootfs.js";
export {
  assembleDisk,
  compressArtifact,
  convertRaw,
  extractBootFiles,
  makeFilesystem,
  writePartitionTable,
  DISK_LAYOUT,
  type AssembleDiskOptions,
  type AssembledDisk,
  type DiskProgress,
} from "./disk.js";
export { repoRoot, builtinImagesDir } from "./paths.js";
export { buildImage, type BuildOptions, type BuildOutcome, type BuildEvent } from "./build.js";
