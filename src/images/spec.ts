// Loads and validates an image spec file (images.json / images.yaml: a list of images, in
// civm's form or lvh's images.json form, which is translated). Every problem is collected
// and reported together in one ConfigError, one line each, naming the file, the image and
// the field: `images.json: image "base" (#1): field "actions[2].copy.src": ...`.
import { parseArch } from "../vm/arch.js";
import { duplicateNameProblems } from "../config/duplicates.js";
import { kindOf } from "../config/kind.js";
import { readdirSync } from "node:fs";
import { stat } from "node:fs/promises";
import { dirname, join, posix, resolve } from "node:path";
import * as z from "zod";
import { ConfigError } from "../errors/index.js";
import { loadStructuredFile } from "../config/load-file.js";
import { SIZE_FORMS, formatSize, parseSize } from "../config/sizes.js";
import { closestMatch } from "../config/suggest.js";
import { issueMessage, joinPath, shapeKeys } from "../config/zod-issues.js";
import { isLvhForm, lvhImageName, translateLvhImage } from "./lvh.js";
import { hostDebianMirror } from "./mirror.js";
import { builtinImagesDir } from "./paths.js";
import {
  ACTION_KINDS,
  IMAGE_FORMATS,
  type ActionKind,
  type GithubRunnerSpec,
  type ImageAction,
  type ImageFormat,
  type ImageSpec,
  type LoadedImageSpecs,
} from "./types.js";

export const DEFAULT_SUITE = "bookworm";
export const DEFAULT_KERNEL = "linux-image-amd64";
export const DEFAULT_SIZE_BYTES = 4 * 1024 ** 3;
const MiB = 1024 ** 2;
const MIN_SIZE = 64 * MiB;
/** An MBR (msdos) partition table addresses at most 2^32 512-byte sectors. */
const MAX_SIZE = 2 * 1024 ** 4;

export const IMAGE_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
/** A Debian package, optionally with :arch and =version or /release. */
export const PACKAGE_RE = /^[a-z0-9][a-z0-9+.-]*(:[a-z0-9-]+)?([=/][A-Za-z0-9.+~:_-]+)?$/;
const SUITE_RE = /^[a-z][a-z0-9.-]*$/;
const HOSTNAME_RE = /^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;
const UNIT_RE = /^[A-Za-z0-9@._:\\-]+$/;
const UNIT_SUFFIXES = ["service", "socket", "timer", "target", "path", "mount", "automount", "swap", "slice", "scope", "device"];

export interface LoadImageOptions {
  /** Mirror for root images that set none (default: the Debian mirror of the host's apt). */
  defaultMirror?: string;
  /** Look parents that the file does not define up among the built-in images (default true). */
  builtins?: boolean;
  /** Folder of the built-in specs (default: images/ at the repo root). */
  builtinDir?: string;
  /**
   * civm's state dir: a parent that neither the file nor the built-in images define is looked
   * up among its stored images, and used as it is (src/images/stored-parent.ts). Unset: no
   * stored parents.
   */
  stateDir?: string;
}

// ---------------------------------------------------------------- field schemas (zod)

const sizeSchema = z.union([z.string(), z.number()], { error: `must be a size: ${SIZE_FORMS}` }).transform((v, ctx) => {
  let bytes: number;
  try {
    bytes = parseSize(v);
  } catch (e) {
    ctx.addIssue({ code: "custom", message: (e as Error).message });
    return z.NEVER;
  }
  if (bytes < MIN_SIZE) {
    ctx.addIssue({ code: "custom", message: `${JSON.stringify(v)} is too small for a disk image; use at least ${formatSize(MIN_SIZE)} (a size without a suffix is in bytes)` });
    return z.NEVER;
  }
  if (bytes > MAX_SIZE) {
    ctx.addIssue({ code: "custom", message: `${JSON.stringify(v)} is too large: the image's MBR partition table addresses at most 2T` });
    return z.NEVER;
  }
  return Math.ceil(bytes / MiB) * MiB;
});

const packageSchema = z
  .string({ error: "must be a Debian package name, as a string" })
  .regex(PACKAGE_RE, 'must be a Debian package name such as "curl", "curl=7.88.1-10" or "curl/bookworm-backports"');

