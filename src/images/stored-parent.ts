// A spec's parent that is only a stored image. `parent: base` where the spec file does not
// define "base" and no built-in image is named so: the image stored in the state dir stands
// in as the parent. Its key (manifest.json's `key`) goes into the child's key like a parent's
// key always does, and what a child inherits from its parent comes from the manifest:
//   suite, mirror   manifest `suite`, `mirror` (recorded by builds since they were added;
//                   an older manifest gets them when its image is built again and found up
//                   to date: civm image build NAME -f FILE)
//   size            the disk's virtual size (manifest `virtualSize`), rounded up to a MiB
//   arch            manifest `arch` (absent: x86_64)
// The builder uses the stored disk as it is (ImageSpec.stored): nothing in this spec file
// describes how to build it, so it is never rebuilt from here.
import { join } from "node:path";
import { parseArch } from "../vm/arch.js";
import { ImageStore } from "./store.js";
import type { ImageSpec } from "./types.js";

const MiB = 1024 ** 2;

/** The stored image as a parent, or why it cannot be one. */
export type StoredParent = { spec: ImageSpec } | { problem: string };

/**
 * The stored image `name` in `stateDir` as a parent spec; `problem` (a sentence that follows
 * `field "parent": `) when it is stored but cannot be a parent; undefined when no image of
 * that name is stored.
 */
export async function storedParentSpec(name: string, stateDir: string): Promise<StoredParent | undefined> {
  const store = new ImageStore(stateDir);
  const found = await store.examine(name);
  if (!found) return undefined;
  const q = JSON.stringify(name);
  const fix = `build the parent first with \`civm image build ${name} -f FILE\` (FILE: the spec file it is defined in), then this image again`;
  if ("damaged" in found) return { problem: `the stored image ${q} cannot be a parent: ${found.damaged}; ${fix}.` };
  const m = found.image.manifest;
  const manifestPath = join(found.image.dir, "manifest.json");
  if (m.source !== "build") {
    return {
      problem: `the stored image ${q} was ${m.source === "pull" ? "pulled (civm image pull)" : `made by ${JSON.stringify(m.source)}`}, not built by civm: a child is built by booting its parent's kernel and civm's guest agent, and its key builds on the parent's build key; ${fix}.`,
    };
  }
  if (!found.image.kernelPath || !found.image.initrdPath) {
    return { problem: `the stored image ${q} has no kernel and initrd beside its disk (${manifestPath} names none); a child is built by booting its parent's kernel; ${fix}.` };
  }
  const lacking = (["suite", "mirror"] as const).filter((f) => typeof m[f] !== "string" || m[f] === "");
  if (lacking.length > 0) {
    return {
      problem:
        `the stored image ${q} cannot be a parent yet: its manifest ${manifestPath} does not record ${lacking.map((f) => JSON.stringify(f)).join(" and ")} ` +
        `(it was built by an older civm), which a child inherits; ${fix} (an image that is up to date is not rebuilt: its manifest gets the missing fields).`,
    };
  }
  const arch = m.arch === undefined ? "x86_64" : parseArch(m.arch);
  if (arch === undefined) return { problem: `the stored image ${q} cannot be a parent: ${manifestPath} names the architecture ${JSON.stringify(m.arch)}, which civm does not know; ${fix}.` };
  const spec: ImageSpec = {
    name,
    suite: m.suite as string,
    mirror: m.mirror as string,
    packages: [],
    sizeBytes: Math.ceil(m.virtualSize / MiB) * MiB,
    format: m.format,
    flatten: false,
    actions: [],
    ...(arch !== "x86_64" ? { arch } : {}),
    stored: { key: m.key, manifest: manifestPath },
    source: { file: manifestPath, baseDir: found.image.dir, index: 0, lvh: false, builtin: false },
  };
  return { spec };
}

/** Names of the stored images in `stateDir` (for messages). */
export async function storedImageNames(stateDir: string): Promise<{ dir: string; names: string[] }> {
  const store = new ImageStore(stateDir);
  return { dir: store.dir, names: (await store.list()).map((i) => i.name) };
}
