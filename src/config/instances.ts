// Loads and validates an instances file (JSON or YAML list of instance objects).
// Every problem in the file is collected and reported together, one paragraph each,
// naming file, instance and key. Messages never echo config values (they may be secrets):
// only keys, and for names, sizes and ports the offending value.
import { constants } from "node:fs";
import { access, lstat, stat } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import * as z from "zod/mini";
import { duplicateNameProblems } from "./duplicates.js";
import { kindOf } from "./kind.js";
import { ConfigError } from "../errors/index.js";
import { loadStructuredFile } from "./load-file.js";
import { SIZE_FORMS, parseSize } from "./sizes.js";
import { closestMatch } from "./suggest.js";
import type { InstanceSpec, JsonValue, MachineType } from "./types.js";

export interface LoadedInstances {
  /** The file as the caller named it; used in messages. */
  file: string;
  /** Absolute folder of the file; relative paths inside resolve against it. */
  baseDir: string;
  instances: InstanceSpec[];
}

export interface LoadOptions {
  /** Check that image/kernel/initrd of every instance exist and are readable (default true). */
  checkFiles?: boolean;
}

export const NAME_RE = /^[A-Za-z0-9._-]+$/;
const MIN_RAM = 16 * 1024 ** 2;

// zod/mini, not the full zod: the same validation core without the chainable-method
// classes and locales, which made zod ~80% of the code civm run loads (see docs/benchmarks.md).
const sizeField = z.pipe(
  z.union([z.string(), z.number()]),
  z.transform((v: string | number, ctx) => {
    try {
      return parseSize(v);
    } catch (e) {
      ctx.issues.push({ code: "custom", message: (e as Error).message, input: v });
      return z.NEVER;
    }
  }),
);

const instanceSchema = z
  .strictObject({
    name: z.string().check(z.regex(NAME_RE), z.refine((n) => n !== "." && n !== "..")),
    image: z.string().check(z.minLength(1)),
    "cpu-cores": z._default(z.number().check(z.int(), z.positive()), 2),
    ram: z._default(sizeField, 2 * 1024 ** 3),
    "root-disk": z.optional(sizeField),
    "timeout-seconds": z._default(z.number().check(z.int(), z.positive()), 3600),
    "ssh-port": z.optional(z.number().check(z.int(), z.minimum(1), z.maximum(65535))),
    config: z._default(z.json(), {}),
    kernel: z.optional(z.string().check(z.minLength(1))),
    initrd: z.optional(z.string().check(z.minLength(1))),
    cmdline: z.optional(z.string()),
    machine: z._default(z.enum(["pc", "q35", "microvm"]), "pc"),
    "qemu-args": z._default(z.array(z.string()), []),
    "firmware-boot": z._default(z.boolean(), false),
  })
  .check(
    z.superRefine((v, ctx) => {
      if (v.kernel !== undefined) return;
      for (const key of ["initrd", "cmdline"] as const) {
        if (v[key] === undefined) continue;
        const message = `"${key}" only applies to direct kernel boot: set "kernel" to the kernel image to boot, or remove "${key}"`;
        ctx.addIssue({ code: "custom", path: [key], message });
      }
    }),
    z.superRefine((v, ctx) => {
      if (v.ram >= MIN_RAM) return;
      const message = `"ram" is only ${v.ram} bytes, too little to boot; a size without a suffix is in bytes, so write e.g. "2G" or "512M"`;
      ctx.addIssue({ code: "custom", path: ["ram"], message });
    }),
  );

type ParsedInstance = z.output<typeof instanceSchema>;

export const INSTANCE_KEYS: readonly string[] = Object.keys(instanceSchema.shape);

const KEY_ALIASES: Record<string, string> = {
  cpus: "cpu-cores",
  cores: "cpu-cores",
  smp: "cpu-cores",
  memory: "ram",
  mem: "ram",
  disk: "root-disk",
  "disk-size": "root-disk",
  port: "ssh-port",
  timeout: "timeout-seconds",
  args: "qemu-args",
  append: "cmdline",
};

