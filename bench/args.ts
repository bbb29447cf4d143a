// Command-line values of the bench scripts: `--NAME VALUE`, else the default (also when the
// flag is last with no value).
export function benchArg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1]! : def;
}
