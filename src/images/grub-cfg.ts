// Which kernel, initrd and command line GRUB boots by default, read from grub.cfg text.
// Pure: no I/O (files the script tests or sources come through `files`), table-tested with
// real Debian and Ubuntu grub.cfg text (test/unit/grub-cfg.test.ts).
//
// This is not GRUB's interpreter: it runs the part of GRUB's script language that
// grub-mkconfig writes (set/unset, load_env, if/elif/else with `[ ... ]` tests, functions,
// menuentry/submenu, search --set, linux/initrd, source of a file it was given) and decides
// the default entry the way GRUB does (`default` as an index, a title or an id, `>` into
// submenus; an unknown default boots entry 0). A condition it cannot decide (`loadfont`,
// `keystatus`) runs both branches; what they disagree on becomes unknown, and is an error
// only if the chosen entry needs it. Anything else it cannot follow (configfile, a sourced
// file it was not given, chainloader, multiboot) is a GrubCfgError saying so, and the caller
// boots through the firmware instead.

/** Why the default entry could not be decided; the message is shown to the user. */
export class GrubCfgError extends Error {}

/** The script tests or sources a file on the config's partition that was not in `files`: read it and ask again. */
export class GrubNeedsFile extends GrubCfgError {
  constructor(readonly path: string) {
    super(`grub.cfg reads ${path}`);
  }
}

type Seg = { t: "lit"; v: string } | { t: "var"; name: string; quoted: boolean };
interface Word {
  segs: Seg[];
  line: number;
}
type Tok = { k: "word"; w: Word } | { k: "sep" } | { k: "lbrace"; line: number } | { k: "rbrace"; line: number };

type Cmd =
  | { kind: "simple"; words: Word[]; line: number }
  | { kind: "if"; branches: { cond: Cmd[]; body: Cmd[] }[]; elseBody: Cmd[] | undefined; line: number }
  | { kind: "block"; head: Word[]; body: Cmd[]; line: number }
  | { kind: "loop"; line: number };

const NAME = /[A-Za-z0-9_]/;

/** GRUB's lexer, as far as generated configs need it: quotes, escapes, $var/${var}, ; and newlines, braces. */
function lex(text: string): Tok[] {
  const toks: Tok[] = [];
  let i = 0;
  let line = 1;
  let segs: Seg[] | undefined;
  let wordLine = 1;
  const lit = (c: string) => {
    segs ??= [];
    wordLine = segs.length ? wordLine : line;
    const last = segs[segs.length - 1];
    if (last?.t === "lit") last.v += c;
    else segs.push({ t: "lit", v: c });
  };
  const end = () => {
    if (!segs) return;
    const only = segs.length === 1 && segs[0]!.t === "lit" ? segs[0]!.v : undefined;
    // An unquoted { or } on its own is a brace; "{" in quotes is text (only a quoted word has an empty lit).
    if (only === "{" && !quotedWord) toks.push({ k: "lbrace", line: wordLine });
    else if (only === "}" && !quotedWord) toks.push({ k: "rbrace", line: wordLine });
    else toks.push({ k: "word", w: { segs, line: wordLine } });
    segs = undefined;
    quotedWord = false;
  };
  let quotedWord = false;
  const readVar = (quoted: boolean) => {
    // at "$"
    i++;
    let name = "";
    if (text[i] === "{") {
      const close = text.indexOf("}", i);
      if (close < 0) throw new GrubCfgError(`line ${line}: unterminated \${`);
      name = text.slice(i + 1, close);
      i = close + 1;
    } else if (text[i] === "?" || text[i] === "#" || text[i] === "@" || text[i] === "*") {
      name = text[i]!;
      i++;
    } else {
      while (i < text.length && NAME.test(text[i]!)) name += text[i++];
    }
    if (!name) return lit("$");
    segs ??= [];
    if (!segs.length) wordLine = line;
    segs.push({ t: "var", name, quoted });
  };
  while (i < text.length) {
    const c = text[i]!;
    if (c === "\n" || c === ";") {
      end();
      toks.push({ k: "sep" });
      if (c === "\n") line++;
      i++;
    } else if (c === " " || c === "\t" || c === "\r") {
      end();
      i++;
    } else if (c === "#" && !segs) {
      while (i < text.length && text[i] !== "\n") i++;
    } else if (c === "\\") {
      if (text[i + 1] === "\n") {
        line++;
        i += 2;
      } else {
        lit(text[i + 1] ?? "");
        i += 2;
      }
    } else if (c === "'") {
      const close = text.indexOf("'", i + 1);
      if (close < 0) throw new GrubCfgError(`line ${line}: unterminated single quote`);
      const v = text.slice(i + 1, close);
      segs ??= [];
      if (!segs.length) wordLine = line;
      quotedWord = true;
      segs.push({ t: "lit", v });
      line += v.split("\n").length - 1;
      i = close + 1;
    } else if (c === '"') {
      segs ??= [];
      if (!segs.length) wordLine = line;
      quotedWord = true;
      segs.push({ t: "lit", v: "" });
      i++;
      for (;;) {
        if (i >= text.length) throw new GrubCfgError(`line ${wordLine}: unterminated double quote`);
        const d = text[i]!;
        if (d === '"') {
          i++;
          break;
        }
        if (d === "\\" && ['"', "\\", "$", "\n"].includes(text[i + 1] ?? "")) {
          if (text[i + 1] !== "\n") lit(text[i + 1]!);
          else line++;
          i += 2;
        } else if (d === "$") readVar(true);
        else {
          if (d === "\n") line++;
          lit(d);
          i++;
        }
      }
    } else if (c === "$") readVar(false);
    else {
      lit(c);
      i++;
    }
  }
  end();
  return toks;
}

