// Loads and validates an instances file (JSON or YAML list of instance objects).
// Every problem in the file is collected and reported together, one paragraph each,
// naming file, instance and key. Messages never echo config values (they may be secrets):
// only keys, and for names, sizes and ports the offending value.
import { parseNetworkValue, ALLOW_FORMS, type NetworkSpec } from "../net/policy.js";
import { constants } from "node:fs";
import { access, lstat, stat } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { duplicateNameProblems } from "./duplicates.js";
import { kindOf } from "./kind.js";
import { ConfigError } from "../errors/index.js";
import { loadStructuredFile } from "./load-file.js";
import { SIZE_FORMS, parseSize } from "./sizes.js";
import { durationProblem, durationRange } from "./durations.js";
import { closestMatch } from "./suggest.js";
import type { InstanceSpec, JsonValue, MachineType } from "./types.js";
import { ARCH_FORMS, ARCH_INFO, parseArch, type GuestArch } from "../vm/arch.js";

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

/** The keys of an instance, in the order problems with them are reported. */
export const INSTANCE_KEYS: readonly string[] = [
  "name", "image", "cpu-cores", "ram", "root-disk", "timeout-seconds", "ssh-port", "config",
  "kernel", "initrd", "cmdline", "machine", "qemu-args", "firmware-boot", "network", "arch",
];

/** An instance as validated, defaults filled in. */
interface ParsedInstance {
  name: string;
  image: string;
  "cpu-cores": number;
  ram: number;
  "root-disk": number | undefined;
  "timeout-seconds": number;
  "ssh-port": number | undefined;
  config: JsonValue;
  kernel: string | undefined;
  initrd: string | undefined;
  cmdline: string | undefined;
  machine: MachineType;
  "qemu-args": string[];
  "firmware-boot": boolean;
  network: NetworkSpec;
  arch: GuestArch;
}

/**
 * One problem with an entry. Only the first problem of each key is reported: with a
 * message of its own (`message`), or else the key's HINTS line. A "fatal" problem (the
 * wrong type, a fraction for a whole number, an unparsable size) skips the checks across
 * keys (kernel options without a kernel, too little ram), which would only add noise.
 */
interface Issue {
  key: string;
  message?: string;
  fatal: boolean;
  /** A key that is not in INSTANCE_KEYS. */
  unknown?: boolean;
}

const MACHINES: readonly string[] = ["pc", "q35", "microvm", "virt"];

/**
 * Validates one instance object (hand-written rather than a schema library: this runs on
 * every civm run, before QEMU starts, and a schema library was a third of the code civm
 * run loaded; see docs/benchmarks.md). Returns the parsed instance or its issues.
 */