const IMAGE_FIELDS = {
  name: z.string({ error: 'must be the image\'s name, as a string, e.g. "base"' }).regex(IMAGE_NAME_RE, 'must be made only of letters, digits, ".", "_" and "-", starting with a letter or digit, e.g. "base"'),
  description: z.string({ error: "must be a string" }),
  parent: z.string({ error: "must be the name of another image, as a string" }).min(1, "must be the name of another image"),
  suite: z.string({ error: 'must be a Debian suite, as a string, e.g. "bookworm"' }).regex(SUITE_RE, 'must be a Debian suite such as "bookworm" or "trixie"'),
  mirror: z.string({ error: "must be a Debian mirror URL, as a string" }).regex(/^(https?|file):\/\/\S+$/, "must be a Debian mirror URL (http://, https:// or file://)"),
  packages: z.array(packageSchema, { error: 'must be a list of Debian package names, e.g. ["curl", "git"]' }),
  size: sizeSchema,
  format: z.enum(IMAGE_FORMATS as [ImageFormat, ...ImageFormat[]], { error: 'must be "qcow2" (default), "raw" or "vhd"' }),
  compress: z.literal("zstd", { error: 'must be "zstd" (or left out for no compressed artifact)' }),
  kernel: z.string({ error: "must be the kernel's Debian package name, as a string" }).regex(PACKAGE_RE, 'must be a Debian package name such as "linux-image-amd64" or "linux-image-cloud-amd64"'),
  flatten: z.boolean({ error: "must be true (a standalone copy of the parent) or false (a qcow2 backing chain on the parent)" }),
  actions: z.array(z.unknown(), { error: 'must be a list of actions, e.g. [{"run": "apt-get clean"}]' }),
  githubRunner: z.strictObject(
    {
      version: z.string({ error: 'must be the runner\'s release version, as a string, e.g. "2.321.0"' }).regex(/^\d+\.\d+\.\d+$/, 'must be a release version such as "2.321.0" (no leading "v")'),
      sha256: z
        .string({ error: "must be the release asset's sha256, as a string of 64 hex digits" })
        .regex(/^[0-9A-Fa-f]{64}$/, "must be the release asset's sha256: 64 hex digits, as GitHub publishes it with the release")
        .transform((h) => h.toLowerCase()),
      url: z.string({ error: "must be a URL (https://...) or a host path to the runner's .tar.gz, as a string" }).min(1, "must not be empty").optional(),
    },
    { error: 'must be an object like {"version": "2.321.0", "sha256": "<64 hex digits>"} (and optionally "url")' },
  ),
  sudo: z.boolean({ error: "must be true (passwordless sudo for the runner user) or false (no sudo)" }),
  civm: z.boolean({ error: "must be true (install civm itself, built from this checkout, into /opt/civm) or false" }),
  uefi: z.boolean({ error: "must be true (the disk also boots under UEFI: an EFI system partition with GRUB) or false (BIOS only)" }),
  snapshot: z.boolean({ error: "must be true (civm image build also makes the image's memory snapshot, docs/images.md \"Snapshots\") or false" }),
  arch: z.string({ error: 'must be the guest\'s architecture, as a string: "x86_64" (default) or "arm64"' }).refine((v) => parseArch(v) !== undefined, 'must be "x86_64" (the default; also "amd64") or "arm64" (also "aarch64")'),
};
type ImageField = keyof typeof IMAGE_FIELDS;
const IMAGE_KEYS = Object.keys(IMAGE_FIELDS) as ImageField[];

const KEY_ALIASES: Record<string, string> = {
  image_size: "size",
  "disk-size": "size",
  disksize: "size",
  release: "suite",
  distribution: "suite",
  dist: "suite",
  include: "packages",
  steps: "actions",
  runner: "githubRunner",
  github_runner: "githubRunner",
  "github-runner": "githubRunner",
  from: "parent",
  base: "parent",
};

