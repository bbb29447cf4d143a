export { VmRun, WORKDIR_LAYOUT, redactAll, newVmId, type RunVmRequest, type VmResult } from "./run.js";
export { EXIT_CODE_OF_REASON, type ExitReason, type StopReason } from "./supervisor.js";
export { buildQemuArgs, DEFAULT_CMDLINE, DEVICE_IDS, type QemuPlan, type PortForward, type HostMount, type NinePSecurityModel } from "./argv.js";
export { securityModelFor, lacksUserXattrs, type ModeChoice } from "./ninep.js";
export { Registry, liveness, workDirProblem, procIdentity, type RegistryEntry, type Liveness, type Verdict, type ProcIdentity } from "./registry.js";
export { reconcile } from "./reconcile.js";
export { QmpClient, type QmpEvent } from "./qmp.js";
export { renderConfigDrive, CONFIG_DRIVE_LABEL } from "./config-drive.js";
export { formatBytes } from "./format.js";
