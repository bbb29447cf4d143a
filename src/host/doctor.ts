// `civm doctor`: is this host ready? The tools civm calls (with versions), QEMU new enough,
// KVM present and really usable (the probe boot of kvm.ts, cached), free disk in the state
// dir, state and logs dirs writable. Each check has a severity: a failed "required" check
// makes the report not ok (exit 8); a failed "optional" one is only a warning.
import { constants } from "node:fs";
import { access, readFile, rm, statfs, stat, writeFile } from "node:fs/promises";
import { delimiter, dirname, join, resolve } from "node:path";
import { messageOf } from "../errors/index.js";
import { PACKAGE_OF, ToolError, run } from "../exec/index.js";
import { detectAccel, parseQemuVersion, type AccelDecision } from "./kvm.js";
import type { Paths } from "./paths.js";
import { ARCH_INFO, GUEST_ARCHES, hostArch } from "../vm/arch.js";

export type CheckSeverity = "required" | "optional";
export type CheckStatus = "pass" | "warn" | "fail";

export interface DoctorCheck {
  name: string;
  /** True when the check passed outright (status "pass"). */
  ok: boolean;
  /** "fail" only for required checks; a failed optional check (or low disk) is "warn". */
  status: CheckStatus;
  severity: CheckSeverity;
  detail: string;
  /** What to do about it, e.g. "apt-get install -y qemu-utils". */
  fix?: string;
}

export interface DoctorReport {
  /** No failed required check. */
  ok: boolean;
  checks: DoctorCheck[];
  /** The accelerator civm would use (absent when it could not be decided). */
  accel?: AccelDecision;
}

export interface DoctorOptions {
  paths: Paths;
  env?: NodeJS.ProcessEnv;
  /** For tests: the KVM device (default /dev/kvm). */
  kvmDevice?: string;
  /** For tests: KVM probe timeout (default 4000 ms). */
  probeTimeoutMs?: number;
  /** For tests: binfmt_misc's folder (default /proc/sys/fs/binfmt_misc), a file to test existence (default fs). */
  binfmtDir?: string;
  fileExists?: (path: string) => Promise<boolean>;
  /** For tests: the host's architecture as Node names it (default process.arch). */
  hostNodeArch?: string;
}

export const MIN_QEMU = { major: 6, minor: 1 } as const;
const GiB = 1024 ** 3;
export const DISK_WARN_BYTES = 10 * GiB;
export const DISK_FAIL_BYTES = 2 * GiB;

interface ToolSpec {
  name: string;
  /** Programs that do the job, first preferred (xorriso, else genisoimage). */
  programs: string[];
  versionArgs: Record<string, string[]>;
  severity: CheckSeverity;
  /** What civm needs it for, shown when it is missing. */
  purpose: string;
}

export const TOOLS: readonly ToolSpec[] = [
  { name: "qemu-system-x86_64", programs: ["qemu-system-x86_64"], versionArgs: { "qemu-system-x86_64": ["--version"] }, severity: "required", purpose: "runs the VMs" },
  { name: "qemu-img", programs: ["qemu-img"], versionArgs: { "qemu-img": ["--version"] }, severity: "required", purpose: "creates each VM's overlay disk" },
  {
    name: "xorriso",
    programs: ["xorriso", "genisoimage"],
    versionArgs: { xorriso: ["-version"], genisoimage: ["--version"] },
    severity: "required",
    purpose: "writes the config drive (genisoimage also works)",
  },
  { name: "nft", programs: ["nft"], versionArgs: { nft: ["--version"] }, severity: "required", purpose: "applies each VM's network policy (nftables)" },
  { name: "setpriv", programs: ["setpriv"], versionArgs: { setpriv: ["--version"] }, severity: "required", purpose: "starts QEMU as its unprivileged user" },
  { name: "mmdebstrap", programs: ["mmdebstrap"], versionArgs: { mmdebstrap: ["--version"] }, severity: "optional", purpose: "needed only to build images" },
  { name: "mke2fs", programs: ["mke2fs"], versionArgs: { mke2fs: ["-V"] }, severity: "optional", purpose: "needed only to build images" },
  { name: "sfdisk", programs: ["sfdisk"], versionArgs: { sfdisk: ["--version"] }, severity: "optional", purpose: "needed only to build images" },
  { name: "zstd", programs: ["zstd"], versionArgs: { zstd: ["--version"] }, severity: "optional", purpose: "needed only for compressed images: .zst pulls, OCI pulls and pushes (lvh's .qcow2.zst, zstd layers)" },
  { name: "ssh-keygen", programs: ["ssh-keygen"], versionArgs: {}, severity: "optional", purpose: "needed only to log into VMs over SSH" },
  { name: "ssh", programs: ["ssh"], versionArgs: { ssh: ["-V"] }, severity: "optional", purpose: "needed only to log into VMs over SSH" },
];

