// civm image pull against a local HTTP server (127.0.0.1) serving a small qcow2 (written
// with qemu-io so it holds data), its .zst and .sha256: good images verify and are stored,
// tampered or wrong ones are rejected and leave nothing in the store.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { ConfigError, ExternalError } from "../../src/errors/index.js";
import { ImageStore } from "../../src/images/store.js";
import { describePullUrl, parseSha256File, pullImage, type PullProgress } from "../../src/images/pull.js";
import { tempDir } from "../support/paths.js";

const MiB = 1024 * 1024;

interface Route {
  status?: number;
  body?: Buffer | string;
  headers?: Record<string, string>;
  /** Write the body in this many pieces, waiting delayMs between them. */
  pieces?: number;
  delayMs?: number;
  /** Send headers, then nothing. */
  hang?: boolean;
}

const routes = new Map<string, Route>();
const requested: string[] = [];
let server: Server;
let base: string;

let qcow: Buffer;
let qcowSha: string;
let zst: Buffer;
let otherQcow: Buffer;
let otherSha: string;
let overlay: Buffer;

function sha(b: Buffer): string {
  return createHash("sha256").update(b).digest("hex");
}

function handle(req: IncomingMessage, res: ServerResponse): void {
  const path = new URL(req.url ?? "/", "http://x").pathname;
  requested.push(path);
  const r = routes.get(path);
  if (!r) {
    res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
    return;
  }
  const body = r.body === undefined ? Buffer.alloc(0) : Buffer.from(r.body);
  res.writeHead(r.status ?? 200, { "content-length": String(body.length), ...r.headers });
  if (r.hang) {
    res.write(body.subarray(0, 10));
    return;
  }
  const pieces = r.pieces ?? 1;
  if (pieces === 1) {
    res.end(body);
    return;
  }
  const size = Math.ceil(body.length / pieces);
  let i = 0;
  const next = (): void => {
    if (res.destroyed) return;
    const chunk = body.subarray(i * size, (i + 1) * size);
    i++;
    if (i >= pieces) res.end(chunk);
    else {
      res.write(chunk);
      setTimeout(next, r.delayMs ?? 0);
    }
  };
  next();
}

function serve(path: string, body: Buffer | string, extra: Partial<Route> = {}): void {
  routes.set(path, { body, ...extra });
}

before(async () => {
  const work = tempDir("civm-pull-src-");
  const make = (name: string, pattern: string): Buffer => {
    const f = join(work, name);
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", f, "16M"]);
    execFileSync("qemu-io", ["-f", "qcow2", "-c", `write -P ${pattern} 0 1M`, "-c", `write -P ${pattern} 8M 64k`, f], { stdio: "ignore" });
    return readFileSync(f);
  };
  qcow = make("tiny.qcow2", "0xab");
  qcowSha = sha(qcow);
  execFileSync("zstd", ["-q", "-k", join(work, "tiny.qcow2"), "-o", join(work, "tiny.qcow2.zst")]);
  zst = readFileSync(join(work, "tiny.qcow2.zst"));
  assert.notEqual(sha(zst), qcowSha);
  otherQcow = make("other.qcow2", "0x5a");
  otherSha = sha(otherQcow);
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "/etc/hostname", join(work, "overlay.qcow2"), "16M"]);
  overlay = readFileSync(join(work, "overlay.qcow2"));

  server = createServer(handle);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;

  serve("/tiny.qcow2", qcow);
  serve("/tiny.qcow2.zst", zst);
  serve("/tiny.qcow2.sha256", `${qcowSha}  tiny.qcow2\n`);
  // Tampered: the checksum file does not match what is served.
  serve("/bad/tiny.qcow2", qcow);
  serve("/bad/tiny.qcow2.zst", zst);
  serve("/bad/tiny.qcow2.sha256", `${otherSha}\n`);
  // Redirects for both files.
  routes.set("/moved/tiny.qcow2", { status: 302, headers: { location: "/tiny.qcow2" } });
  routes.set("/moved/tiny.qcow2.sha256", { status: 301, headers: { location: "/tiny.qcow2.sha256" } });
  serve("/other.qcow2", otherQcow);
  serve("/other.qcow2.sha256", otherSha);
  // Not a qcow2, with a correct checksum.
  const raw = Buffer.alloc(MiB, 7);
  serve("/raw.qcow2", raw);
  serve("/raw.qcow2.sha256", sha(raw));
  // An overlay on a host file.
  serve("/overlay.qcow2", overlay);
  serve("/overlay.qcow2.sha256", sha(overlay));
  // Corrupt zstd stream (a frame in the middle flipped), checksum of the real image.
  const broken = Buffer.from(zst);
  for (let i = 64; i < Math.min(broken.length, 4096); i++) broken[i] = broken[i]! ^ 0xff;
  serve("/broken/tiny.qcow2.zst", broken);
  serve("/broken/tiny.qcow2.sha256", qcowSha);
  // Only the checksum.
  serve("/missing/tiny.qcow2.sha256", qcowSha);
  // Trickled in 6 pieces over ~1.5 s.
  serve("/slow/tiny.qcow2", qcow, { pieces: 6, delayMs: 300 });
  serve("/slow/tiny.qcow2.sha256", qcowSha);
  // Headers, 10 bytes, then silence.
  serve("/hang/tiny.qcow2", qcow, { hang: true });
  serve("/hang/tiny.qcow2.sha256", qcowSha);
  serve("/junk/tiny.qcow2.sha256", "<html>oops</html>\n");
});

