import type { Command } from "commander";
import { pathsFrom } from "../global.js";
import { say } from "../output.js";
import { bootInstance, trapSignals } from "./run.js";
import { STORED_IMAGE_CMDLINE } from "../../images/resolve.js";
import type { InstanceSpec } from "../../config/types.js";

const DEMO_IMAGE = "civm-runner";

/** What the demo VM runs: proof that it read its config, ran as the runner user and had a disk. */
const DEMO_COMMAND = [
  'echo "civm demo: hello from $(hostname), kernel $(uname -r), running as $(id -un)"',
  "df -h / | tail -n 1",
  'echo "civm demo: done; the VM powers off and civm deletes it"',
].join("; ");

export function registerDemo(program: Command): void {
  program
    .command("demo")
    .description(`civm's main job end to end on the built-in defaults: build (or reuse) the ${DEMO_IMAGE} image, boot one ephemeral VM from it that reads its config from the CD-ROM, runs a command as the runner user and powers off; the VM is deleted.`)
    .option("--quiet", "do not stream the VM's console")
    .action(async (flags: { quiet?: boolean }, cmd: Command) => {
      const paths = pathsFrom(cmd);
      const stop = trapSignals("demo");
      const { loadBuiltinImageSpecs, buildImage } = await import("../../images/index.js");
      const { detectAccel } = await import("../../host/kvm.js");
      const { ImageStore } = await import("../../images/store.js");
      const accel = await detectAccel({ stateDir: paths.stateDir });
      say(`step 1/2: image ${DEMO_IMAGE} (built once, then reused while its spec is unchanged)`);
      const [outcome] = (await buildImage({
        name: DEMO_IMAGE, specs: await loadBuiltinImageSpecs(), store: new ImageStore(paths.stateDir), paths, accel: accel.accel,
        log: () => {},
        onEvent: (e) => process.stderr.write(`[${(e.elapsedMs / 1000).toFixed(1).padStart(6)} s] ${e.image}: ${e.message}\n`),
      })).slice(-1);
      const img = outcome!.stored;
      say(`step 2/2: one ephemeral VM from ${img.diskPath}`);
      const spec: InstanceSpec = {
        name: "civm-demo", image: img.diskPath, imageRef: DEMO_IMAGE, cpus: 2, ramBytes: 1024 ** 3, rootDiskBytes: 6 * 1024 ** 3,
        timeoutSeconds: 600, sshPort: undefined, config: { command: DEMO_COMMAND },
        kernel: img.kernelPath, initrd: img.initrdPath, cmdline: img.kernelPath ? STORED_IMAGE_CMDLINE : undefined,
        machine: "pc", qemuArgs: [], source: { file: "(civm demo)", index: 0 },
      };
      const code = await bootInstance({ spec, file: "(civm demo)", baseDir: process.cwd(), paths, graceSeconds: 30, stop, flags: { console: !flags.quiet } });
      process.exit(code);
    });
}