/** Finds a program on env.PATH (not process.env: tests point PATH at fakes). */
export async function findProgram(program: string, env: NodeJS.ProcessEnv): Promise<string | undefined> {
  if (program.includes("/")) return program;
  for (const dir of (env.PATH ?? "").split(delimiter)) {
    if (!dir) continue;
    const p = join(dir, program);
    try {
      await access(p, constants.X_OK);
      if ((await stat(p)).isFile()) return p;
    } catch {
      /* keep looking */
    }
  }
  return undefined;
}

/** First meaningful line a program prints about its version (stdout or stderr). */
async function versionLine(path: string, args: string[], env: NodeJS.ProcessEnv): Promise<string | undefined> {
  let text: string;
  try {
    const r = await run(path, args, { env, timeoutMs: 10_000 });
    text = `${r.stdout}\n${r.stderr}`;
  } catch (e) {
    text = e instanceof ToolError ? e.stderr : "";
  }
  const line = text
    .split("\n")
    .map((l) => l.replace(/^[*\s]+|[*\s]+$/g, ""))
    .find((l) => /\d+\.\d+/.test(l));
  return line ? line.slice(0, 120) : undefined;
}

/** Version of the Debian package that ships a program (for tools without a version flag). */
async function packageVersion(pkg: string, env: NodeJS.ProcessEnv): Promise<string | undefined> {
  try {
    const { stdout } = await run("dpkg-query", ["-W", "-f=${Version}", pkg], { env, timeoutMs: 10_000 });
    return stdout.trim() || undefined;
  } catch {
    return undefined;
  }
}

function check(name: string, severity: CheckSeverity, ok: boolean, detail: string, fix?: string): DoctorCheck {
  const c: DoctorCheck = { name, ok, status: ok ? "pass" : severity === "required" ? "fail" : "warn", severity, detail };
  if (fix !== undefined && !ok) c.fix = fix;
  return c;
}

async function toolCheck(spec: ToolSpec, env: NodeJS.ProcessEnv): Promise<{ check: DoctorCheck; path?: string; version?: string }> {
  for (const program of spec.programs) {
    const path = await findProgram(program, env);
    if (!path) continue;
    const args = spec.versionArgs[program];
    let version = args ? await versionLine(path, args, env) : undefined;
    if (!version) {
      const pkg = PACKAGE_OF[program];
      const pv = pkg ? await packageVersion(pkg, env) : undefined;
      if (pv) version = `${pkg} ${pv}`;
    }
    const alt = program !== spec.programs[0] ? ` (${spec.programs[0]} is absent; ${program} is used instead)` : "";
    const c = check(spec.name, spec.severity, true, `${version ?? "version unknown"}, ${path}${alt}`);
    return { check: c, path, ...(version ? { version } : {}) };
  }
  const first = spec.programs[0] ?? spec.name;
  const names = spec.programs.join(" or ");
  const pkg = PACKAGE_OF[first];
  return {
    check: check(spec.name, spec.severity, false, `${names} not found on PATH; ${spec.purpose}`, pkg ? `apt-get install -y ${pkg}` : undefined),
  };
}