const HINTS: Record<string, string> = {
  name: 'must be a name made only of letters, digits, ".", "_" and "-", e.g. "vm-1"',
  image: "must be the path of the base disk image, as a string (relative paths start from the instances file's folder)",
  "cpu-cores": "must be a whole number of CPU cores, at least 1, e.g. 4",
  ram: `must be a size: ${SIZE_FORMS}`,
  "root-disk": `must be a size: ${SIZE_FORMS}`,
  "timeout-seconds": "must be a whole number of seconds, at least 1, e.g. 3600",
  "ssh-port": "must be a TCP port number from 1 to 65535, e.g. 2201",
  config: "must be JSON data: an object, list, string, number, boolean or null",
  kernel: "must be the path of a kernel image, as a string",
  initrd: "must be the path of an initrd, as a string",
  cmdline: "must be the kernel command line, as a string",
  machine: 'must be one of "pc", "q35" or "microvm"',
  "qemu-args": 'must be a list of strings, e.g. ["-device", "virtio-rng-pci"]',
  "firmware-boot": "must be true or false: true boots a stored image through its bootloader instead of its kernel",
};

const MISSING: Record<string, string> = {
  name: 'add a unique "name", e.g. "vm-1"; "civm run NAME" picks the instance by it',
  image: 'add "image" with the path of the base disk image (relative paths start from the instances file\'s folder)',
};

/** Keys whose offending value may be quoted in messages (never secrets). */
const QUOTABLE = new Set(["name", "ssh-port", "ram", "root-disk"]);

/** Reads, validates and resolves every instance in `file`; throws one ConfigError listing all problems. */
export async function loadInstances(file: string, opts: LoadOptions = {}): Promise<LoadedInstances> {
  const data = await loadStructuredFile(file);
  const baseDir = dirname(resolve(file));
  if (!Array.isArray(data)) {
    throw new ConfigError(
      `${file}: the file must contain a list of instance objects ([{"name": ..., "image": ...}, ...]), but it contains ${data == null ? "nothing (null or an empty file)" : kindOf(data)}.`,
    );
  }
  const problems: string[] = [];
  const instances: InstanceSpec[] = [];
  for (const [index, entry] of data.entries()) {
    const where = `${file}: ${entryLabel(entry, index)}`;
    const spec = validateEntry(entry, index, file, baseDir, where, problems);
    if (!spec) continue;
    if (opts.checkFiles !== false) problems.push(...(await checkInstanceFiles(spec, where)));
    instances.push(spec);
  }
  problems.push(...duplicateNames(data, file));
  if (problems.length > 0) throw new ConfigError(problems.join("\n"));
  return { file, baseDir, instances };
}

/** The instance called `name`; a ConfigError listing the available names otherwise. */
export function selectInstance(loaded: LoadedInstances, name: string): InstanceSpec {
  const found = loaded.instances.find((i) => i.name === name);
  if (found) return found;
  const names = loaded.instances.map((i) => i.name);
  if (names.length === 0) {
    throw new ConfigError(`${loaded.file}: no instance named ${JSON.stringify(name)}: the file defines no instances; add one.`);
  }
  const list = names.map((n) => JSON.stringify(n)).join(", ");
  const hint = closestMatch(name, names);
  const suggestion = hint ? ` Did you mean ${JSON.stringify(hint)}?` : "";
  throw new ConfigError(`${loaded.file}: no instance named ${JSON.stringify(name)}; the file defines ${list}.${suggestion}`);
}

/** `FILE: instance "NAME" (#N)`, the prefix of messages about one instance. */
export function describeInstance(spec: InstanceSpec): string {
  return `${spec.source.file}: instance ${JSON.stringify(spec.name)} (#${spec.source.index + 1})`;
}

function entryLabel(entry: unknown, index: number): string {
  const name = isPlainObject(entry) ? entry.name : undefined;
  return typeof name === "string" && name !== "" ? `instance ${JSON.stringify(name)} (#${index + 1})` : `instance #${index + 1}`;
}

function validateEntry(
  entry: unknown,
  index: number,
  file: string,
  dir: string,
  where: string,
  problems: string[],
): InstanceSpec | undefined {
  if (!isPlainObject(entry)) {
    problems.push(`${where}: must be an object with "name", "image" and other keys, but it is ${kindOf(entry)}.`);
    return undefined;
  }
  const parsed = instanceSchema.safeParse(entry);
  if (!parsed.success) {
    problems.push(...describeIssues(parsed.error.issues, entry).map((p) => `${where}: ${p}`));
    return undefined;
  }
  return toSpec(parsed.data, index, file, dir);
}

