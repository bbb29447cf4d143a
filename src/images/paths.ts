// Where the image builder finds things shipped with civm: the repo (or package) root,
// the built-in image specs (images/*.yaml) and the guest agent (guest/).
import { fileURLToPath } from "node:url";
import { dirname, join, resolve } from "node:path";

/** Repo root: this file compiles to dist/src/images/, three levels below it. */
export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

/** Folder of the built-in image specs (civm-runner.yaml). */
export const builtinImagesDir = join(repoRoot, "images");

/** guest/VERSION: the guest agent's version, part of every image's cache key. */
export const guestVersionFile = join(repoRoot, "guest", "VERSION");
