// A pool's settings as the daemon gets them from the config, for unit tests of the daemon.
import { DEFAULT_NETWORK } from "../../src/net/policy.js";
import type { PoolSpec } from "../../src/pool/types.js";

export function poolSpec(over: Partial<PoolSpec> = {}): PoolSpec {
  return {
    name: "linux",
    index: 0,
    maxRunners: 3,
    minRunners: 1,
    runner: {
      namePrefix: "civm-linux",
      image: { ref: "runner", kind: "stored" },
      imagePullPolicy: "IfNotPresent",
      target: { kind: "repo", owner: "rust-lang-ci", repo: "rust" },
      labels: ["linux", "x64"],
      groupId: 1,
      registration: "jit",
      workFolder: "_work",
    },
    vm: { cpus: 1, ramBytes: 256 << 20, rootDiskBytes: undefined, timeoutSeconds: 600, cmdline: undefined, network: DEFAULT_NETWORK },
    idleTimeoutSeconds: 60,
    ...over,
  };
}