const TERMINATORS = new Set(["then", "elif", "else", "fi", "do", "done"]);

class Parser {
  private i = 0;
  constructor(private readonly toks: Tok[]) {}

  private peekKeyword(): string | undefined {
    const t = this.toks[this.i];
    if (t?.k === "rbrace") return "}";
    if (t?.k !== "word") return undefined;
    const s = t.w.segs;
    return s.length === 1 && s[0]!.t === "lit" ? s[0]!.v : undefined;
  }

  private skipSeps(): void {
    while (this.toks[this.i]?.k === "sep") this.i++;
  }

  private expect(kw: string, line: number): void {
    this.skipSeps();
    if (this.peekKeyword() !== kw) throw new GrubCfgError(`line ${line}: expected "${kw}"`);
    this.i++;
  }

  /** Commands until one of `stop` (not consumed) or the end. */
  list(stop: Set<string>): Cmd[] {
    const out: Cmd[] = [];
    for (;;) {
      this.skipSeps();
      if (this.i >= this.toks.length) return out;
      const kw = this.peekKeyword();
      if (kw !== undefined && stop.has(kw)) return out;
      out.push(this.command());
    }
  }

  private command(): Cmd {
    const t = this.toks[this.i]!;
    const line = t.k === "word" ? t.w.line : t.k === "sep" ? 0 : t.line;
    const kw = this.peekKeyword();
    if (t.k === "lbrace" || t.k === "rbrace") throw new GrubCfgError(`line ${line}: unexpected "${t.k === "lbrace" ? "{" : "}"}"`);
    if (kw !== undefined && TERMINATORS.has(kw)) throw new GrubCfgError(`line ${line}: unexpected "${kw}"`);
    if (kw === "if") {
      this.i++;
      const branches: { cond: Cmd[]; body: Cmd[] }[] = [];
      let elseBody: Cmd[] | undefined;
      for (;;) {
        const cond = this.list(new Set(["then"]));
        this.expect("then", line);
        const body = this.list(new Set(["elif", "else", "fi"]));
        branches.push({ cond, body });
        const next = this.peekKeyword();
        this.i++;
        if (next === "elif") continue;
        if (next === "else") {
          elseBody = this.list(new Set(["fi"]));
          this.expect("fi", line);
        } else if (next !== "fi") throw new GrubCfgError(`line ${line}: "if" without "fi"`);
        return { kind: "if", branches, elseBody, line };
      }
    }
    if (kw === "for" || kw === "while" || kw === "until") {
      // Not evaluated (grub-mkconfig writes none at the top level); skipped whole.
      this.list(new Set(["do"]));
      this.expect("do", line);
      this.list(new Set(["done"]));
      this.expect("done", line);
      return { kind: "loop", line };
    }
    const words: Word[] = [];
    while (this.i < this.toks.length) {
      const u = this.toks[this.i]!;
      if (u.k === "sep" || u.k === "rbrace") break;
      if (u.k === "lbrace") {
        if (kw !== "menuentry" && kw !== "submenu" && kw !== "function") throw new GrubCfgError(`line ${line}: unexpected "{"`);
        this.i++;
        const body = this.list(new Set(["}"]));
        this.expect("}", line);
        return { kind: "block", head: words, body, line };
      }
      words.push(u.w);
      this.i++;
    }
    return { kind: "simple", words, line };
  }
}