function formatBytes(n: number): string {
  if (n >= GiB) return `${(n / GiB).toFixed(1)} GiB`;
  return `${(n / 1024 ** 2).toFixed(0)} MiB`;
}

/** Disk check from the free bytes: fail below 2 GiB, warn below 10 GiB. */
export function diskCheck(dir: string, freeBytes: number): DoctorCheck {
  const free = `${formatBytes(freeBytes)} free in ${dir}`;
  const fix = "free some space or point --state-dir / CIVM_STATE_DIR at a bigger disk";
  if (freeBytes < DISK_FAIL_BYTES) return { ...check("disk space", "required", false, `${free}; civm needs at least 2 GiB`, fix), status: "fail" };
  if (freeBytes < DISK_WARN_BYTES) return { ...check("disk space", "required", false, `${free}; below the recommended 10 GiB (images and overlays grow)`, fix), status: "warn" };
  return check("disk space", "required", true, free);
}

/** The dir itself if it exists, else its closest existing ancestor. */
async function existingAncestor(dir: string): Promise<string> {
  let d = resolve(dir);
  for (;;) {
    try {
      await stat(d);
      return d;
    } catch {
      const up = dirname(d);
      if (up === d) return d;
      d = up;
    }
  }
}

async function writableCheck(name: string, dir: string): Promise<DoctorCheck> {
  const fix = `make ${dir} writable for this user, or choose another with --state-dir/--logs-dir (CIVM_STATE_DIR/CIVM_LOGS_DIR)`;
  const at = await existingAncestor(dir);
  try {
    if (!(await stat(at)).isDirectory()) return check(name, "required", false, `${at} is not a directory`, fix);
    // Really write: access(W_OK) says yes to root on a read-only bind mount in some setups.
    const probe = join(at, `.civm-doctor-${process.pid}-${Date.now()}`);
    await writeFile(probe, "");
    await rm(probe, { force: true });
  } catch (e) {
    return check(name, "required", false, `${at} is not writable: ${messageOf(e)}`, fix);
  }
  return check(name, "required", true, at === resolve(dir) ? `${dir} is writable` : `${dir} does not exist yet; it will be created in ${at}, which is writable`);
}

