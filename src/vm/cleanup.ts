// A cleanup stack: every resource is pushed as it is taken and released in reverse order.
// Every step runs even when an earlier one fails; failures are combined, not lost.

export class CleanupStack {
  private readonly steps: { what: string; fn: () => Promise<void> | void }[] = [];

  push(what: string, fn: () => Promise<void> | void): void {
    this.steps.push({ what, fn });
  }

  async run(): Promise<Error | undefined> {
    const errors: string[] = [];
    while (this.steps.length) {
      const step = this.steps.pop()!;
      try {
        await step.fn();
      } catch (e) {
        errors.push(`${step.what}: ${(e as Error).message}`);
      }
    }
    return errors.length ? new Error(`cleanup failed: ${errors.join("; ")}`) : undefined;
  }
}
