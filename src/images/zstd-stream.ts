// zstd as a stream stage: Debian's zstd binary (Node 20's zlib has no zstd). Used by the
// OCI pull (zstd layers, .qcow2.zst files inside layers and artifacts) and push.
import { spawn } from "node:child_process";
import { Duplex, type Readable, type Writable } from "node:stream";
import { CivmError, ExternalError } from "../errors/index.js";
import { missingProgram } from "../exec/index.js";

export interface ZstdProcess {
  stdin: Writable;
  stdout: Readable;
  /** Both ends as one stream (for pipeline); made on demand, as it reads stdout. */
  duplex(): Duplex;
  /** Resolves when zstd exits 0; rejects with a CivmError otherwise. */
  done: Promise<void>;
  kill(): void;
}

/** Starts `zstd ARGS` (-q added); `describe` turns a failure into the error to report. */
export function zstdProcess(args: readonly string[], describe: (why: string, stderr: string) => CivmError): ZstdProcess {
  const child = spawn("zstd", ["-q", ...args], { stdio: ["pipe", "pipe", "pipe"] });
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (d: string) => {
    if (stderr.length < 4096) stderr += d;
  });
  // A stage that fails first makes the other end error with EPIPE: the exit status says why.
  child.stdin.on("error", () => {});
  const done = new Promise<void>((resolve, reject) => {
    child.on("error", (e: NodeJS.ErrnoException) => reject(e.code === "ENOENT" ? missingProgram("zstd") : e));
    child.on("close", (code, signal) => {
      if (code === 0) resolve();
      else reject(describe(signal ? `was killed by ${signal}` : `exit ${code}`, stderr.trim()));
    });
  });
  done.catch(() => {});
  return {
    stdin: child.stdin,
    stdout: child.stdout,
    duplex: () => Duplex.from({ writable: child.stdin, readable: child.stdout }),
    done,
    kill: () => {
      if (child.exitCode === null) child.kill("SIGKILL");
    },
  };
}

/** zstd -d -c, failing as "WHAT is not valid zstd data". */
export function zstdDecompress(what: string): ZstdProcess {
  return zstdProcess(["-d", "-c"], (why, stderr) => new ExternalError(`${what} is not valid zstd data: zstd -d ${why}`, stderr ? { details: stderr } : {}));
}