function age(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

async function kvmChecks(opts: DoctorOptions, env: NodeJS.ProcessEnv, qemuPath: string | undefined): Promise<{ checks: DoctorCheck[]; accel?: AccelDecision }> {
  const device = opts.kvmDevice ?? "/dev/kvm";
  const checks: DoctorCheck[] = [];
  let present = false;
  try {
    await stat(device);
    present = true;
    try {
      await access(device, constants.R_OK | constants.W_OK);
      checks.push(check(device, "optional", true, `${device} exists and is readable and writable`));
    } catch {
      checks.push(check(device, "optional", false, `${device} exists but this user cannot open it read-write`, "add the user to the kvm group: usermod -aG kvm $USER (then log in again)"));
    }
  } catch {
    checks.push(
      check(device, "optional", false, `${device} does not exist`, "enable VT-x/AMD-V (or nested virtualisation on the outer hypervisor) and load kvm_intel or kvm_amd"),
    );
  }
  if (!qemuPath) {
    checks.push(check("KVM usable", "optional", false, "cannot probe: qemu-system-x86_64 is missing"));
    return { checks };
  }
  try {
    const accel = await detectAccel({
      stateDir: opts.paths.stateDir,
      qemuBinary: qemuPath,
      env,
      ...(opts.kvmDevice ? { kvmDevice: opts.kvmDevice } : {}),
      ...(opts.probeTimeoutMs ? { timeoutMs: opts.probeTimeoutMs } : {}),
    });
    const source = accel.cached
      ? `cached result from ${accel.probedAt !== undefined ? `${age(Date.now() - accel.probedAt)} ago` : "earlier"} (host-cache.json, kept 24 h)`
      : accel.reason.startsWith("forced")
        ? "not probed"
        : present
          ? "probed just now"
          : "no probe needed";
    if (accel.accel === "kvm") {
      checks.push(check("KVM usable", "optional", true, `yes: ${accel.reason}; ${source}`));
    } else {
      const fix = accel.reason.startsWith("forced")
        ? "unset CIVM_ACCEL to let civm probe KVM"
        : present
          ? "if this host is a VM, enable nested virtualisation on the outer hypervisor; set CIVM_ACCEL=tcg to skip the probe"
          : undefined;
      checks.push(check("KVM usable", "optional", false, `no: ${accel.reason}; ${source}. Guests run under TCG (software emulation), 5-10x slower`, fix));
    }
    return { checks, accel };
  } catch (e) {
    checks.push(check("KVM usable", "optional", false, `cannot decide: ${messageOf(e)}`));
    return { checks };
  }
}

export async function runDoctor(opts: DoctorOptions): Promise<DoctorReport> {
  const env = opts.env ?? process.env;
  const tools = await Promise.all(TOOLS.map((t) => toolCheck(t, env)));
  const checks: DoctorCheck[] = tools.map((t) => t.check);

  const qemu = tools[0];
  if (qemu?.path) {
    const name = `QEMU >= ${MIN_QEMU.major}.${MIN_QEMU.minor}`;
    try {
      const v = parseQemuVersion(qemu.version ?? "");
      const good = v.major > MIN_QEMU.major || (v.major === MIN_QEMU.major && v.minor >= MIN_QEMU.minor);
      checks.push(
        check(name, "required", good, `found ${v.major}.${v.minor}.${v.micro}`, `install QEMU ${MIN_QEMU.major}.${MIN_QEMU.minor} or newer (Debian 12: apt-get install -y qemu-system-x86)`),
      );
    } catch {
      checks.push(check(name, "required", false, `cannot read the version of ${qemu.path}`, "reinstall qemu-system-x86"));
    }
  }

  const kvm = await kvmChecks(opts, env, qemu?.path);
  checks.push(...kvm.checks);

  try {
    const at = await existingAncestor(opts.paths.stateDir);
    const s = await statfs(at);
    checks.push(diskCheck(at, s.bavail * s.bsize));
  } catch (e) {
    checks.push(check("disk space", "required", false, `cannot read free space of ${opts.paths.stateDir}: ${messageOf(e)}`));
  }
  checks.push(await writableCheck("state dir writable", opts.paths.stateDir));
  checks.push(await writableCheck("logs dir writable", opts.paths.logsDir));

  checks.push(...(await foreignArchChecks(opts, env)));

  const report: DoctorReport = { ok: !checks.some((c) => c.status === "fail"), checks };
  if (kvm.accel) report.accel = kvm.accel;
  return report;
}

/**
 * What guests of another architecture than the host's need (arm64 on an x86_64 host): QEMU's
 * emulator, its UEFI firmware, and for image builds binfmt_misc running that architecture's
 * programs through qemu-user. All optional: they are needed only for those guests.
 */
export async function foreignArchChecks(opts: Pick<DoctorOptions, "binfmtDir" | "fileExists" | "hostNodeArch">, env: NodeJS.ProcessEnv): Promise<DoctorCheck[]> {
  const exists = opts.fileExists ?? (async (p: string) => stat(p).then(() => true, () => false));
  const host = hostArch(opts.hostNodeArch);
  const checks: DoctorCheck[] = [];
  for (const arch of GUEST_ARCHES) {
    if (arch === host || arch === "x86_64") continue;
    const info = ARCH_INFO[arch];
    const emu = host === undefined ? "" : `; TCG on this ${host} host (emulated, several times slower than KVM)`;
    const t = await toolCheck({ name: `${arch} guests: ${info.qemuBinary}`, programs: [info.qemuBinary], versionArgs: { [info.qemuBinary]: ["--version"] }, severity: "optional", purpose: `needed only for arch: ${arch} guests` }, env);
    if (t.check.ok) t.check.detail += emu;
    checks.push(t.check);
    if (info.firmware) {
      const ok = await exists(info.firmware.path);
      checks.push(check(`${arch} guests: UEFI firmware`, "optional", ok, ok ? `${info.firmware.path} (for ${arch} disks without a kernel civm boots directly)` : `${info.firmware.path} is missing; needed only for ${arch} disks that boot themselves (a kernel civm boots directly needs none)`, `apt-get install -y ${info.firmware.package}`));
    }
    if (info.binfmt) {
      const dir = opts.binfmtDir ?? "/proc/sys/fs/binfmt_misc";
      const entry = join(dir, info.binfmt.entry);
      let detail: string;
      let ok = false;
      let fix = `apt-get install -y ${info.binfmt.package} binfmt-support`;
      if (!(await exists(join(dir, "status")))) {
        detail = `binfmt_misc is not mounted at ${dir}; needed only to build ${arch} images (mmdebstrap runs the root tree's ${arch} programs through qemu-user)`;
        fix = `mount -t binfmt_misc binfmt_misc ${dir}, then update-binfmts --enable ${info.binfmt.entry} (${info.binfmt.package} and binfmt-support installed)`;
      } else {
        const text = await readFile(entry, "utf8").catch(() => undefined);
        if (text === undefined) detail = `no ${info.binfmt.entry} entry in ${dir}; needed only to build ${arch} images`;
        else if (!/^enabled$/m.test(text)) {
          detail = `${entry} is disabled; needed only to build ${arch} images`;
          fix = `update-binfmts --enable ${info.binfmt.entry}`;
        } else if (!/^flags:.*F/m.test(text)) {
          detail = `${entry} lacks the F flag (the interpreter must be loaded at registration to work inside the build's chroot); needed only to build ${arch} images`;
          fix = `install ${info.binfmt.package} (its entries have the F flag) and update-binfmts --enable ${info.binfmt.entry}`;
        } else {
          ok = true;
          detail = `${entry} enabled (${/^interpreter (.*)$/m.exec(text)?.[1] ?? "interpreter unknown"}): ${arch} images can be built`;
        }
      }
      checks.push(check(`${arch} image builds: binfmt_misc`, "optional", ok, detail, fix));
    }
  }
  return checks;
}

const MARK: Record<CheckStatus, string> = { pass: "ok  ", warn: "WARN", fail: "FAIL" };

/** Human-readable report: one line per check, a fix under each problem, a verdict. */
export function formatDoctorReport(report: DoctorReport): string {
  const width = Math.max(...report.checks.map((c) => c.name.length), 10);
  const lines: string[] = [];
  for (const c of report.checks) {
    lines.push(`${MARK[c.status]}  ${c.name.padEnd(width)}  ${c.detail}`);
    if (c.fix && !c.ok) lines.push(`${" ".repeat(6 + width + 2)}fix: ${c.fix}`);
  }
  const fails = report.checks.filter((c) => c.status === "fail").length;
  const warns = report.checks.filter((c) => c.status === "warn").length;
  const accel = report.accel ? `; VMs will use ${report.accel.accel.toUpperCase()}` : "";
  const verdict = report.ok
    ? `ready${warns ? ` (${warns} warning${warns > 1 ? "s" : ""})` : ""}${accel}`
    : `NOT ready: ${fails} failed check${fails > 1 ? "s" : ""}${warns ? `, ${warns} warning${warns > 1 ? "s" : ""}` : ""}`;
  lines.push("", `civm doctor: ${verdict}`);
  return lines.join("\n") + "\n";
}
