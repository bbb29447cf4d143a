// The configuration pre-processor: replaces ${{ FUNCTION:ARGS }} in the string values of an
// instance's config (keys are left alone) right before the VM starts.
//   env:NAME                       value of an environment variable
//   file:PATH                      a file's contents, one trailing newline removed
//   gha-install-token:OWNER/REPO   a fresh self-hosted runner registration token (or :ORG)
// Everything is checked first and every problem reported at once; GitHub is called only
// when the rest is valid. Resolved values are secrets: they are returned for redaction and
// never appear in a message.
import { readFile } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { CivmError, ConfigError, ExternalError, messageOf } from "../errors/index.js";
import { parseRunnerTarget } from "../github/registration-token.js";
import { describeInstance } from "./instances.js";
import { closestMatch } from "./suggest.js";
import type { InstanceSpec, JsonValue } from "./types.js";

export const PREPROCESS_FUNCTIONS = ["env", "file", "gha-install-token"] as const;
type FunctionName = (typeof PREPROCESS_FUNCTIONS)[number];

export interface PreprocessOptions {
  env: NodeJS.ProcessEnv;
  /** Prefix of messages, e.g. `instances.json: instance "vm-1" (#1)`. */
  where: string;
  /** Folder that relative file: paths start from (the instances file's folder). */
  baseDir: string;
  /** Registration token for "OWNER/REPO" or "ORG"; default: the GitHub API via GITHUB_TOKEN. */
  githubTokenFetcher?: (target: string) => Promise<string>;
}

export interface PreprocessResult {
  value: JsonValue;
  /** Every value that was substituted in; pass to redact() before logging anything. */
  secrets: string[];
}

interface Expr {
  fn: FunctionName;
  arg: string;
}
type Part = string | Expr;
/** A string value holding at least one expression, and where it sits in the tree. */
interface Site {
  path: string;
  parts: Part[];
}
/** A string value that is not a valid template. */
interface BadSite {
  path: string;
  problem: string;
}

const EXPR_SHAPE = "write ${{ FUNCTION:ARGS }} with FUNCTION one of " + PREPROCESS_FUNCTIONS.join(", ");

/** Resolves every expression in `config`; throws one ConfigError (or ExternalError for GitHub). */
export async function preprocessConfig(config: JsonValue, opts: PreprocessOptions): Promise<PreprocessResult> {
  const found = collectSites(config, "config");
  const { values, pending, problems } = await resolveLocals(found, opts);
  if (problems.length > 0) throw new ConfigError(problems.join("\n"));
  const sites = found.filter((s): s is Site => "parts" in s);
  const tokens = await fetchTokens(pending, opts, [...values.values()]);
  for (const part of sites.flatMap((s) => s.parts)) {
    if (typeof part !== "string" && part.fn === "gha-install-token") values.set(part, tokens.get(part.arg) ?? "");
  }
  const secrets = [...new Set([...values.values()].filter((v) => v !== ""))];
  const byPath = new Map(sites.map((site) => [site.path, site]));
  return { value: substitute(config, byPath, values, "config"), secrets };
}

interface LocalResults {
  values: Map<Expr, string>;
  /** gha-install-token targets still to fetch, with the values that use them. */
  pending: Map<string, Site[]>;
  problems: string[];
}

/** Checks every expression and resolves env: and file:, in document order. */
async function resolveLocals(found: (Site | BadSite)[], opts: PreprocessOptions): Promise<LocalResults> {
  const out: LocalResults = { values: new Map(), pending: new Map(), problems: [] };
  for (const site of found) {
    if ("problem" in site) {
      out.problems.push(`${opts.where}: ${site.path}: ${site.problem}`);
      continue;
    }
    for (const part of site.parts) {
      if (typeof part === "string") continue;
      const r = await resolveLocal(part, opts);
      if ("problem" in r) out.problems.push(`${opts.where}: ${site.path}: ${r.problem}`);
      else if ("value" in r) out.values.set(part, r.value);
      else out.pending.set(part.arg, [...(out.pending.get(part.arg) ?? []), site]);
    }
  }
  return out;
}

