// Bundles the compiled CLI (dist/src) into dist/bundle/ with esbuild: one file per lazily
// loaded part instead of hundreds of modules, which halves civm's start-up time (see
// docs/benchmarks.md). bin/civm uses the bundle when it exists, dist/src otherwise.
//
// A rebuild must not break a civm that is running from this bundle (a long `civm serve` or
// image build imports its parts lazily): chunk names carry a content hash, so the previous
// build's chunks are left in place for a day and each file is replaced by a rename, never
// rewritten where a starting civm could read half of it.
import { build } from "esbuild";
import { mkdirSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";

const outdir = "dist/bundle";
const KEEP_STALE_MS = 24 * 3600_000;
const result = await build({
  entryPoints: ["dist/src/cli/main.js"],
  bundle: true,
  splitting: true,
  minify: true,
  sourcemap: "linked",
  platform: "node",
  target: "node20",
  format: "esm",
  outdir,
  write: false,
  logLevel: "warning",
  // CommonJS dependencies (yaml via createRequire, pino) need `require` in ESM output.
  banner: { js: "import { createRequire as __civmRequire } from 'node:module'; const require = __civmRequire(import.meta.url);" },
});
mkdirSync(outdir, { recursive: true });
const fresh = new Set();
for (const f of result.outputFiles) {
  const tmp = `${f.path}.${process.pid}.tmp`;
  writeFileSync(tmp, f.contents);
  renameSync(tmp, f.path);
  fresh.add(basename(f.path));
}
// What this build made, for civm-release.ts: an image with civm in it takes these, not the
// previous builds' chunks that linger beside them.
const list = join(outdir, "files.json");
writeFileSync(`${list}.${process.pid}.tmp`, JSON.stringify([...fresh].sort(), null, 1) + "\n");
renameSync(`${list}.${process.pid}.tmp`, list);
fresh.add("files.json");
const now = Date.now();
for (const name of readdirSync(outdir)) {
  if (fresh.has(name)) continue;
  const p = join(outdir, name);
  if (now - statSync(p).mtimeMs > KEEP_STALE_MS) rmSync(p, { recursive: true, force: true });
}