/** Parses grub.cfg text into commands (syntax errors are GrubCfgErrors). */
function parse(text: string): Cmd[] {
  const p = new Parser(lex(text));
  const cmds = p.list(new Set(["}"]));
  return cmds;
}

/** A value that depends on a condition civm could not decide. */
interface Unknown {
  unknown: string;
}
type Value = string | Unknown;
const isUnknown = (v: unknown): v is Unknown => typeof v === "object" && v !== null && !Array.isArray(v) && "unknown" in v;

class Undecided extends Error {}

interface MenuItem {
  kind: "entry" | "submenu";
  title: string;
  id: string | undefined;
  body: Cmd[];
  line: number;
}

/** Where a path lives, as GRUB's `root` or a `(hdX,Y)` prefix says. */
export type GrubDevice =
  | { kind: "default" }
  | { kind: "partition"; disk: number; partition: number }
  | { kind: "fs-uuid"; value: string }
  | { kind: "label"; value: string }
  | { kind: "file"; value: string };

export interface GrubPath {
  device: GrubDevice;
  path: string;
}

export interface GrubBootEntry {
  /** The entry's title, with its submenu's before it ("Advanced options ... > Debian, with Linux ..."). */
  title: string;
  /** GRUB's index path ("0", "1>2"). */
  index: string;
  kernel: GrubPath;
  /** The kernel's arguments as GRUB passes them (without BOOT_IMAGE=). */
  args: string;
  initrds: GrubPath[];
}

export interface GrubEnv {
  /** Variables from grubenv (load_env). */
  grubenv?: Record<string, string>;
  /**
   * Files the script may test (`[ -f ... ]`, `-s`, `-e`) or `source`, by path on the config's
   * own partition (e.g. "/boot/grub/custom.cfg"): content, or null when known to be absent.
   * A path not listed makes such a test undecidable.
   */
  files?: Record<string, string | null>;
  /** Folder of grub.cfg on its partition ("/boot/grub"), for $prefix and $config_directory. */
  configDir: string;
}

/** Platform variables GRUB sets before reading grub.cfg (i386-pc, GRUB 2.06+). */
const PLATFORM: Record<string, string> = {
  grub_platform: "pc",
  grub_cpu: "i386",
  feature_chainloader_bpb: "y",
  feature_ntldr: "y",
  feature_platform_search_hint: "y",
  feature_default_font_path: "y",
  feature_all_video_module: "y",
  feature_menuentry_id: "y",
  feature_menuentry_options: "y",
  feature_200_final: "y",
  feature_nativedisk_cmd: "y",
  feature_timeout_style: "y",
  root: "",
};

/** Parses a grubenv block ("# GRUB Environment Block", name=value lines, '#' padding). */
export function parseGrubenv(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const eq = line.indexOf("=");
    if (eq <= 0) continue;
    out[line.slice(0, eq)] = line.slice(eq + 1).replace(/\\(.)/g, (_, c: string) => (c === "n" ? "\n" : c));
  }
  return out;
}

/** A device name as GRUB writes it: "hd0,msdos1", "(hd0,gpt2)", "hd0,1". */
export function parseGrubDevice(s: string): GrubDevice | undefined {
  const m = /^\(?hd(\d+),(?:msdos|gpt)?(\d+)\)?$/.exec(s.trim());
  return m ? { kind: "partition", disk: Number(m[1]), partition: Number(m[2]) } : undefined;
}

