import { test } from "node:test";
import assert from "node:assert/strict";
import { formatSize, parseSize } from "../../src/config/index.js";

const K = 1024;
const M = K * K;
const G = M * K;

test("parseSize accepts the seeds' forms", () => {
  assert.equal(parseSize("4G"), 4 * G);
  assert.equal(parseSize("512M"), 512 * M);
  assert.equal(parseSize("80G"), 80 * G);
  assert.equal(parseSize("2G"), 2 * G);
});

test("parseSize: units are binary with optional iB/B suffix, any case", () => {
  for (const s of ["4G", "4g", "4GiB", "4gib", "4GB", "4gb", "4 G", " 4G "]) assert.equal(parseSize(s), 4 * G, s);
  assert.equal(parseSize("1T"), K * G);
  assert.equal(parseSize("64K"), 64 * K);
  assert.equal(parseSize("64KiB"), 64 * K);
  assert.equal(parseSize("1.5G"), 1.5 * G);
  assert.equal(parseSize("0.5K"), 512);
});

test("parseSize: a bare integer is bytes, as string, with B, or as a number", () => {
  assert.equal(parseSize("1048576"), M);
  assert.equal(parseSize("4096B"), 4096);
  assert.equal(parseSize(2 * G), 2 * G);
});

test("parseSize rejects zero, negatives, partial bytes and garbage with the accepted forms", () => {
  const cases: [string | number, RegExp][] = [
    ["0", /is zero/],
    ["0G", /is zero/],
    [0, /is zero/],
    ["-4G", /is negative/],
    [-5, /is negative/],
    ["1.1K", /not a whole number of bytes/],
    [1.5, /not a whole number of bytes/],
    ["4X", /is not a size/],
    ["G", /is not a size/],
    ["", /is not a size/],
    ["4 gigs", /is not a size/],
    ["4iB", /is not a size/],
    ["99999999T", /too large/],
  ];
  for (const [input, why] of cases) {
    assert.throws(() => parseSize(input), (e: Error) => {
      assert.match(e.message, why, String(input));
      assert.match(e.message, /K, M, G or T suffix/);
      return true;
    });
  }
});

test("parseSize error quotes the offending string", () => {
  assert.throws(
    () => parseSize("4X"),
    (e: Error) => e.message.startsWith('"4X" is not a size; write '),
  );
});

test("formatSize gives short forms that parse back", () => {
  assert.equal(formatSize(4 * G), "4G");
  assert.equal(formatSize(512 * M), "512M");
  assert.equal(formatSize(1.5 * G), "1.5G");
  assert.equal(formatSize(1000), "1000 bytes");
  assert.equal(formatSize(2 * K * G), "2T");
  assert.match(formatSize(G + 1), /^1\.00G \(1073741825 bytes\)$/);
  for (const b of [4 * G, 512 * M, 1.5 * G, 1000]) assert.equal(parseSize(formatSize(b).replace(" bytes", "")), b);
});
