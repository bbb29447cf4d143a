// Describing a value in messages without showing it (config values may be secrets).

/** What kind of value this is, in words, without showing it. */
export function kindOf(v: unknown): string {
  if (v === null) return "null";
  if (v === undefined) return "nothing";
  if (Array.isArray(v)) return "a list";
  if (typeof v === "object") return "an object";
  if (typeof v === "number") return Number.isInteger(v) ? "a whole number" : "a number";
  if (typeof v === "boolean") return "a boolean";
  return `a ${typeof v}`;
}
