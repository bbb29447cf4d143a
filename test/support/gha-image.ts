// The built-in image civm-gha with the fake actions runner (test/support/fake-runner.ts) in
// place of GitHub's release: images/civm-gha.yaml as it is, except that githubRunner names
// the fake archive, served with its sha256 from a local HTTP server. Built once for the whole
// suite into its own store (<testCacheDir>/store-gha; its civm-runner parent is built there
// too) under a lock, like runner-image.ts does for civm-runner; cached by key across runs
// (the fake archive's bytes never change).
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { parse } from "yaml";
import { civmBin, repoRoot, testCacheDir } from "./paths.js";
import { makeFakeRunnerArchive, type FakeRunnerArchive } from "./fake-runner.js";
import { acquireLock, runNode } from "./runner-image.js";
import { civmEnv, type CivmEnv } from "./civm-cli.js";

export const ghaStoreDir = join(testCacheDir, "store-gha");
export const GHA_IMAGE = "civm-gha";
const lockDir = join(testCacheDir, "store-gha.lock");
const fixtureDir = join(testCacheDir, "gha-fixture");

export interface ArchiveServer {
  url: string;
  /** GET requests for the archive so far. */
  requests(): number;
  close(): Promise<void>;
}

/** Serves `file` at /NAME on 127.0.0.1 and counts the requests. */
export async function serveArchive(file: string, name: string): Promise<ArchiveServer> {
  let n = 0;
  const data = readFileSync(file);
  const srv: Server = createServer((req, res) => {
    if (req.url !== `/${name}`) return res.writeHead(404).end();
    n++;
    res.writeHead(200, { "content-type": "application/gzip", "content-length": data.length }).end(data);
  });
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${(srv.address() as AddressInfo).port}/${name}`,
    requests: () => n,
    close: () => new Promise<void>((r) => { srv.closeAllConnections(); srv.close(() => r()); }),
  };
}

/** images/civm-gha.yaml with githubRunner replaced, written as JSON to `file`. */
export function writeGhaSpec(file: string, runner: { version: string; sha256: string; url: string }, name = GHA_IMAGE): void {
  const specs = parse(readFileSync(join(repoRoot, "images", "civm-gha.yaml"), "utf8")) as Record<string, unknown>[];
  const gha = specs.find((s) => s.name === GHA_IMAGE);
  if (!gha) throw new Error("images/civm-gha.yaml has no civm-gha");
  writeFileSync(file, JSON.stringify([{ ...gha, name, githubRunner: runner }], null, 2));
}

export interface GhaImage {
  stateDir: string;
  diskPath: string;
  cached: boolean;
  seconds: number;
  archive: FakeRunnerArchive;
  /** Downloads of the archive this build made (0 when the image or the download cache had it). */
  downloads: number;
  specFile: string;
  output: string;
}

let pending: Promise<GhaImage> | undefined;

export function ensureGhaImage(): Promise<GhaImage> {
  pending ??= build().catch((e: unknown) => {
    pending = undefined;
    throw e;
  });
  return pending;
}

async function build(): Promise<GhaImage> {
  mkdirSync(ghaStoreDir, { recursive: true });
  mkdirSync(fixtureDir, { recursive: true, mode: 0o755 });
  const release = await acquireLock(lockDir, GHA_IMAGE);
  const archive = makeFakeRunnerArchive(fixtureDir);
  const server = await serveArchive(archive.path, "actions-runner-linux-x64.tar.gz");
  try {
    const specFile = join(fixtureDir, "images.json");
    writeGhaSpec(specFile, { version: archive.version, sha256: archive.sha256, url: server.url });
    const started = Date.now();
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      CIVM_STATE_DIR: ghaStoreDir,
      CIVM_LOGS_DIR: join(ghaStoreDir, "logs"),
      CIVM_ACCEL: process.env.CIVM_ACCEL ?? "tcg",
    };
    const r = await runNode([civmBin, "image", "build", GHA_IMAGE, "-f", specFile, "--json"], env);
    const seconds = (Date.now() - started) / 1000;
    if (r.code !== 0) throw new Error(`civm image build ${GHA_IMAGE} failed (exit ${r.code}) in ${ghaStoreDir}:\n${r.stderr.slice(-6000)}\n${r.stdout.slice(-6000)}`);
    const result = r.stdout
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { type: string; image?: string; status?: string; disk?: string })
      .filter((o) => o.type === "result" && o.image === GHA_IMAGE)
      .at(-1);
    if (!result?.disk || !existsSync(result.disk)) throw new Error(`civm image build ${GHA_IMAGE} printed no result with an existing disk:\n${r.stdout}\n${r.stderr}`);
    return { stateDir: ghaStoreDir, diskPath: result.disk, cached: result.status === "cached", seconds, archive, downloads: server.requests(), specFile, output: r.stdout + r.stderr };
  } finally {
    await server.close();
    release();
  }
}

/** civmEnv() with the gha store as CIVM_STATE_DIR (own temp root and logs dir). */
export function ghaEnv(extra: NodeJS.ProcessEnv = {}): CivmEnv {
  const e = civmEnv(extra);
  mkdirSync(e.logsDir, { recursive: true });
  return { ...e, stateDir: ghaStoreDir, env: { ...e.env, CIVM_STATE_DIR: ghaStoreDir } };
}