interface State {
  vars: Map<string, Value>;
  functions: Map<string, Cmd[]>;
  menu: MenuItem[] | Unknown;
  /** Inside an entry: what it loads. */
  boot: { kernel?: GrubPath | Unknown; args?: Value; initrds?: GrubPath[] | Unknown } | undefined;
  depth: number;
}

function clone(s: State): State {
  return {
    vars: new Map(s.vars),
    functions: new Map(s.functions),
    menu: isUnknown(s.menu) ? s.menu : [...s.menu],
    boot: s.boot ? { ...s.boot } : undefined,
    depth: s.depth,
  };
}

const ROOT_SEARCH = "\u0000search:";

class Evaluator {
  constructor(private readonly env: GrubEnvInternal) {}

  private expandWord(w: Word, s: State): string {
    let out = "";
    for (const seg of w.segs) {
      if (seg.t === "lit") out += seg.v;
      else {
        const v = s.vars.get(seg.name) ?? "";
        if (isUnknown(v)) throw new Undecided(`\$${seg.name} (line ${w.line}) ${v.unknown}`);
        out += v;
      }
    }
    return out;
  }

  /** Words as arguments: an unquoted expansion to nothing is no argument at all. */
  private expand(words: Word[], s: State): string[] {
    const out: string[] = [];
    for (const w of words) {
      const v = this.expandWord(w, s);
      const bareVars = w.segs.every((g) => g.t === "var" && !g.quoted);
      if (bareVars && v === "") continue;
      if (bareVars) out.push(...v.split(/[ \t]+/).filter(Boolean));
      else out.push(v);
    }
    return out;
  }

  run(cmds: Cmd[], s: State): void {
    for (const c of cmds) this.one(c, s);
  }

  private one(c: Cmd, s: State): void {
    if (c.kind === "loop") return;
    if (c.kind === "if") return this.runIf(c, s);
    if (c.kind === "block") return this.block(c, s);
    if (!c.words.length) return;
    let args: string[];
    try {
      args = this.expand(c.words, s);
    } catch (e) {
      if (!(e instanceof Undecided)) throw e;
      return this.undecidedCommand(c, s, e.message);
    }
    if (!args.length) return;
    const [cmd, ...rest] = args as [string, ...string[]];
    const assign = /^([A-Za-z_][A-Za-z0-9_]*)=([\s\S]*)$/.exec(cmd);
    if (assign && !rest.length) return void s.vars.set(assign[1]!, assign[2]!);
    switch (cmd) {
      case "set":
        for (const a of rest) {
          const m = /^([A-Za-z_][A-Za-z0-9_]*)=([\s\S]*)$/.exec(a);
          if (m) s.vars.set(m[1]!, m[2]!);
        }
        return;
      case "unset":
        for (const a of rest) s.vars.delete(a);
        return;
      case "load_env":
        if (rest.some((a) => a === "-f" || a.startsWith("--file"))) throw new GrubCfgError(`line ${c.line}: load_env from another file than grubenv`);
        for (const [k, v] of Object.entries(this.env.grubenv ?? {})) s.vars.set(k, v);
        return;
      case "source":
      case ".": {
        const file = this.localPath(rest[0] ?? "", s);
        const text = file === undefined ? undefined : this.env.files?.[file];
        if (file !== undefined && text === undefined) throw new GrubNeedsFile(file);
        if (typeof text !== "string") throw new GrubCfgError(`line ${c.line}: sources ${rest[0]}, which ${file === undefined ? "is on another device" : "does not exist"}`);
        if (s.depth > 8) throw new GrubCfgError(`line ${c.line}: sources nested more than 8 deep`);
        s.depth++;
        this.run(parse(text), s);
        s.depth--;
        return;
      }
      case "configfile":
      case "normal":
      case "extract_entries_configfile":
      case "extract_entries_source":
        throw new GrubCfgError(`line ${c.line}: "${cmd}" loads another menu, which civm does not follow`);
      case "search":
      case "search.fs_uuid":
      case "search.fs_label":
      case "search.file":
        return this.search(cmd, rest, s);
      case "linux":
      case "linux16":
      case "linuxefi":
        if (!s.boot) return;
        s.boot.kernel = this.grubPath(rest[0], s, c.line);
        s.boot.args = rest.slice(1).join(" ");
        return;
      case "initrd":
      case "initrd16":
      case "initrdefi":
        if (!s.boot) return;
        s.boot.initrds = rest.filter((a) => !a.startsWith("--")).map((a) => this.grubPath(a, s, c.line));
        return;
      case "chainloader":
      case "multiboot":
      case "multiboot2":
      case "kfreebsd":
      case "knetbsd":
      case "kopenbsd":
      case "appleloader":
      case "ntldr":
        if (s.boot) throw new GrubCfgError(`line ${c.line}: the default entry boots with "${cmd}", not a Linux kernel`);
        return;
      default: {
        const fn = s.functions.get(cmd);
        if (!fn) return; // insmod, echo, load_video, terminal_output, ...: nothing civm needs
        if (s.depth > 16) throw new GrubCfgError(`line ${c.line}: functions nested more than 16 deep`);
        const saved = rest.map((_, i) => [String(i + 1), s.vars.get(String(i + 1))] as const);
        rest.forEach((a, i) => s.vars.set(String(i + 1), a));
        s.depth++;
        this.run(fn, s);
        s.depth--;
        for (const [k, v] of saved) (v === undefined ? s.vars.delete(k) : s.vars.set(k, v));
      }
    }
  }

