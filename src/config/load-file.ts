// Reads a JSON or YAML file into plain data. Syntax errors become one ConfigError per file,
// each problem as "FILE:LINE:COL: what is wrong" (no file contents: they may hold secrets).
import { readFile } from "node:fs/promises";
import { extname } from "node:path";
import { createRequire } from "node:module";
import { ConfigError } from "../errors/index.js";

type Format = "json" | "yaml";

interface SyntaxProblem {
  line: number;
  col: number;
  what: string;
}

/** Reads and parses `path`: .json as JSON, .yaml/.yml as YAML, anything else JSON then YAML. */
export async function loadStructuredFile(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    throw new ConfigError(`${path}: cannot read the file: ${osReason(e)}`, { cause: e });
  }
  return parseStructuredText(text, path);
}

/** Parses text already read; `path` names the source in messages and picks the format. */
export function parseStructuredText(text: string, path: string): unknown {
  const body = text.startsWith("\uFEFF") ? text.slice(1) : text;
  const format = formatOf(path);
  if (format === "json") return orThrow(path, parseJson(body));
  if (format === "yaml") return orThrow(path, parseYaml(body));
  const asJson = parseJson(body);
  if (!("problems" in asJson)) return asJson.value;
  const asYaml = parseYaml(body);
  if (!("problems" in asYaml)) return asYaml.value;
  return orThrow(path, /^\s*[[{]/.test(body) ? asJson : asYaml);
}

function formatOf(path: string): Format | undefined {
  const ext = extname(path).toLowerCase();
  if (ext === ".json") return "json";
  if (ext === ".yaml" || ext === ".yml") return "yaml";
  return undefined;
}

type Parsed = { value: unknown } | { problems: SyntaxProblem[] };

function orThrow(path: string, parsed: Parsed): unknown {
  if (!("problems" in parsed)) return parsed.value;
  const lines = parsed.problems.map((p) => `${path}:${p.line}:${p.col}: ${p.what}`);
  throw new ConfigError(lines.join("\n"));
}

function osReason(e: unknown): string {
  const err = e as NodeJS.ErrnoException;
  const reasons: Record<string, string> = {
    ENOENT: "no such file or directory",
    EACCES: "permission denied",
    EISDIR: "it is a directory, not a file",
    ENOTDIR: "a component of the path is not a directory",
  };
  return (err.code && reasons[err.code]) ?? err.message ?? String(e);
}

// Loaded on first use: most instances files are JSON, and civm's start-up time counts.
let yamlModule: typeof import("yaml") | undefined;
function yaml(): typeof import("yaml") {
  yamlModule ??= createRequire(import.meta.url)("yaml") as typeof import("yaml");
  return yamlModule;
}

function parseYaml(text: string): Parsed {
  // merge: YAML's `<<: *anchor` (one entry built on another, as images/civm-runner.yaml does).
  const doc = yaml().parseDocument(text, { prettyErrors: true, merge: true });
  // Later errors are mostly fallout of the first; report that one.
  const e = doc.errors[0];
  if (!e) {
    try {
      return { value: doc.toJS() as unknown };
    } catch (err) {
      // yaml refuses documents whose aliases expand past its limit ("billion laughs"): bad input.
      return { problems: [{ line: 1, col: 1, what: `${(err as Error).message.replace(/\.$/, "")}: the file's aliases (*name) expand to too much data; write the values out or use fewer aliases` }] };
    }
  }
  const what = e.message
    .replace(/ at line \d+, column \d+:?[\s\S]*$/, "") // the pretty snippet would echo file contents
    .replace(/: ".*"$/, ""); // so would a quoted token ("Unexpected scalar token in YAML stream: \"...\"")
  return { problems: [{ line: e.linePos?.[0].line ?? 1, col: e.linePos?.[0].col ?? 1, what }] };
}

function parseJson(text: string): Parsed {
  try {
    return { value: JSON.parse(text) as unknown };
  } catch {
    const found = locateJsonError(text);
    const { line, col } = lineCol(text, found.offset);
    return { problems: [{ line, col, what: found.what }] };
  }
}

/** 1-based line and column of a character offset. */
export function lineCol(text: string, offset: number): { line: number; col: number } {
  const before = text.slice(0, offset);
  const line = before.split("\n").length;
  const col = offset - (before.lastIndexOf("\n") + 1) + 1;
  return { line, col };
}

class JsonSyntax extends Error {
  constructor(
    readonly offset: number,
    readonly what: string,
  ) {
    super(what);
  }
}

/**
 * Finds where strict JSON first goes wrong (JSON.parse in Node 20 often omits the
 * position). Only called after JSON.parse failed, so it need not build values.
 */
export function locateJsonError(text: string): { offset: number; what: string } {
  const s = new JsonScanner(text);
  try {
    s.ws();
    s.value();
    s.ws();
    if (s.i < text.length) s.fail("unexpected text after the end of the JSON value");
  } catch (e) {
    if (e instanceof JsonSyntax) return { offset: e.offset, what: e.what };
    throw e;
  }
  return { offset: 0, what: "invalid JSON" };
}

class JsonScanner {
  i = 0;
  constructor(private readonly t: string) {}

  fail(what: string, at = this.i): never {
    throw new JsonSyntax(at, what);
  }

  ws(): void {
    while (/[ \t\r\n]/.test(this.t[this.i] ?? "")) this.i++;
  }

  describe(): string {
    const c = this.t[this.i];
    if (c === undefined) return "the file ends";
    return `found ${JSON.stringify(c)}`;
  }

  value(): void {
    const c = this.t[this.i];
    if (c === "{") return this.object();
    if (c === "[") return this.array();
    if (c === '"') return this.string();
    if (c === "-" || (c !== undefined && c >= "0" && c <= "9")) return this.number();
    for (const word of ["true", "false", "null"]) {
      if (this.t.startsWith(word, this.i)) {
        this.i += word.length;
        return;
      }
    }
    if (c === "/") this.fail("comments are not allowed in JSON (use a .yaml file for comments)");
    if (c === "'") this.fail("strings must use double quotes in JSON");
    this.fail(`expected a value, but ${this.describe()}`);
  }

  object(): void {
    this.i++;
    this.ws();
    if (this.t[this.i] === "}") return void this.i++;
    for (;;) {
      if (this.t[this.i] !== '"') {
        const trailing = this.t[this.i] === "}";
        this.fail(trailing ? "trailing comma before } is not allowed in JSON" : `expected a "quoted" key, but ${this.describe()}`);
      }
      this.string();
      this.ws();
      if (this.t[this.i] !== ":") this.fail(`expected ":" after the key, but ${this.describe()}`);
      this.i++;
      this.ws();
      this.value();
      this.ws();
      if (this.t[this.i] === "}") return void this.i++;
      if (this.t[this.i] !== ",") this.fail(`expected "," or "}" after a value in an object, but ${this.describe()}`);
      this.i++;
      this.ws();
    }
  }

  array(): void {
    this.i++;
    this.ws();
    if (this.t[this.i] === "]") return void this.i++;
    for (;;) {
      if (this.t[this.i] === "]") this.fail("trailing comma before ] is not allowed in JSON");
      this.value();
      this.ws();
      if (this.t[this.i] === "]") return void this.i++;
      if (this.t[this.i] !== ",") this.fail(`expected "," or "]" after a list element, but ${this.describe()}`);
      this.i++;
      this.ws();
    }
  }

  string(): void {
    const start = this.i;
    this.i++;
    for (;;) {
      const c = this.t[this.i];
      if (c === undefined) this.fail("unterminated string", start);
      if (c === '"') return void this.i++;
      if (c === "\n" || c < " ") this.fail("control character (e.g. a line break) inside a string; escape it");
      if (c === "\\") {
        const e = this.t[this.i + 1] ?? "";
        if (e === "u" && /^[0-9a-fA-F]{4}$/.test(this.t.slice(this.i + 2, this.i + 6))) this.i += 6;
        else if ('"\\/bfnrt'.includes(e) && e !== "") this.i += 2;
        else this.fail("invalid escape sequence in a string");
      } else this.i++;
    }
  }

  number(): void {
    const m = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(this.t.slice(this.i));
    if (!m) this.fail("invalid number");
    this.i += m[0].length;
  }
}
