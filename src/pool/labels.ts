// Runner labels as GitHub compares them: case-insensitively. Every self-hosted runner
// carries "self-hosted", so a pool implies it even when its config leaves it out.

export const IMPLIED_LABEL = "self-hosted";

/** Lower-cased, trimmed, de-duplicated, sorted, with "self-hosted" added. */
export function normalizeLabels(labels: readonly string[]): string[] {
  const set = new Set(labels.map((l) => l.trim().toLowerCase()).filter((l) => l !== ""));
  set.add(IMPLIED_LABEL);
  return [...set].sort();
}

/** A stable key for a label set (normalized, comma-joined). */
export function labelKey(normalized: readonly string[]): string {
  return normalized.join(",");
}

/** Whether a runner with `poolLabels` can take a job that asks for `jobLabels` (pool ⊇ job). */
export function labelsMatch(poolLabels: readonly string[], jobLabels: readonly string[]): boolean {
  const have = new Set(normalizeLabels(poolLabels));
  return jobLabels.every((l) => have.has(l.trim().toLowerCase()));
}

/** Labels sent to GitHub when registering: as written, plus "self-hosted" if missing. */
export function registrationLabels(labels: readonly string[]): string[] {
  return labels.some((l) => l.trim().toLowerCase() === IMPLIED_LABEL) ? [...labels] : [IMPLIED_LABEL, ...labels];
}