  /** A command whose arguments depend on an undecided condition: harmless unless it sets something civm reads. */
  private undecidedCommand(c: Extract<Cmd, { kind: "simple" }>, s: State, why: string): void {
    const first = c.words[0]!.segs.map((g) => (g.t === "lit" ? g.v : "$")).join("");
    const assign = /^([A-Za-z_][A-Za-z0-9_]*)=/.exec(first);
    if (assign) return void s.vars.set(assign[1]!, { unknown: why });
    if (first === "set") {
      for (const w of c.words.slice(1)) {
        const m = /^([A-Za-z_][A-Za-z0-9_]*)=/.exec(w.segs[0]?.t === "lit" ? w.segs[0].v : "");
        if (m) s.vars.set(m[1]!, { unknown: why });
      }
      return;
    }
    if (first.startsWith("search")) return void s.vars.set("root", { unknown: why });
    if (!s.boot) return;
    if (/^linux/.test(first)) {
      s.boot.kernel = { unknown: why };
      s.boot.args = { unknown: why };
    } else if (/^initrd/.test(first)) s.boot.initrds = { unknown: why };
  }

  private search(cmd: string, args: string[], s: State): void {
    let kind: "fs-uuid" | "label" | "file" = cmd === "search.fs_uuid" ? "fs-uuid" : cmd === "search.fs_label" ? "label" : "file";
    let target = "root";
    const positional: string[] = [];
    for (let i = 0; i < args.length; i++) {
      const a = args[i]!;
      if (a === "--fs-uuid" || a === "-u") kind = "fs-uuid";
      else if (a === "--label" || a === "-l") kind = "label";
      else if (a === "--file" || a === "-f") kind = "file";
      else if (a.startsWith("--set=")) target = a.slice(6);
      else if (a === "--set" || a === "-s") {
        if (args[i + 1] !== undefined && !args[i + 1]!.startsWith("-") && i + 2 < args.length) target = args[++i]!;
      } else if (a.startsWith("-")) continue; // --no-floppy, --hint*=...
      else positional.push(a);
    }
    const value = positional[0];
    if (value !== undefined) s.vars.set(target, `${ROOT_SEARCH}${kind}:${value}`);
  }

  /** A path on the config's own partition, when `p` names one ($prefix-relative or absolute, no other device). */
  private localPath(p: string, s: State): string | undefined {
    const gp = this.grubPath(p, s, 0);
    return gp.device.kind === "default" ? gp.path : undefined;
  }

