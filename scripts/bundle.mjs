// Bundles the compiled CLI (dist/src) into dist/bundle/ with esbuild: one file per lazily
// loaded part instead of hundreds of modules, which halves civm's start-up time (see
// docs/benchmarks.md). bin/civm uses the bundle when it exists, dist/src otherwise.
import { build } from "esbuild";
import { rmSync } from "node:fs";

rmSync("dist/bundle", { recursive: true, force: true });
await build({
  entryPoints: ["dist/src/cli/main.js"],
  bundle: true,
  splitting: true,
  minify: true,
  sourcemap: "linked",
  platform: "node",
  target: "node20",
  format: "esm",
  outdir: "dist/bundle",
  logLevel: "warning",
  // CommonJS dependencies (yaml via createRequire, pino) need `require` in ESM output.
  banner: { js: "import { createRequire as __civmRequire } from 'node:module'; const require = __civmRequire(import.meta.url);" },
});
