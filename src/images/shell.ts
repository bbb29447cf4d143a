// Quoting for the small POSIX sh scripts the image builder writes (mmdebstrap hooks).

/** `value` as one sh word: single-quoted, with embedded single quotes escaped. */
export function shq(value: string): string {
  if (value !== "" && /^[\w@%+=:,./-]+$/.test(value)) return value;
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

/** Several sh words. */
export function shWords(values: readonly string[]): string {
  return values.map(shq).join(" ");
}
