// lvh (cilium/little-vm-helper) kernels.json: {"kernels": [{"name", "url"?, "opts"?}], "common_opts"?}.
// civm reads it for the names only: lvh builds those kernels from git, which civm does not
// do (yet); a kernel lvh built (its tar-install folder: boot/ and lib/modules/) is added
// with `civm kernel add NAME DIR`.
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { ConfigError } from "../errors/index.js";

export interface LvhKernel {
  name: string;
  url?: string;
}

export interface LvhKernels {
  file: string;
  kernels: LvhKernel[];
}

/** Parses kernels.json text; `file` is for messages. Throws a ConfigError on a malformed file. */
export function parseLvhKernels(text: string, file: string): LvhKernels {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(`${file}: not valid JSON: ${(e as Error).message}`);
  }
  const list = (data as { kernels?: unknown } | null)?.kernels;
  if (!Array.isArray(list)) throw new ConfigError(`${file}: expected lvh's kernels.json form {"kernels": [{"name": ..., "url": ...}]}`);
  const kernels: LvhKernel[] = [];
  list.forEach((k: unknown, i) => {
    const name = (k as { name?: unknown } | null)?.name;
    if (typeof name !== "string" || !name) throw new ConfigError(`${file}: kernels[${i}] has no "name"`);
    const url = (k as { url?: unknown }).url;
    kernels.push({ name, ...(typeof url === "string" ? { url } : {}) });
  });
  return { file, kernels };
}

/** The kernels.json given, else ./kernels.json or ./_data/kernels.json (lvh's layout) when present. */
export async function findLvhKernels(explicit: string | undefined, cwd = process.cwd()): Promise<LvhKernels | undefined> {
  const candidates = explicit ? [resolve(cwd, explicit)] : [join(cwd, "kernels.json"), join(cwd, "_data", "kernels.json")];
  for (const f of candidates) {
    if (!existsSync(f)) {
      if (explicit) throw new ConfigError(`${explicit}: no such file (lvh kernels.json)`);
      continue;
    }
    return parseLvhKernels(await readFile(f, "utf8"), explicit ?? f);
  }
  return undefined;
}
