// The images spec's `install-kernel: NAME` action: a kernel from civm's kernel store goes into
// the image. Before anything is built (and before the cache key is computed), each such action
// becomes two ordinary ones:
//   copy  <staged>/civm-kernel-<release>  ->  /tmp/   (boot/vmlinuz-<release>, boot/config-<release>
//         when the stored kernel has its config, lib/modules/<release>/)
//   run   put them in place, depmod, update-initramfs -c (with a temporary /boot/config-<release>
//         naming gzip when the kernel brings none), echo <release> > /boot/civm-kernel
// The staged folder is the stored kernel's vmlinuz and its modules (read out of modules.img
// with debugfs, no mount), so the image's key covers the kernel's bytes like any copied file.
// The build's epilogue exports /boot/civm-kernel's kernel (not the newest version) as the
// image's direct-boot kernel.
import { mkdir, copyFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { ConfigError } from "../errors/index.js";
import { run } from "../exec/index.js";
import { describeImage } from "./spec.js";
import { shq } from "./shell.js";
import type { ImageAction, ImageSpec } from "./types.js";

/** The file the build's epilogue reads to pick the exported kernel. */
export const INSTALLED_KERNEL_MARKER = "/boot/civm-kernel";

function installScript(release: string): string {
  const d = `/tmp/civm-kernel-${release}`;
  return [
    `d=${shq(d)} r=${shq(release)}`,
    `cp -a "$d/boot/." /boot/`,
    `mkdir -p "/lib/modules/$r"`,
    `if [ -d "$d/lib/modules/$r" ]; then cp -a "$d/lib/modules/$r/." "/lib/modules/$r/"; fi`,
    `rm -rf "$d"`,
    `depmod "$r"`,
    `rm -f "/boot/initrd.img-$r"`,
    // Debian's mkinitramfs picks the initramfs compression from /boot/config-<release> and
    // fails without it; a stored kernel whose source had none brings none. A temporary one naming gzip
    // (CONFIG_RD_GZIP: on by default in every kernel that takes an initrd) is removed after,
    // so nothing else (libbpf, DKMS) mistakes it for the kernel's real config.
    `cfg="/boot/config-$r" stub=`,
    `if [ ! -e "$cfg" ]; then printf '%s\\n' '# civm install-kernel: for update-initramfs only, removed after' CONFIG_BLK_DEV_INITRD=y CONFIG_RD_GZIP=y > "$cfg"; stub=1; fi`,
    `update-initramfs -c -k "$r"`,
    `if [ -n "$stub" ]; then rm -f "$cfg"; fi`,
    `echo "$r" > ${INSTALLED_KERNEL_MARKER}`,
  ].join("\n");
}

/**
 * Returns the chain with every install-kernel action replaced; the kernels' files are staged
 * under `stageDir` (the caller removes it after the build).
 */
export async function expandInstallKernels(chain: readonly ImageSpec[], stateDir: string, stageDir: string): Promise<ImageSpec[]> {
  if (!chain.some((s) => s.actions.some((a) => a.kind === "install-kernel"))) return [...chain];
  const { KernelStore } = await import("../kernels/index.js");
  const store = new KernelStore(stateDir);
  const out: ImageSpec[] = [];
  for (const spec of chain) {
    const actions: ImageAction[] = [];
    for (const [i, a] of spec.actions.entries()) {
      if (a.kind !== "install-kernel") {
        actions.push(a);
        continue;
      }
      let k;
      try {
        k = await store.require(a.kernel);
      } catch (e) {
        throw new ConfigError(`${describeImage(spec)}: field "actions[${i}].install-kernel": ${(e as Error).message}`);
      }
      const release = k.manifest.release;
      const staged = join(stageDir, `${spec.name}-${i}`, `civm-kernel-${release}`);
      await mkdir(join(staged, "boot"), { recursive: true });
      await copyFile(k.kernelPath, join(staged, "boot", `vmlinuz-${release}`));
      if (k.configPath) await copyFile(k.configPath, join(staged, "boot", `config-${release}`));
      if (k.modulesDisk) {
        const mods = join(staged, "lib", "modules", release);
        await mkdir(mods, { recursive: true });
        // modules.img's root is lib/modules/<release> itself; debugfs reads it without a mount.
        await run("debugfs", ["-R", `rdump / ${mods}`, k.modulesDisk], { failCode: "host" });
        // rdump makes <dest>/<basename of the dumped dir>: for "/" that is the folder itself, but
        // older e2fsprogs put it under an empty name; lost+found is not a module.
        await rm(join(mods, "lost+found"), { recursive: true, force: true });
      }
      const comment = a.comment ?? `install-kernel ${a.kernel} (${release})`;
      actions.push({ kind: "copy", src: `kernel ${a.kernel}`, srcPath: staged, dest: "/tmp/", comment });
      actions.push({ kind: "run", command: installScript(release), comment });
    }
    out.push({ ...spec, actions });
  }
  return out;
}
