// CIVM_TRACE=1 prints how long after civm's start each phase began (stderr), to find
// where start-up time goes (see bench/ and docs/benchmarks.md).
const enabled = process.env.CIVM_TRACE === "1";

export function trace(phase: string): void {
  if (enabled) process.stderr.write(`civm: trace ${performance.now().toFixed(1)} ms ${phase}\n`);
}