/** preprocessConfig for a loaded instance: messages name its file and instance. */
export function preprocessInstanceConfig(
  spec: InstanceSpec,
  opts: Omit<PreprocessOptions, "where" | "baseDir">,
): Promise<PreprocessResult> {
  const baseDir = spec.source.baseDir ?? dirname(resolve(spec.source.file));
  return preprocessConfig(spec.config, { ...opts, where: describeInstance(spec), baseDir });
}

/** Replaces every secret (4+ characters; multi-line ones also line by line) with "***". */
export function redact(text: string, secrets: readonly string[]): string {
  const pieces = new Set<string>();
  for (const s of secrets) {
    if (s.length >= 4) pieces.add(s);
    if (!s.includes("\n")) continue;
    for (const line of s.split(/\r?\n/)) if (line.trim().length >= 8) pieces.add(line.trim());
  }
  let out = text;
  for (const p of [...pieces].sort((a, b) => b.length - a.length)) out = out.split(p).join("***");
  return out;
}

function pathOf(parent: string, key: string | number): string {
  if (typeof key === "number") return `${parent}[${key}]`;
  return /^[A-Za-z_][\w-]*$/.test(key) ? `${parent}.${key}` : `${parent}[${JSON.stringify(key)}]`;
}

/** Every string holding an expression (or a broken one), in document order. */
function collectSites(v: JsonValue, path: string, out: (Site | BadSite)[] = []): (Site | BadSite)[] {
  if (typeof v === "string") {
    const parsed = parseTemplate(v);
    if ("problem" in parsed) out.push({ path, problem: parsed.problem });
    else if (parsed.parts.some((p) => typeof p !== "string")) out.push({ path, parts: parsed.parts });
  } else if (Array.isArray(v)) {
    v.forEach((item, i) => collectSites(item, pathOf(path, i), out));
  } else if (v !== null && typeof v === "object") {
    for (const [k, item] of Object.entries(v)) collectSites(item, pathOf(path, k), out);
  }
  return out;
}

/** Splits a string into literal text and expressions. Messages never quote the string. */
export function parseTemplate(s: string): { parts: Part[] } | { problem: string } {
  const parts: Part[] = [];
  let pos = 0;
  for (;;) {
    const start = s.indexOf("${{", pos);
    if (start < 0) break;
    const end = s.indexOf("}}", start + 3);
    const inner = end < 0 ? "" : s.slice(start + 3, end);
    if (end < 0 || inner.includes("${{")) return { problem: `"\${{" is not closed by "}}"; ${EXPR_SHAPE}.` };
    const expr = parseExpr(inner);
    if ("problem" in expr) return expr;
    if (start > pos) parts.push(s.slice(pos, start));
    parts.push(expr);
    pos = end + 2;
  }
  if (pos < s.length) parts.push(s.slice(pos));
  return { parts };
}

function parseExpr(inner: string): Expr | { problem: string } {
  const m = /^\s*([A-Za-z][\w-]*)\s*:\s*([\s\S]*?)\s*$/.exec(inner);
  if (!m) {
    const word = /^\s*([A-Za-z][\w-]*)\s*$/.exec(inner)?.[1];
    const known = word && (PREPROCESS_FUNCTIONS as readonly string[]).includes(word);
    if (known) return { problem: `"${word}" needs an argument after a colon: \${{ ${word}:${ARG_NAME[word as FunctionName]} }}.` };
    return { problem: `an expression has no "FUNCTION:" prefix; ${EXPR_SHAPE}.` };
  }
  const [, fn = "", arg = ""] = m;
  if (!(PREPROCESS_FUNCTIONS as readonly string[]).includes(fn)) {
    const hint = closestMatch(fn, PREPROCESS_FUNCTIONS);
    const mean = hint ? ` Did you mean "${hint}"?` : "";
    return { problem: `unknown function "${fn}"; the known functions are ${PREPROCESS_FUNCTIONS.join(", ")}.${mean}` };
  }
  const name = fn as FunctionName;
  if (arg === "") return { problem: `"${name}" needs an argument: \${{ ${name}:${ARG_NAME[name]} }}.` };
  return { fn: name, arg };
}

