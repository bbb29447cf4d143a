import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ConfigError } from "../../src/errors/index.js";
import { loadStructuredFile, parseStructuredText } from "../../src/config/index.js";
import { tempDir } from "../support/paths.js";

function syntaxError(text: string, path: string): string {
  try {
    parseStructuredText(text, path);
  } catch (e) {
    assert.ok(e instanceof ConfigError, "a ConfigError");
    return e.message;
  }
  assert.fail("expected a syntax error");
}

test("JSON and YAML load by extension", async () => {
  const dir = tempDir();
  writeFileSync(join(dir, "a.json"), '[{"name": "x"}]');
  writeFileSync(join(dir, "a.yaml"), "- name: x\n");
  writeFileSync(join(dir, "a.yml"), "- name: x\n");
  for (const f of ["a.json", "a.yaml", "a.yml"]) assert.deepEqual(await loadStructuredFile(join(dir, f)), [{ name: "x" }]);
});

test("unknown extension: JSON, then YAML", () => {
  assert.deepEqual(parseStructuredText('{"a": [1, 2]}', "conf"), { a: [1, 2] });
  assert.deepEqual(parseStructuredText("a: b\n", "conf"), { a: "b" });
});

test("a byte order mark is ignored", () => {
  assert.deepEqual(parseStructuredText('\uFEFF{"a": 1}', "x.json"), { a: 1 });
});

test("malformed JSON reports file, line and column", () => {
  assert.equal(syntaxError('[\n  {"a": 1}\n  {"b": 2}\n]', "i.json"), 'i.json:3:3: expected "," or "]" after a list element, but found "{"');
  assert.equal(syntaxError('{\n  "a": 1,\n}', "i.json"), "i.json:3:1: trailing comma before } is not allowed in JSON");
  assert.equal(syntaxError('[1,\n 2,\n ]', "i.json"), "i.json:3:2: trailing comma before ] is not allowed in JSON");
  assert.equal(syntaxError('{"a": }', "i.json"), 'i.json:1:7: expected a value, but found "}"');
  assert.equal(syntaxError('[\n  {"a": 1}', "i.json"), 'i.json:2:11: expected "," or "]" after a list element, but the file ends');
  assert.equal(syntaxError("", "i.json"), "i.json:1:1: expected a value, but the file ends");
  assert.equal(syntaxError('{"a": "x', "i.json"), "i.json:1:7: unterminated string");
  assert.equal(syntaxError("{'a': 1}", "i.json"), 'i.json:1:2: expected a "quoted" key, but found "\'"');
  assert.equal(syntaxError("[1] x", "i.json"), "i.json:1:5: unexpected text after the end of the JSON value");
  assert.equal(syntaxError("// hi\n[]", "i.json"), "i.json:1:1: comments are not allowed in JSON (use a .yaml file for comments)");
});

test("malformed JSON messages do not echo string contents", () => {
  const msg = syntaxError('{"token": "s3cr3t-value" "x": 1}', "i.json");
  assert.equal(msg, 'i.json:1:26: expected "," or "}" after a value in an object, but found "\\""');
  assert.ok(!msg.includes("s3cr3t"));
});

test("malformed YAML reports file, line and column without a snippet", () => {
  const msg = syntaxError("- name: a\n  image: x\n  config: {a: b: c}\n", "i.yaml");
  assert.equal(msg, "i.yaml:3:15: Block collections are not allowed within flow collections");
  assert.ok(!msg.includes("\n"), "one line, no code snippet");
  assert.equal(syntaxError("- name: a\n  name: b\n", "i.yaml"), "i.yaml:2:3: Map keys must be unique");
  const tabbed = syntaxError("- name: a\n\timage: s3cr3t-value\n", "i.yaml");
  assert.equal(tabbed, "i.yaml:2:2: Unexpected scalar at node end");
});

test("unknown extension: JSON-looking text broken for both parsers reports the JSON error", () => {
  assert.equal(syntaxError('[\n  {"a": 1\n', "instances"), 'instances:3:1: expected "," or "}" after a value in an object, but the file ends');
  assert.match(syntaxError("a: [1\n", "instances"), /^instances:\d+:\d+: /);
});

test("unreadable files name the file and the OS reason", async () => {
  const dir = tempDir();
  await assert.rejects(loadStructuredFile(join(dir, "nope.json")), (e: Error) => {
    assert.ok(e instanceof ConfigError);
    assert.equal(e.message, `${join(dir, "nope.json")}: cannot read the file: no such file or directory`);
    return true;
  });
  mkdirSync(join(dir, "d.json"));
  await assert.rejects(loadStructuredFile(join(dir, "d.json")), /d\.json: cannot read the file: it is a directory, not a file$/);
});

test("YAML merge keys: an entry built on another (<<: *anchor), its own fields winning", () => {
  const text = "- &base\n  name: a\n  size: 4G\n  packages: [x]\n- <<: *base\n  name: b\n  arch: arm64\n";
  assert.deepEqual(parseStructuredText(text, "images.yaml"), [
    { name: "a", size: "4G", packages: ["x"] },
    { name: "b", size: "4G", packages: ["x"], arch: "arm64" },
  ]);
});
