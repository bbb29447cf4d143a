import { Option, type Command } from "commander";
import { pathsFrom } from "../global.js";
import { printJson, printNames, say, table } from "../output.js";
import { ConfigError } from "../../errors/index.js";
import { formatSeconds } from "../../vm/format.js";

export function registerKernel(program: Command): void {
  const kernel = program
    .command("kernel")
    .description("Kernels for ad-hoc VMs (civm run --image IMG --kernel NAME) and images (install-kernel): add from a Debian package, a .deb, a bzImage or lvh's build layout; build from lvh's kernels.json; list; remove.");

  kernel
    .command("add")
    .description("Store a kernel with its modules and a generated initrd. SOURCE: a Debian package (linux-image-amd64, linux-image-cloud-amd64, linux-image-6.1.0-NN-amd64; fetched with apt-get download), a .deb, a bzImage (with --modules), or a folder with boot/ and lib/modules/ (lvh's tar-install). To build one from source: civm kernel build.")
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
    .command("build")
    .description("Build a kernel lvh's kernels.json defines and store it (as kernel add does): fetch its url (git URL#ref, tarball or local source folder), base config (defconfig), common_opts and opts through scripts/config, make; cached by source and options")
    .argument("<name>", "the kernels.json entry (also the stored name, unless --name)")
    .option("--kernels-file <file>", "lvh kernels.json (default ./kernels.json or ./_data/kernels.json)")
    .option("--name <name>", "store it under this name")
    .option("-j, --jobs <n>", "parallel make jobs (default: the CPUs)")
    .option("--force", "build again even when the stored kernel's key (source, options, compiler) is unchanged; replaces a kernel of that name")
    .option("--json", "print the stored kernel (name, release, status, key, seconds, dir) as JSON")
    .addHelpText("after", `
kernels.json is lvh's format: {"kernels": [{"name", "url", "opts"?, "extra_make_args"?}], "common_opts"?}; each
option is a scripts/config argument list (["--enable", "CONFIG_X"], ["--disable", ...], ["--module", ...],
["--set-val", "CONFIG_X", "V"], ["--set-str", ...], ["--undefine", ...]). url: git://host/repo.git?depth=1#branch
(lvh's form; https:// too), an http(s) tarball, or a path to a tarball or a source folder (relative to
kernels.json; built out of tree, never written to). civm's own key base_config (default ["defconfig"]) names
the make targets that write the starting .config, e.g. ["tinyconfig", "kvm_guest.config"]. See docs/dev-vms.md.`)
    .action(async (name: string, flags: { kernelsFile?: string; name?: string; jobs?: string; force?: boolean; json?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const { buildKernel } = await import("../../kernels/build.js");
      let jobs: number | undefined;
      if (flags.jobs !== undefined) {
        jobs = Number(flags.jobs);
        if (!Number.isInteger(jobs) || jobs < 1 || jobs > 1024) throw new ConfigError(`--jobs ${JSON.stringify(flags.jobs)}: give a whole number of parallel make jobs (1 or more)`);
      }
      const label = flags.name ?? name;
      const r = await buildKernel({
        name, ...(flags.name ? { as: flags.name } : {}), ...(flags.kernelsFile ? { kernelsFile: flags.kernelsFile } : {}), force: !!flags.force,
        ...(jobs ? { jobs } : {}), stateDir: paths.stateDir, logsDir: paths.logsDir, log: (l) => say(`kernel ${label}: ${l}`),
      });
      const k = r.kernel;
      say(`kernel ${k.name}: ${k.manifest.release} ${r.status === "built" ? `built and stored in ${formatSeconds(r.seconds * 1000)}` : `up to date (${formatSeconds(r.seconds * 1000)})`}; boot it with: civm run --image IMAGE --kernel ${k.name}`);
      if (flags.json) printJson({ name: k.name, release: k.manifest.release, status: r.status, key: k.manifest.build?.key, seconds: r.seconds, buildSeconds: k.manifest.build?.buildSeconds, modules: k.manifest.hasModules, dir: k.dir, ...(r.logFile ? { log: r.logFile } : {}) });
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
      // A broken kernels.json is not a reason to hide the stored kernels: say why and go on.
      const lvh = await findLvhKernels(flags.lvhKernels).catch((e: unknown) => {
        if (!(e instanceof ConfigError)) throw e;
        say(`warning: ${e.message}`);
        return undefined;
      });
      const notAdded = (lvh?.kernels ?? []).filter((l) => !kernels.some((k) => k.name === l.name));
      const lvhNote = () => notAdded.length && say(`${lvh!.file} (lvh) also names ${notAdded.map((l) => l.name).join(", ")}: build one with civm kernel build NAME`);
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
