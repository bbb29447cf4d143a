// How a pool's kernel options (`cmdline`, or fireactions' `firecracker.kernelArgs`) combine
// with civm's own kernel command line. Firecracker configs carry a whole command line written
// for Firecracker's machine (e.g. seed 003's "console=ttyS0 reboot=k panic=1 pci=off"); used
// as civm's whole command line it has no root= and pci=off removes the virtio-pci disk, so the
// runner never boots. So the pool's options are appended to civm's default for the image:
// a key=value option the pool sets replaces civm's (root=, panic=, init=, ...; console= may
// repeat, each adds a console), ro/rw replace each other, and options that cannot work on the
// chosen machine are dropped and named in a warning (config check, serve start).
import type { MachineType as Machine } from "../config/types.js";
import type { PoolSpec } from "./types.js";

export interface DroppedOption {
  option: string;
  why: string;
}

export interface CombinedCmdline {
  cmdline: string;
  /** Options of the pool's that were left out, with the reason. */
  dropped: DroppedOption[];
}

/** Options a kernel takes more than once, each adding something: never replaced. */
const REPEATABLE = new Set(["console"]);

/** Why an option cannot work on `machine` (undefined: it can). */
export function unusableOption(option: string, machine: Machine): string | undefined {
  const [key = "", value] = splitOption(option);
  if (machine === "microvm") return undefined;
  if (key === "pci" && value !== undefined && value.split(",").includes("off")) {
    return `civm's ${machine} machine puts the root disk, the config disc and the network on PCI (virtio-pci); without PCI the guest finds none of them and never boots`;
  }
  if (key === "virtio_mmio.device") return `it describes a Firecracker virtio-mmio device; civm's ${machine} machine has its devices on PCI`;
  return undefined;
}

/**
 * Splits a kernel command line into options (whitespace-separated; double quotes keep spaces
 * in a value, as the kernel's parser does).
 */
export function splitCmdline(text: string): string[] {
  const out: string[] = [];
  let cur = "";
  let quoted = false;
  let has = false;
  for (const ch of text) {
    if (ch === '"') quoted = !quoted;
    if (!quoted && /\s/.test(ch)) {
      if (has) out.push(cur);
      cur = "";
      has = false;
      continue;
    }
    cur += ch;
    has = true;
  }
  if (has) out.push(cur);
  return out;
}

function splitOption(option: string): [string, string | undefined] {
  const i = option.indexOf("=");
  return i < 0 ? [option, undefined] : [option.slice(0, i), option.slice(i + 1)];
}

/** civm's `base` for the image with the pool's `extra` appended (see the top of this file). */
export function combineCmdline(base: string, extra: string | undefined, machine: Machine): CombinedCmdline {
  const dropped: DroppedOption[] = [];
  const all = splitCmdline(extra ?? "");
  // After "--" the options are init's, not the kernel's: passed as they are.
  const dash = all.indexOf("--");
  const own = dash < 0 ? all : all.slice(0, dash);
  const initArgs = dash < 0 ? [] : all.slice(dash);
  const kept: string[] = [];
  for (const o of own) {
    const why = unusableOption(o, machine);
    if (why) dropped.push({ option: o, why });
    else kept.push(o);
  }
  const keys = new Set(kept.map((o) => splitOption(o)).filter(([k, v]) => v !== undefined && !REPEATABLE.has(k)).map(([k]) => k));
  const flags = new Set(kept.filter((o) => !o.includes("=")));
  const same = new Set(kept);
  const fromBase = splitCmdline(base).filter((o) => {
    if (same.has(o)) return false; // said again by the pool: once is enough
    const [k, v] = splitOption(o);
    if (v !== undefined) return !keys.has(k);
    if ((o === "rw" && flags.has("ro")) || (o === "ro" && flags.has("rw"))) return false;
    return true;
  });
  return { cmdline: [...fromBase, ...kept, ...initArgs].join(" "), dropped };
}

/** The field a pool's kernel options came from, for messages. */
export function cmdlineField(pool: PoolSpec): string {
  return pool.cmdlineFrom ?? "cmdline";
}

/**
 * Warnings about the pools' kernel options (machine "pc", what pools boot): options civm
 * drops, and options of a pool with `firmware-boot: true`, where civm passes no command line
 * at all. (A foreign disk's own kernel gets them after GRUB's arguments; one civm cannot read
 * boots through its boot loader, said by the launcher when it starts a VM.)
 */
export function poolCmdlineWarnings(pools: readonly PoolSpec[], file: string): string[] {
  const out: string[] = [];
  for (const p of pools) {
    if (p.vm.cmdline === undefined) continue;
    const where = `${file}: pool "${p.name}" (#${p.index + 1})`;
    const field = cmdlineField(p);
    if (p.vm.firmwareBoot) {
      out.push(`${where}: "${field}" is ignored: "firmware-boot": true boots ${p.runner.image.ref} through its own boot loader, which has its own kernel command line.`);
      continue;
    }
    for (const d of combineCmdline("", p.vm.cmdline, "pc").dropped) {
      out.push(`${where}: "${field}" option "${d.option}" is dropped: ${d.why}. The other options are appended to civm's own kernel command line.`);
    }
  }
  return out;
}