function toSpec(v: ParsedInstance, index: number, file: string, dir: string): InstanceSpec {
  const path = (p: string | undefined) => (p === undefined ? undefined : resolve(dir, p));
  return {
    name: v.name,
    image: resolve(dir, v.image),
    imageRef: v.image,
    firmwareBoot: v["firmware-boot"],
    cpus: v["cpu-cores"],
    ramBytes: v.ram,
    rootDiskBytes: v["root-disk"],
    timeoutSeconds: v["timeout-seconds"],
    sshPort: v["ssh-port"],
    config: v.config as JsonValue,
    kernel: path(v.kernel),
    initrd: path(v.initrd),
    cmdline: v.cmdline,
    machine: v.machine as MachineType,
    qemuArgs: v["qemu-args"],
    source: { file, index, baseDir: dir },
  };
}

function describeIssues(issues: readonly z.core.$ZodIssue[], entry: Record<string, unknown>): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  for (const issue of issues) {
    if (issue.code === "unrecognized_keys") {
      out.push(...issue.keys.map((k) => unknownKey(k)));
      continue;
    }
    const key = String(issue.path[0] ?? "");
    if (seen.has(key)) continue;
    seen.add(key);
    out.push(describeIssue(issue, key, entry));
  }
  return out;
}

function unknownKey(key: string): string {
  const hint = closestMatch(key, INSTANCE_KEYS, { aliases: KEY_ALIASES });
  if (hint) return `unknown key ${JSON.stringify(key)}; did you mean ${JSON.stringify(hint)}?`;
  return `unknown key ${JSON.stringify(key)}; the known keys are ${INSTANCE_KEYS.join(", ")}.`;
}

function describeIssue(issue: z.core.$ZodIssue, key: string, entry: Record<string, unknown>): string {
  if (issue.code === "custom") return qualify(key, issue.message);
  const value = entry[key];
  if (value === undefined) return `missing key ${JSON.stringify(key)}: ${MISSING[key] ?? "add it"}.`;
  return `${JSON.stringify(key)} ${HINTS[key] ?? "is invalid"}${got(key, value)}.`;
}

/** Size messages start with the value; prefix the key so the paragraph names it. */
function qualify(key: string, message: string): string {
  return message.startsWith(`"${key}"`) ? `${message}.` : `${JSON.stringify(key)}: ${message}.`;
}

function got(key: string, value: unknown): string {
  if (QUOTABLE.has(key) && (typeof value === "string" || typeof value === "number")) {
    return ` (got ${JSON.stringify(value)})`;
  }
  return ` (got ${kindOf(value)})`;
}

function duplicateNames(data: unknown[], file: string): string[] {
  const names = data.map((entry) => (isPlainObject(entry) && typeof entry.name === "string" ? entry.name : undefined));
  return duplicateNameProblems(file, names, "instances", '"civm run NAME" picks an instance by name');
}

/** Problems with the files an instance points to (missing, unreadable, not a file). */
export async function checkInstanceFiles(spec: InstanceSpec, where = describeInstance(spec)): Promise<string[]> {
  const out: string[] = [];
  for (const key of ["image", "kernel", "initrd"] as const) {
    const path = spec[key];
    if (path === undefined) continue;
    const problem = await fileProblem(path);
    if (problem) out.push(`${where}: "${key}" ${problem}`);
  }
  return out;
}

async function fileProblem(path: string): Promise<string | undefined> {
  const fix = "fix the path (relative paths start from the instances file's folder) or create the file first.";
  let info;
  try {
    info = await stat(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOENT" && (await isSymlink(path))) return `${path} is a symbolic link to a file that does not exist; ${fix}`;
    if (code === "ENOENT" || code === "ENOTDIR") return `${path} does not exist; ${fix}`;
    if (code === "EACCES") return `${path} cannot be reached: permission denied on a parent folder; fix the folder's permissions.`;
    return `${path} cannot be checked: ${(e as Error).message}.`;
  }
  if (info.isDirectory()) return `${path} is a directory; it must be a file.`;
  if (!info.isFile() && !info.isBlockDevice()) return `${path} is not a regular file; it must be a file.`;
  try {
    await access(path, constants.R_OK);
  } catch {
    return `${path} is not readable by this user (permission denied); make it readable (e.g. chmod a+r) or run civm as a user who can read it.`;
  }
  return undefined;
}

async function isSymlink(path: string): Promise<boolean> {
  try {
    return (await lstat(path)).isSymbolicLink();
  } catch {
    return false;
  }
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
