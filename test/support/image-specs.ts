// Helpers of the image spec tests (test/unit/images-*.test.ts).
import assert from "node:assert/strict";
import { ConfigError } from "../../src/errors/index.js";
import { loadImageSpecs, type LoadImageOptions } from "../../src/images/spec.js";
import type { ImageSpec } from "../../src/images/types.js";

/** The message of the ConfigError (exit code 2) that loading `file` must end with. */
export async function specLoadError(file: string, opts: LoadImageOptions): Promise<string> {
  try {
    await loadImageSpecs(file, opts);
  } catch (e) {
    assert.ok(e instanceof ConfigError, `a ConfigError, got ${String(e)}`);
    assert.equal(e.exitCode, 2);
    return e.message;
  }
  assert.fail("expected loadImageSpecs to fail");
}

/** The image named `name` among `images` (an assertion when it is not there). */
export function imageByName(images: readonly ImageSpec[], name: string): ImageSpec {
  const found = images.find((i) => i.name === name);
  assert.ok(found, `image ${name}`);
  return found;
}
