// The tiny guest on plain QEMU (TCG), without civm: it finds the config CD by label, prints
// instance.json, ejects the CD and acts on config.tiny. Other e2e tests build on this.
import { test, before } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { run } from "../../src/exec/index.js";
import { buildTinyGuest, type TinyGuest } from "../support/tiny-guest.js";
import { tempDir } from "../support/paths.js";

let guest: TinyGuest;
let warmMs = 0;
before(async () => {
  await buildTinyGuest(); // cold or warm: whatever the cache holds
  const t0 = performance.now();
  guest = await buildTinyGuest();
  warmMs = performance.now() - t0;
});

interface Boot {
  status: number | null;
  signal: NodeJS.Signals | null;
  ms: number;
  console: string;
  qmpReplies: unknown[];
}

interface BootOptions {
  machine: "pc" | "q35";
  config: Record<string, unknown>;
  /** Kill QEMU after this long (default 60 s): the guest must end by itself before. */
  limitMs?: number;
  extraArgs?: string[];
  /** Called whenever the console grows; may send QMP commands. */
  onConsole?: (text: string, qmp: (cmd: Record<string, unknown>) => void, kill: () => void) => void;
}

/** Boots the tiny guest with a hand-made config ISO, as the brief for this guest says. */
async function boot(opts: BootOptions): Promise<Boot> {
  const dir = tempDir("civm-tiny-boot-");
  const cfg = join(dir, "cfg");
  mkdirSync(cfg);
  writeFileSync(join(cfg, "instance.json"), JSON.stringify({ name: "t", config: opts.config }));
  await run("xorriso", ["-as", "mkisofs", "-V", "instance-configuration", "-J", "-R", "-o", join(dir, "cfg.iso"), cfg]);
  // The cached disk is shared by all tests: boot an overlay of it.
  const disk = join(dir, "disk.qcow2");
  await run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", guest.disk, "-F", "qcow2", disk]);
  const consoleLog = join(dir, "console.log");
  const args = [
    "-accel", "tcg",
    "-machine", opts.machine,
    "-m", "256",
    "-nodefaults",
    "-no-user-config",
    "-display", "none",
    "-serial", `file:${consoleLog}`,
    "-kernel", guest.kernel,
    "-initrd", guest.initrd,
    "-append", "console=ttyS0 quiet panic=-1",
    "-drive", `file=${join(dir, "cfg.iso")},if=none,id=cd0,media=cdrom,readonly=on`,
    "-device", "ide-cd,drive=cd0,id=cdrom0,bus=ide.1",
    "-drive", `file=${disk},if=virtio`,
    "-no-reboot",
    "-qmp", "stdio",
    ...(opts.extraArgs ?? []),
  ];
  const t0 = performance.now();
  const child = spawn("qemu-system-x86_64", args, { stdio: ["pipe", "pipe", "pipe"] });
  let stderr = "";
  let stdout = "";
  child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stdin.on("error", () => undefined);
  const qmp = (cmd: Record<string, unknown>): void => {
    child.stdin.write(JSON.stringify(cmd) + "\n");
  };
  qmp({ execute: "qmp_capabilities" });
  const kill = (): void => {
    child.kill("SIGKILL");
  };
  const readConsole = (): string => (existsSync(consoleLog) ? readFileSync(consoleLog, "utf8") : "");
  let seen = 0;
  const poll = setInterval(() => {
    const text = readConsole();
    if (text.length !== seen) {
      seen = text.length;
      opts.onConsole?.(text, qmp, kill);
    }
  }, 100);
  const limit = setTimeout(kill, opts.limitMs ?? 60_000);
  const [status, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) =>
    child.on("close", (code, sig) => resolve([code, sig])),
  );
  clearInterval(poll);
  clearTimeout(limit);
  const ms = performance.now() - t0;
  const qmpReplies = stdout
    .split("\n")
    .filter((l) => l.trim().startsWith("{"))
    .map((l) => JSON.parse(l) as unknown);
  if (stderr.trim()) process.stderr.write(`qemu stderr: ${stderr}`);
  const text = readConsole();
  rmSync(dir, { recursive: true, force: true });
  return { status, signal, ms, console: text, qmpReplies };
}

