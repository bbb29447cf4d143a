// lvh (cilium/little-vm-helper) kernels.json:
//   {"kernels": [{"name", "url"?, "opts"?, "extra_make_args"?}], "common_opts"?}
// where each option is the argument list of the kernel's scripts/config, e.g.
// ["--enable", "CONFIG_BPF"], ["--module", "CONFIG_TLS"], ["--disable", "CONFIG_DRM"].
// `civm kernel build NAME` builds an entry (src/kernels/build.ts); civm adds one key of its
// own, `base_config`: the make targets that write the starting .config (default
// ["defconfig"], as lvh), e.g. ["tinyconfig", "kvm_guest.config"] for a small kernel.
// Every problem is one paragraph naming the file, the field and the fix.
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { ConfigError } from "../errors/index.js";
import { closestMatch } from "../config/suggest.js";

/** One scripts/config operation. */
export type KconfigOp =
  | { op: "enable" | "disable" | "module" | "undefine"; name: string }
  | { op: "set-str" | "set-val"; name: string; value: string };

export interface LvhKernel {
  name: string;
  url?: string;
  opts: KconfigOp[];
  extraMakeArgs: string[];
  /** make targets writing the starting .config (civm's key; lvh always uses defconfig). */
  baseConfig: string[];
}

export interface LvhKernels {
  file: string;
  kernels: LvhKernel[];
  commonOpts: KconfigOp[];
}

const ENTRY_KEYS = ["name", "url", "opts", "extra_make_args", "base_config"] as const;
const TOP_KEYS = ["kernels", "common_opts"] as const;

/** scripts/config's flags, long and short, and how many arguments follow each. */
const FLAGS: Record<string, { op: KconfigOp["op"]; args: 1 | 2 }> = {
  "--enable": { op: "enable", args: 1 }, "-e": { op: "enable", args: 1 },
  "--disable": { op: "disable", args: 1 }, "-d": { op: "disable", args: 1 },
  "--module": { op: "module", args: 1 }, "-m": { op: "module", args: 1 },
  "--undefine": { op: "undefine", args: 1 }, "-u": { op: "undefine", args: 1 },
  "--set-str": { op: "set-str", args: 2 },
  "--set-val": { op: "set-val", args: 2 },
};
const OPTION_NAME_RE = /^[A-Za-z0-9_]+$/;
/** make targets a base config may name: *config (defconfig, tinyconfig, x86_64_defconfig) and *.config fragments. */
const BASE_CONFIG_RE = /^([a-z0-9_]*config|[A-Za-z0-9_-]+\.config)$/;

/** CONFIG_X for X or CONFIG_X (scripts/config adds the prefix the same way). */
export function configSymbol(name: string): string {
  return name.startsWith("CONFIG_") ? name : `CONFIG_${name}`;
}

/** The scripts/config arguments of one operation. */
export function kconfigArgs(o: KconfigOp): string[] {
  return "value" in o ? [`--${o.op}`, o.name, o.value] : [`--${o.op}`, o.name];
}

function problem(file: string, field: string, what: string, fix: string): ConfigError {
  return new ConfigError(`${file}: field "${field}": ${what}; ${fix}`);
}

function parseOpts(value: unknown, file: string, field: string): KconfigOp[] {
  if (value === undefined) return [];
  const example = 'a list of scripts/config argument lists such as [["--enable", "CONFIG_BPF"], ["--module", "CONFIG_TLS"]]';
  if (!Array.isArray(value)) throw problem(file, field, `${JSON.stringify(value)} is not a list`, `write it as ${example}`);
  return value.map((o: unknown, i) => {
    const at = `${field}[${i}]`;
    if (!Array.isArray(o) || o.length === 0 || o.some((x) => typeof x !== "string")) {
      throw problem(file, at, `${JSON.stringify(o)} is not a list of strings`, `write an option as ["--enable", "CONFIG_NAME"] (also --disable, --module, --undefine, --set-str NAME VALUE, --set-val NAME VALUE)`);
    }
    const [flag, ...rest] = o as string[];
    const known = FLAGS[flag!];
    if (!known) {
      const hint = closestMatch(flag!, Object.keys(FLAGS));
      throw problem(file, `${at}[0]`, `${JSON.stringify(flag)} is not a scripts/config flag civm applies`, hint ? `did you mean ${JSON.stringify(hint)}?` : `use --enable, --disable, --module, --undefine, --set-str or --set-val`);
    }
    if (rest.length !== known.args) {
      throw problem(file, at, `${flag} takes ${known.args === 1 ? "one option name" : "an option name and a value"}, got ${rest.length} argument(s)`, `write ${known.args === 1 ? `["${flag}", "CONFIG_NAME"]` : `["${flag}", "CONFIG_NAME", "VALUE"]`}`);
    }
    const name = rest[0]!;
    if (!OPTION_NAME_RE.test(name)) {
      throw problem(file, `${at}[1]`, `${JSON.stringify(name)} is not a kernel option name`, `give a Kconfig symbol such as CONFIG_BPF (letters, digits and "_")`);
    }
    return known.args === 2 ? { op: known.op as "set-str" | "set-val", name, value: rest[1]! } : { op: known.op as "enable", name };
  });
}

