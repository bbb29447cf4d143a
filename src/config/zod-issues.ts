// zod issues as civm's config messages: the field path ("caches.registry.mirrors[1].url"),
// "missing: ..." for absent fields, and "did you mean" for unknown keys. Shared by the image
// spec loader and the serve config's `caches:` section.
import type * as z from "zod";
import { closestMatch } from "./suggest.js";

export function joinPath(base: string, path: readonly PropertyKey[]): string {
  let out = base;
  for (const p of path) out += typeof p === "number" ? `[${p}]` : `.${String(p)}`;
  return out;
}

export function issueMessage(issue: z.core.$ZodIssue, value: unknown, knownKeys: readonly string[] = []): string {
  if (issue.code === "unrecognized_keys") {
    return issue.keys
      .map((k) => {
        const hint = closestMatch(k, knownKeys);
        const known = knownKeys.length ? `; the keys are ${knownKeys.map((x) => JSON.stringify(x)).join(", ")}` : "";
        return `unknown key ${JSON.stringify(k)}` + (hint ? `; did you mean ${JSON.stringify(hint)}?` : known);
      })
      .join("; ");
  }
  if (issue.code === "invalid_type" && valueAt(value, issue.path) === undefined) return `missing: ${issue.message}`;
  return issue.message;
}

export function valueAt(value: unknown, path: readonly PropertyKey[]): unknown {
  let cur = value;
  for (const p of path) {
    if (cur === null || typeof cur !== "object") return undefined;
    cur = (cur as Record<PropertyKey, unknown>)[p];
  }
  return cur;
}

/** Keys of a zod object schema, for "did you mean" on unknown keys. */
export function shapeKeys(schema: z.ZodType): string[] {
  const shape = (schema as unknown as { shape?: Record<string, unknown> }).shape;
  return shape ? Object.keys(shape) : [];
}