const absPath = z
  .string({ error: "must be an absolute path in the image, as a string" })
  .regex(/^\//, 'must be an absolute path in the image, starting with "/"')
  .transform((p) => (p.length > 1 && p.endsWith("/") ? `${posix.normalize(p).replace(/\/$/, "")}/` : posix.normalize(p)));

const modeSchema = z
  .string({ error: 'must be an octal permission mode written as a string, e.g. "0755" (a bare number would be read as decimal)' })
  .regex(/^(0o?)?[0-7]{3,4}$/, 'must be an octal permission mode such as "0644" or "0755"')
  .transform((m) => parseInt(m.replace(/^0o/, ""), 8));

const ACTION_SCHEMAS = {
  run: z.string({ error: "must be a shell command, as a string" }).min(1, "must not be empty"),
  copy: z.strictObject({
    src: z.string({ error: "must be a host path, as a string" }).min(1, "must not be empty"),
    dest: absPath,
    mode: modeSchema.optional(),
  }),
  write: z.strictObject({ path: absPath, content: z.string({ error: "must be the file's content, as a string" }), mode: modeSchema.optional() }),
  mkdir: z.strictObject({ path: absPath, mode: modeSchema.optional() }),
  symlink: z.strictObject({ target: z.string({ error: "must be the link's target, as a string" }).min(1, "must not be empty"), path: absPath }),
  "append-line": z.strictObject({
    file: absPath,
    line: z.string({ error: "must be one line of text, as a string" }).refine((l) => !/[\r\n]/.test(l), "must be a single line (no line breaks); use several append-line actions or a write action"),
  }),
  "set-hostname": z.string({ error: "must be a host name, as a string" }).regex(HOSTNAME_RE, 'must be a host name made of letters, digits and "-" (dot-separated labels of at most 63 characters)'),
  "enable-service": z.string({ error: 'must be a systemd unit name, as a string, e.g. "ssh" or "fstrim.timer"' }).regex(UNIT_RE, 'must be a systemd unit name such as "ssh" or "fstrim.timer"'),
  provision: z.unknown(),
  "install-kernel": z.string({ error: "must be the name of a stored kernel (civm kernel ls), as a string" }).regex(/^[a-z0-9][a-z0-9._-]*$/, "must be the name of a stored kernel (civm kernel ls): lowercase letters, digits, \".\", \"_\" and \"-\""),
} satisfies Record<ActionKind, z.ZodType>;

const ACTION_EXAMPLES: Record<ActionKind, string> = {
  run: '{"run": "apt-get clean"}',
  copy: '{"copy": {"src": "files/motd", "dest": "/etc/motd", "mode": "0644"}}',
  write: '{"write": {"path": "/etc/motd", "content": "hello\\n"}}',
  mkdir: '{"mkdir": {"path": "/opt/runner"}}',
  symlink: '{"symlink": {"target": "/usr/bin/python3", "path": "/usr/local/bin/python"}}',
  "append-line": '{"append-line": {"file": "/etc/sysctl.conf", "line": "vm.swappiness = 10"}}',
  "set-hostname": '{"set-hostname": "runner"}',
  "enable-service": '{"enable-service": "ssh"}',
  provision: '{"provision": "scripts/setup.sh"} or {"provision": {"inline": "apt-get update"}}',
  "install-kernel": '{"install-kernel": "bpf-next"} (a kernel from civm kernel build or civm kernel add)',
};

const ACTION_ALIASES: Record<string, string> = {
  shell: "run",
  command: "run",
  exec: "run",
  "run-command": "run",
  upload: "copy",
  "copy-in": "copy",
  file: "write",
  link: "symlink",
  ln: "symlink",
  hostname: "set-hostname",
  enable: "enable-service",
  service: "enable-service",
  script: "provision",
  append: "append-line",
};

// ---------------------------------------------------------------- entry points

/** Reads, validates and orders every image in `file`; throws one ConfigError listing all problems. */
export async function loadImageSpecs(file: string, opts: LoadImageOptions = {}): Promise<LoadedImageSpecs> {
  return loadImageSpecsInternal(file, opts, false);
}

/** The images to build for `name`, oldest ancestor first, ending with the image itself. */
export function resolveBuildOrder(specs: LoadedImageSpecs | readonly ImageSpec[], name: string): ImageSpec[] {
  const images = Array.isArray(specs) ? (specs as readonly ImageSpec[]) : (specs as LoadedImageSpecs).images;
  const file = Array.isArray(specs) ? undefined : (specs as LoadedImageSpecs).file;
  const byName = new Map(images.map((i) => [i.name, i]));
  // lvh names its images after their files: "base.qcow2" is the image "base".
  const target = byName.get(name) ?? byName.get(lvhImageName(name));
  if (!target) {
    const names = images.map((i) => i.name);
    const where = file ? `${file}: ` : "";
    const hint = closestMatch(name, names);
    const list = names.length ? `; the images are ${names.map((n) => JSON.stringify(n)).join(", ")}` : "; there are no images";
    throw new ConfigError(`${where}no image named ${JSON.stringify(name)}${list}.${hint ? ` Did you mean ${JSON.stringify(hint)}?` : ""}`);
  }
  const chain: ImageSpec[] = [];
  const seen = new Set<string>();
  for (let cur: ImageSpec | undefined = target; cur; cur = cur.parent ? byName.get(cur.parent) : undefined) {
    if (seen.has(cur.name)) throw new ConfigError(`image ${JSON.stringify(cur.name)} is its own ancestor`);
    seen.add(cur.name);
    chain.unshift(cur);
    if (cur.parent && !byName.has(cur.parent)) {
      throw new ConfigError(`${describeImage(cur)}: its parent ${JSON.stringify(cur.parent)} is not among the loaded images.`);
    }
  }
  return chain;
}

/** `FILE: image "NAME" (#N)`, the prefix of messages about one image. */
export function describeImage(spec: ImageSpec): string {
  return `${spec.source.file}: image ${JSON.stringify(spec.name)} (#${spec.source.index + 1})`;
}

/** The built-in image spec files (images/*.yaml, *.yml, *.json at the repo root). */
export function builtinSpecFiles(dir = builtinImagesDir): string[] {
  try {
    return readdirSync(dir)
      .filter((n) => /\.(ya?ml|json)$/.test(n))
      .sort()
      .map((n) => join(dir, n));
  } catch {
    return [];
  }
}

/** Every built-in image (e.g. civm-runner), loaded from the repo's images/ folder. */
export async function loadBuiltinImageSpecs(opts: LoadImageOptions = {}): Promise<ImageSpec[]> {
  const out: ImageSpec[] = [];
  // A built-in may name another file's built-in as its parent (civm-gha on civm-runner): files
  // whose parents are not loaded yet wait for a later pass; the last failure is reported.
  let todo = builtinSpecFiles(opts.builtinDir);
  while (todo.length > 0) {
    const failed: string[] = [];
    let lastError: unknown;
    for (const f of todo) {
      try {
        const loaded = await loadImageSpecsInternal(f, { ...opts, builtins: false }, true, out);
        for (const img of loaded.images) if (!out.some((o) => o.name === img.name)) out.push(img);
      } catch (e) {
        failed.push(f);
        lastError = e;
      }
    }
    if (failed.length === todo.length) throw lastError;
    todo = failed;
  }
  return out;
}

// ---------------------------------------------------------------- loading

/** An image validated on its own; suite/mirror/size are settled once parents are known. */
interface Draft {
  spec: Omit<ImageSpec, "suite" | "mirror" | "sizeBytes" | "flatten"> & {
    suite?: string;
    mirror?: string;
    sizeBytes?: number;
    flatten?: boolean;
  };
  where: string;
  field: (f: string) => string;
}

async function loadImageSpecsInternal(file: string, opts: LoadImageOptions, builtin: boolean, builtinPool: readonly ImageSpec[] = []): Promise<LoadedImageSpecs> {
  const data = await loadStructuredFile(file);
  const baseDir = dirname(resolve(file));
  if (!Array.isArray(data)) {
    throw new ConfigError(
      `${file}: the file must contain a list of images ([{"name": "base", "packages": [...], "actions": [...]}, ...]), but it contains ${kindOf(data)}.`,
    );
  }
  const lvh = isLvhForm(data);
  const problems: string[] = [];
  const drafts: Draft[] = [];
  for (const [index, entry] of data.entries()) {
    const where = `${file}: ${entryLabel(entry, index)}`;
    let raw: unknown = entry;
    let namer = (f: string) => f;
    if (lvh) {
      const t = translateLvhImage(entry);
      if (t.problems.length > 0 || !t.image) {
        problems.push(...t.problems.map((p) => `${where}: ${p}`));
        continue;
      }
      raw = t.image;
      namer = t.fieldName;
    }
    const draft = await validateImage(raw, { file, baseDir, index, lvh, builtin, where, namer }, problems);
    if (draft) drafts.push(draft);
  }
  problems.push(...duplicateNames(data, file, lvh));

  // Parents are checked on every entry that names one, valid or not, so all problems show at once.
  const nodes = rawNodes(data, file, lvh);
  const rawNames = new Set(nodes.map((n) => n.name));
  const missing = nodes.filter((n) => n.parent !== undefined && !rawNames.has(n.parent));
  let builtins: ImageSpec[] = [...builtinPool];
  if (missing.length > 0 && opts.builtins !== false && !builtin) builtins = await loadBuiltinImageSpecs(opts);
  const builtinByName = new Map(builtins.map((b) => [b.name, b]));
  // Then among the stored images: one built earlier (from another file) is used as it is.
  const storedByName = new Map<string, ImageSpec>();
  const storeDir = builtin ? undefined : opts.stateDir;
  const unresolved = missing.filter((n) => !builtinByName.has(n.parent as string));
  const notStored: RawNode[] = [];
  const storedParents = unresolved.length > 0 && storeDir !== undefined ? await import("./stored-parent.js") : undefined;
  if (storedParents && storeDir !== undefined) {
    const { storedParentSpec } = storedParents;
    const looked = new Map<string, Awaited<ReturnType<typeof storedParentSpec>>>();
    for (const n of unresolved) {
      const parent = n.parent as string;
      if (!looked.has(parent)) looked.set(parent, await storedParentSpec(parent, storeDir));
      const r = looked.get(parent);
      if (!r) notStored.push(n);
      else if ("spec" in r) storedByName.set(parent, r.spec);
      else problems.push(`${n.where}: field "parent": ${r.problem}`);
    }
  } else notStored.push(...unresolved);
  const stored = notStored.length > 0 && storedParents && storeDir !== undefined ? await storedParents.storedImageNames(storeDir) : undefined;
  for (const n of notStored) {
    const parent = n.parent as string;
    const hint = closestMatch(parent, [...rawNames, ...builtinByName.keys(), ...(stored?.names ?? [])]);
    const builtinList = builtins.length ? `among the built-in images (${builtins.map((b) => b.name).join(", ")})` : "";
    const storedList = stored ? `among the images stored in ${stored.dir} (${stored.names.length ? stored.names.join(", ") : "none"})` : "";
    const where = [builtinList, storedList].filter((w) => w !== "");
    problems.push(
      `${n.where}: field "parent": no image named ${JSON.stringify(parent)} in ${file}${where.length === 2 ? `, ${where.join(" or ")}` : where.length === 1 ? ` or ${where[0]}` : ""}` +
        (hint
          ? `; did you mean ${JSON.stringify(hint)}?`
          : `; define it in the file${stored ? `, build it first from the file that defines it (civm image build ${parent} -f FILE)` : ""} or remove "parent" to build a root image.`),
    );
  }
  problems.push(...parentCycles(nodes, file));
  if (problems.length > 0) throw new ConfigError(problems.join("\n"));
  const local = new Map(drafts.map((d) => [d.spec.name, d]));

  // Order parents first, settle inherited fields, check parent/child constraints.
  const ordered: ImageSpec[] = [];
  const done = new Map<string, ImageSpec>();
  let defaultMirror = opts.defaultMirror;
  const mirrorFor = (): string | undefined => (defaultMirror ??= hostDebianMirror());
  // A parent from outside the file: a built-in image (with its own built-in parents), else a
  // stored one (which has none here).
  const addOutside = (name: string): ImageSpec | undefined => {
    const b = builtinByName.get(name) ?? storedByName.get(name);
    if (!b || done.has(name)) return done.get(name);
    if (b.parent) addOutside(b.parent);
    done.set(name, b);
    ordered.push(b);
    return b;
  };
  const visit = (d: Draft): void => {
    if (done.has(d.spec.name)) return;
    let parent: ImageSpec | undefined;
    if (d.spec.parent !== undefined) {
      const p = local.get(d.spec.parent);
      if (p) {
        visit(p);
        parent = done.get(p.spec.name);
      } else parent = addOutside(d.spec.parent);
      if (!parent) return; // the parent itself was invalid; its problem is reported
    }
    const spec = finish(d, parent, mirrorFor, problems);
    if (!spec) return;
    done.set(spec.name, spec);
    ordered.push(spec);
  };
  for (const d of drafts) visit(d);
  if (problems.length > 0) throw new ConfigError(problems.join("\n"));
  return { file, baseDir, images: ordered };
}

interface Ctx {
  file: string;
  baseDir: string;
  index: number;
  lvh: boolean;
  builtin: boolean;
  where: string;
  namer: (f: string) => string;
}

async function validateImage(entry: unknown, ctx: Ctx, problems: string[]): Promise<Draft | undefined> {
  const { where, namer } = ctx;
  const fieldProblem = (field: string, message: string) => problems.push(`${where}: field ${JSON.stringify(namer(field))}: ${message}`);
  if (!isObject(entry)) {
    problems.push(`${where}: must be an object with "name", "packages", "actions" and other keys, but it is ${kindOf(entry)}.`);
    return undefined;
  }
  const before = problems.length;
  const values: Partial<Record<ImageField, unknown>> = {};
  for (const [key, value] of Object.entries(entry)) {
    if (!(IMAGE_KEYS as string[]).includes(key)) {
      const hint = closestMatch(key, IMAGE_KEYS, { aliases: KEY_ALIASES });
      problems.push(
        `${where}: field ${JSON.stringify(key)}: unknown key` +
          (hint ? `; did you mean ${JSON.stringify(hint)}?` : `; the known keys are ${IMAGE_KEYS.join(", ")}.`),
      );
      continue;
    }
    const parsed = IMAGE_FIELDS[key as ImageField].safeParse(value);
    if (!parsed.success) {
      for (const issue of parsed.error.issues) fieldProblem(joinPath(key, issue.path), issueMessage(issue, value));
      continue;
    }
    values[key as ImageField] = parsed.data;
  }
  if (entry.name === undefined) problems.push(`${where}: missing field "name": add a unique "name", e.g. "base"; "civm image build NAME" picks the image by it.`);
  const actions: ImageAction[] = [];
  for (const [i, raw] of ((values.actions as unknown[] | undefined) ?? []).entries()) {
    const action = await validateAction(raw, i, ctx, fieldProblem);
    if (action) actions.push(action);
  }
  const isChild = typeof values.parent === "string";
  if (isChild) {
    for (const key of ["suite", "mirror", "kernel", "civm", "uefi", "arch"] as const) {
      if (entry[key] !== undefined) fieldProblem(key, `only root images (without "parent") take ${JSON.stringify(key)}; a child uses its parent's, so remove it`);
    }
    if (values.parent === values.name) fieldProblem("parent", `an image cannot be its own parent`);
  } else if (entry.flatten !== undefined) {
    fieldProblem("flatten", 'only applies to images with a "parent" (a root image is always standalone); remove it');
  }
  if (problems.length > before) return undefined;
  const packages = [...new Set((values.packages as string[] | undefined) ?? [])];
  const spec: Draft["spec"] = {
    name: values.name as string,
    packages,
    format: (values.format as ImageFormat | undefined) ?? "qcow2",
    actions,
    source: { file: ctx.file, baseDir: ctx.baseDir, index: ctx.index, lvh: ctx.lvh, builtin: ctx.builtin },
  };
  if (values.description !== undefined) spec.description = values.description as string;
  if (values.parent !== undefined) spec.parent = values.parent as string;
  if (values.suite !== undefined) spec.suite = values.suite as string;
  if (values.mirror !== undefined) spec.mirror = (values.mirror as string).replace(/\/+$/, "");
  if (values.size !== undefined) spec.sizeBytes = values.size as number;
  if (values.compress !== undefined) spec.compress = "zstd";
  if (values.flatten !== undefined) spec.flatten = values.flatten as boolean;
  const arch = values.arch !== undefined ? parseArch(values.arch as string) : undefined;
  if (arch && arch !== "x86_64") spec.arch = arch;
  if (!isChild) spec.kernel = (values.kernel as string | undefined) ?? (arch === "arm64" ? "linux-image-arm64" : DEFAULT_KERNEL);
  if (arch === "arm64") {
    for (const key of ["uefi", "civm", "githubRunner", "snapshot"] as const) {
      if (entry[key] !== undefined && entry[key] !== false) fieldProblem(key, `is not supported yet for arch: arm64 images (they boot by their kernel, directly); remove it or build an x86_64 image`);
    }
  }
  if (values.sudo !== undefined) spec.sudo = values.sudo as boolean;
  if (values.civm === true) spec.civm = true;
  if (values.uefi === true) spec.uefi = true;
  if (values.snapshot === true) spec.snapshot = true;
  if (values.githubRunner !== undefined) {
    const gr = values.githubRunner as { version: string; sha256: string; url?: string };
    const runner = await githubRunnerSpec(gr, ctx.baseDir, (m) => fieldProblem("githubRunner.url", m));
    if (!runner) return undefined;
    spec.githubRunner = runner;
  }
  return { spec, where, field: namer };
}

/** GitHub's release asset for an actions/runner version (Linux x64). */
export function githubRunnerReleaseUrl(version: string): string {
  return `https://github.com/actions/runner/releases/download/v${version}/actions-runner-linux-x64-${version}.tar.gz`;
}

/** A URL is downloaded; anything else (or file://) is a host path, which must exist. */
async function githubRunnerSpec(
  gr: { version: string; sha256: string; url?: string },
  baseDir: string,
  problem: (m: string) => void,
): Promise<GithubRunnerSpec | undefined> {
  const url = gr.url ?? githubRunnerReleaseUrl(gr.version);
  if (/^https?:\/\//i.test(url)) return { version: gr.version, sha256: gr.sha256, url };
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(url) && !url.startsWith("file://")) {
    problem(`${JSON.stringify(url)} is neither an http(s) URL nor a host path; give the release asset's https:// URL or the path of a downloaded .tar.gz (for hosts without internet access).`);
    return undefined;
  }
  const localPath = resolve(baseDir, url.startsWith("file://") ? decodeURIComponent(url.slice("file://".length)) : url);
  const why = await sourceProblem(localPath, baseDir, "runner archive", true);
  if (why) {
    problem(why);
    return undefined;
  }
  return { version: gr.version, sha256: gr.sha256, url, localPath };
}

function finish(d: Draft, parent: ImageSpec | undefined, mirrorFor: () => string | undefined, problems: string[]): ImageSpec | undefined {
  const s = d.spec;
  if (parent) {
    const sizeBytes = s.sizeBytes ?? parent.sizeBytes;
    if (sizeBytes < parent.sizeBytes) {
      problems.push(
        `${d.where}: field ${JSON.stringify(d.field("size"))}: ${formatSize(sizeBytes)} is smaller than its parent ${JSON.stringify(parent.name)} (${formatSize(parent.sizeBytes)}); a child's disk can only be as large or larger, so raise it or leave "size" out.`,
      );
      return undefined;
    }
    return { ...s, suite: parent.suite, mirror: parent.mirror, sizeBytes, flatten: s.flatten ?? false, ...(parent.arch ? { arch: parent.arch } : {}) };
  }
  const mirror = s.mirror ?? mirrorFor();
  if (mirror === undefined) {
    problems.push(
      `${d.where}: field "mirror": none set, and the host's apt has no Debian mirror configured (/etc/apt/sources.list, /etc/apt/sources.list.d/); set "mirror" to the Debian mirror URL to install from.`,
    );
    return undefined;
  }
  return { ...s, suite: s.suite ?? DEFAULT_SUITE, mirror, sizeBytes: s.sizeBytes ?? DEFAULT_SIZE_BYTES, flatten: false };
}

// ---------------------------------------------------------------- actions

async function validateAction(
  raw: unknown,
  i: number,
  ctx: Ctx,
  fieldProblem: (field: string, message: string) => void,
): Promise<ImageAction | undefined> {
  const at = `actions[${i}]`;
  const kinds = ACTION_KINDS.join(", ");
  if (!isObject(raw)) {
    fieldProblem(at, `must be an object with one action, e.g. {"run": "apt-get clean"}, but it is ${kindOf(raw)}; the actions are ${kinds}.`);
    return undefined;
  }
  const keys = Object.keys(raw).filter((k) => k !== "comment");
  if (raw.comment !== undefined && typeof raw.comment !== "string") fieldProblem(`${at}.comment`, "must be a string");
  const unknown = keys.filter((k) => !(ACTION_KINDS as readonly string[]).includes(k));
  for (const k of unknown) {
    const hint = closestMatch(k, ACTION_KINDS, { aliases: ACTION_ALIASES });
    fieldProblem(at, `unknown action ${JSON.stringify(k)}` + (hint ? `; did you mean ${JSON.stringify(hint)}? The actions are ${kinds}.` : `; the actions are ${kinds}.`));
  }
  if (unknown.length > 0) return undefined;
  if (keys.length === 0) {
    fieldProblem(at, `has no action; write one of ${kinds}, e.g. {"run": "apt-get clean"}`);
    return undefined;
  }
  if (keys.length > 1) {
    fieldProblem(at, `has several actions (${keys.map((k) => JSON.stringify(k)).join(", ")}); write each as its own list item, in the order they should run`);
    return undefined;
  }
  const kind = keys[0] as ActionKind;
  let value = raw[kind];
  // Shorthand: {"mkdir": "/path"}.
  if (kind === "mkdir" && typeof value === "string") value = { path: value };
  const parsed = ACTION_SCHEMAS[kind].safeParse(value);
  if (!parsed.success) {
    for (const issue of parsed.error.issues) {
      const message = issueMessage(issue, value, shapeKeys(ACTION_SCHEMAS[kind]));
      fieldProblem(joinPath(`${at}.${kind}`, issue.path), `${message} (e.g. ${ACTION_EXAMPLES[kind]})`);
    }
    return undefined;
  }
  const comment = typeof raw.comment === "string" ? { comment: raw.comment } : {};
  const v = parsed.data as never as Record<string, unknown>;
  switch (kind) {
    case "run":
      return { kind, command: parsed.data as string, ...comment };
    case "copy": {
      const src = v.src as string;
      const srcPath = resolve(ctx.baseDir, src);
      const problem = await sourceProblem(srcPath, ctx.baseDir, "file or folder");
      if (problem) {
        fieldProblem(`${at}.copy.src`, problem);
        return undefined;
      }
      return { kind, src, srcPath, dest: v.dest as string, ...(v.mode !== undefined ? { mode: v.mode as number } : {}), ...comment };
    }
    case "write":
      return { kind, path: v.path as string, content: v.content as string, ...(v.mode !== undefined ? { mode: v.mode as number } : {}), ...comment };
    case "mkdir":
      return { kind, path: v.path as string, ...(v.mode !== undefined ? { mode: v.mode as number } : {}), ...comment };
    case "symlink":
      return { kind, target: v.target as string, path: v.path as string, ...comment };
    case "append-line":
      return { kind, file: v.file as string, line: v.line as string, ...comment };
    case "set-hostname":
      return { kind, hostname: parsed.data as string, ...comment };
    case "enable-service": {
      const unit = parsed.data as string;
      const hasSuffix = UNIT_SUFFIXES.some((s) => unit.endsWith(`.${s}`));
      return { kind, unit: hasSuffix ? unit : `${unit}.service`, ...comment };
    }
    case "provision":
      return provisionAction(value, `${at}.provision`, ctx, fieldProblem, comment);
    case "install-kernel":
      return { kind, kernel: parsed.data as string, ...comment };
  }
}

/**
 * `provision` is a host script or inline shell. A string that is one word containing "/" or
 * ending in ".sh" is a script path (it must exist); anything else is inline shell. The object
 * forms {"script": PATH} and {"inline": TEXT} say it explicitly.
 */
async function provisionAction(
  value: unknown,
  at: string,
  ctx: Ctx,
  fieldProblem: (field: string, message: string) => void,
  comment: { comment?: string },
): Promise<ImageAction | undefined> {
  const example = ACTION_EXAMPLES.provision;
  let script: string | undefined;
  let inline: string | undefined;
  if (typeof value === "string") {
    if (value.trim() === "") {
      fieldProblem(at, `must not be empty (e.g. ${example})`);
      return undefined;
    }
    if (!/\s/.test(value) && (value.includes("/") || value.endsWith(".sh"))) script = value;
    else inline = value;
  } else if (isObject(value)) {
    const keys = Object.keys(value);
    if (keys.length !== 1 || (keys[0] !== "script" && keys[0] !== "inline")) {
      fieldProblem(at, `must be a script path, inline shell, {"script": PATH} or {"inline": TEXT} (e.g. ${example})`);
      return undefined;
    }
    const v = value[keys[0] as string];
    if (typeof v !== "string" || v.trim() === "") {
      fieldProblem(`${at}.${keys[0]}`, "must be a non-empty string");
      return undefined;
    }
    if (keys[0] === "script") script = v;
    else inline = v;
  } else {
    fieldProblem(at, `must be a script path or inline shell, as a string (e.g. ${example})`);
    return undefined;
  }
  if (inline !== undefined) return { kind: "provision", inline, ...comment };
  const srcPath = resolve(ctx.baseDir, script as string);
  const problem = await sourceProblem(srcPath, ctx.baseDir, "script", true);
  if (problem) {
    fieldProblem(at, `${problem} To run inline shell instead, write {"inline": "..."}.`);
    return undefined;
  }
  return { kind: "provision", script: { src: script as string, srcPath }, ...comment };
}

async function sourceProblem(path: string, baseDir: string, what: string, fileOnly = false): Promise<string | undefined> {
  const rel = `relative paths start from the spec file's folder, ${baseDir}`;
  try {
    const info = await stat(path);
    if (fileOnly && !info.isFile()) return `${path} is not a regular file; the ${what} must be a file.`;
    if (!info.isFile() && !info.isDirectory()) return `${path} is neither a file nor a folder.`;
    return undefined;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "ENOTDIR") return `the ${what} ${path} does not exist (${rel}); fix the path or create it.`;
    if (code === "EACCES") return `the ${what} ${path} cannot be read: permission denied.`;
    return `the ${what} ${path} cannot be checked: ${(e as Error).message}.`;
  }
}