function parseStrings(value: unknown, file: string, field: string, example: string, re?: RegExp): string[] {
  if (value === undefined) return [];
  if (!Array.isArray(value) || value.some((x) => typeof x !== "string" || !x)) {
    throw problem(file, field, `must be a list of strings`, `write it as ${example}`);
  }
  if (re) {
    const bad = (value as string[]).find((x) => !re.test(x));
    if (bad !== undefined) throw problem(file, field, `${JSON.stringify(bad)} is not a make config target`, `use targets such as ${example}`);
  }
  return value as string[];
}

/** Parses kernels.json text; `file` is for messages. Throws a ConfigError on a malformed file. */
export function parseLvhKernels(text: string, file: string): LvhKernels {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(`${file}: not valid JSON: ${(e as Error).message}`);
  }
  if (typeof data !== "object" || data === null || Array.isArray(data) || !Array.isArray((data as { kernels?: unknown }).kernels)) {
    throw new ConfigError(`${file}: expected lvh's kernels.json form {"kernels": [{"name": ..., "url": ..., "opts": [...]}], "common_opts": [...]}`);
  }
  const top = data as Record<string, unknown>;
  for (const key of Object.keys(top)) {
    if ((TOP_KEYS as readonly string[]).includes(key)) continue;
    const hint = closestMatch(key, TOP_KEYS);
    throw problem(file, key, "unknown key in kernels.json", hint ? `did you mean ${JSON.stringify(hint)}?` : `kernels.json takes ${TOP_KEYS.join(" and ")}`);
  }
  const seen = new Set<string>();
  const kernels = (top.kernels as unknown[]).map((k: unknown, i): LvhKernel => {
    const at = `kernels[${i}]`;
    if (typeof k !== "object" || k === null || Array.isArray(k)) throw problem(file, at, "must be an object", 'write {"name": "6.6", "url": "...", "opts": [...]}');
    const entry = k as Record<string, unknown>;
    const name = entry.name;
    if (typeof name !== "string" || !name) throw new ConfigError(`${file}: kernels[${i}] has no "name": give each kernel a "name" (the name civm kernel build takes)`);
    if (seen.has(name)) throw problem(file, `${at}.name`, `kernel "${name}" is defined twice`, "rename or remove one");
    seen.add(name);
    for (const key of Object.keys(entry)) {
      if ((ENTRY_KEYS as readonly string[]).includes(key)) continue;
      const hint = closestMatch(key, ENTRY_KEYS);
      throw problem(file, `${at}.${key}`, `unknown key in kernel "${name}"`, hint ? `did you mean ${JSON.stringify(hint)}?` : `a kernel takes ${ENTRY_KEYS.join(", ")}`);
    }
    if (entry.url !== undefined && (typeof entry.url !== "string" || !entry.url)) {
      throw problem(file, `${at}.url`, "must be a string", "give a git URL (git://host/repo.git?depth=1#branch), a tarball (URL or path) or a local source folder");
    }
    return {
      name,
      ...(typeof entry.url === "string" ? { url: entry.url } : {}),
      opts: parseOpts(entry.opts, file, `${at}.opts`),
      extraMakeArgs: parseStrings(entry.extra_make_args, file, `${at}.extra_make_args`, '["LLVM=1"]'),
      baseConfig: entry.base_config === undefined ? ["defconfig"] : parseStrings(entry.base_config, file, `${at}.base_config`, '["defconfig"] or ["tinyconfig", "kvm_guest.config"]', BASE_CONFIG_RE),
    };
  });
  for (const k of kernels) {
    if (k.baseConfig.length === 0) throw problem(file, `kernels[${kernels.indexOf(k)}].base_config`, "is empty", 'name at least one config target, e.g. ["defconfig"]');
  }
  return { file, kernels, commonOpts: parseOpts(top.common_opts, file, "common_opts") };
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