const ARG_NAME: Record<FunctionName, string> = { env: "NAME", file: "PATH", "gha-install-token": "OWNER/REPO" };

type Local = { value: string } | { problem: string } | { remote: true };

async function resolveLocal(e: Expr, opts: PreprocessOptions): Promise<Local> {
  if (e.fn === "env") return resolveEnv(e.arg, opts.env);
  if (e.fn === "file") return resolveFile(e.arg, opts.baseDir);
  try {
    parseRunnerTarget(e.arg);
    return { remote: true };
  } catch (err) {
    return { problem: `gha-install-token: ${messageOf(err)}` };
  }
}

function resolveEnv(name: string, env: NodeJS.ProcessEnv): Local {
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) {
    return { problem: `env: the argument is not an environment variable name (letters, digits and "_", not starting with a digit).` };
  }
  const value = env[name];
  if (value === undefined) return { problem: `environment variable ${name} is not set; export it before running civm.` };
  return { value };
}

async function resolveFile(arg: string, baseDir: string): Promise<Local> {
  const path = resolve(baseDir, arg);
  try {
    const text = await readFile(path, "utf8");
    return { value: text.replace(/\r?\n$/, "") };
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    const why = e.code === "ENOENT" ? "no such file" : e.code === "EACCES" ? "permission denied" : e.code === "EISDIR" ? "it is a directory" : e.message;
    return { problem: `file: cannot read ${path} (${why}); relative paths start from ${baseDir}.` };
  }
}

async function defaultFetcher(env: NodeJS.ProcessEnv): Promise<(target: string) => Promise<string>> {
  const { fetchRegistrationToken } = await import("../github/index.js");
  return (target) => fetchRegistrationToken(target, { env });
}

/** One request per distinct target; `known` are values resolved so far, redacted from failures. */
async function fetchTokens(pending: Map<string, Site[]>, opts: PreprocessOptions, known: string[]): Promise<Map<string, string>> {
  const tokens = new Map<string, string>();
  if (pending.size === 0) return tokens;
  const fetcher = opts.githubTokenFetcher ?? (await defaultFetcher(opts.env));
  const targets = [...pending.keys()];
  const results = await Promise.allSettled(targets.map((t) => fetcher(t)));
  const failures: { message: string; config: boolean }[] = [];
  results.forEach((r, i) => {
    const target = targets[i] as string;
    if (r.status === "fulfilled") return void tokens.set(target, r.value);
    const paths = [...new Set((pending.get(target) ?? []).map((s) => s.path))].join(", ");
    const config = r.reason instanceof ConfigError;
    failures.push({ message: `${opts.where}: ${paths}: ${messageOf(r.reason)}`, config });
  });
  if (failures.length === 0) return tokens;
  const message = redact([...new Set(failures.map((f) => f.message))].join("\n"), [...known, ...tokens.values()]);
  const first = results.find((r) => r.status === "rejected")?.reason as unknown;
  const cause = first instanceof CivmError ? first : undefined;
  if (failures.some((f) => f.config)) throw new ConfigError(message, { cause });
  throw new ExternalError(message, { cause });
}

function substitute(v: JsonValue, sites: Map<string, Site>, values: Map<Expr, string>, path: string): JsonValue {
  if (typeof v === "string") {
    const site = sites.get(path);
    return site ? site.parts.map((p) => (typeof p === "string" ? p : (values.get(p) ?? ""))).join("") : v;
  }
  if (Array.isArray(v)) return v.map((item, i) => substitute(item, sites, values, pathOf(path, i)));
  if (v !== null && typeof v === "object") {
    // fromEntries keeps a "__proto__" key as data instead of setting the prototype.
    return Object.fromEntries(Object.entries(v).map(([k, item]) => [k, substitute(item, sites, values, pathOf(path, k))]));
  }
  return v;
}