// ---------------------------------------------------------------- whole-file checks

function duplicateNames(data: unknown[], file: string, lvh: boolean): string[] {
  const names = data.map((entry) => {
    const raw = isObject(entry) ? entry.name : undefined;
    return typeof raw !== "string" ? undefined : lvh ? lvhImageName(raw) : raw;
  });
  return duplicateNameProblems(file, names, "images", '"civm image build NAME" and "parent" pick an image by name');
}

interface RawNode {
  name: string;
  parent?: string;
  index: number;
  where: string;
}

/** Name and parent of every entry that has a string name (lvh names without their extension). */
function rawNodes(data: readonly unknown[], file: string, lvh: boolean): RawNode[] {
  const strip = (n: string) => (lvh ? lvhImageName(n) : n);
  const out: RawNode[] = [];
  data.forEach((entry, index) => {
    if (!isObject(entry) || typeof entry.name !== "string") return;
    const node: RawNode = { name: strip(entry.name), index, where: `${file}: ${entryLabel(entry, index)}` };
    if (typeof entry.parent === "string" && entry.parent !== "") node.parent = strip(entry.parent);
    out.push(node);
  });
  return out;
}

function parentCycles(nodes: readonly RawNode[], file: string): string[] {
  const byName = new Map<string, RawNode>();
  for (const n of nodes) if (!byName.has(n.name)) byName.set(n.name, n);
  const out: string[] = [];
  const reported = new Set<string>();
  for (const start of nodes) {
    const path: string[] = [];
    let cur: RawNode | undefined = start;
    while (cur && !path.includes(cur.name)) {
      path.push(cur.name);
      cur = cur.parent !== undefined ? byName.get(cur.parent) : undefined;
    }
    if (!cur) continue;
    const cycle = path.slice(path.indexOf(cur.name));
    if (cycle.length === 1) continue; // self-parent: reported on the image itself
    const key = [...cycle].sort().join("\0");
    if (reported.has(key)) continue;
    reported.add(key);
    const labels = cycle.map((n) => `${JSON.stringify(n)} (#${(byName.get(n) as RawNode).index + 1})`);
    const chain = [...cycle, cycle[0]].map((n) => JSON.stringify(n)).join(" -> ");
    out.push(
      `${file}: images ${labels.join(", ")}: field "parent" forms a cycle: ${chain} (each names the next as its parent); an image cannot descend from itself, so remove "parent" from one of them to make it a root image.`,
    );
  }
  return out;
}

// ---------------------------------------------------------------- helpers

function entryLabel(entry: unknown, index: number): string {
  const name = isObject(entry) ? entry.name : undefined;
  return typeof name === "string" && name !== "" ? `image ${JSON.stringify(name)} (#${index + 1})` : `image #${index + 1}`;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
