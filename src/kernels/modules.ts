// Kernel module lists: which .ko files (in load order) an initramfs needs for a set of
// module names, from the kernel's modules.dep and modules.builtin. Pure; table-tested.
import { basename } from "node:path";

/** "kernel/fs/ext4/ext4.ko" (or .ko.xz/.gz/.zst) → "ext4"; dashes become underscores as the kernel does. */
export const moduleName = (path: string): string => basename(path).replace(/\.ko(\.(xz|gz|zst))?$/, "").replace(/-/g, "_");

export interface ResolveModulesOptions {
  /** Skip wanted modules that are neither in modules.dep nor built in (instead of failing). */
  optional?: readonly string[];
}

/**
 * Module paths (relative to lib/modules/<kver>) in load order: dependencies first. Built-in
 * modules are left out. A wanted module that the kernel does not know is an error unless it
 * is listed in `opts.optional`.
 */
export function resolveModules(modulesDep: string, builtin: string, wanted: readonly string[], opts: ResolveModulesOptions = {}): string[] {
  const deps = new Map<string, { path: string; deps: string[] }>();
  for (const line of modulesDep.split("\n")) {
    const colon = line.indexOf(":");
    if (colon < 0) continue;
    const path = line.slice(0, colon).trim();
    const rest = line.slice(colon + 1).trim();
    deps.set(moduleName(path), { path, deps: rest ? rest.split(/\s+/).map(moduleName) : [] });
  }
  const builtins = new Set(builtin.split("\n").filter(Boolean).map(moduleName));
  const optional = new Set((opts.optional ?? []).map((m) => m.replace(/-/g, "_")));
  const order: string[] = [];
  const done = new Set<string>();
  const visiting = new Set<string>();
  const visit = (name: string, from: string | undefined): void => {
    if (done.has(name) || builtins.has(name)) return;
    const entry = deps.get(name);
    if (!entry) {
      if (!from && optional.has(name)) return;
      throw new Error(`kernel module ${name}${from ? ` (needed by ${from})` : ""} is not in modules.dep`);
    }
    if (visiting.has(name)) throw new Error(`kernel module dependency cycle at ${name}`);
    visiting.add(name);
    for (const d of entry.deps) visit(d, name);
    visiting.delete(name);
    done.add(name);
    order.push(entry.path);
  };
  for (const w of wanted) visit(w.replace(/-/g, "_"), undefined);
  return order;
}
