// Upstream fireactions' server config.yaml (snake_case: bind_address, metrics, github.app_id,
// pools[].replicas / max_runners / min_runners, runner.image_pull_policy, firecracker.
// machine_config, ...) translated into civm's serve config, so a fireactions host can point
// `civm serve --config` at the file it has. Keys civm has no use for are collected and named
// in one warning; civm's own keys (webhookSecret, apiToken, ...) may sit next to them.

type Obj = Record<string, unknown>;

const isObj = (v: unknown): v is Obj => typeof v === "object" && v !== null && !Array.isArray(v);

/** Top-level keys only fireactions' config.yaml has (civm's own are camelCase). */
const MARKERS = ["bind_address", "basic_auth_enabled", "basic_auth_users", "containerd", "log_level", "debug"];

/** True when `raw` is written in fireactions' config.yaml form. */
export function isFireactionsConfig(raw: unknown): raw is Obj {
  if (!isObj(raw)) return false;
  if (MARKERS.some((k) => k in raw)) return true;
  const gh = raw.github;
  if (isObj(gh) && ("app_id" in gh || "app_private_key" in gh)) return true;
  const pools = raw.pools;
  return Array.isArray(pools) && pools.some((p) => isObj(p) && ("replicas" in p || "max_runners" in p || "min_runners" in p || (isObj(p.firecracker) && "machine_config" in p.firecracker)));
}

export interface Translated {
  config: Obj;
  /** "key (why)" for each key civm does not use. */
  ignored: string[];
}

/** Moves `from` of `src` to `to` of `dst` when present; returns whether it was there. */
function move(src: Obj, from: string, dst: Obj, to: string): boolean {
  if (!(from in src)) return false;
  if (!(to in dst)) dst[to] = src[from];
  delete src[from];
  return true;
}

export function translateFireactions(raw: Obj): Translated {
  const src: Obj = { ...raw };
  const out: Obj = {};
  const ignored: string[] = [];
  const ignore = (obj: Obj, key: string, path: string, why: string) => {
    if (!(key in obj)) return;
    delete obj[key];
    ignored.push(`${path} (${why})`);
  };

  move(src, "bind_address", out, "listen");
  if (isObj(src.metrics)) {
    const m = { ...src.metrics };
    if (m.enabled === false) ignored.push("metrics.enabled: false (civm always serves /metrics)");
    if (m.enabled !== false && typeof m.address === "string") out.metricsListen = m.address;
    delete m.enabled;
    delete m.address;
    for (const k of Object.keys(m)) ignored.push(`metrics.${k} (unknown to fireactions and civm)`);
    delete src.metrics;
  }
  ignore(src, "basic_auth_enabled", "basic_auth_enabled", "civm's API takes a bearer token: set apiToken");
  ignore(src, "basic_auth_users", "basic_auth_users", "civm's API takes a bearer token: set apiToken");
  ignore(src, "containerd", "containerd", "civm boots disk images, it uses no containerd");
  ignore(src, "log_level", "log_level", "use civm serve --log-level");
  ignore(src, "debug", "debug", "use civm serve --log-level debug");

  if (isObj(src.github)) {
    const g = { ...src.github };
    const gh: Obj = {};
    move(g, "app_id", gh, "appId");
    move(g, "app_private_key", gh, "privateKey");
    move(g, "app_private_key_file", gh, "privateKeyFile");
    move(g, "installation_id", gh, "installationId");
    move(g, "api_url", gh, "apiUrl");
    out.github = { ...gh, ...g };
    delete src.github;
  }
  if (Array.isArray(src.pools)) {
    out.pools = src.pools.map((p, i) => (isObj(p) ? translatePool(p, `pools[${i}]`, ignore) : p));
    delete src.pools;
  }
  // Whatever is left (civm's own keys, or typos) goes to civm's validation as it is.
  return { config: { ...out, ...src }, ignored };
}

function translatePool(p: Obj, path: string, ignore: (obj: Obj, key: string, path: string, why: string) => void): Obj {
  const src: Obj = { ...p };
  const out: Obj = {};
  move(src, "name", out, "name");
  // fireactions keeps `replicas` runners at all times: civm's min = max = replicas.
  if ("replicas" in src) {
    out.maxRunners = src.replicas;
    out.minRunners = src.replicas;
    delete src.replicas;
  }
  move(src, "max_runners", out, "maxRunners");
  move(src, "min_runners", out, "minRunners");
  if (src.shutdown_on_exit === false) ignore(src, "shutdown_on_exit", `${path}.shutdown_on_exit: false`, "civm runner VMs are always single-use");
  else delete src.shutdown_on_exit;
  if (isObj(src.runner)) {
    const r = { ...src.runner };
    const runner: Obj = {};
    for (const [from, to] of [["name", "name"], ["image", "image"], ["image_pull_policy", "imagePullPolicy"], ["group_id", "groupId"], ["organization", "organization"], ["repository", "repository"], ["labels", "labels"]] as const) move(r, from, runner, to);
    out.runner = { ...runner, ...r };
    delete src.runner;
  }
  if (isObj(src.firecracker)) {
    const f = { ...src.firecracker };
    const fc: Obj = {};
    if (isObj(f.machine_config)) {
      const m = { ...f.machine_config };
      move(m, "vcpu_count", fc, "vcpuCount");
      move(m, "mem_size_mib", fc, "memSizeMib");
      for (const k of Object.keys(m)) ignore(m, k, `${path}.firecracker.machine_config.${k}`, "no civm equivalent");
      delete f.machine_config;
    }
    move(f, "kernel_args", fc, "kernelArgs");
    ignore(f, "binary_path", `${path}.firecracker.binary_path`, "civm runs QEMU");
    ignore(f, "kernel_image_path", `${path}.firecracker.kernel_image_path`, "civm boots the image's own kernel");
    ignore(f, "metadata", `${path}.firecracker.metadata`, "civm has no MMDS; the guest gets its config from a CD-ROM");
    out.firecracker = { ...fc, ...f };
    delete src.firecracker;
  }
  return { ...out, ...src };
}
