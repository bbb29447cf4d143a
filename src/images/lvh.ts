// lvh (cilium/little-vm-helper) images.json, translated to civm's spec form so lvh users can
// bring their file. lvh's form: [{"name": "base.qcow2", "parent"?, "image_size"?, "packages",
// "actions": [{"comment"?, "type": "run-command", "op": {"Cmd": "..."}}, ...]}].
// Each lvh action becomes exactly one civm action (same index), so messages about the
// translated spec can name the lvh field the user wrote (see LvhTranslation.fieldName).
import { closestMatch } from "../config/suggest.js";
import { shq } from "./shell.js";

type Obj = Record<string, unknown>;

function isObject(v: unknown): v is Obj {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** lvh op types civm translates, with the op keys each takes and the civm fields they become. */
const LVH_OPS: Record<string, { keys: string[]; civm: string; fields: Record<string, string> }> = {
  "run-command": { keys: ["Cmd"], civm: "run", fields: { Cmd: "" } },
  "copy-in": { keys: ["LocalPath", "RemoteDir"], civm: "copy", fields: { LocalPath: "src", RemoteDir: "dest" } },
  upload: { keys: ["File", "Dest"], civm: "copy", fields: { File: "src", Dest: "dest" } },
  "set-hostname": { keys: ["Hostname"], civm: "set-hostname", fields: { Hostname: "" } },
  mkdir: { keys: ["Dir"], civm: "mkdir", fields: { Dir: "path" } },
  "append-line": { keys: ["File", "Line"], civm: "append-line", fields: { File: "file", Line: "line" } },
  link: { keys: ["Target", "Link"], civm: "symlink", fields: { Target: "target", Link: "path" } },
  chmod: { keys: ["Permissions", "File"], civm: "run", fields: { Permissions: "", File: "" } },
};

export const LVH_SUPPORTED_TYPES: readonly string[] = Object.keys(LVH_OPS);

/** lvh ops civm knows but does not take, and what to do instead. */
const LVH_UNSUPPORTED: Record<string, string> = {
  "install-kernel":
    'lvh\'s form installs a kernel folder lvh built; civm installs a kernel from its store: build it with civm kernel build NAME (kernels.json) or add it with civm kernel add NAME DIR, then rewrite this action in civm\'s form {"install-kernel": "NAME"} (or set "kernel" on the root image to a Debian kernel package)',
  "no-network": "civm's chroot steps always have the network; remove this action",
};

const LVH_IMAGE_KEYS = ["name", "parent", "image_size", "packages", "actions"] as const;

/** True when the list looks like lvh's images.json (lvh keys or type/op actions). */
export function isLvhForm(data: readonly unknown[]): boolean {
  return data.some((entry) => {
    if (!isObject(entry)) return false;
    if ("image_size" in entry) return true;
    const actions = entry.actions;
    return Array.isArray(actions) && actions.some((a) => isObject(a) && ("op" in a || "type" in a));
  });
}

export interface LvhTranslation {
  /** The image in civm's spec form; undefined when the lvh entry is too broken to translate. */
  image?: Obj;
  /** Problems in lvh terms, each `field "...": what is wrong` (no file/image prefix). */
  problems: string[];
  /** The lvh field a civm field path came from ("actions[2].copy.src" -> "actions[2].op.LocalPath"). */
  fieldName: (civmField: string) => string;
}

/** lvh names images by file name ("base.qcow2"); civm by name, adding the extension itself. */
export function lvhImageName(name: string): string {
  return name.replace(/\.(qcow2|img|raw)$/, "");
}

export function translateLvhImage(entry: unknown): LvhTranslation {
  const map = new Map<string, string>([["size", "image_size"]]);
  const fieldName = (f: string): string => {
    const exact = map.get(f);
    if (exact) return exact;
    const m = /^(actions\[\d+\])(\..*)?$/.exec(f);
    if (m) return map.get(m[1] as string) ?? (m[1] as string);
    return f;
  };
  const problems: string[] = [];
  if (!isObject(entry)) {
    return { problems: ['must be an object like {"name": "base.qcow2", "packages": [...], "actions": [...]} (lvh form)'], fieldName };
  }
  const image: Obj = {};
  for (const [key, value] of Object.entries(entry)) {
    if (!(LVH_IMAGE_KEYS as readonly string[]).includes(key)) {
      const hint = closestMatch(key, LVH_IMAGE_KEYS);
      problems.push(
        `field ${JSON.stringify(key)}: unknown key in an lvh image` +
          (hint ? `; did you mean ${JSON.stringify(hint)}?` : `; lvh images take ${LVH_IMAGE_KEYS.join(", ")}.`),
      );
      continue;
    }
    if (key === "name" || key === "parent") image[key] = typeof value === "string" ? lvhImageName(value) : value;
    else if (key === "image_size") image.size = value;
    else if (key === "packages") image.packages = value;
    else if (key === "actions") {
      if (!Array.isArray(value)) {
        problems.push('field "actions": must be a list of lvh actions ({"type": ..., "op": {...}})');
        continue;
      }
      image.actions = value.map((a, i) => translateAction(a, i, map, problems));
    }
  }
  if (typeof entry.name === "string" && lvhImageName(entry.name) !== entry.name) {
    image.description = `translated from lvh image ${JSON.stringify(entry.name)}`;
  }
  if (problems.length > 0) return { problems, fieldName };
  return { image, problems, fieldName };
}

function translateAction(a: unknown, i: number, map: Map<string, string>, problems: string[]): unknown {
  const at = `actions[${i}]`;
  if (!isObject(a)) {
    problems.push(`field "${at}": must be an lvh action object {"type": ..., "op": {...}}`);
    return a;
  }
  for (const key of Object.keys(a)) {
    if (key === "type" || key === "op" || key === "comment") continue;
    problems.push(`field "${at}.${key}": unknown key in an lvh action; lvh actions take "type", "op" and "comment".`);
  }
  const type = a.type;
  if (typeof type !== "string") {
    problems.push(`field "${at}.type": missing the lvh action type (a string such as "run-command")`);
    return a;
  }
  const known = LVH_OPS[type];
  if (!known) {
    const why = LVH_UNSUPPORTED[type];
    const supported = `civm translates the lvh types ${LVH_SUPPORTED_TYPES.join(", ")}`;
    if (why) {
      problems.push(`field "${at}.type": lvh action type ${JSON.stringify(type)} is not supported by civm: ${why}. (${supported}.)`);
    } else {
      const hint = closestMatch(type, LVH_SUPPORTED_TYPES);
      problems.push(
        `field "${at}.type": lvh action type ${JSON.stringify(type)} is not supported by civm` +
          (hint ? `; did you mean ${JSON.stringify(hint)}?` : "") +
          ` ${supported}; for anything else use a "run-command" or rewrite the file in civm's form.`,
      );
    }
    return a;
  }
  const op = a.op;
  if (!isObject(op)) {
    problems.push(`field "${at}.op": must be an object with ${known.keys.map((k) => JSON.stringify(k)).join(" and ")} for type ${JSON.stringify(type)}`);
    return a;
  }
  let bad = false;
  for (const key of Object.keys(op)) {
    if (known.keys.includes(key)) continue;
    const hint = closestMatch(key, known.keys);
    problems.push(
      `field "${at}.op.${key}": unknown key for lvh type ${JSON.stringify(type)}` +
        (hint ? `; did you mean ${JSON.stringify(hint)}?` : `; it takes ${known.keys.map((k) => JSON.stringify(k)).join(" and ")}.`),
    );
    bad = true;
  }
  for (const key of known.keys) {
    if (op[key] === undefined) {
      problems.push(`field "${at}.op.${key}": missing; lvh type ${JSON.stringify(type)} needs ${known.keys.map((k) => JSON.stringify(k)).join(" and ")}`);
      bad = true;
    }
  }
  if (bad) return a;
  map.set(at, `${at}.op`);
  for (const [lvhKey, civmKey] of Object.entries(known.fields)) {
    map.set(civmKey ? `${at}.${known.civm}.${civmKey}` : `${at}.${known.civm}`, `${at}.op.${lvhKey}`);
  }
  const out: Obj = {};
  if (typeof a.comment === "string") out.comment = a.comment;
  switch (type) {
    case "run-command":
      out.run = op.Cmd;
      break;
    case "copy-in":
      // virt-customize --copy-in LOCAL:REMOTEDIR copies LOCAL into the existing folder REMOTEDIR.
      out.copy = { src: op.LocalPath, dest: typeof op.RemoteDir === "string" ? withSlash(op.RemoteDir) : op.RemoteDir };
      break;
    case "upload":
      out.copy = { src: op.File, dest: op.Dest };
      break;
    case "set-hostname":
      out["set-hostname"] = op.Hostname;
      break;
    case "mkdir":
      out.mkdir = { path: op.Dir };
      break;
    case "append-line":
      out["append-line"] = { file: op.File, line: op.Line };
      break;
    case "link":
      out.symlink = { target: op.Target, path: op.Link };
      break;
    case "chmod":
      if (typeof op.Permissions !== "string" || typeof op.File !== "string") {
        problems.push(`field "${at}.op": "Permissions" and "File" must be strings`);
        return a;
      }
      out.run = `chmod ${shq(op.Permissions)} ${shq(op.File)}`;
      break;
  }
  return out;
}

function withSlash(p: string): string {
  return p.endsWith("/") ? p : `${p}/`;
}
