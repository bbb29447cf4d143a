// civm image build: stage 1 (root tree with mmdebstrap, disk assembled without mounts) and
// stage 2 (a VM civm boots with its own executor, by direct kernel boot, that installs the
// bootloader, applies a child's packages and actions, and runs provision scripts). The
// result goes to the image store only when every step succeeded.
import { hostArch, requireArch } from "../vm/arch.js";
import { copyFile, cp, link, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { availableParallelism, tmpdir } from "node:os";
import { basename, join } from "node:path";
import { CivmError, ConfigError } from "../errors/index.js";
import { run } from "../exec/index.js";
import type { Paths } from "../host/paths.js";
import type { InstanceSpec } from "../config/types.js";
import { VmRun, securityModelFor, type HostMount } from "../vm/index.js";
import { parseAllowEntry, type NetworkSpec } from "../net/policy.js";
import { cacheKeysFor } from "./cache-key.js";
import { expandInstallKernels } from "./install-kernel.js";
import { DOWNLOADS_DIR, ensureVerifiedFile } from "./download.js";
import { ESP_LAYOUT, assembleDisk, convertRaw, compressArtifact } from "./disk.js";
import { buildRootTree, actionHook, describeAction, removeTree } from "./rootfs.js";
import { resolveBuildOrder, describeImage } from "./spec.js";
import { shq } from "./shell.js";
import { repoRoot } from "./paths.js";
import type { ImageSpec, LoadedImageSpecs } from "./types.js";
import type { ImageStore, StoredImage } from "./store.js";

export interface BuildEvent {
  image: string;
  step: "cached" | "download" | "rootfs" | "disk" | "vm" | "finish" | "done";
  message: string;
  elapsedMs: number;
}

export interface BuildOptions {
  name: string;
  specs: LoadedImageSpecs | readonly ImageSpec[];
  store: ImageStore;
  paths: Paths;
  /** Rebuild the named image even when its key is unchanged (its ancestors stay cached). */
  force?: boolean;
  accel: "kvm" | "tcg";
  /** Every line of the build (mmdebstrap, hooks, the build VM's console). */
  log: (line: string) => void;
  onEvent?: (e: BuildEvent) => void;
  /** Keep downloaded .deb files here across builds. */
  aptCacheDir?: string;
  /**
   * SIGINT/SIGTERM from the CLI: mmdebstrap is ended, the build VM powered off (forced after
   * its grace), the pending image removed; the build rejects with the signal's reason.
   */
  signal?: AbortSignal;
}

export interface BuildOutcome {
  image: string;
  status: "cached" | "built";
  key: string;
  seconds: number;
  stored: StoredImage;
}

/** Mount points of the build shares inside the build VM. */
const GUEST_SHARE = "/run/civm-build";
const GUEST_OUT = "/run/civm-out";
const BUILD_OK = "civm-build-ok";
const BUILD_VM_TIMEOUT_S = 3600;
export const BUILD_VM_CMDLINE = "console=ttyS0 root=LABEL=civm-root rw panic=-1 civm.build cloud-init=disabled";

export async function buildImage(o: BuildOptions): Promise<BuildOutcome[]> {
  // install-kernel actions become copies of the stored kernel's files (staged here) first, so
  // the key covers the kernel's bytes.
  const stage = await mkdtemp(join(tmpdir(), "civm-kernels-"));
  try {
    return await buildChain(o, await expandInstallKernels(resolveBuildOrder(o.specs as LoadedImageSpecs, o.name), o.paths.stateDir, stage));
  } finally {
    await rm(stage, { recursive: true, force: true });
  }
}

async function buildChain(o: BuildOptions, chain: ImageSpec[]): Promise<BuildOutcome[]> {
  const keys = await cacheKeysFor(chain);
  const outcomes: BuildOutcome[] = [];
  for (const spec of chain) {
    o.signal?.throwIfAborted();
    const started = Date.now();
    const key = keys.get(spec.name)!;
    const existing = await o.store.get(spec.name);
    const forced = o.force && spec.name === o.name;
    if (spec.stored) {
      outcomes.push(usedAsStored(o, spec, existing, forced, started));
      continue;
    }
    if (existing && existing.manifest.key === key && !forced) {
      o.onEvent?.({ image: spec.name, step: "cached", message: `${spec.name} is up to date (key ${key.slice(0, 12)})`, elapsedMs: Date.now() - started });
      outcomes.push({ image: spec.name, status: "cached", key, seconds: (Date.now() - started) / 1000, stored: await withSpecFields(o, spec, key, existing) });
      continue;
    }
    const parentKey = spec.parent ? keys.get(spec.parent) : undefined;
    const stored = await buildOne(o, spec, key, parentKey, started);
    outcomes.push({ image: spec.name, status: "built", key, seconds: (Date.now() - started) / 1000, stored });
  }
  return outcomes;
}

/**
 * A parent that is only a stored image (no spec in this file: src/images/stored-parent.ts) is
 * used as it is. It must still be the image the spec was loaded with: its key is in the child's.
 */
function usedAsStored(o: BuildOptions, spec: ImageSpec, existing: StoredImage | undefined, forced: boolean | undefined, started: number): BuildOutcome {
  const ref = spec.stored as NonNullable<ImageSpec["stored"]>;
  const file = Array.isArray(o.specs) ? "the spec file" : (o.specs as LoadedImageSpecs).file;
  if (forced) {
    throw new ConfigError(`${spec.name} is a stored image that ${file} does not define, so it cannot be rebuilt from it; rebuild it from the spec file that defines it: civm image build ${spec.name} -f FILE --force.`);
  }
  if (!existing || existing.manifest.key !== ref.key) {
    throw new ConfigError(`the stored image ${spec.name} ${existing ? "was replaced" : "was removed"} since the spec was loaded (${ref.manifest}); run the build again.`);
  }
  o.onEvent?.({ image: spec.name, step: "cached", message: `${spec.name} is a stored image, used as it is (key ${ref.key.slice(0, 12)})`, elapsedMs: Date.now() - started });
  return { image: spec.name, status: "cached", key: ref.key, seconds: (Date.now() - started) / 1000, stored: existing };
}

/**
 * A cached image whose manifest (from an older civm) lacks the spec's suite and mirror gets
 * them: its key covers them, and a spec in another file may name it as a parent.
 */
async function withSpecFields(o: BuildOptions, spec: ImageSpec, key: string, existing: StoredImage): Promise<StoredImage> {
  if (existing.manifest.suite !== undefined && existing.manifest.mirror !== undefined) return existing;
  try {
    if (await o.store.addSpecFields(spec.name, key, { suite: spec.suite, mirror: spec.mirror })) return (await o.store.get(spec.name)) ?? existing;
  } catch (e) {
    o.log(`${spec.name}: could not record its suite and mirror in its manifest: ${(e as Error).message}`);
  }
  return existing;
}

async function buildOne(o: BuildOptions, spec: ImageSpec, key: string, parentKey: string | undefined, started: number): Promise<StoredImage> {
  const ev = (step: BuildEvent["step"], message: string) => o.onEvent?.({ image: spec.name, step, message, elapsedMs: Date.now() - started });
  // On the host, before anything is built: a wrong digest fails here and stores nothing.
  let runnerArchive: string | undefined;
  if (spec.githubRunner) {
    const gr = spec.githubRunner;
    const got = await ensureVerifiedFile({
      url: gr.url, sha256: gr.sha256, cacheDir: join(o.paths.stateDir, DOWNLOADS_DIR),
      where: `${describeImage(spec)}: field "githubRunner"`, log: o.log,
      ...(gr.localPath ? { localPath: gr.localPath } : {}),
    });
    ev("download", got.downloaded ? `actions runner ${gr.version} fetched and verified (${got.bytes} bytes)` : `actions runner ${gr.version} from the download cache (sha256 verified)`);
    runnerArchive = got.path;
  }
  // What the build VM of another architecture needs, before anything is built.
  if (spec.arch && spec.arch !== "x86_64") await requireArch(spec.arch, { firmware: false, where: describeImage(spec), field: 'field "arch":', dropHint: 'remove "arch" to build an x86_64 image' });
  const pending = await o.store.begin(spec.name);
  // The root tree is removed while the build VM boots (on a loaded host its removal took 90 s
  // of the critical path); every way out of this function waits for it.
  let treeGone: Promise<void> = Promise.resolve();
  try {
    o.signal?.throwIfAborted();
    const work = join(pending.dir, "work");
    const share = join(work, "share");
    const out = join(work, "out");
    await mkdir(share, { recursive: true });
    await mkdir(out, { recursive: true });
    // Stage 2 boots the disk in its working format (qcow2 or raw); vhd is converted after.
    const bootFormat = spec.format === "qcow2" ? "qcow2" : "raw";
    const disk = join(pending.dir, `disk.${bootFormat}`);
    let kernel = join(pending.dir, "vmlinuz");
    let initrd = join(pending.dir, "initrd.img");
    let packages: Record<string, string> = {};
    let parent: StoredImage | undefined;

    if (!spec.parent) {
      let rootSpec = withUefi(spec);
      if (spec.civm) rootSpec = await withCivmRelease(rootSpec, join(work, "release"), join(o.paths.stateDir, DOWNLOADS_DIR), o.log, (m) => ev("download", m));
      ev("rootfs", `mmdebstrap ${spec.suite} (${spec.packages.length} extra packages)`);
      const tree = await buildRootTree({
        spec: withGuestAgent(rootSpec), workDir: work, log: o.log,
        onProgress: (p) => ev("rootfs", p.message),
        ...(o.aptCacheDir ? { aptCacheDir: o.aptCacheDir } : {}),
        ...(o.signal ? { signal: o.signal } : {}),
      });
      try {
        o.signal?.throwIfAborted();
        ev("disk", `assembling ${bootFormat} disk`);
        const asm = await assembleDisk({ tree: tree.tree, output: disk, sizeBytes: spec.sizeBytes, format: bootFormat, log: o.log, onProgress: (p) => ev("disk", p.message), kernelPath: kernel, initrdPath: initrd, label: describeImage(spec), ...(spec.uefi ? { uefi: true } : {}) });
        packages = asm.packages;
      } finally {
        treeGone = removeTree(tree.tree);
        treeGone.catch(() => undefined); // awaited below, on success and on failure
      }
    } else {
      parent = await o.store.require(spec.parent);
      if (!parent.kernelPath || !parent.initrdPath) {
        throw new ConfigError(`${describeImage(spec)}: parent image "${spec.parent}" has no kernel and initrd beside its disk (was it pulled?); a child is built by booting its parent's kernel. Build the parent with civm image build.`);
      }
      kernel = parent.kernelPath;
      initrd = parent.initrdPath;
      await childDisk(spec, parent, disk, bootFormat, ev);
    }

    if (runnerArchive) {
      // The build share is read by QEMU (9p): a hard link where it can be, else a copy.
      const staged = join(share, RUNNER_ARCHIVE);
      await link(runnerArchive, staged).catch(() => copyFile(runnerArchive as string, staged));
    }
    o.signal?.throwIfAborted();
    const script = await stage2Script(spec, share, parent !== undefined);
    ev("vm", `booting the build VM (${o.accel}) to ${parent ? "apply packages and actions" : "install the bootloader"}${spec.actions.some((a) => a.kind === "provision") ? " and run provision scripts" : ""}`);
    await bootBuildVm(o, spec, { disk, format: bootFormat, kernel, initrd, share, out, script });
    o.signal?.throwIfAborted();

    // The VM wrote its kernel, initrd and package list to the out share.
    const status = await readFile(join(out, "status"), "utf8").catch(() => "");
    if (status.trim() !== BUILD_OK) throw new CivmError("internal", `${describeImage(spec)}: the build VM powered off without finishing its script (see the build log above)`);
    const finalKernel = join(pending.dir, "vmlinuz");
    const finalInitrd = join(pending.dir, "initrd.img");
    await cp(join(out, "vmlinuz"), finalKernel);
    await cp(join(out, "initrd.img"), finalInitrd);
    packages = parsePackages(await readFile(join(out, "packages.tsv"), "utf8"));

    ev("finish", `finishing ${spec.format} image`);
    let finalDisk = disk;
    if (spec.format === "vhd") {
      finalDisk = join(pending.dir, "disk.vhd");
      await convertRaw(disk, finalDisk, "vhd");
      await rm(disk, { force: true });
    }
    let compressed: string | undefined;
    if (spec.compress === "zstd") compressed = basename(await compressArtifact(finalDisk));
    await treeGone;
    await rm(work, { recursive: true, force: true });
    const stored = await pending.commit({
      name: spec.name, key, format: spec.format, disk: basename(finalDisk),
      kernel: "vmlinuz", initrd: "initrd.img",
      ...(spec.parent ? { parent: spec.parent, ...(parentKey ? { parentKey } : {}) } : {}),
      // What a child in another file inherits when it names this image as its parent.
      suite: spec.suite, mirror: spec.mirror,
      packages, buildSeconds: (Date.now() - started) / 1000, createdAt: new Date().toISOString(), source: "build",
      ...(spec.arch && spec.arch !== "x86_64" ? { arch: spec.arch } : {}),
      ...(compressed ? { compressed } : {}),
    });
    ev("done", `${spec.name} built in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    return stored;
  } catch (e) {
    await treeGone.catch(() => undefined);
    await pending.abort();
    throw e;
  }
}

/** Packages the guest agent calls (besides what every Debian system has). */
const AGENT_PACKAGES = ["jq", "eject", "cloud-guest-utils", "openssh-client"];

/**
 * Every civm root image carries the guest agent (guest/): the build VM itself runs its
 * script through it, and the image's VMs read their instance.json with it. Its version is
 * part of every cache key (guest/VERSION).
 */
export function withGuestAgent(spec: ImageSpec): ImageSpec {
  const guestDir = join(repoRoot, "guest");
  return {
    ...spec,
    packages: [...new Set([...spec.packages, ...AGENT_PACKAGES])],
    actions: [
      { kind: "copy", src: guestDir, srcPath: guestDir, dest: "/tmp/civm-guest" },
      { kind: "run", command: "sh /tmp/civm-guest/install.sh / && rm -rf /tmp/civm-guest" },
      ...spec.actions,
    ],
  };
}

/** What `uefi: true` adds to a root image: GRUB's EFI modules and mkfs.vfat for the ESP. */
export const UEFI_PACKAGES: readonly string[] = ["grub-efi-amd64-bin", "dosfstools"];

export function withUefi(spec: ImageSpec): ImageSpec {
  return spec.uefi ? { ...spec, packages: [...new Set([...spec.packages, ...UEFI_PACKAGES])] } : spec;
}

/**
 * `civm: true`: stages this checkout's civm release and the host's Node.js package (see
 * civm-release.ts) in `dir` and puts the actions that install them before the spec's own.
 */
async function withCivmRelease(spec: ImageSpec, dir: string, cacheDir: string, log: (l: string) => void, ev: (m: string) => void): Promise<ImageSpec> {
  const { hostNodeRuntime, repackNode, stageRelease, stageNodeDeb, releaseActions } = await import("./civm-release.js");
  const where = describeImage(spec);
  const node = await hostNodeRuntime(where);
  await mkdir(dir, { recursive: true });
  const deb = await stageNodeDeb(await repackNode(node, cacheDir, log), dir);
  ev(`Node.js ${node.version} (${node.package}, the build host's package)`);
  const release = await stageRelease(dir, where);
  ev(`civm release staged from ${repoRoot}`);
  return { ...spec, actions: [...releaseActions(release, deb, node), ...spec.actions] };
}

/** A child's disk: a qcow2 on its parent (backing chain) or a standalone copy. */
async function childDisk(spec: ImageSpec, parent: StoredImage, disk: string, bootFormat: "qcow2" | "raw", ev: (s: BuildEvent["step"], m: string) => void): Promise<void> {
  const size = Math.max(spec.sizeBytes, parent.manifest.virtualSize);
  if (!spec.flatten && bootFormat === "qcow2") {
    ev("disk", `qcow2 on ${parent.name} (backing chain)`);
    // The parent's path is final (<images>/<parent>/...): the store renames only its own dirs.
    await run("qemu-img", ["create", "-q", "-f", "qcow2", "-F", parent.manifest.format === "vhd" ? "vpc" : parent.manifest.format, "-b", parent.diskPath, disk, String(size)]);
  } else {
    ev("disk", `copy of ${parent.name} (flattened)`);
    await run("qemu-img", ["convert", "-O", bootFormat, parent.diskPath, disk]);
    await run("qemu-img", ["resize", "-q", "-f", bootFormat, disk, String(size)]);
  }
}

function parsePackages(tsv: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of tsv.split("\n")) {
    const [name, version] = line.split("\t");
    if (name && version) out[name] = version;
  }
  return out;
}

/**
 * The script the build VM runs as root (through the guest agent's `command`). Files it
 * needs (action hooks, copy sources, provision scripts) are staged in `share`, which the VM
 * sees read-only at /run/civm-build.
 */
async function stage2Script(spec: ImageSpec, share: string, isChild: boolean): Promise<string> {
  const lines = ["set -eu", "export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8", `echo "civm-build: stage 2 of ${spec.name}"`];
  if (!isChild && spec.arch !== "arm64") {
    // arm64 images boot by their kernel (direct kernel boot); no BIOS GRUB there.
    lines.push(...STAGE2_BOOTLOADER);
    if (spec.uefi) lines.push(...STAGE2_UEFI);
  }
  if (isChild && spec.packages.length) {
    lines.push(`echo "civm-build: installing ${spec.packages.length} packages"`, "apt-get update -q", `apt-get install -y -q --no-install-recommends ${spec.packages.map(shq).join(" ")}`, "apt-get clean");
  }
  if (spec.githubRunner) lines.push(...runnerInstallScript(spec.githubRunner.version, `${GUEST_SHARE}/${RUNNER_ARCHIVE}`));
  if (spec.sudo !== undefined) lines.push(...sudoScript(spec.sudo));
  const hooksDir = join(share, "hooks");
  await mkdir(hooksDir, { recursive: true });
  const total = spec.actions.length;
  for (const [i, action] of spec.actions.entries()) {
    const n = String(i + 1).padStart(3, "0");
    if (action.kind === "provision") {
      const file = `provision-${n}.sh`;
      if (action.script) await cp(action.script.srcPath, join(share, file));
      else await writeFile(join(share, file), action.inline ?? "");
      lines.push(`echo ${shq(`civm-build: action ${i + 1}/${total}: ${describeAction(action)}`)}`, `(cd / && sh -e ${GUEST_SHARE}/${file})`);
      continue;
    }
    if (!isChild) continue; // root images applied these in the chroot already
    let a = action;
    if (a.kind === "copy") {
      // Stage the source in the share and point the hook at its path inside the VM.
      const staged = join(share, `copy-${n}`);
      await mkdir(staged, { recursive: true });
      await cp(a.srcPath, join(staged, basename(a.srcPath)), { recursive: true, preserveTimestamps: true });
      a = { ...a, srcPath: `${GUEST_SHARE}/copy-${n}/${basename(a.srcPath)}` };
    }
    const hook = actionHook(a, i, total, `${GUEST_SHARE}/hooks`);
    if (!hook) continue;
    await writeFile(join(hooksDir, hook.name), hook.text);
    for (const [name, content] of Object.entries(hook.data ?? {})) await writeFile(join(hooksDir, name), content);
    lines.push(`sh ${GUEST_SHARE}/hooks/${hook.name} /`);
  }
  if (isChild) lines.push("if [ -d /boot/grub ]; then update-grub; fi");
  lines.push(...STAGE2_EPILOGUE);
  const file = join(share, "stage2.sh");
  await writeFile(file, lines.join("\n") + "\n");
  return `sh -e ${GUEST_SHARE}/stage2.sh`;
}

/**
 * The build VM ends with `poweroff -f` (the guest agent), which leaves a mounted root as it
 * is: ext4 would keep `needs_recovery` and an orphan list, and every VM of the image would
 * replay the journal at boot. Remounting / read-only first commits the journal and marks the
 * filesystem clean. A / that some service keeps busy (a deleted file still open) refuses the
 * remount; sysrq's emergency remount forces it (it runs in the background, hence the wait).
 */
export const CLEAN_ROOT_SCRIPT = [
  'echo "civm-build: remounting / read-only (a clean filesystem: no journal replay at boot)"',
  "root_is_ro() { awk '$2 == \"/\" && $4 ~ /^ro(,|$)/ { found = 1 } END { exit !found }' /proc/mounts; }",
  "if ! mount -o remount,ro / 2>/dev/null; then",
  '  echo "civm-build: / is busy; forcing it read-only with sysrq (emergency remount)"',
  "  echo 1 > /proc/sys/kernel/sysrq && echo u > /proc/sysrq-trigger || true",
  "  for _ in 1 2 3 4 5 6 7 8 9 10; do root_is_ro && break; sleep 0.5; done",
  "fi",
  'root_is_ro || echo "civm-build: warning: / is still read-write; VMs of this image will replay its journal at boot"',
];

/** The runner archive's name in the build share. */
const RUNNER_ARCHIVE = "github-runner.tar.gz";
/** The account the agent runs jobs as (guest/: CIVM_RUNNER_USER's default). */
const RUNNER_USER = "runner";

/**
 * Unpacks the verified runner archive into ~runner/actions-runner (the agent's default
 * runner_dir), owned by the runner user (tar runs as that user: the job never needs root),
 * and checks it has the runner's layout. A previous runner there is replaced.
 */
export function runnerInstallScript(version: string, archive: string): string[] {
  return [
    `echo ${shq(`civm-build: installing the GitHub Actions runner ${version} for ${RUNNER_USER}`)}`,
    `home=$(getent passwd ${RUNNER_USER} | cut -d: -f6) || { echo "civm-build: error: githubRunner needs a '${RUNNER_USER}' user in the image (civm-runner has one); create it in an earlier image or action" >&2; exit 1; }`,
    'd="$home/actions-runner"',
    'rm -rf "$d"',
    `install -d -o ${RUNNER_USER} -g "$(id -gn ${RUNNER_USER})" -m 0755 "$d"`,
    `runuser -u ${RUNNER_USER} -- tar -xzf - -C "$d" < ${archive}`,
    'for f in config.sh run.sh bin/Runner.Listener; do',
    '  [ -e "$d/$f" ] || { echo "civm-build: error: the githubRunner archive has no $f: it is not an actions/runner release for Linux" >&2; exit 1; }',
    "done",
  ];
}

/** `sudo: true` gives the runner user passwordless sudo (as GitHub's hosted runners have); `false` takes it away. */
export function sudoScript(on: boolean): string[] {
  const file = "/etc/sudoers.d/civm-runner";
  if (!on) return [`echo "civm-build: no sudo for ${RUNNER_USER}"`, `rm -f ${file}`, `gpasswd -d ${RUNNER_USER} sudo >/dev/null 2>&1 || true`];
  return [
    `echo "civm-build: passwordless sudo for ${RUNNER_USER}"`,
    `command -v visudo >/dev/null || { echo "civm-build: error: \"sudo: true\" needs the sudo package in the image" >&2; exit 1; }`,
    `printf '%s\n' '# civm: passwordless sudo for the job user, as on GitHub-hosted runners ("sudo" in the image spec)' '${RUNNER_USER} ALL=(ALL:ALL) NOPASSWD: ALL' > ${file}.tmp`,
    `chmod 0440 ${file}.tmp && visudo -cqf ${file}.tmp && mv ${file}.tmp ${file}`,
  ];
}

/** A root image's bootloader, installed from inside the build VM. */
export const STAGE2_BOOTLOADER: readonly string[] = ['echo "civm-build: installing GRUB on /dev/vda"', "grub-install --target=i386-pc /dev/vda", "update-grub"];

/**
 * `uefi: true`: GRUB for UEFI on the EFI system partition, at the removable-media path
 * (/EFI/BOOT/BOOTX64.EFI), which firmware boots without an NVRAM entry (none survives a copy
 * of the disk). It reads the same /boot/grub/grub.cfg as the BIOS GRUB. Not mounted at run
 * time: nothing on the host changes it.
 */
export const STAGE2_UEFI: readonly string[] = [
  `echo "civm-build: installing GRUB for UEFI on the EFI system partition ${ESP_LAYOUT.device}"`,
  `mkfs.vfat -n CIVM-EFI ${ESP_LAYOUT.device} >/dev/null`,
  "mkdir -p /boot/efi",
  `mount -t vfat ${ESP_LAYOUT.device} /boot/efi`,
  "grub-install --target=x86_64-efi --efi-directory=/boot/efi --removable --no-nvram",
  "umount /boot/efi",
];

/**
 * The end of every build script: export the kernel, initrd and package list, forget this
 * boot's identity, leave a clean filesystem. (A change here must bump IMAGE_BUILDER_VERSION;
 * test/unit/images-builder-version.test.ts holds it to that.)
 */
export const STAGE2_EPILOGUE: readonly string[] = [
  'echo "civm-build: exporting kernel, initrd and package list"',
  "# The kernel an install-kernel action put in (its release in /boot/civm-kernel), else the newest.",
  'if [ -s /boot/civm-kernel ]; then k="/boot/vmlinuz-$(cat /boot/civm-kernel)"; else k=$(ls -1 /boot/vmlinuz-* | sort -V | tail -n 1); fi',
  `cp "$k" ${GUEST_OUT}/vmlinuz`,
  `cp "/boot/initrd.img-\${k#/boot/vmlinuz-}" ${GUEST_OUT}/initrd.img`,
  `dpkg-query -W -f '\${Package}\\t\${Version}\\n' > ${GUEST_OUT}/packages.tsv`,
  "# Forget this boot: every VM of the image makes its own identity. journald first lets go",
  "# of /var/log/journal, so no deleted-but-open journal file is left on the disk.",
  "journalctl --relinquish-var 2>/dev/null || true",
  "rm -f /etc/ssh/ssh_host_* /var/lib/dbus/machine-id",
  ": > /etc/machine-id",
  "rm -rf /var/lib/apt/lists/* /var/log/journal/*",
  "# Not the private /tmp of running services (PrivateTmp=): deleted while in use, they would stay",
  "# on the disk as orphan inodes and keep / from being remounted read-only.",
  "find /tmp /var/tmp -mindepth 1 -maxdepth 1 ! -name 'systemd-private-*' -exec rm -rf {} +",
  "fstrim -a >/dev/null 2>&1 || true",
  "# Debian ships no systemd-update-done, so systemd-sysusers (ConditionNeedsUpdate=/etc) ran",
  "# at every boot, on the critical path to basic.target; this boot already made the users.",
  "touch -r /usr /etc/.updated /var/.updated",
  "sync",
  ...CLEAN_ROOT_SCRIPT,
  `echo ${BUILD_OK} > ${GUEST_OUT}/status`,
  'echo "civm-build: stage 2 done"',
];

async function bootBuildVm(
  o: BuildOptions,
  spec: ImageSpec,
  b: { disk: string; format: "qcow2" | "raw"; kernel: string; initrd: string; share: string; out: string; script: string },
): Promise<void> {
  const instance: InstanceSpec = {
    name: `build-${spec.name}`,
    image: b.disk,
    cpus: Math.min(2, availableParallelism()),
    ramBytes: 2 * 1024 ** 3,
    rootDiskBytes: undefined,
    timeoutSeconds: BUILD_VM_TIMEOUT_S,
    sshPort: undefined,
    config: {
      command: b.script,
      user: "root",
      mounts: [
        { tag: "civmbuild", path: GUEST_SHARE, ro: true },
        { tag: "civmout", path: GUEST_OUT, ro: false },
      ],
    },
    kernel: b.kernel,
    initrd: b.initrd,
    // civm.build: units that must run only in a build VM (the guest agent, in images such as
    // civm-host that are not runner VMs) check it; cloud-init has nothing to do in a build.
    cmdline: BUILD_VM_CMDLINE,
    machine: spec.arch === "arm64" ? "virt" : "pc",
    ...(spec.arch && spec.arch !== "x86_64" ? { arch: spec.arch } : {}),
    qemuArgs: [],
    network: buildNetwork(spec.mirror),
    source: { file: spec.source.file, index: spec.source.index },
  };
  // mapped-xattr (or mapped-file where xattrs may be missing): the build's root cannot put
  // setuid or device files into civm's state dir; what it writes is 0644 for civm to read.
  const choice = await securityModelFor(b.out);
  if (choice.note) o.log(`build vm: ${choice.note}`);
  const mounts: HostMount[] = [
    { path: b.share, tag: "civmbuild", readOnly: true, securityModel: choice.model },
    { path: b.out, tag: "civmout", readOnly: false, securityModel: choice.model },
  ];
  let partial = "";
  const vm = new VmRun({
    // A guest of another architecture than the host's is emulated whatever KVM says.
    spec: instance, paths: o.paths, accel: spec.arch && spec.arch !== hostArch() ? "tcg" : o.accel, graceSeconds: 30, mounts,
    directDisk: { path: b.disk, format: b.format },
    // The disk being built and the results share: QEMU's (its per-VM group) while it runs.
    qemuWritable: [b.disk, b.out],
    log: (l) => o.log(`build vm: ${l}`),
    onConsole: (text) => {
      partial += text.replace(/\r/g, "");
      const lines = partial.split("\n");
      partial = lines.pop() ?? "";
      for (const l of lines) o.log(`console: ${l}`);
    },
  });
  // Interrupted: the half-built disk is thrown away, so QEMU is ended at once (no ACPI grace).
  const onAbort = () => vm.stop("signal", true);
  o.signal?.addEventListener("abort", onAbort, { once: true });
  let r: Awaited<ReturnType<VmRun["run"]>>;
  try {
    o.signal?.throwIfAborted();
    r = await vm.run();
  } finally {
    o.signal?.removeEventListener("abort", onAbort);
  }
  if (partial) o.log(`console: ${partial}`);
  o.signal?.throwIfAborted();
  if (r.reason !== "poweroff") {
    throw new CivmError(r.reason === "timeout" ? "timeout" : "qemu", `${describeImage(spec)}: the build VM ended with ${r.reason} (console log: ${r.consoleLog})`, { ...(r.detail ? { details: r.detail } : {}) });
  }
}

/**
 * The build VM's network: the default policy, plus the spec's Debian mirror wherever it is
 * (an apt cache on the host or a private network is common), so apt works inside.
 */
export function buildNetwork(mirror: string): NetworkSpec {
  let url: URL;
  try {
    url = new URL(mirror);
  } catch {
    return { mode: "restricted", allow: [] };
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return { mode: "restricted", allow: [] };
  const port = url.port || (url.protocol === "https:" ? "443" : "80");
  // URL gives an IPv6 host in brackets already, as an allow entry writes it.
  const host = url.hostname;
  const isLocal = host === "localhost" || host === "127.0.0.1" || host === "[::1]";
  try {
    return { mode: "restricted", allow: [parseAllowEntry(`${isLocal ? "host" : host}:${port}`)] };
  } catch {
    return { mode: "restricted", allow: [] };
  }
}