  private grubPath(p: string | undefined, s: State, line: number): GrubPath {
    if (!p) throw new GrubCfgError(`line ${line}: a linux or initrd command without a file`);
    const m = /^\(([^)]*)\)(.*)$/.exec(p);
    if (m) {
      const dev = m[1]!;
      const cfgDev = this.env.configDevice;
      const device = dev === cfgDev || dev === "" ? this.rootDevice(s, line) : parseGrubDevice(dev);
      if (!device || (device.kind === "partition" && device.disk !== 0)) throw new GrubCfgError(`line ${line}: ${p}: device (${dev}) is not a partition of the first disk`);
      return { device, path: m[2] || "/" };
    }
    if (!p.startsWith("/")) throw new GrubCfgError(`line ${line}: ${p} is not an absolute path`);
    return { device: this.rootDevice(s, line), path: p };
  }

  private rootDevice(s: State, line: number): GrubDevice {
    const root = s.vars.get("root");
    if (isUnknown(root)) throw new Undecided(`$root (line ${line}) ${root.unknown}`);
    if (!root || root === this.env.configDevice) return { kind: "default" };
    if (root.startsWith(ROOT_SEARCH)) {
      const rest = root.slice(ROOT_SEARCH.length);
      const colon = rest.indexOf(":");
      const kind = rest.slice(0, colon) as "fs-uuid" | "label" | "file";
      return { kind, value: rest.slice(colon + 1) };
    }
    const d = parseGrubDevice(root);
    if (!d || (d.kind === "partition" && d.disk !== 0)) throw new GrubCfgError(`line ${line}: root is "${root}", not a partition of the first disk`);
    return d;
  }

  private block(c: Extract<Cmd, { kind: "block" }>, s: State): void {
    const head = c.head.map((w) => w.segs.map((g) => (g.t === "lit" ? g.v : "")).join(""));
    const kw = head[0];
    if (kw === "function") {
      if (head[1]) s.functions.set(head[1], c.body);
      return;
    }
    if (kw !== "menuentry" && kw !== "submenu") return;
    if (isUnknown(s.menu)) return;
    let args: string[];
    try {
      args = this.expand(c.head.slice(1), s);
    } catch (e) {
      if (!(e instanceof Undecided)) throw e;
      s.menu = { unknown: e.message };
      return;
    }
    let title: string | undefined;
    let id: string | undefined;
    for (let i = 0; i < args.length; i++) {
      const a = args[i]!;
      if (a === "--id") id = args[++i];
      else if (a.startsWith("--id=")) id = a.slice(5);
      else if (a === "--class" || a === "--users" || a === "--hotkey" || a === "--source") i++;
      else if (a.startsWith("--")) continue;
      else title ??= a;
    }
    s.menu.push({ kind: kw === "menuentry" ? "entry" : "submenu", title: title ?? "", id, body: c.body, line: c.line });
  }

  private runIf(c: Extract<Cmd, { kind: "if" }>, s: State): void {
    for (const b of c.branches) {
      const v = this.condition(b.cond, s);
      if (v === true) return this.run(b.body, s);
      if (v === false) continue;
      // Undecided: this branch and whatever the rest would do, side by side.
      const a = clone(s);
      this.run(b.body, a);
      const rest = clone(s);
      this.runIf({ ...c, branches: c.branches.slice(c.branches.indexOf(b) + 1) }, rest);
      return merge(s, a, rest, `depends on a condition civm cannot decide (line ${c.line}: ${v})`);
    }
    if (c.elseBody) this.run(c.elseBody, s);
  }

  /** true/false, or why it cannot be decided. */
  private condition(cmds: Cmd[], s: State): boolean | string {
    let result: boolean | string = true;
    for (const cmd of cmds) {
      if (cmd.kind !== "simple") return `line ${cmd.line}: a compound condition`;
      let args: string[];
      try {
        args = cmd.words.map((w) => this.expandWord(w, s));
      } catch (e) {
        if (e instanceof Undecided) return e.message;
        throw e;
      }
      const [name, ...rest] = args;
      if (name === "[" && rest[rest.length - 1] === "]") result = this.test(rest.slice(0, -1), cmd.line);
      else if (name === "test") result = this.test(rest, cmd.line);
      else if (name === "true") result = true;
      else if (name === "false") result = false;
      else result = `"${args.join(" ")}" (line ${cmd.line})`;
    }
    return result;
  }

  private test(a: string[], line: number): boolean | string {
    const or = a.indexOf("-o");
    if (or >= 0) return combine(this.test(a.slice(0, or), line), this.test(a.slice(or + 1), line), "or");
    const and = a.indexOf("-a");
    if (and >= 0) return combine(this.test(a.slice(0, and), line), this.test(a.slice(and + 1), line), "and");
    if (a[0] === "!") {
      const v = this.test(a.slice(1), line);
      return typeof v === "boolean" ? !v : v;
    }
    if (a.length === 0) return false;
    if (a.length === 1) return a[0] !== "";
    if (a.length === 2) {
      const [op, x] = a as [string, string];
      if (op === "-n") return x !== "";
      if (op === "-z") return x === "";
      if (op === "-e" || op === "-f" || op === "-s" || op === "-d") {
        const p = this.localPathSafe(x);
        if (p === undefined) return `"[ ${op} ${x} ]" (line ${line}: a file on another device)`;
        const f = this.env.files?.[p];
        if (f === undefined) throw new GrubNeedsFile(p);
        if (op === "-d") return `"[ -d ${x} ]" (line ${line})`;
        return f !== null && (op !== "-s" || f.length > 0);
      }
    }
    if (a.length === 3) {
      const [x, op, y] = a as [string, string, string];
      if (op === "=" || op === "==") return x === y;
      if (op === "!=") return x !== y;
      const nums = { "-eq": (p: number, q: number) => p === q, "-ne": (p: number, q: number) => p !== q, "-lt": (p: number, q: number) => p < q, "-le": (p: number, q: number) => p <= q, "-gt": (p: number, q: number) => p > q, "-ge": (p: number, q: number) => p >= q } as Record<string, (p: number, q: number) => boolean>;
      if (nums[op]) return nums[op]!(Number.parseInt(x, 10) || 0, Number.parseInt(y, 10) || 0);
    }
    return `"[ ${a.join(" ")} ]" (line ${line})`;
  }

  private localPathSafe(p: string): string | undefined {
    const m = /^\(([^)]*)\)(.*)$/.exec(p);
    if (m) return m[1] === this.env.configDevice || m[1] === "" ? m[2] : undefined;
    return p.startsWith("/") ? p : undefined;
  }

  /** Runs an entry's body and says what it loads. */
  bootOf(item: MenuItem, s: State, title: string, index: string): GrubBootEntry {
    const e = clone(s);
    e.boot = {};
    e.vars.set("chosen", title);
    try {
      this.run(item.body, e);
    } catch (err) {
      if (err instanceof Undecided) throw new GrubCfgError(`the default entry "${title}" uses ${err.message}`);
      throw err;
    }
    const b = e.boot;
    if (!b.kernel) throw new GrubCfgError(`the default entry "${title}" (line ${item.line}) has no linux command`);
    if (isUnknown(b.kernel)) throw new GrubCfgError(`the default entry "${title}": its linux command ${b.kernel.unknown}`);
    if (isUnknown(b.args)) throw new GrubCfgError(`the default entry "${title}": its kernel arguments ${b.args.unknown}`);
    if (isUnknown(b.initrds)) throw new GrubCfgError(`the default entry "${title}": its initrd command ${b.initrds.unknown}`);
    return { title, index, kernel: b.kernel, args: b.args ?? "", initrds: b.initrds ?? [] };
  }

  /** GRUB's choice: `default` split at ">", each part an index, an id or a title; unknown → entry 0. */
  choose(s: State): GrubBootEntry {
    const d = s.vars.get("default") ?? "";
    if (isUnknown(d)) throw new GrubCfgError(`the default entry ${d.unknown}`);
    let menu = s.menu;
    let state = s;
    const parts = d === "" ? ["0"] : d.split(">");
    const titles: string[] = [];
    const index: number[] = [];
    for (let depth = 0; ; depth++) {
      if (isUnknown(menu)) throw new GrubCfgError(`the menu ${menu.unknown}`);
      if (!menu.length) throw new GrubCfgError(depth ? `submenu "${titles.join(" > ")}" has no entries` : "grub.cfg has no menu entries");
      const part = parts[depth] ?? "0";
      let i = /^\d+$/.test(part) ? Number(part) : menu.findIndex((m) => m.id === part);
      if (i < 0) i = menu.findIndex((m) => m.title === part);
      if (i < 0 || i >= menu.length) i = depth === 0 ? 0 : -1;
      if (i < 0) throw new GrubCfgError(`default "${d}": submenu "${titles.join(" > ")}" has no entry "${part}"`);
      const item = menu[i]!;
      titles.push(item.title);
      index.push(i);
      if (item.kind === "entry") return this.bootOf(item, state, titles.join(" > "), index.join(">"));
      if (depth > 8) throw new GrubCfgError(`default "${d}": submenus nested too deep`);
      // GRUB runs a submenu's body when it is opened: its entries, in a copy of the state.
      const sub = clone(state);
      sub.menu = [];
      this.run(item.body, sub);
      state = sub;
      menu = sub.menu;
    }
  }
}

