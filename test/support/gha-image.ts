// The built-in image civm-gha with the fake actions runner (test/support/fake-runner.ts) in
// place of GitHub's release: images/civm-gha.yaml as it is, except that githubRunner names
// the fake archive, served with its sha256 from a local HTTP server. Built once for the whole
// suite into its own store (<testCacheDir>/store-gha; its civm-runner parent is built there
// too) under a lock, like runner-image.ts does for civm-runner; cached by key across runs
// (the fake archive's bytes never change).
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { parse } from "yaml";
import { repoRoot, testCacheDir } from "./paths.js";
import { makeFakeRunnerArchive, type FakeRunnerArchive } from "./fake-runner.js";
import { oncePerProcess, runImageBuild, withLock, type StoredBuild } from "./stored-build.js";
import { storeEnv, type CivmEnv } from "./civm-cli.js";

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

export interface GhaImage extends StoredBuild {
  archive: FakeRunnerArchive;
  /** Downloads of the archive this build made (0 when the image or the download cache had it). */
  downloads: number;
  specFile: string;
}

export const ensureGhaImage: () => Promise<GhaImage> = oncePerProcess(build);

async function build(): Promise<GhaImage> {
  mkdirSync(ghaStoreDir, { recursive: true });
  mkdirSync(fixtureDir, { recursive: true, mode: 0o755 });
  // The archive and its server are made under the lock too: another process may be writing them.
  return withLock(lockDir, GHA_IMAGE, async () => {
    const archive = makeFakeRunnerArchive(fixtureDir);
    const server = await serveArchive(archive.path, "actions-runner-linux-x64.tar.gz");
    try {
      const specFile = join(fixtureDir, "images.json");
      writeGhaSpec(specFile, { version: archive.version, sha256: archive.sha256, url: server.url });
      const b = await runImageBuild({ image: GHA_IMAGE, storeDir: ghaStoreDir, specFile });
      return { ...b, archive, downloads: server.requests(), specFile };
    } finally {
      await server.close();
    }
  });
}

/** civmEnv() with the gha store as CIVM_STATE_DIR (own temp root and logs dir). */
export function ghaEnv(extra: NodeJS.ProcessEnv = {}): CivmEnv {
  return storeEnv(ghaStoreDir, extra);
}
