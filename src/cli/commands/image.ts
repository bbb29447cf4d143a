import { Command } from "commander";
import { createWriteStream, existsSync } from "node:fs";
import { join } from "node:path";
import { pathsFrom } from "../global.js";
import { abortOnSignals, clearProgress, printJson, printNames, progressLine, say } from "../output.js";
import { ensureLogsDir } from "../../host/paths.js";
import { ConfigError } from "../../errors/index.js";
import { formatBytes } from "../../vm/format.js";

interface BuildFlags {
  file?: string;
  force?: boolean;
  quiet?: boolean;
  json?: boolean;
}

/** -f FILE, else ./images.json or ./images.yaml when present, else only the built-in images. */
function specFile(flag: string | undefined): string | undefined {
  if (flag) return flag;
  return ["images.json", "images.yaml", "images.yml"].find((f) => existsSync(f));
}

function stamp(): string {
  return new Date().toISOString().replace(/[-:]/g, "").replace(/\..*/, "").replace("T", "-");
}

export function registerImage(program: Command): void {
  const image = program.command("image").description("Build, list, fetch and remove VM images in the image store (state dir).");

  image
    .command("build")
    .description("Build an image (and its parents) from a spec: mmdebstrap root tree, ext4 partition without mounts, then a VM boot for the bootloader and provision scripts. Unchanged images are cached by key. A parent the file does not define may be a built-in image or one already in the store (used as it is). A spec with snapshot: true also gets its memory snapshot (docs/images.md \"Snapshots\").")
    .argument("<name>", "image name (built in: civm-runner, civm-runner-arm64, civm-gha, civm-host)")
    .option("-f, --file <file>", "images spec, JSON or YAML, civm or lvh form (default: ./images.json or ./images.yaml, plus the built-in images)")
    .option("--force", "rebuild the image even if its key is unchanged (parents stay cached)")
    .option("-q, --quiet", "print only the result")
    .option("--json", "print progress and the result as JSON lines on stdout")
    .action(async (asked: string, flags: BuildFlags, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const { loadImageSpecs, loadBuiltinImageSpecs, buildImage } = await import("../../images/index.js");
      const { lvhImageName } = await import("../../images/lvh.js");
      const { ImageStore, sweepStale } = await import("../../images/store.js");
      const { detectAccel } = await import("../../host/kvm.js");
      const file = specFile(flags.file);
      // A parent the file does not define may be a built-in image or one stored in the state dir.
      const specs = file ? await loadImageSpecs(file, { stateDir: paths.stateDir }) : await loadBuiltinImageSpecs();
      // lvh's names carry the file's extension: "base.qcow2" builds the image base.
      const all = Array.isArray(specs) ? specs : specs.images;
      const name = all.some((i) => i.name === asked) ? asked : lvhImageName(asked);
      const store = new ImageStore(paths.stateDir);
      await sweepStale(store);
      const accel = await detectAccel({ stateDir: paths.stateDir });
      ensureLogsDir(paths.logsDir);
      const logFile = join(paths.logsDir, `image-build-${name}-${stamp()}.log`);
      const logStream = createWriteStream(logFile, { mode: 0o600 });
      const emit = (obj: Record<string, unknown>) => process.stdout.write(JSON.stringify(obj) + "\n");
      if (!flags.quiet && !flags.json) say(`building ${name}; full log: ${logFile}${accel.accel === "tcg" ? " (TCG: the VM stage is slow)" : ""}`);
      const interrupt = abortOnSignals(`the build of ${name} was interrupted; its build VM and work files are gone, nothing was stored`);
      try {
        const outcomes = await buildImage({
          name, specs, store, paths, accel: accel.accel, force: !!flags.force, signal: interrupt.signal,
          aptCacheDir: join(paths.stateDir, "apt-cache"),
          log: (l) => logStream.write(l + "\n"),
          onEvent: (e) => {
            logStream.write(`== ${e.image}: ${e.step}: ${e.message}\n`);
            if (flags.json) emit({ type: "progress", ...e });
            else if (!flags.quiet) process.stderr.write(`[${(e.elapsedMs / 1000).toFixed(1).padStart(6)} s] ${e.image}: ${e.message}\n`);
          },
        });
        for (const o of outcomes) {
          if (flags.json) emit({ type: "result", image: o.image, status: o.status, key: o.key, seconds: o.seconds, disk: o.stored.diskPath });
          else say(`${o.image}: ${o.status} in ${o.seconds.toFixed(1)} s (key ${o.key.slice(0, 12)}): ${o.stored.diskPath}`);
        }
        // snapshot: true: the image's snapshot for the default VM settings, made now rather than on first use.
        const wanted = all.find((i) => i.name === name);
        const built = outcomes.find((o) => o.image === name);
        if (wanted?.snapshot && built) {
          const { ensureDefaultSnapshot } = await import("../../images/snapshot.js");
          // The image is stored by now: an interrupt here ends the snapshot's VM and removes only the snapshot's files.
          interrupt.release();
          const snapInterrupt = abortOnSignals(`the snapshot of ${name} was interrupted; its VM was ended and its unfinished files removed (the image itself is stored)`);
          const snap = await ensureDefaultSnapshot({ img: built.stored, paths, accel: accel.accel, signal: snapInterrupt.signal, log: (l) => (flags.json ? emit({ type: "progress", image: name, step: "snapshot", message: l }) : flags.quiet ? undefined : say(l)) }).finally(() => snapInterrupt.release());
          if (flags.json) emit({ type: "snapshot", image: name, key: snap.meta.key, memoryBytes: snap.meta.memoryBytes, seconds: snap.meta.makeSeconds });
          else say(`${name}: snapshot ${snap.meta.key.slice(0, 8)} (${snap.meta.settings.cpus} cpus, ${Math.round(snap.meta.settings.ramBytes / 1024 ** 2)} MiB): memory file ${(snap.meta.memoryBytes / 1024 ** 2).toFixed(1)} MiB`);
        }
      } catch (e) {
        if (!flags.json) say(`build failed; full log: ${logFile}`);
        throw e;
      } finally {
        interrupt.release();
        await new Promise((r) => logStream.end(r));
      }
    });

  image
    .command("ls")
    .alias("list")
    .description("List stored images: name, key, format, size, age, memory snapshots (count and memory file size; --json: each one's settings).")
    .option("--json", "print a JSON array")
    .option("-q, --quiet", "print names only, one a line")
    .action(async (flags: { json?: boolean; quiet?: boolean }, cmd: Command) => {
      const { ImageStore, formatImageTable } = await import("../../images/store.js");
      const { listSnapshots } = await import("../../images/snapshot.js");
      const images = await new ImageStore(pathsFrom(cmd).stateDir).list();
      const snaps = new Map(await Promise.all(images.map(async (i) => [i.name, await listSnapshots(i)] as const)));
      const snapJson = (name: string) =>
        (snaps.get(name) ?? []).map((s) => ({
          key: s.meta.key, createdAt: s.meta.createdAt, memoryBytes: s.meta.memoryBytes, diskBytes: s.meta.diskBytes, makeSeconds: s.meta.makeSeconds,
          accel: s.meta.settings.accel, machine: s.meta.settings.machine, cpus: s.meta.settings.cpus, ramBytes: s.meta.settings.ramBytes, qemu: s.meta.qemu.path, dir: s.dir,
        }));
      if (flags.json) printJson(images.map((i) => ({ ...i.manifest, diskPath: i.diskPath, snapshots: snapJson(i.name) })));
      else if (flags.quiet) printNames(images.map((i) => i.manifest.name));
      else process.stdout.write(formatImageTable(images, Date.now(), new Map([...snaps].map(([n, l]) => [n, l.map((s) => s.meta.memoryBytes)]))));
    });

  image
    .command("path")
    .description("Print the disk path of a stored image (for scripts).")
    .argument("<name>")
    .action(async (name: string, _f: unknown, cmd: Command) => {
      const { ImageStore } = await import("../../images/store.js");
      const img = await new ImageStore(pathsFrom(cmd).stateDir).require(name);
      process.stdout.write(img.diskPath + "\n");
    });

  image
    .command("rm")
    .description("Remove a stored image (refused while a child image is built on it).")
    .argument("<names...>")
    .option("--json", "print the removed images as a JSON array")
    .action(async (names: string[], flags: { json?: boolean }, cmd: Command) => {
      const { ImageStore } = await import("../../images/store.js");
      const store = new ImageStore(pathsFrom(cmd).stateDir);
      const removed = [];
      for (const name of names) {
        await store.remove(name);
        say(`removed image ${name}`);
        removed.push({ name });
      }
      if (flags.json) printJson(removed);
    });

  image
    .command("export")
    .description("Write a stored image as one standalone disk file to upload elsewhere: qcow2 or raw (libvirt, Proxmox, OpenStack) or a fixed VHD (Azure); a child image comes out whole.")
    .argument("<name>")
    .requiredOption("--format <format>", "qcow2, raw or vhd (fixed, whole MiB, for Azure)")
    .requiredOption("-o, --output <file>", "the file to write")
    .option("--force", "replace an existing output file")
    .option("-q, --quiet", "no progress")
    .option("--json", "print the result (output, format, virtualSize, bytes) as JSON")
    .action(async (name: string, flags: { format: string; output: string; force?: boolean; quiet?: boolean; json?: boolean }, cmd: Command) => {
      const { ImageStore } = await import("../../images/store.js");
      const { exportImage, parseFormat } = await import("../../images/export.js");
      const format = parseFormat(flags.format);
      const img = await new ImageStore(pathsFrom(cmd).stateDir).require(name);
      const r = await exportImage({
        image: img, format, output: flags.output, force: !!flags.force,
        ...(flags.quiet ? {} : { onProgress: (p: number) => process.stderr.write(`\rcivm: exporting ${name}: ${p.toFixed(0)}%   `) }),
      });
      if (!flags.quiet) process.stderr.write("\n");
      say(`exported ${name} to ${r.output} (${format}, virtual size ${formatBytes(r.virtualSize)}, ${formatBytes(r.bytes)} on disk)`);
      if (flags.json) printJson(r);
    });

  image
    .command("pull")
    .description(
      "Fetch an image into the store: from an OCI registry (REGISTRY/REPO:TAG or @sha256:..., little-vm-helper's layout; digests verified, cached by digest), or a .qcow2 or .qcow2.zst over HTTP(S) with its .sha256 (of the uncompressed image).",
    )
    .argument("<ref-or-url>", "REGISTRY/REPO:TAG, REGISTRY/REPO@sha256:DIGEST, or an http(s) URL of a .qcow2[.zst]")
    .option("--name <name>", "store it under this name (default: REPO-TAG for a reference, the file name without .qcow2[.zst] for a URL)")
    .option("--platform <os/arch>", "reference: the platform to take from a multi-platform image (default linux/<this host>)")
    .option("--file <name>", "reference: the disk to take when the image holds several (lvh's root-images: base, kind, ...; default the first)")
    .option("--auth-file <file>", "reference: registry credentials, docker's config.json format (default $CIVM_REGISTRY_AUTH_FILE, else podman's and docker's own files)")
    .option("-q, --quiet", "no progress")
    .option("--json", "print the stored image (name, diskPath, sha256; digest and reference for OCI) as JSON")
    .option("--force", "replace a stored image of the same name (a reference's own earlier pull is refreshed without it)")
    .addHelpText(
      "after",
      `
A reference names a registry (a host with a "." or a ":PORT", or localhost) and a tag or
digest: quay.io/lvh-images/kind:bpf-next-main. Pulling a tag again refreshes it; the same
digest is never downloaded twice. civm run --image REF and instances' "image" pull on first
use. Credentials are never taken from the command line; see docs/images.md.`,
    )
    .action(async (arg: string, flags: { name?: string; quiet?: boolean; json?: boolean; force?: boolean; platform?: string; file?: string; authFile?: string }, cmd: Command) => {
      const { ImageStore } = await import("../../images/store.js");
      const paths = pathsFrom(cmd);
      const store = new ImageStore(paths.stateDir);
      if (!/^https?:\/\//i.test(arg)) {
        const { requireOciReference } = await import("../../images/oci-ref.js");
        const ref = requireOciReference(arg, "civm image pull");
        const { pullOciImage } = await import("../../images/oci.js");
        const { sweepStale } = await import("../../images/store.js");
        await sweepStale(store);
        const interrupt = abortOnSignals(`the pull of ${arg} was interrupted; nothing was stored`);
        const r = await pullOciImage({
          ref, store, stateDir: paths.stateDir, log: flags.quiet ? () => {} : say, signal: interrupt.signal,
          ...(flags.name ? { name: flags.name } : {}),
          ...(flags.platform ? { platform: flags.platform } : {}),
          ...(flags.file ? { file: flags.file } : {}),
          ...(flags.authFile ? { authFile: flags.authFile } : {}),
          ...(flags.force ? { force: true } : {}),
          ...(flags.quiet ? {} : { onProgress: progressLine(formatBytes) }),
        }).finally(() => {
          interrupt.release();
          clearProgress();
        });
        say(`${r.status === "up-to-date" ? "up to date" : "stored"}: ${r.image.name}: ${r.image.diskPath} (${r.digest})`);
        if (flags.json) printJson({ name: r.image.name, diskPath: r.image.diskPath, sha256: r.image.manifest.sha256, digest: r.digest, reference: r.image.manifest.url, status: r.status });
        return;
      }
      if (flags.platform || flags.file || flags.authFile) throw new ConfigError("--platform, --file and --auth-file are for OCI references; an http(s) URL names one file");
      const { pullImage, describePullUrl } = await import("../../images/pull.js");
      // As kernel add: replacing what is stored takes --force (checked before downloading).
      const target = flags.name ?? describePullUrl(arg).defaultName;
      if (!flags.force && (await store.get(target).catch(() => undefined))) {
        throw new ConfigError(`an image named "${target}" is already stored (civm image ls); pass --force to replace it, or --name for another name`);
      }
      const img = await pullImage({
        url: arg, store, log: flags.quiet ? () => {} : say,
        ...(flags.name ? { name: flags.name } : {}),
        ...(flags.quiet ? {} : { onProgress: (p: { bytes: number; total?: number }) => process.stderr.write(`\rcivm: ${formatBytes(p.bytes)}${p.total ? ` of ${formatBytes(p.total)}` : ""}   `) }),
      });
      if (!flags.quiet) process.stderr.write("\n");
      say(`stored ${img.name}: ${img.diskPath} (sha256 ${img.manifest.sha256.slice(0, 16)}…)`);
      if (flags.json) printJson({ name: img.name, diskPath: img.diskPath, sha256: img.manifest.sha256 });
    });

  image
    .command("push")
    .description("Push a stored image to an OCI registry in little-vm-helper's layout (data/images/NAME.qcow2.zst in an image layer, with its kernel and initrd when it has them), so civm image pull, civm run --image REF and lvh can use it.")
    .argument("<name>", "a stored image (civm image ls)")
    .argument("<ref>", "REGISTRY/REPO:TAG")
    .option("--auth-file <file>", "registry credentials, docker's config.json format (default $CIVM_REGISTRY_AUTH_FILE, else podman's and docker's own files)")
    .option("-q, --quiet", "no progress")
    .option("--json", "print the pushed reference and digest as JSON")
    .action(async (name: string, refText: string, flags: { authFile?: string; quiet?: boolean; json?: boolean }, cmd: Command) => {
      const { ImageStore, sweepStale } = await import("../../images/store.js");
      const { requireOciReference } = await import("../../images/oci-ref.js");
      const { pushOciImage } = await import("../../images/oci.js");
      const ref = requireOciReference(refText, "civm image push", { needTag: true });
      const store = new ImageStore(pathsFrom(cmd).stateDir);
      await sweepStale(store);
      const interrupt = abortOnSignals(`the push of ${name} was interrupted; the tag may not have been updated`);
      const r = await pushOciImage({
        name, ref, store, log: flags.quiet ? () => {} : say, signal: interrupt.signal,
        ...(flags.authFile ? { authFile: flags.authFile } : {}),
        ...(flags.quiet ? {} : { onProgress: progressLine(formatBytes) }),
      }).finally(() => {
        interrupt.release();
        clearProgress();
      });
      say(`pushed ${name}: ${r.reference} (${formatBytes(r.uploaded)} uploaded)`);
      if (flags.json) printJson({ name, reference: r.reference, digest: r.digest, uploaded: r.uploaded });
    });
}