function combine(a: boolean | string, b: boolean | string, op: "and" | "or"): boolean | string {
  if (op === "and") {
    if (a === false || b === false) return false;
    if (a === true && b === true) return true;
  } else {
    if (a === true || b === true) return true;
    if (a === false && b === false) return false;
  }
  return typeof a === "string" ? a : (b as string);
}

/** `s` becomes what `a` and `b` agree on; the rest is unknown (with `why`). */
function merge(s: State, a: State, b: State, why: string): void {
  const keys = new Set([...a.vars.keys(), ...b.vars.keys()]);
  s.vars = new Map();
  for (const k of keys) {
    const x = a.vars.get(k);
    const y = b.vars.get(k);
    if (x === y && x !== undefined) s.vars.set(k, x);
    else if (x === undefined && y === undefined) continue;
    else s.vars.set(k, isUnknown(x) ? x : isUnknown(y) ? y : { unknown: why });
  }
  s.functions = new Map([...b.functions, ...a.functions]);
  const sameMenu = !isUnknown(a.menu) && !isUnknown(b.menu) && a.menu.length === b.menu.length && a.menu.every((m, i) => m === (b.menu as MenuItem[])[i]);
  s.menu = sameMenu ? a.menu : isUnknown(a.menu) ? a.menu : isUnknown(b.menu) ? b.menu : { unknown: `(its entries) ${why}` };
  if (s.boot && a.boot && b.boot) {
    const same = (x: unknown, y: unknown) => JSON.stringify(x) === JSON.stringify(y);
    s.boot = {
      ...(a.boot.kernel || b.boot.kernel ? { kernel: same(a.boot.kernel, b.boot.kernel) ? a.boot.kernel! : { unknown: why } } : {}),
      ...(a.boot.args !== undefined || b.boot.args !== undefined ? { args: same(a.boot.args, b.boot.args) ? a.boot.args! : { unknown: why } } : {}),
      ...(a.boot.initrds || b.boot.initrds ? { initrds: same(a.boot.initrds, b.boot.initrds) ? a.boot.initrds! : { unknown: why } } : {}),
    };
  }
}

