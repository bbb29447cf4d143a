// Kernels for dev VMs (`civm kernel add|ls|rm`, `civm run --kernel NAME`) and the pieces of
// a busybox initramfs the tests' tiny guest shares.
export { KernelStore, checkKernelName, INITRD_MODULES, KERNELS_DIR, MODULES_DISK, type StoredKernel, type KernelManifest, type KernelSource, type AddKernelOptions } from "./store.js";
export { MODULES_LABEL, INITRD_INIT } from "./init-script.js";
export { resolveModules, moduleName } from "./modules.js";
export { parseBzImage, readBzImage, type BzImageInfo } from "./bzimage.js";
export { parseLvhKernels, findLvhKernels, type LvhKernels, type LvhKernel } from "./lvh.js";
export { aptDownload, dependsOnKernelPackage, packageVersion, extractDeb, debFields, foreignAptOptions, foreignAptUpdate } from "./debian.js";
export { gzipFile, installedBusybox, staticBusybox, busyboxTree, copyModules, packInitramfs, readModuleIndex } from "./initramfs.js";