function assertConfigRead(b: Boot, json: string): void {
  assert.match(b.console, /tiny-guest: booted \(kernel \d/);
  assert.ok(b.console.includes(`tiny-guest: instance.json: ${json}`), b.console);
  assert.match(b.console, /tiny-guest: eject \/dev\/sr0: ok/);
}

const poweroffConfig = { tiny: "poweroff", hello: "world" };
const poweroffJson = JSON.stringify({ name: "t", config: poweroffConfig });

for (const machine of ["pc", "q35"] as const) {
  test(`${machine}: reads instance.json from the config CD, ejects it, powers off; QEMU exits by itself`, async (t) => {
    const b = await boot({ machine, config: poweroffConfig });
    t.diagnostic(`${machine} boot to power-off: ${(b.ms / 1000).toFixed(1)} s (TCG)`);
    assert.equal(b.signal, null, `QEMU was killed (no power-off within 60 s):\n${b.console}`);
    assert.equal(b.status, 0);
    assert.ok(b.ms < 60_000);
    assertConfigRead(b, poweroffJson);
    assert.match(b.console, /tiny-guest: mode poweroff\r?\ntiny-guest: powering off\r?\n/);
    assert.match(b.console, /reboot: Power down/);
  });
}

test("warm build is fast", (t) => {
  t.diagnostic(`warm buildTinyGuest: ${warmMs.toFixed(0)} ms`);
  assert.ok(warmMs < 1000, `warm build took ${warmMs} ms`);
});

test("hang: keeps running (ignores the power button) until killed", async () => {
  let powerdownSent = 0;
  const b = await boot({
    machine: "pc",
    config: { tiny: "hang" },
    onConsole: (text, qmp, kill) => {
      if (text.includes("tiny-guest: hanging") && !powerdownSent) {
        powerdownSent = Date.now();
        qmp({ execute: "system_powerdown" });
        setTimeout(kill, 3000);
      }
    },
  });
  assert.equal(b.signal, "SIGKILL", b.console);
  assert.ok(powerdownSent > 0);
  assert.match(b.console, /tiny-guest: hanging/);
  assert.doesNotMatch(b.console, /powering off/);
});

test("fail: init exits, the kernel panics, panic=-1 + -no-reboot end QEMU", async () => {
  const b = await boot({ machine: "pc", config: { tiny: "fail" } });
  assert.equal(b.signal, null, b.console);
  assert.equal(b.status, 0);
  assert.match(b.console, /tiny-guest: failing/);
  assert.match(b.console, /Kernel panic - not syncing: Attempted to kill init/);
  assert.ok(
    b.qmpReplies.some((r) => (r as { event?: string }).event === "GUEST_PANICKED" || (r as { data?: { reason?: string } }).data?.reason === "guest-reset"),
    JSON.stringify(b.qmpReplies),
  );
});

test("reboot: reboot -f; -no-reboot ends QEMU with a guest-reset SHUTDOWN event", async () => {
  const b = await boot({ machine: "pc", config: { tiny: "reboot" } });
  assert.equal(b.signal, null, b.console);
  assert.match(b.console, /tiny-guest: rebooting/);
  const shutdown = b.qmpReplies.find((r) => (r as { event?: string }).event === "SHUTDOWN") as { data?: { reason?: string } } | undefined;
  assert.equal(shutdown?.data?.reason, "guest-reset");
});

test("acpi: the CD tray is open after the eject; system_powerdown powers the guest off", async () => {
  let sent = false;
  const b = await boot({
    machine: "q35",
    config: { tiny: "acpi" },
    onConsole: (text, qmp) => {
      if (text.includes("tiny-guest: waiting for acpi power button") && !sent) {
        sent = true;
        qmp({ execute: "query-block", id: "qb" });
        qmp({ execute: "system_powerdown" });
      }
    },
  });
  assert.equal(b.signal, null, b.console);
  assert.match(b.console, /tiny-guest: acpi power button pressed\r?\ntiny-guest: powering off/);
  const tray = b.qmpReplies.find((r) => (r as { event?: string }).event === "DEVICE_TRAY_MOVED") as { data?: { "tray-open"?: boolean } } | undefined;
  assert.equal(tray?.data?.["tray-open"], true, "the guest's eject opens the tray");
  const qb = b.qmpReplies.find((r) => (r as { id?: string }).id === "qb") as { return?: { device: string; tray_open?: boolean }[] } | undefined;
  assert.equal(qb?.return?.find((d) => d.device === "cd0")?.tray_open, true);
  const shutdown = b.qmpReplies.find((r) => (r as { event?: string }).event === "SHUTDOWN") as { data?: { reason?: string } } | undefined;
  assert.equal(shutdown?.data?.reason, "guest-shutdown");
});

test("network: udhcpc on virtio-net gets the user-mode address", async () => {
  let sent = false;
  const b = await boot({
    machine: "pc",
    config: { tiny: "network" },
    extraArgs: ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"],
    onConsole: (text, qmp) => {
      if (text.includes("tiny-guest: waiting for acpi power button") && !sent) {
        sent = true;
        qmp({ execute: "system_powerdown" });
      }
    },
  });
  assert.equal(b.signal, null, b.console);
  assert.match(b.console, /tiny-guest: network eth0 10\.0\.2\.15 gateway 10\.0\.2\.2/);
});

test("concurrent cold builds into an empty cache agree on one guest", async (t) => {
  const cacheDir = tempDir("civm-tiny-cache-");
  t.after(() => rmSync(cacheDir, { recursive: true, force: true }));
  const lines: string[] = [];
  const log = (l: string): void => {
    lines.push(l);
  };
  const t0 = performance.now();
  const [a, b] = await Promise.all([buildTinyGuest({ cacheDir, log }), buildTinyGuest({ cacheDir, log })]);
  const coldMs = performance.now() - t0;
  t.diagnostic(`two concurrent cold builds: ${(coldMs / 1000).toFixed(1)} s`);
  assert.deepEqual(a, b);
  assert.ok(existsSync(a.kernel) && existsSync(a.initrd) && existsSync(a.disk));
  assert.equal(a.kernelVersion, guest.kernelVersion);
  const info = JSON.parse((await run("qemu-img", ["info", "--output=json", a.disk])).stdout) as { "virtual-size": number; format: string };
  assert.equal(info.format, "qcow2");
  assert.equal(info["virtual-size"], 64 * 1024 * 1024);
  const t1 = performance.now();
  await buildTinyGuest({ cacheDir, log });
  t.diagnostic(`warm: ${(performance.now() - t1).toFixed(0)} ms`);
  assert.ok(lines.some((l) => l.startsWith("building")));
});
