// What a snapshot's guest and civm agree on (guest/lib/civm-agent.sh, the tests' tiny guest).

/** On the kernel command line of a snapshot's VM: wait for the disc without a limit, become unique once it comes. */
export const SNAPSHOT_FLAG = "civm.snapshot";

/** The console line (after the agent's prefix) at which civm saves the VM. */
export const SNAPSHOT_POINT = "snapshot point: waiting for the configuration disc";

/** The agent's warning that the boot had not settled when it announced the snapshot point, if the console text has it. */
export function unsettledBoot(consoleText: string): string | undefined {
  return /snapshot: the boot had not settled after [^\r\n]*/.exec(consoleText)?.[0];
}
