// Host concerns: state/logs paths, the accelerator (KVM probe), `civm doctor`.
export * from "./paths.js";
export * from "./kvm.js";
export * from "./doctor.js";
