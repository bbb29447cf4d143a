// "Did you mean ...?" for unknown keys, names and functions.

/** Optimal-string-alignment (restricted Damerau-Levenshtein) distance. */
export function editDistance(a: string, b: string): number {
  const rows: number[][] = [];
  for (let i = 0; i <= a.length; i++) {
    const row: number[] = [i];
    for (let j = 1; j <= b.length; j++) {
      if (i === 0) {
        row.push(j);
        continue;
      }
      const prev = rows[i - 1] as number[];
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let d = Math.min((prev[j] as number) + 1, (row[j - 1] as number) + 1, (prev[j - 1] as number) + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        d = Math.min(d, ((rows[i - 2] as number[])[j - 2] as number) + 1);
      }
      row.push(d);
    }
    rows.push(row);
  }
  return (rows[a.length] as number[])[b.length] as number;
}

function normalize(s: string): string {
  return s.toLowerCase().replace(/[-_\s.]/g, "");
}

export interface SuggestOptions {
  /** Known synonyms: { memory: "ram" }. Looked up after normalizing. */
  aliases?: Record<string, string>;
}

/**
 * The candidate closest to `input`, or undefined when none is plausibly meant.
 * Tries, in order: same word ignoring case and separators, an alias, a candidate that
 * starts with the input ("timeout" -> "timeout-seconds"), then the smallest edit distance
 * within about a third of the word's length.
 */
export function closestMatch(input: string, candidates: readonly string[], opts: SuggestOptions = {}): string | undefined {
  const word = normalize(input);
  if (!word) return undefined;
  const exact = candidates.find((c) => normalize(c) === word);
  if (exact) return exact;
  for (const [alias, target] of Object.entries(opts.aliases ?? {})) {
    if (normalize(alias) === word && candidates.includes(target)) return target;
  }
  if (word.length >= 3) {
    const prefixed = candidates.filter((c) => normalize(c).startsWith(word)).sort((x, y) => x.length - y.length);
    if (prefixed[0]) return prefixed[0];
  }
  const limit = Math.max(1, Math.floor(word.length / 3));
  let best: string | undefined;
  let bestDistance = limit + 1;
  for (const c of candidates) {
    const d = editDistance(word, normalize(c));
    if (d < bestDistance) {
      best = c;
      bestDistance = d;
    }
  }
  return best;
}

/** `; did you mean "x"?` or "" — ready to append to a message. */
export function didYouMean(input: string, candidates: readonly string[], opts: SuggestOptions = {}): string {
  const hit = closestMatch(input, candidates, opts);
  return hit ? `; did you mean "${hit}"?` : "";
}
