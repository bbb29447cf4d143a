// Dev VMs (lvh parity): civm run --image ... [--detach], then wait, exec, ssh, logs, stop.
export { planDevVm, devRunRequest, planConsoleSinks, memFlag, MIN_MEM_BYTES, KEEPALIVE_COMMAND, type DevFlags, type DevPlan, type PlanContext } from "./plan.js";
export { parseHostMount, planHostMounts, parsePortSpec, checkForwardsDistinct, checkVmName, RESERVED_TAGS, type HostMountSpec } from "./options.js";
export { sshArgv, sshOptions, remoteCommand, shellQuote, makeKeyPair, freePort, sshProbe, type SshTarget } from "./ssh.js";
export { devMetaOf, requireDevMeta, sshOverride, findVm, liveEntries, lastConsoleLog, type DevMeta } from "./meta.js";
export { startDetached, runSupervisor, SUPERVISOR_COMMAND, PLAN_ENV } from "./supervise.js";
export { waitUntilReady, AGENT_READY, type WaitMode, type WaitOptions } from "./wait.js";
export { stopVm, type StopOptions } from "./stop.js";
