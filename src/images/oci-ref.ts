// OCI references (REGISTRY/REPO:TAG, REGISTRY/REPO@sha256:HEX) and the one rule that tells
// them apart from disk paths and stored image names wherever civm accepts an image
// (civm run's instances `image`, --image, pools' runner.image, civm image pull/push).
//
// The rule, in order (docs/images.md, "Which is which"):
//   1. starts with "/", "./", "../" or "~"              -> a path
//   2. REGISTRY/REPO with a :TAG or an @sha256: digest, -> an OCI reference
//      REGISTRY holding a "." or a ":PORT", or "localhost"
//   3. no "/" and no disk extension (.qcow2, .img, ...) -> a stored image name (built-in ones too)
//   4. anything else                                    -> a path
// Pure and synchronous: no file is looked at, so the same string means the same thing on
// every host. A relative path that happens to match rule 2 is written with "./".
import { ConfigError } from "../errors/index.js";

export interface OciReference {
  /** As the user wrote it (after trimming). */
  input: string;
  /** Registry as written: host[:port] (docker.io for Docker Hub). */
  registry: string;
  /** Repository path, e.g. lvh-images/kind (Docker Hub's one-word names get library/). */
  repository: string;
  tag?: string;
  /** sha256:<64 hex>, when the reference pins one. */
  digest?: string;
}

const DOMAIN_COMPONENT = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
const DOMAIN = `(?:${DOMAIN_COMPONENT}(?:\\.${DOMAIN_COMPONENT})*|\\[[0-9a-fA-F:]+\\])(?::[0-9]+)?`;
const PATH_COMPONENT = "[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*";
const TAG = "[\\w][\\w.-]{0,127}";
const DIGEST = "sha256:[0-9a-f]{64}";
const REFERENCE_RE = new RegExp(`^(${DOMAIN})/(${PATH_COMPONENT}(?:/${PATH_COMPONENT})*)(?::(${TAG}))?(?:@(${DIGEST}))?$`);

const DISK_EXTENSION_RE = /\.(qcow2|img|raw|vhd|vmdk)$/i;

/** Whether a registry component names a registry (Docker's rule: a dot, a port, or localhost). */
function isRegistryHost(host: string): boolean {
  return host.includes(".") || host.includes(":") || host === "localhost" || host.startsWith("[");
}

/**
 * Parses REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:HEX (both: the digest wins, the tag
 * names the stored image). Returns undefined for anything else, a tagless name included.
 */
export function parseOciReference(input: string): OciReference | undefined {
  const s = input.trim();
  if (s.length > 512 || s.startsWith("/") || s.startsWith("./") || s.startsWith("../") || s.startsWith("~")) return undefined;
  const m = REFERENCE_RE.exec(s);
  if (!m) return undefined;
  const [, registry, repo, tag, digest] = m as unknown as [string, string, string, string | undefined, string | undefined];
  if (!isRegistryHost(registry)) return undefined;
  if (tag === undefined && digest === undefined) return undefined;
  if (repo.length > 255) return undefined;
  const isHub = registry === "docker.io" || registry === "index.docker.io" || registry === "registry-1.docker.io";
  const ref: OciReference = { input: s, registry: isHub ? "docker.io" : registry, repository: isHub && !repo.includes("/") ? `library/${repo}` : repo };
  if (tag !== undefined) ref.tag = tag;
  if (digest !== undefined) ref.digest = digest;
  return ref;
}

/** Why a string that names a registry is still no reference (for hints), or undefined. */
export function almostOciReference(input: string): string | undefined {
  const s = input.trim();
  if (parseOciReference(s) || s.startsWith("/") || s.startsWith(".") || s.startsWith("~")) return undefined;
  const first = s.split("/")[0] ?? "";
  if (!s.includes("/") || !isRegistryHost(first) || DISK_EXTENSION_RE.test(s)) return undefined;
  const last = s.slice(s.lastIndexOf("/") + 1);
  if (!last.includes(":") && !s.includes("@")) return `${s} looks like a registry reference without a tag: write ${s}:latest (or @sha256:...) to pull it, or ./${s} for a local path`;
  return `${s} is not a valid reference (repository names are lowercase letters, digits and . _ -; tags at most 128 of letters, digits, . _ -; digests sha256: and 64 hex digits)`;
}

