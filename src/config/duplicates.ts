// One message for entries of a file that share a name (instances, images, pools).

/**
 * `names[i]` is the name of entry #i+1 (undefined when it has none). Returns one problem per
 * name used more than once, e.g. `FILE: instances #1 and #2 are both named "vm-1"; names
 * must be unique because WHY, so rename one of them.`
 */
export function duplicateNameProblems(file: string, names: readonly (string | undefined)[], noun: string, why: string): string[] {
  const byName = new Map<string, number[]>();
  names.forEach((name, i) => {
    if (name !== undefined) byName.set(name, [...(byName.get(name) ?? []), i + 1]);
  });
  const out: string[] = [];
  for (const [name, idx] of byName) {
    if (idx.length < 2) continue;
    const list = idx.map((i) => `#${i}`);
    const joined = `${list.slice(0, -1).join(", ")} and ${list.at(-1)}`;
    const [all, fix] = idx.length === 2 ? ["both", "rename one of them"] : ["all", "rename all but one"];
    out.push(`${file}: ${noun} ${joined} are ${all} named ${JSON.stringify(name)}; names must be unique because ${why}, so ${fix}.`);
  }
  return out;
}
