import { Option, type Command } from "commander";
import { pathsFrom } from "../global.js";
import { printJson, printNames, say, table } from "../output.js";
import { ConfigError } from "../../errors/index.js";
import { formatSeconds } from "../../vm/format.js";

export function registerKernel(program: Command): void {
  const kernel = program
    .command("kernel")
    .description("Kernels for ad-hoc VMs (civm run --image IMG --kernel NAME): add from a Debian package, a .deb, a bzImage or lvh's build layout; list; remove.");

  kernel
    .command("add")
    .description("Store a kernel with its modules and a generated initrd. SOURCE: a Debian package (linux-image-amd64, linux-image-cloud-amd64, linux-image-6.1.0-NN-amd64; fetched with apt-get download), a .deb, a bzImage (with --modules), or a folder with boot/ and lib/modules/ (lvh's tar-install). Building from git is not supported.")
    .argument("<name>", "name to boot it by (--kernel NAME)")
    .argument("[source]", "package, .deb, bzImage or folder (default: NAME itself, e.g. civm kernel add linux-image-cloud-amd64)")
    .option("--modules <dir>", "modules of a bzImage: lib/modules/<release> or a folder holding it")
    .option("--force", "replace a stored kernel of the same name (the overwrite flag of every civm command)")
    // The flag's old name, kept working for scripts.
    .addOption(new Option("--replace").hideHelp())
    .option("--lvh-kernels <file>", "lvh kernels.json to read kernel names from (default ./kernels.json or ./_data/kernels.json)")
    .option("--json", "print the stored kernel (name, release, modules, dir) as JSON")
    .action(async (name: string, source: string | undefined, flags: { modules?: string; force?: boolean; replace?: boolean; lvhKernels?: string; json?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const { KernelStore } = await import("../../kernels/index.js");
      const store = new KernelStore(paths.stateDir);
      const k = await store.add({
        name, source: source ?? name, ...(flags.modules ? { modules: flags.modules } : {}), replace: !!(flags.force || flags.replace),
        ...(flags.lvhKernels ? { lvhKernels: flags.lvhKernels } : {}), log: (l) => say(`kernel ${name}: ${l}`),
      });
      say(`kernel ${k.name}: ${k.manifest.release}${k.manifest.hasModules ? " with modules" : " (no modules)"}, added in ${formatSeconds(k.manifest.addSeconds * 1000)}; boot it with: civm run --image IMAGE --kernel ${k.name}`);
      if (flags.json) printJson({ name: k.name, release: k.manifest.release, modules: k.manifest.hasModules, dir: k.dir });
      else process.stdout.write(`${k.dir}\n`);
    });

  kernel
    .command("ls")
    .alias("list")
    .description("List stored kernels (and the kernels an lvh kernels.json names, if one is found)")
    .option("--json", "print a JSON array of the stored kernels")
    .option("-q, --quiet", "print names only, one a line")
    .option("--lvh-kernels <file>", "lvh kernels.json (default ./kernels.json or ./_data/kernels.json)")
    .action(async (flags: { json?: boolean; quiet?: boolean; lvhKernels?: string }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const { KernelStore, findLvhKernels } = await import("../../kernels/index.js");
      const kernels = await new KernelStore(paths.stateDir).list();
      const lvh = await findLvhKernels(flags.lvhKernels);
      const notAdded = (lvh?.kernels ?? []).filter((l) => !kernels.some((k) => k.name === l.name));
      const lvhNote = () => notAdded.length && say(`${lvh!.file} (lvh) also names ${notAdded.map((l) => l.name).join(", ")}: civm does not build kernels from git; build them with lvh and add the result with civm kernel add NAME DIR`);
      // Every list prints an array; what lvh names but is not stored goes to stderr.
      if (flags.json) {
        printJson(kernels.map((k) => ({ name: k.name, release: k.manifest.release, modules: k.manifest.hasModules, source: k.manifest.source, dir: k.dir, createdAt: k.manifest.createdAt })));
        lvhNote();
        return;
      }
      if (flags.quiet) {
        printNames(kernels.map((k) => k.name));
        return;
      }
      const rows = [["NAME", "RELEASE", "MODULES", "SOURCE"]];
      for (const k of kernels) {
        const s = k.manifest.source;
        rows.push([k.name, k.manifest.release, k.manifest.hasModules ? "yes" : "no", s.package ? `${s.package}${s.version ? ` ${s.version}` : ""}` : (s.path ?? s.kind)]);
      }
      process.stdout.write(table(rows));
      lvhNote();
    });

  kernel
    .command("rm")
    .description("Remove stored kernels")
    .argument("<names...>")
    .option("--json", "print the removed kernels as a JSON array")
    .action(async (names: string[], flags: { json?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const { KernelStore } = await import("../../kernels/index.js");
      const { liveEntries, devMetaOf } = await import("../../dev/index.js");
      const store = new KernelStore(paths.stateDir);
      const live = await liveEntries(paths.stateDir);
      for (const n of names) {
        const users = live.filter((e) => devMetaOf(e)?.kernel === n).map((e) => e.name);
        if (users.length) throw new ConfigError(`kernel ${n} is in use by ${users.join(", ")}; stop ${users.length > 1 ? "them" : "it"} first (civm stop ${users.join(" ")})`);
        await store.remove(n);
        say(`kernel ${n} removed`);
      }
      if (flags.json) printJson(names.map((name) => ({ name })));
    });
}
