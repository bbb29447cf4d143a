import type { Command } from "commander";
import { pathsFrom } from "../global.js";
import { say, table } from "../output.js";
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
    .option("--replace", "replace a stored kernel of the same name")
    .option("--lvh-kernels <file>", "lvh kernels.json to read kernel names from (default ./kernels.json or ./_data/kernels.json)")
    .action(async (name: string, source: string | undefined, flags: { modules?: string; replace?: boolean; lvhKernels?: string }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const { KernelStore } = await import("../../kernels/index.js");
      const store = new KernelStore(paths.stateDir);
      const k = await store.add({
        name, source: source ?? name, ...(flags.modules ? { modules: flags.modules } : {}), replace: !!flags.replace,
        ...(flags.lvhKernels ? { lvhKernels: flags.lvhKernels } : {}), log: (l) => say(`kernel ${name}: ${l}`),
      });
      say(`kernel ${k.name}: ${k.manifest.release}${k.manifest.hasModules ? " with modules" : " (no modules)"}, added in ${formatSeconds(k.manifest.addSeconds * 1000)}; boot it with: civm run --image IMAGE --kernel ${k.name}`);
      process.stdout.write(`${k.dir}\n`);
    });

  kernel
    .command("ls")
    .description("List stored kernels (and the kernels an lvh kernels.json names, if one is found)")
    .option("--json", "print JSON")
    .option("--lvh-kernels <file>", "lvh kernels.json (default ./kernels.json or ./_data/kernels.json)")
    .action(async (flags: { json?: boolean; lvhKernels?: string }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const { KernelStore, findLvhKernels } = await import("../../kernels/index.js");
      const kernels = await new KernelStore(paths.stateDir).list();
      const lvh = await findLvhKernels(flags.lvhKernels);
      const notAdded = (lvh?.kernels ?? []).filter((l) => !kernels.some((k) => k.name === l.name));
      if (flags.json) {
        process.stdout.write(
          JSON.stringify(
            {
              kernels: kernels.map((k) => ({ name: k.name, release: k.manifest.release, modules: k.manifest.hasModules, source: k.manifest.source, dir: k.dir, createdAt: k.manifest.createdAt })),
              ...(lvh ? { lvh: { file: lvh.file, notAdded: notAdded.map((l) => l.name) } } : {}),
            },
            null,
            2,
          ) + "\n",
        );
        return;
      }
      const rows = [["NAME", "RELEASE", "MODULES", "SOURCE"]];
      for (const k of kernels) {
        const s = k.manifest.source;
        rows.push([k.name, k.manifest.release, k.manifest.hasModules ? "yes" : "no", s.package ? `${s.package}${s.version ? ` ${s.version}` : ""}` : (s.path ?? s.kind)]);
      }
      process.stdout.write(table(rows));
      if (notAdded.length) {
        say(`${lvh!.file} (lvh) also names ${notAdded.map((l) => l.name).join(", ")}: civm does not build kernels from git; build them with lvh and add the result with civm kernel add NAME DIR`);
      }
    });

  kernel
    .command("rm")
    .description("Remove stored kernels")
    .argument("<names...>")
    .action(async (names: string[], _flags: unknown, cmd: Command) => {
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
    });
}