function parseInstance(entry: Record<string, unknown>): { value: ParsedInstance; issues?: undefined } | { value?: undefined; issues: Issue[] } {
  const issues: Issue[] = [];
  const fail = (key: string, fatal: boolean, message?: string) => issues.push({ key, fatal, ...(message !== undefined ? { message } : {}) });
  const finite = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);

  const str = (key: string, opts: { optional?: boolean; nonEmpty?: boolean } = {}): string | undefined => {
    const v = entry[key];
    if (v === undefined && opts.optional) return undefined;
    if (typeof v !== "string") return void fail(key, true);
    if (opts.nonEmpty && v.length === 0) fail(key, false);
    return v;
  };
  const int = (key: string, dflt: number | undefined, min: number, max = Number.MAX_SAFE_INTEGER): number | undefined => {
    const v = entry[key];
    if (v === undefined) return dflt;
    if (!finite(v) || !Number.isInteger(v)) return void fail(key, true);
    if (!Number.isSafeInteger(v)) fail(key, false);
    if (v < min || v > max) fail(key, false);
    return v;
  };
  const seconds = (key: string, dflt: number, min: number): number | undefined => {
    const v = entry[key];
    if (v === undefined) return dflt;
    if (!finite(v) || !Number.isInteger(v)) return void fail(key, true);
    const problem = durationProblem(v, { min });
    if (problem) fail(key, false, `"${key}" ${problem} (got ${v})`);
    return v;
  };
  const size = (key: string, dflt: number | undefined): number | undefined => {
    const v = entry[key];
    if (v === undefined) return dflt;
    if (typeof v !== "string" && !finite(v)) return void fail(key, true);
    try {
      return parseSize(v);
    } catch (e) {
      return void fail(key, true, (e as Error).message);
    }
  };

  const name = str("name");
  if (name !== undefined) {
    if (!NAME_RE.test(name)) fail("name", false);
    if (name === "." || name === "..") fail("name", false, `"name" cannot be "." or ".." (it names the VM's work and log files); use e.g. "vm-1"`);
  }
  const image = str("image", { nonEmpty: true });
  const cpus = int("cpu-cores", 2, 1);
  const ram = size("ram", 2 * 1024 ** 3);
  const rootDisk = size("root-disk", undefined);
  const timeout = seconds("timeout-seconds", 3600, 1);
  const sshPort = int("ssh-port", undefined, 1, 65535);
  const config = entry.config === undefined ? {} : entry.config;
  if (!isJson(config)) fail("config", true);
  const kernel = str("kernel", { optional: true, nonEmpty: true });
  const initrd = str("initrd", { optional: true, nonEmpty: true });
  const cmdline = str("cmdline", { optional: true });
  const arch = entry.arch === undefined ? "x86_64" : typeof entry.arch === "string" ? parseArch(entry.arch) : undefined;
  if (arch === undefined) fail("arch", true);
  const machine = entry.machine === undefined ? ARCH_INFO[arch ?? "x86_64"].defaultMachine : entry.machine;
  if (typeof machine !== "string" || !MACHINES.includes(machine)) fail("machine", true);
  const qemuArgs = entry["qemu-args"] === undefined ? [] : entry["qemu-args"];
  if (!Array.isArray(qemuArgs) || !qemuArgs.every((a) => typeof a === "string")) fail("qemu-args", true);
  const firmwareBoot = entry["firmware-boot"] === undefined ? false : entry["firmware-boot"];
  if (typeof firmwareBoot !== "boolean") fail("firmware-boot", true);
  const net = parseNetworkValue(entry.network);
  if (net.problems) fail("network", true, `"network" ${net.problems.join("; ")}`);
  const unknown = Object.keys(entry).filter((k) => !INSTANCE_KEYS.includes(k));
  for (const key of unknown) issues.push({ key, fatal: false, unknown: true });

  // Checks across keys, when every key has the right type.
  if (!issues.some((i) => i.fatal)) {
    if (kernel === undefined) {
      for (const key of ["initrd", "cmdline"] as const) {
        if (entry[key] === undefined) continue;
        fail(key, false, `"${key}" only applies to direct kernel boot: set "kernel" to the kernel image to boot, or remove "${key}"`);
      }
    }
    if (!ARCH_INFO[arch!].machines.includes(machine as string)) {
      const fits = ARCH_INFO[arch!].machines.map((m) => JSON.stringify(m)).join(" or ");
      fail("machine", false, entry.arch === undefined
        ? `"machine" "${machine as string}" is an arm64 machine, and the instance has no "arch" (x86_64 by default): add "arch": "arm64", or set "machine" to ${fits}`
        : `"machine" "${machine as string}" cannot run an ${arch!} guest: remove "machine" (${arch!} uses "${ARCH_INFO[arch!].defaultMachine}") or set it to ${fits}`);
    }
    if (ram! < MIN_RAM) {
      fail("ram", false, `"ram" is only ${ram} bytes, too little to boot; a size without a suffix is in bytes, so write e.g. "2G" or "512M"`);
    }
  }
  if (issues.length) return { issues };
  return {
    value: {
      name: name!, image: image!, "cpu-cores": cpus!, ram: ram!, "root-disk": rootDisk, "timeout-seconds": timeout!, "ssh-port": sshPort,
      config: config as JsonValue, kernel, initrd, cmdline, machine: machine as MachineType, "qemu-args": qemuArgs as string[], "firmware-boot": firmwareBoot as boolean,
      network: net.value!, arch: arch!,
    },
  };
}