interface GrubEnvInternal extends GrubEnv {
  /** GRUB's name for the config's partition ("hd0,msdos1"): $root and $prefix start there. */
  configDevice: string;
}

/**
 * The entry GRUB boots when nobody touches the menu, from grub.cfg's text. Throws a
 * GrubCfgError (a sentence for the log) when it cannot be told.
 */
export function defaultBootEntry(text: string, env: GrubEnv & { configDevice?: string }): GrubBootEntry {
  const configDevice = env.configDevice ?? "hd0,msdos1";
  const ev = new Evaluator({ ...env, configDevice } as GrubEnvInternal);
  const vars = new Map<string, Value>(Object.entries(PLATFORM));
  vars.set("root", configDevice);
  vars.set("prefix", `(${configDevice})${env.configDir}`);
  vars.set("config_directory", `(${configDevice})${env.configDir}`);
  vars.set("config_file", `(${configDevice})${env.configDir}/grub.cfg`);
  vars.set("cmdpath", `(${configDevice.split(",")[0]})`);
  const s: State = { vars, functions: new Map(), menu: [], boot: undefined, depth: 0 };
  try {
    ev.run(parse(text), s);
    return ev.choose(s);
  } catch (e) {
    if (e instanceof Undecided) throw new GrubCfgError(`grub.cfg uses ${e.message}`);
    throw e;
  }
}