/** The registry host HTTP requests go to (Docker Hub's API lives on registry-1.docker.io). */
export function registryApiHost(ref: Pick<OciReference, "registry">): string {
  return ref.registry === "docker.io" ? "registry-1.docker.io" : ref.registry;
}

/** REGISTRY/REPO:TAG, REGISTRY/REPO@DIGEST, or REGISTRY/REPO:TAG@DIGEST: the canonical spelling. */
export function formatOciReference(ref: Pick<OciReference, "registry" | "repository" | "tag" | "digest">): string {
  return `${ref.registry}/${ref.repository}${ref.tag !== undefined ? `:${ref.tag}` : ""}${ref.digest !== undefined ? `@${ref.digest}` : ""}`;
}

/** The reference pinned to a digest (the tag dropped): what a stored image records as its source. */
export function pinnedReference(ref: Pick<OciReference, "registry" | "repository">, digest: string): string {
  return `${ref.registry}/${ref.repository}@${digest}`;
}

export type ImageRefKind =
  | { kind: "path"; ref: string }
  | { kind: "stored"; ref: string; name: string }
  | { kind: "oci"; ref: string; oci: OciReference };

/** The rule above: what an image string names. */
export function classifyImageRef(ref: string): ImageRefKind {
  const s = ref.trim();
  if (s.startsWith("/") || s.startsWith("./") || s.startsWith("../") || s.startsWith("~")) return { kind: "path", ref };
  const oci = parseOciReference(s);
  if (oci) return { kind: "oci", ref, oci };
  if (s.length > 0 && !s.includes("/") && !DISK_EXTENSION_RE.test(s)) return { kind: "stored", ref, name: s };
  return { kind: "path", ref };
}

/** Parses a reference or throws a ConfigError saying what is wrong with it (`what` names the field or flag). */
export function requireOciReference(input: string, what: string, opts: { needTag?: boolean } = {}): OciReference {
  const ref = parseOciReference(input);
  if (!ref) {
    const why = almostOciReference(input);
    throw new ConfigError(
      `${what}: ${JSON.stringify(input)} is not an OCI reference${why ? ` (${why})` : ""}; write REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:DIGEST, e.g. quay.io/lvh-images/kind:bpf-next-main`,
    );
  }
  if (opts.needTag && ref.tag === undefined) {
    throw new ConfigError(`${what}: ${input} names a digest; a push needs a tag to put the image under (REGISTRY/REPOSITORY:TAG)`);
  }
  return ref;
}

/**
 * The stored-image name a pull gets by default: the repository's last component and the
 * tag (kind-bpf-next-main), or the digest's first 12 hex digits when there is no tag.
 */
export function defaultOciImageName(ref: OciReference): string {
  const last = ref.repository.slice(ref.repository.lastIndexOf("/") + 1);
  const suffix = ref.tag ?? (ref.digest ?? "").replace(/^sha256:/, "").slice(0, 12);
  const raw = `${last}-${suffix}`.toLowerCase().replace(/[^a-z0-9._-]+/g, "-").replace(/^[^a-z0-9]+/, "");
  return (raw || "oci-image").slice(0, 128);
}

/** OCI's name for this host's architecture (amd64, arm64, ...). */
export function hostOciArch(arch: string = process.arch): string {
  const map: Record<string, string> = { x64: "amd64", arm64: "arm64", arm: "arm", ia32: "386", ppc64: "ppc64le", s390x: "s390x", riscv64: "riscv64" };
  return map[arch] ?? arch;
}

export interface OciPlatform {
  os: string;
  architecture: string;
  variant?: string;
}

/** "linux/amd64", "linux/arm64/v8", or "amd64" (linux implied). */
export function parsePlatform(s: string, what = "--platform"): OciPlatform {
  const parts = s.trim().split("/");
  const ok = /^[a-z0-9_]+$/;
  if (parts.length === 1 && ok.test(parts[0]!)) return { os: "linux", architecture: parts[0]! };
  if ((parts.length === 2 || parts.length === 3) && parts.every((p) => ok.test(p))) {
    return { os: parts[0]!, architecture: parts[1]!, ...(parts[2] !== undefined ? { variant: parts[2] } : {}) };
  }
  throw new ConfigError(`${what} ${JSON.stringify(s)} is not a platform; write OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64`);
}

export function formatPlatform(p: OciPlatform): string {
  return `${p.os}/${p.architecture}${p.variant ? `/${p.variant}` : ""}`;
}
