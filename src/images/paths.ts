// Where the image builder finds things shipped with civm: the repo (or package) root,
// the built-in image specs (images/*.yaml) and the guest agent (guest/).
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import { existsSync, readFileSync } from "node:fs";

/**
 * Repo (or installed package) root: the nearest folder above this file whose package.json
 * is civm's. Found by walking up because this code runs from dist/src/images/ (tsc) or
 * from a chunk in dist/bundle/ (esbuild).
 */
function findRoot(from: string): string {
  for (let dir = from; ; dir = dirname(dir)) {
    const pkg = join(dir, "package.json");
    if (existsSync(pkg)) {
      try {
        if ((JSON.parse(readFileSync(pkg, "utf8")) as { name?: string }).name === "civm") return dir;
      } catch {
        /* not ours */
      }
    }
    if (dirname(dir) === dir) throw new Error(`civm: cannot find civm's package root above ${from}`);
  }
}

export const repoRoot = findRoot(dirname(fileURLToPath(import.meta.url)));

/** Folder of the built-in image specs (civm-runner.yaml). */
export const builtinImagesDir = join(repoRoot, "images");

/** guest/VERSION: the guest agent's version, part of every image's cache key. */
export const guestVersionFile = join(repoRoot, "guest", "VERSION");
