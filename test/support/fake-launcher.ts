// A VmLauncher without VMs for daemon tests and benchmarks: each start is a record the test
// ends by hand (exit) or through stop(); imageKey can be held open (gate).
import type { LaunchOutcome, LaunchRequest, VmHandle, VmLauncher } from "../../src/pool/daemon.js";

export interface FakeVm {
  req: LaunchRequest;
  stopped: number;
  forced: boolean;
  exit(o?: Partial<LaunchOutcome>): void;
  done: boolean;
}

export class FakeLauncher implements VmLauncher {
  vms: FakeVm[] = [];
  key = "img-1";
  reconciled = 0;
  imageKeyCalls = 0;
  /** When set, imageKey() (so every pass) waits for it: a pass held open. */
  gate: Promise<void> | undefined;
  /** true: stop() ends the VM at once (a guest that honours ACPI). */
  stopEnds = true;
  async imageKey(): Promise<string> {
    this.imageKeyCalls++;
    if (this.gate) await this.gate;
    return this.key;
  }
  async reconcileLeftovers(): Promise<void> {
    this.reconciled++;
  }
  start(req: LaunchRequest): VmHandle {
    let resolve!: (o: LaunchOutcome) => void;
    const result = new Promise<LaunchOutcome>((r) => (resolve = r));
    const vm: FakeVm = {
      req,
      stopped: 0,
      forced: false,
      done: false,
      exit: (o = {}) => {
        if (vm.done) return;
        vm.done = true;
        resolve({ reason: "poweroff", exitCode: 0, ...o });
      },
    };
    this.vms.push(vm);
    return {
      result,
      stop: (force = false) => {
        vm.stopped++;
        vm.forced ||= force;
        if (this.stopEnds || force) vm.exit({ reason: "stopped", exitCode: 5 });
      },
    };
  }
  running(): FakeVm[] {
    return this.vms.filter((v) => !v.done);
  }
}