/** JSON data: null, booleans, strings, finite numbers, and lists and plain objects of them. */
function isJson(v: unknown): boolean {
  if (v === null || typeof v === "string" || typeof v === "boolean") return true;
  if (typeof v === "number") return Number.isFinite(v);
  if (Array.isArray(v)) return v.every(isJson);
  if (typeof v !== "object") return false;
  const proto = Object.getPrototypeOf(v) as unknown;
  return (proto === Object.prototype || proto === null) && Object.values(v).every(isJson);
}

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
  architecture: "arch",
  platform: "arch",
};

const HINTS: Record<string, string> = {
  name: 'must be a name made only of letters, digits, ".", "_" and "-", e.g. "vm-1"',
  image: "must be the path of the base disk image, as a string (relative paths start from the instances file's folder)",
  "cpu-cores": "must be a whole number of CPU cores, at least 1, e.g. 4",
  ram: `must be a size: ${SIZE_FORMS}`,
  "root-disk": `must be a size: ${SIZE_FORMS}`,
  "timeout-seconds": `must be a whole number of seconds ${durationRange({ min: 1 })}, e.g. 3600`,
  "ssh-port": "must be a TCP port number from 1 to 65535, e.g. 2201",
  config: "must be JSON data: an object, list, string, number, boolean or null",
  kernel: "must be the path of a kernel image, as a string",
  initrd: "must be the path of an initrd, as a string",
  cmdline: "must be the kernel command line, as a string",
  machine: 'must be one of "pc", "q35" or "microvm" (x86_64), or "virt" (arm64)',
  arch: `must be the guest's architecture: ${ARCH_FORMS}`,
  "qemu-args": 'must be a list of strings, e.g. ["-device", "virtio-rng-pci"]',
  "firmware-boot": "must be true or false: true boots a stored image through its bootloader instead of its kernel",
  network: `must be "restricted" (the default: the internet only), "none", "unrestricted", or {"allow": [...]} where ${ALLOW_FORMS}`,
};

const MISSING: Record<string, string> = {
  name: 'add a unique "name", e.g. "vm-1"; "civm run NAME" picks the instance by it',
  image: 'add "image" with the path of the base disk image (relative paths start from the instances file\'s folder)',
};

/** Keys whose offending value may be quoted in messages (never secrets). */
const QUOTABLE = new Set(["name", "ssh-port", "ram", "root-disk", "timeout-seconds", "arch"]);

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
  const parsed = parseInstance(entry);
  if (parsed.issues) {
    problems.push(...describeIssues(parsed.issues, entry).map((p) => `${where}: ${p}`));
    return undefined;
  }
  return toSpec(parsed.value, index, file, dir);
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
    network: v.network,
    ...(v.arch !== "x86_64" ? { arch: v.arch } : {}),
    source: { file, index, baseDir: dir },
  };
}

function describeIssues(issues: readonly Issue[], entry: Record<string, unknown>): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  for (const issue of issues) {
    if (seen.has(issue.key)) continue;
    seen.add(issue.key);
    out.push(describeIssue(issue, entry));
  }
  return out;
}

function unknownKey(key: string): string {
  const hint = closestMatch(key, INSTANCE_KEYS, { aliases: KEY_ALIASES });
  if (hint) return `unknown key ${JSON.stringify(key)}; did you mean ${JSON.stringify(hint)}?`;
  return `unknown key ${JSON.stringify(key)}; the known keys are ${INSTANCE_KEYS.join(", ")}.`;
}

function describeIssue(issue: Issue, entry: Record<string, unknown>): string {
  const { key } = issue;
  if (issue.unknown) return unknownKey(key);
  if (issue.message !== undefined) return qualify(key, issue.message);
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
