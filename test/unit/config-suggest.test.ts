import { test } from "node:test";
import assert from "node:assert/strict";
import { closestMatch, didYouMean, editDistance, INSTANCE_KEYS } from "../../src/config/index.js";

test("editDistance counts a transposition as one edit", () => {
  assert.equal(editDistance("ram", "ram"), 0);
  assert.equal(editDistance("cpu-core", "cpu-cores"), 1);
  assert.equal(editDistance("rma", "ram"), 1);
  assert.equal(editDistance("", "abc"), 3);
  assert.equal(editDistance("kitten", "sitting"), 3);
});

test("closestMatch finds the intended instance key", () => {
  assert.equal(closestMatch("cpu-core", INSTANCE_KEYS), "cpu-cores");
  assert.equal(closestMatch("timeout", INSTANCE_KEYS), "timeout-seconds");
  assert.equal(closestMatch("sshport", INSTANCE_KEYS), "ssh-port");
  assert.equal(closestMatch("SSH_PORT", INSTANCE_KEYS), "ssh-port");
  assert.equal(closestMatch("imgae", INSTANCE_KEYS), "image");
  assert.equal(closestMatch("rootdisk", INSTANCE_KEYS), "root-disk");
});

test("closestMatch uses aliases and gives up on unrelated words", () => {
  assert.equal(closestMatch("memory", INSTANCE_KEYS, { aliases: { memory: "ram" } }), "ram");
  assert.equal(closestMatch("memory", INSTANCE_KEYS), undefined);
  assert.equal(closestMatch("zzz", INSTANCE_KEYS), undefined);
  assert.equal(closestMatch("", INSTANCE_KEYS), undefined);
});

test("didYouMean formats a suffix or nothing", () => {
  assert.equal(didYouMean("vm1", ["vm-1", "vm-2"]), '; did you mean "vm-1"?');
  assert.equal(didYouMean("qqqqqq", ["vm-1"]), "");
});
