// Sizes as written in instances files ("4G", "512M", "80GiB") to and from bytes.
// Every unit is binary (K = 1024), as QEMU reads them; "GB" and "GiB" both mean 2^30.

const UNITS: Record<string, number> = {
  "": 1,
  k: 1024,
  m: 1024 ** 2,
  g: 1024 ** 3,
  t: 1024 ** 4,
};

const SIZE_RE = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?$/i;

/** Human description of the accepted forms, for error messages. */
export const SIZE_FORMS =
  'a whole number of bytes or a number with a K, M, G or T suffix (optionally followed by "iB" or "B"), e.g. "512M", "4G", "80GiB"; units are binary (1G = 1024M)';

function invalid(input: unknown, why: string): Error {
  const shown = typeof input === "string" ? JSON.stringify(input) : String(input);
  return new Error(`${shown} ${why}; write ${SIZE_FORMS}`);
}

/**
 * Bytes in a size such as "4G", "512m", "4GiB", "1.5G" or "1048576" (bare numbers are bytes).
 * Throws a plain Error (the caller adds where it came from) for zero, negatives, fractions
 * that are not whole bytes, and anything else.
 */
export function parseSize(input: string | number): number {
  if (typeof input === "number") return checkBytes(input, input);
  const text = input.trim();
  if (/^-\s*\d/.test(text)) throw invalid(input, "is negative");
  const m = SIZE_RE.exec(text);
  if (!m) throw invalid(input, "is not a size");
  const [, num = "", unit = "", suffix] = m;
  if (suffix && unit === "" && suffix.toLowerCase() === "ib") throw invalid(input, "is not a size");
  const bytes = Number(num) * (UNITS[unit.toLowerCase()] ?? NaN);
  return checkBytes(bytes, input);
}

function checkBytes(bytes: number, input: string | number): number {
  if (!Number.isFinite(bytes)) throw invalid(input, "is not a size");
  if (bytes < 0) throw invalid(input, "is negative");
  if (bytes === 0) throw invalid(input, "is zero");
  if (!Number.isInteger(bytes)) throw invalid(input, "is not a whole number of bytes");
  if (bytes > Number.MAX_SAFE_INTEGER) throw invalid(input, "is too large");
  return bytes;
}

/** Short form for messages: "4G", "1.5G", "512M", "1000 bytes". */
export function formatSize(bytes: number): string {
  for (const unit of ["T", "G", "M", "K"] as const) {
    const per = UNITS[unit.toLowerCase()] as number;
    if (bytes < per) continue;
    const n = bytes / per;
    if (Number.isInteger(n)) return `${n}${unit}`;
    if (Number.isInteger(n * 100)) return `${n}${unit}`;
    return `${n.toFixed(2)}${unit} (${bytes} bytes)`;
  }
  return `${bytes} bytes`;
}
