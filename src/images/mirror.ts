// The Debian mirror the host's apt uses: the default `mirror` of root images. Read from
// /etc/apt/sources.list and /etc/apt/sources.list.d/*.list|*.sources (one-line and deb822
// forms); security and -updates/-backports entries are skipped. No host name is built in.
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";

export interface AptSource {
  uri: string;
  suites: string[];
  components: string[];
  file: string;
}

/** Every enabled `deb` source in the host's apt configuration, in apt's reading order. */
export function readAptSources(aptDir = "/etc/apt"): AptSource[] {
  const files: string[] = [];
  const main = join(aptDir, "sources.list");
  files.push(main);
  let names: string[] = [];
  try {
    names = readdirSync(join(aptDir, "sources.list.d")).sort();
  } catch {
    /* no sources.list.d */
  }
  for (const n of names) if (n.endsWith(".list") || n.endsWith(".sources")) files.push(join(aptDir, "sources.list.d", n));
  const out: AptSource[] = [];
  for (const file of files) {
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch {
      continue;
    }
    out.push(...(file.endsWith(".sources") ? parseDeb822(text, file) : parseOneLine(text, file)));
  }
  return out;
}

export function parseOneLine(text: string, file: string): AptSource[] {
  const out: AptSource[] = [];
  for (const raw of text.split("\n")) {
    const line = raw.replace(/#.*$/, "").trim();
    if (!line) continue;
    const m = /^(deb|deb-src)\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)$/.exec(line);
    if (!m || m[1] !== "deb") continue;
    out.push({ uri: m[2] as string, suites: [m[3] as string], components: (m[4] ?? "").split(/\s+/).filter(Boolean), file });
  }
  return out;
}

export function parseDeb822(text: string, file: string): AptSource[] {
  const out: AptSource[] = [];
  const stanzas = text
    .split("\n")
    .filter((l) => !l.startsWith("#"))
    .join("\n")
    .split(/\n\s*\n/);
  for (const stanza of stanzas) {
    const fields = new Map<string, string>();
    let last = "";
    for (const line of stanza.split("\n")) {
      if (/^\s/.test(line) && last) {
        fields.set(last, `${fields.get(last) ?? ""} ${line.trim()}`);
        continue;
      }
      const m = /^([\w-]+):\s*(.*)$/.exec(line);
      if (!m) continue;
      last = (m[1] as string).toLowerCase();
      fields.set(last, m[2] as string);
    }
    const words = (k: string) => (fields.get(k) ?? "").split(/\s+/).filter(Boolean);
    if (!words("types").includes("deb")) continue;
    if ((fields.get("enabled") ?? "yes").trim().toLowerCase() === "no") continue;
    for (const uri of words("uris")) out.push({ uri, suites: words("suites"), components: words("components"), file });
  }
  return out;
}

/** True for a suite that is a release itself, not a pocket of one (bookworm, not bookworm-security). */
function isReleaseSuite(s: string): boolean {
  return !/[-/](security|updates|backports|proposed-updates)$/.test(s) && !s.includes("/");
}

/** The host's Debian mirror URL, or undefined when apt has none configured. */
export function hostDebianMirror(sources: readonly AptSource[] = readAptSources()): string | undefined {
  const candidates = sources.filter((s) => /^(https?|file):/.test(s.uri) && !/security/.test(s.uri) && s.suites.some(isReleaseSuite));
  const debian = candidates.find((s) => /debian/i.test(s.uri)) ?? candidates[0];
  return debian?.uri.replace(/\/+$/, "");
}