after(() => {
  server.closeAllConnections();
  server.close();
});

function newStore(): ImageStore {
  return new ImageStore(join(tempDir("civm-pull-"), "state"));
}

function leftovers(store: ImageStore): string[] {
  return existsSync(store.dir) ? readdirSync(store.dir) : [];
}

test("a .qcow2 with a matching .sha256 is verified and stored under the file's name", async () => {
  const store = newStore();
  const lines: string[] = [];
  const img = await pullImage({ url: `${base}/tiny.qcow2`, store, log: (l) => lines.push(l) });
  assert.equal(img.name, "tiny");
  assert.equal(img.diskPath, join(store.dir, "tiny", "disk.qcow2"));
  assert.equal(sha(readFileSync(img.diskPath)), qcowSha, "stored bytes are the served bytes");
  const m = img.manifest;
  assert.equal(m.source, "pull");
  assert.equal(m.url, `${base}/tiny.qcow2`);
  assert.equal(m.sha256, qcowSha);
  assert.equal(m.key, `sha256:${qcowSha}`);
  assert.equal(m.format, "qcow2");
  assert.equal(m.virtualSize, 16 * MiB);
  assert.equal(m.diskBytes, qcow.length);
  assert.deepEqual(m.packages, {});
  assert.deepEqual(await store.get("tiny"), img);
  assert.deepEqual(leftovers(store), ["tiny"]);
  assert.ok(lines.some((l) => l.includes("sha256 verified")), lines.join("\n"));
});

test("a .qcow2.zst is decompressed on the fly and checked against <url without .zst>.sha256", async () => {
  const store = newStore();
  requested.length = 0;
  const img = await pullImage({ url: `${base}/tiny.qcow2.zst`, name: "tiny-z", store, log: () => {} });
  assert.equal(img.name, "tiny-z");
  assert.equal(sha(readFileSync(img.diskPath)), qcowSha, "the uncompressed image is stored");
  assert.equal(img.manifest.sha256, qcowSha);
  assert.equal(img.manifest.diskBytes, qcow.length);
  assert.deepEqual(requested, ["/tiny.qcow2.sha256", "/tiny.qcow2.zst"]);
  assert.deepEqual(leftovers(store), ["tiny-z"]);
});

test("redirects are followed for the image and its checksum", async () => {
  const store = newStore();
  const img = await pullImage({ url: `${base}/moved/tiny.qcow2`, store, log: () => {} });
  assert.equal(img.manifest.sha256, qcowSha);
});

for (const file of ["tiny.qcow2", "tiny.qcow2.zst"]) {
  test(`a tampered ${file} (checksum mismatch) is rejected with both digests and nothing is stored`, async () => {
    const store = newStore();
    const url = `${base}/bad/${file}`;
    await assert.rejects(pullImage({ url, store, log: () => {} }), (e: unknown) => {
      assert.ok(e instanceof ExternalError, String(e));
      assert.equal(
        (e as Error).message,
        `checksum mismatch for ${url}: expected ${otherSha}, got ${qcowSha}; the download was deleted`,
      );
      return true;
    });
    assert.deepEqual(leftovers(store), [], "no image and no .tmp- folder");
    assert.equal(await store.get("tiny"), undefined);
  });
}

test("a tampered pull does not replace an image already stored under that name", async () => {
  const store = newStore();
  await pullImage({ url: `${base}/tiny.qcow2`, store, log: () => {} });
  await assert.rejects(pullImage({ url: `${base}/bad/tiny.qcow2`, store, log: () => {} }), ExternalError);
  assert.equal((await store.get("tiny"))?.manifest.sha256, qcowSha);
  assert.deepEqual(leftovers(store), ["tiny"]);
  // A good pull under the same name replaces it.
  const other = await pullImage({ url: `${base}/other.qcow2`, name: "tiny", store, log: () => {} });
  assert.equal(other.manifest.sha256, otherSha);
  assert.equal(sha(readFileSync((await store.require("tiny")).diskPath)), otherSha);
  assert.deepEqual(leftovers(store), ["tiny"]);
});

test("a 404 names the URL and the status, for the image and for its checksum", async () => {
  const store = newStore();
  await assert.rejects(pullImage({ url: `${base}/missing/tiny.qcow2`, store, log: () => {} }), (e: unknown) => {
    assert.ok(e instanceof ExternalError);
    assert.equal((e as Error).message, `GET ${base}/missing/tiny.qcow2 failed: HTTP 404 Not Found`);
    return true;
  });
  await assert.rejects(pullImage({ url: `${base}/nowhere/tiny.qcow2.zst`, store, log: () => {} }), (e: unknown) => {
    assert.ok(e instanceof ExternalError);
    assert.equal((e as Error).message, `GET ${base}/nowhere/tiny.qcow2.sha256 failed: HTTP 404 Not Found`);
    return true;
  });
  assert.deepEqual(leftovers(store), []);
});

