// civm starts QEMU (and a dev VM's supervisor) in a session of its own, so a Ctrl-C in the
// terminal reaches civm only. With the kernel's sched_autogroup (on by default in Debian), a new
// session is also a new CPU scheduling group at nice 0, and a process's own nice value only
// orders it within its group: `nice -n 19 civm run ...` would lower nothing for the VM. The
// child's group gets civm's nice value instead.
import { writeFileSync } from "node:fs";
import { getPriority } from "node:os";

/**
 * Gives the session of `pid` (a child just started with `detached: true`) the nice value
 * `nice` (civm's own by default) when it is above 0. Best effort: a kernel without autogroup
 * has no such file, and lowering a nice value (raising priority) is not asked for.
 */
export function inheritNiceInAutogroup(pid: number | undefined, nice: number = getPriority()): void {
  if (pid === undefined || nice <= 0) return;
  try {
    writeFileSync(`/proc/${pid}/autogroup`, String(Math.min(nice, 19)));
  } catch {
    // No autogroup support (the file is absent), or the child already ended.
  }
}
