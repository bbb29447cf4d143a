// packaging/systemd/civm-serve.service: systemd is not PID 1 where tests run, so the unit is
// parsed and checked against what the code needs; `systemd-analyze verify` runs when present.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { SERVE_DEFAULTS } from "../../src/pool/config.js";
import { EXIT_AFTER_SHUTDOWN_MS } from "../../src/pool/serve.js";
import { TERM_TO_KILL_MS } from "../../src/vm/supervisor.js";
import { civmBin, repoRoot, tempDir } from "../support/paths.js";

const UNIT = join(repoRoot, "packaging", "systemd", "civm-serve.service");

/** section -> key -> values (a key may repeat; comments and blank lines dropped). */
function parseUnit(text: string): Map<string, Map<string, string[]>> {
  const out = new Map<string, Map<string, string[]>>();
  let section: Map<string, string[]> | undefined;
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#") || line.startsWith(";")) continue;
    const sec = /^\[(.+)\]$/.exec(line);
    if (sec) {
      section = new Map();
      out.set(sec[1]!, section);
      continue;
    }
    const eq = line.indexOf("=");
    assert.ok(section && eq > 0, `unit line outside a section or without "=": ${line}`);
    const key = line.slice(0, eq).trim();
    section.set(key, [...(section.get(key) ?? []), line.slice(eq + 1).trim()]);
  }
  return out;
}

const unit = parseUnit(readFileSync(UNIT, "utf8"));
const service = unit.get("Service")!;
const one = (key: string): string | undefined => service.get(key)?.at(-1);
const words = (key: string): string[] => (service.get(key) ?? []).flatMap((v) => v.split(/\s+/).filter(Boolean));

/** systemd time span in seconds ("3900", "65min", "1h 5min", "90s"). */
function seconds(v: string): number {
  const units: Record<string, number> = { "": 1, s: 1, sec: 1, m: 60, min: 60, h: 3600, hr: 3600 };
  let total = 0;
  for (const m of v.matchAll(/(\d+)\s*([a-z]*)/g)) {
    const u = units[m[2]!];
    assert.ok(u !== undefined, `unknown time unit in ${v}`);
    total += Number(m[1]) * u;
  }
  return total;
}

test("civm-serve.service: ExecStart runs civm serve with a config; restarts on failure; installs into multi-user.target", () => {
  const exec = one("ExecStart")!.split(/\s+/);
  assert.equal(basename(exec[0]!), "civm");
  assert.equal(exec[1], "serve");
  assert.ok(exec.includes("--config"), "civm serve requires --config");
  assert.equal(one("Restart"), "on-failure");
  assert.equal(unit.get("Install")?.get("WantedBy")?.[0], "multi-user.target");
  assert.match(one("ExecReload") ?? "", /kill -HUP \$MAINPID/, "SIGHUP re-reads the config");
});

test("civm-serve.service: SIGTERM to civm only (KillMode=mixed); TimeoutStopSec exceeds serve's longest shutdown wait", () => {
  assert.equal(one("KillMode"), "mixed");
  // shutdown(): busy runners get shutdownTimeout, then a forced stop (SIGTERM, SIGKILL after
  // TERM_TO_KILL_MS), then the process exits at the latest EXIT_AFTER_SHUTDOWN_MS later.
  const longestWait = SERVE_DEFAULTS.shutdownTimeoutSeconds + TERM_TO_KILL_MS / 1000 + EXIT_AFTER_SHUTDOWN_MS / 1000;
  const stop = seconds(one("TimeoutStopSec")!);
  assert.ok(stop >= longestWait + 60, `TimeoutStopSec=${stop}s leaves less than a minute over serve's ${longestWait}s`);
});

test("civm-serve.service: the capabilities civm needs, and no more than needed for them", () => {
  const caps = new Set(words("CapabilityBoundingSet"));
  for (const c of ["CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_KILL", "CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_MKNOD"]) {
    assert.ok(caps.has(c), `CapabilityBoundingSet lacks ${c}`);
  }
  for (const c of ["CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_SYS_RAWIO", "CAP_SYS_TIME", "CAP_SYS_BOOT", "CAP_BPF"]) assert.ok(!caps.has(c), `${c} is not needed`);
  assert.ok(!caps.has("~"), "an allow list, not a deny list");
  assert.equal(one("NoNewPrivileges"), "yes");
});

test("civm-serve.service: sandboxing that still lets QEMU, nftables and image builds work", () => {
  assert.equal(one("ProtectSystem"), "strict");
  assert.equal(one("StateDirectory"), "civm"); // /var/lib/civm, writable under ProtectSystem=strict
  assert.equal(one("LogsDirectory"), "civm"); // /var/log/civm
  assert.deepEqual(words("ReadWritePaths").sort(), ["/var/lib/civm", "/var/log/civm"]);
  for (const k of ["ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups", "LockPersonality", "RestrictRealtime"]) {
    assert.equal(one(k), "yes", `${k}=yes`);
  }
  assert.equal(one("SystemCallArchitectures"), "native");
  assert.deepEqual(words("RestrictNamespaces"), ["mnt"], "unshare -m (image builds) needs mnt, nothing else does");
  assert.ok(words("RestrictAddressFamilies").includes("AF_NETLINK"), "nftables talks netlink");
  assert.equal(one("DevicePolicy"), "closed");
  assert.ok((service.get("DeviceAllow") ?? []).includes("/dev/kvm rw"));
  // These would break QEMU or image builds (see the unit's comments).
  assert.notEqual(one("PrivateDevices"), "yes", "hides /dev/kvm");
  assert.notEqual(one("MemoryDenyWriteExecute"), "yes", "TCG and Node's JIT need W+X memory");
  assert.notEqual(one("RestrictSUIDSGID"), "yes", "mmdebstrap creates Debian's setuid programs");
  assert.equal(one("ProtectProc"), undefined, "civm must see QEMU's /proc entries");
});

test("civm-serve.service: systemd-analyze verify finds nothing (ExecStart pointed at this checkout)", (t) => {
  if (spawnSync("systemd-analyze", ["--version"]).status !== 0) {
    t.skip("systemd-analyze is not installed");
    return;
  }
  // verify checks that ExecStart's program exists; the unit names the installed path.
  const dir = tempDir("civm-unit-");
  const copy = join(dir, "civm-serve.service");
  writeFileSync(copy, readFileSync(UNIT, "utf8").replace(/^ExecStart=\S+/m, `ExecStart=${civmBin}`));
  const r = spawnSync("systemd-analyze", ["verify", copy], { encoding: "utf8" });
  rmSync(dir, { recursive: true, force: true });
  assert.equal(r.status, 0, r.stderr);
  // Unknown keys and bad values are only warnings (exit 0): any output fails the test.
  assert.equal(`${r.stdout}${r.stderr}`.trim(), "", "systemd-analyze verify printed warnings");
});