test("a file that is not a qcow2, or is an overlay on another file, is refused and deleted", async () => {
  const store = newStore();
  await assert.rejects(pullImage({ url: `${base}/raw.qcow2`, store, log: () => {} }), (e: unknown) => {
    assert.ok(e instanceof ConfigError, String(e));
    assert.match((e as Error).message, /is not a qcow2 image \(qemu-img sees raw\); the download was deleted/);
    return true;
  });
  await assert.rejects(pullImage({ url: `${base}/overlay.qcow2`, store, log: () => {} }), (e: unknown) => {
    assert.ok(e instanceof ConfigError, String(e));
    assert.match((e as Error).message, /backing file \/etc\/hostname/);
    return true;
  });
  assert.deepEqual(leftovers(store), []);
});

test("a corrupt .zst stream is a clear error and leaves nothing", async () => {
  const store = newStore();
  await assert.rejects(pullImage({ url: `${base}/broken/tiny.qcow2.zst`, store, log: () => {} }), (e: unknown) => {
    assert.ok(e instanceof ExternalError, String(e));
    assert.match((e as Error).message, /broken\/tiny\.qcow2\.zst is not valid zstd data/);
    return true;
  });
  assert.deepEqual(leftovers(store), []);
});

test("a checksum file without a digest, and URLs that are not .qcow2, are refused before downloading", async () => {
  const store = newStore();
  requested.length = 0;
  await assert.rejects(pullImage({ url: `${base}/junk/tiny.qcow2`, store, log: () => {} }), /tiny\.qcow2\.sha256 does not hold a sha256 digest/);
  assert.deepEqual(requested, ["/junk/tiny.qcow2.sha256"]);
  await assert.rejects(pullImage({ url: `${base}/tiny.img`, store, log: () => {} }), ConfigError);
  await assert.rejects(pullImage({ url: "ftp://example.invalid/a.qcow2", store, log: () => {} }), ConfigError);
  await assert.rejects(pullImage({ url: `${base}/Tiny.qcow2`, store, log: () => {} }), /pass --name/);
  assert.deepEqual(leftovers(store), []);
});

test("progress is reported at most every 500 ms with the total from Content-Length", async () => {
  const store = newStore();
  const ticks: (PullProgress & { at: number })[] = [];
  const img = await pullImage({ url: `${base}/slow/tiny.qcow2`, store, log: () => {}, onProgress: (p) => ticks.push({ ...p, at: Date.now() }) });
  assert.equal(img.manifest.sha256, qcowSha);
  assert.ok(ticks.length >= 1 && ticks.length <= 3, `ticks: ${ticks.length}`);
  for (let i = 0; i < ticks.length; i++) {
    const t = ticks[i]!;
    assert.equal(t.total, qcow.length);
    assert.ok(t.bytes > 0 && t.bytes <= qcow.length);
    assert.ok(t.bytesPerSecond > 0);
    assert.ok(t.elapsedMs >= 500);
    if (i > 0) {
      assert.ok(t.at - ticks[i - 1]!.at >= 490, "at most every 500 ms");
      assert.ok(t.bytes > ticks[i - 1]!.bytes);
    }
  }
});

test("a stalled download is abandoned and leaves nothing", async () => {
  const store = newStore();
  await assert.rejects(pullImage({ url: `${base}/hang/tiny.qcow2`, store, log: () => {}, stallMs: 300 }), (e: unknown) => {
    assert.ok(e instanceof ExternalError, String(e));
    assert.match((e as Error).message, /stalled: no data/);
    return true;
  });
  assert.deepEqual(leftovers(store), []);
});

test("parseSha256File and describePullUrl", () => {
  const d = "A".repeat(64);
  assert.equal(parseSha256File(`${d}\n`, "x.qcow2", "u"), "a".repeat(64));
  assert.equal(parseSha256File(`${d} *x.qcow2`, "x.qcow2", "u"), "a".repeat(64));
  assert.equal(parseSha256File(`${"b".repeat(64)}  y.qcow2\n${"c".repeat(64)}  dir/x.qcow2\n`, "x.qcow2", "u"), "c".repeat(64));
  assert.throws(() => parseSha256File("abc\n", "x.qcow2", "u"), ExternalError);
  assert.throws(() => parseSha256File("", "x.qcow2", "u"), ExternalError);
  const t = describePullUrl("https://ci.example/images/ubuntu-22.04.qcow2.zst?sig=1");
  assert.equal(t.compressed, true);
  assert.equal(t.defaultName, "ubuntu-22.04");
  assert.equal(t.sha256Url.href, "https://ci.example/images/ubuntu-22.04.qcow2.sha256?sig=1");
});
