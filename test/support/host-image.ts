// The built-in image civm-host, built once for the suite into its own store
// (<testCacheDir>/store-host) under a lock, like runner-image.ts does for civm-runner. Its key
// covers this checkout's civm build (dist/bundle, node_modules, guest/, images/, packaging/)
// and the host's Node.js package, so a change to civm rebuilds it and an unchanged tree is a
// cache hit of about a second. Also: booting it with a NoCloud seed, SSH into it.
import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { testCacheDir } from "./paths.js";
import { buildStoredImage, oncePerProcess, type StoredBuild } from "./stored-build.js";

export const hostStoreDir = join(testCacheDir, "store-host");
export const HOST_IMAGE = "civm-host";
const lockDir = join(testCacheDir, "store-host.lock");

/** Where civm-host is in its store, and whether this run built it. */
export type HostImage = StoredBuild;

/** Builds civm-host (once per suite, cached by key) and returns where it is. */
export const ensureHostImage: () => Promise<HostImage> = oncePerProcess(() => buildStoredImage({ image: HOST_IMAGE, storeDir: hostStoreDir, lockDir }));

/** A NoCloud seed (an ISO labelled cidata) with this user-data and meta-data. */
export function writeSeedIso(dir: string, userData: string, instanceId: string): string {
  mkdirSync(join(dir, "seed"), { recursive: true });
  execFileSync("sh", ["-c", 'printf "%s" "$1" > "$3/user-data"; printf "instance-id: %s\\nlocal-hostname: civm-host-test\\n" "$2" > "$3/meta-data"', "sh", userData, instanceId, join(dir, "seed")]);
  const iso = join(dir, "seed.iso");
  execFileSync("genisoimage", ["-quiet", "-output", iso, "-volid", "cidata", "-joliet", "-rock", join(dir, "seed", "user-data"), join(dir, "seed", "meta-data")]);
  return iso;
}

/**
 * An OpenStack config drive (ConfigDrive: an ISO labelled config-2, as OpenStack's
 * `--config-drive true` and Proxmox write it): openstack/latest/meta_data.json (the instance's
 * uuid, hostname and public SSH keys) and openstack/latest/user_data.
 */
export function writeConfigDrive(dir: string, userData: string, meta: { uuid: string; hostname: string; publicKeys: Record<string, string> }): string {
  const root = join(dir, "configdrive");
  const latest = join(root, "openstack", "latest");
  mkdirSync(latest, { recursive: true });
  writeFileSync(join(latest, "user_data"), userData);
  writeFileSync(join(latest, "meta_data.json"), JSON.stringify({ uuid: meta.uuid, hostname: meta.hostname, name: meta.hostname, public_keys: meta.publicKeys, availability_zone: "nova", launch_index: 0 }));
  const iso = join(dir, "config-2.iso");
  execFileSync("genisoimage", ["-quiet", "-output", iso, "-volid", "config-2", "-joliet", "-rock", root]);
  return iso;
}

/**
 * Azure's provisioning disc: an ISO holding ovf-env.xml (what Azure attaches at a VM's first
 * boot): the admin user, the host name, SSH password logins off, and the custom data (the
 * user-data cloud-init runs), base64 as Azure writes it. The SSH key is not in it: cloud-init
 * takes it from the instance metadata service (IMDS) when IMDS lists one.
 */
export function writeAzureOvfIso(dir: string, o: { userData: string; hostname: string; username: string }): string {
  const root = join(dir, "ovf");
  mkdirSync(root, { recursive: true });
  const xml = `<?xml version="1.0" encoding="utf-8"?>
<ns0:Environment xmlns:ns0="http://schemas.dmtf.org/ovf/environment/1" xmlns:ns1="http://schemas.microsoft.com/windowsazure" xmlns:ns2="http://www.w3.org/2001/XMLSchema-instance">
  <ns1:ProvisioningSection>
    <ns1:Version>1.0</ns1:Version>
    <ns1:LinuxProvisioningConfigurationSet>
      <ns1:ConfigurationSetType>LinuxProvisioningConfiguration</ns1:ConfigurationSetType>
      <ns1:UserName>${o.username}</ns1:UserName>
      <ns1:DisableSshPasswordAuthentication>true</ns1:DisableSshPasswordAuthentication>
      <ns1:HostName>${o.hostname}</ns1:HostName>
      <ns1:CustomData>${Buffer.from(o.userData).toString("base64")}</ns1:CustomData>
    </ns1:LinuxProvisioningConfigurationSet>
  </ns1:ProvisioningSection>
  <ns1:PlatformSettingsSection>
    <ns1:Version>1.0</ns1:Version>
    <ns1:PlatformSettings>
      <ns1:ProvisionGuestAgent>false</ns1:ProvisionGuestAgent>
      <ns1:PreprovisionedVm>false</ns1:PreprovisionedVm>
    </ns1:PlatformSettings>
  </ns1:PlatformSettingsSection>
</ns0:Environment>
`;
  writeFileSync(join(root, "ovf-env.xml"), xml);
  const iso = join(dir, "ovf-env.iso");
  // Azure's disc is UDF labelled rd_rdfe_...; cloud-init reads ovf-env.xml from any iso9660 or UDF disc.
  execFileSync("genisoimage", ["-quiet", "-output", iso, "-volid", "rd_rdfe_civm", "-joliet", "-rock", root]);
  return iso;
}

export interface SshResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** One command over SSH as the image's default user (debian), key only, host keys not recorded. */
export function ssh(port: number, key: string, command: string, timeoutMs = 120_000): Promise<SshResult> {
  return new Promise((resolve) => {
    const child = spawn("ssh", [
      "-F", "/dev/null", "-i", key, "-p", String(port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
      "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20",
      "debian@127.0.0.1", command,
    ], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** Waits until SSH answers (the host booted and cloud-init installed the key). */
export async function waitForSsh(port: number, key: string, timeoutMs: number, alive: () => boolean): Promise<number> {
  const started = Date.now();
  for (;;) {
    const r = await ssh(port, key, "true", 40_000);
    if (r.code === 0) return (Date.now() - started) / 1000;
    if (!alive()) throw new Error("the host VM ended before SSH answered");
    if (Date.now() - started > timeoutMs) throw new Error(`SSH did not answer within ${timeoutMs / 1000} s: ${r.stderr.trim()}`);
    await new Promise((r2) => setTimeout(r2, 5000));
  }
}
