# shellcheck shell=bash
# civm guest agent: the host's caches (functions only; bin/civm-agent sources this after
# civm-agent.sh, whose parse_config sets the CACHE_* variables from config.caches).
#
# civm serve runs a pull-through registry cache per upstream registry and an HTTP proxy
# cache on the host, and hands their addresses to the guest in instance.json:
#   "caches": {"registry": [{"registry": "docker.io", "url": "http://10.0.2.2:40001"}, ...],
#              "http": {"url": "http://10.0.2.2:40003", "noProxy": "localhost,127.0.0.1,..."}}
# apply_caches runs once the network is up, before the workload:
#   - registry mirrors, written only for the programs the image has: Docker's daemon.json
#     "registry-mirrors" (Docker mirrors docker.io only), containerd's
#     certs.d/<registry>/hosts.toml and BuildKit's buildkitd.toml (/etc/buildkit, and the
#     workload user's buildx default). Docker, containerd and BuildKit fall back to the
#     upstream registry themselves when a mirror does not answer, so these are always written.
#   - the HTTP proxy: HTTP(S)_PROXY and NO_PROXY in the workload's environment and apt's
#     Acquire::http::Proxy, only when the proxy answers now; otherwise the job runs without it.
# Nothing here is fatal: a cache that is down, or a file that cannot be written, is a warning.

CIVM_CACHE_CHECK_SECONDS=${CIVM_CACHE_CHECK_SECONDS:-3}
CIVM_CACHES_MARK="# Written by civm-agent for this VM: the host's registry caches (instance.json config.caches)."

# What containerd's hosts.toml calls the registry's own server.
registry_server() {
  case $1 in
    docker.io) printf '%s' https://registry-1.docker.io ;;
    *) printf 'https://%s' "$1" ;;
  esac
}

# host[:port] of a URL (scheme and path cut off).
url_hostport() {
  local h=${1#*://}
  printf '%s' "${h%%/*}"
}

has_program() { command -v "$1" >/dev/null 2>&1; }

# Whether something answers HTTP at URL within CIVM_CACHE_CHECK_SECONDS: any status line
# (a proxy answers "GET /" with an error page, which is fine). https:// only needs a TCP
# connection. bash's /dev/tcp: no curl or wget needed in the image.
http_answers() {
  local url=$1 hostport host port scheme=${1%%://*} line
  hostport=$(url_hostport "$url")
  case $hostport in
    \[*\]:*) host=${hostport%]:*} port=${hostport##*]:} ;;
    \[*\]) host=${hostport%]} port='' ;;
    *:*) host=${hostport%:*} port=${hostport##*:} ;;
    *) host=$hostport port='' ;;
  esac
  host=${host#[}
  if [ -z "$port" ]; then
    if [ "$scheme" = https ]; then port=443; else port=80; fi
  fi
  # shellcheck disable=SC2016 # expanded by the inner bash
  line=$(timeout "$CIVM_CACHE_CHECK_SECONDS" bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    [ "$3" = https ] && { echo connected; exit 0; }
    printf "GET / HTTP/1.0\r\nHost: %s\r\n\r\n" "$1" >&3
    IFS= read -r line <&3 && printf "%s" "$line"' civm-check "$host" "$port" "$scheme" 2>/dev/null)
  case $line in
    connected | HTTP/1.[01]\ [0-9][0-9][0-9]*) return 0 ;;
  esac
  return 1
}

# Writes FILE from stdin unless it exists and civm-agent did not write it (the image's own
# configuration is left alone). Returns 1 when it could not, 2 when it left the file alone.
write_owned_file() {
  local file=$1 content
  content=$(cat)
  if [ -s "$file" ] && [ "$(head -n 1 "$file")" != "$CIVM_CACHES_MARK" ]; then
    return 2
  fi
  mkdir -p "$(dirname "$file")" && printf '%s\n%s\n' "$CIVM_CACHES_MARK" "$content" >"$file"
}

# Docker mirrors docker.io only: prepend the mirror to daemon.json's "registry-mirrors"
# (keeping whatever else the file holds), and make a running dockerd re-read it.
docker_mirror() {
  local url=$1 file tmp
  file=$(gpath /etc/docker/daemon.json)
  mkdir -p "$(dirname "$file")" || return 1
  if [ -s "$file" ]; then
    tmp=$file.civm-tmp
    if ! jq --arg m "$url" '.["registry-mirrors"] = ([$m] + ((.["registry-mirrors"] // []) - [$m]))' "$file" >"$tmp" 2>/dev/null; then
      rm -f "$tmp"
      log "warning: $file is not valid JSON; Docker does not use the docker.io mirror"
      return 1
    fi
    mv -f "$tmp" "$file" || return 1
  else
    printf '{\n  "registry-mirrors": ["%s"]\n}\n' "$url" >"$file" || return 1
  fi
  # Socket-activated images start dockerd on first use, after this; a running one reloads.
  if [ -d "$(gpath /run/systemd/system)" ] && systemctl is-active --quiet docker.service 2>/dev/null; then
    systemctl reload docker.service || log "warning: reloading docker.service failed; the mirror applies after dockerd restarts"
  fi
}

# containerd (nerdctl, ctr --hosts-dir, the CRI plugin with config_path) reads
# certs.d/<registry>/hosts.toml per pull: the mirror first, the registry itself after it.
containerd_mirror() {
  local registry=$1 url=$2 dir
  dir=$(gpath "/etc/containerd/certs.d/$registry")
  mkdir -p "$dir" || return 1
  printf '%s\nserver = "%s"\n\n[host."%s"]\n  capabilities = ["pull", "resolve"]\n' \
    "$CIVM_CACHES_MARK" "$(registry_server "$registry")" "$url" >"$dir/hosts.toml"
}

# BuildKit's mirrors are host[:port]; a plain-HTTP mirror needs its own section saying so.
buildkit_toml() {
  local i url host
  for ((i = 0; i < CACHE_REG_N; i++)); do
    url=${CACHE_REG_URL[i]}
    host=$(url_hostport "$url")
    printf '[registry."%s"]\n  mirrors = ["%s"]\n' "${CACHE_REG_NAME[i]}" "$host"
    case $url in
      http://*) printf '[registry."%s"]\n  http = true\n' "$host" ;;
    esac
  done
}

apply_registry_mirrors() {
  local i docker=0 containerd=0 buildkit=0 toml file status used=()
  has_program dockerd || has_program docker && docker=1
  has_program containerd && containerd=1
  { [ "$docker" = 1 ] || has_program buildkitd; } && buildkit=1
  if [ "$docker" = 0 ] && [ "$containerd" = 0 ] && [ "$buildkit" = 0 ]; then
    log "registry caches: no Docker, containerd or BuildKit in this image; nothing to configure"
    return 0
  fi
  for ((i = 0; i < CACHE_REG_N; i++)); do
    if [ "$docker" = 1 ] && [ "${CACHE_REG_NAME[i]}" = docker.io ]; then
      if docker_mirror "${CACHE_REG_URL[i]}"; then
        used+=(docker)
      else
        log "warning: cannot configure Docker's docker.io mirror"
      fi
    fi
    if [ "$containerd" = 1 ]; then
      containerd_mirror "${CACHE_REG_NAME[i]}" "${CACHE_REG_URL[i]}" ||
        log "warning: cannot write containerd's hosts.toml for ${CACHE_REG_NAME[i]}"
    fi
  done
  [ "$containerd" = 1 ] && used+=(containerd)
  if [ "$buildkit" = 1 ]; then
    toml=$(buildkit_toml)
    for file in "$(gpath /etc/buildkit/buildkitd.toml)" ${USER_HOME:+"$USER_HOME/.docker/buildx/buildkitd.default.toml"}; do
      write_owned_file "$file" <<<"$toml"
      status=$?
      case $status in
        0) ;;
        2) log "registry caches: $file exists in the image; left as it is" ;;
        *) log "warning: cannot write $file" ;;
      esac
    done
    if [ -n "${USER_HOME:-}" ] && [ -f "$USER_HOME/.docker/buildx/buildkitd.default.toml" ]; then
      chown "$RUN_USER:" "$USER_HOME/.docker" "$USER_HOME/.docker/buildx" "$USER_HOME/.docker/buildx/buildkitd.default.toml" ||
        log "warning: cannot give $RUN_USER its buildx configuration"
    fi
    used+=(buildkit)
  fi
  log "registry caches: ${CACHE_REG_NAME[*]} mirrored for ${used[*]:-nothing}"
}

apply_http_proxy() {
  local url=$CACHE_HTTP_URL no=$CACHE_NO_PROXY dir users="the job's HTTP(S)_PROXY"
  if ! http_answers "$url"; then
    log "warning: the HTTP cache at $url does not answer; the job runs without a proxy"
    return 0
  fi
  RUNNER_ENV+=("http_proxy=$url" "HTTP_PROXY=$url" "https_proxy=$url" "HTTPS_PROXY=$url" "no_proxy=$no" "NO_PROXY=$no")
  # apt over plain HTTP is what a cache can keep (https:// sources are fetched directly).
  dir=$(gpath /etc/apt/apt.conf.d)
  if [ -d "$dir" ]; then
    if printf '// Written by civm-agent for this VM: the host'"'"'s HTTP cache.\nAcquire::http::Proxy "%s";\n' "$url" >"$dir/80civm-proxy"; then
      users="$users and apt"
    else
      log "warning: cannot write $dir/80civm-proxy; apt does not use the HTTP cache"
    fi
  fi
  log "HTTP cache: $url answers; $users use it"
}

apply_caches() {
  if [ "$CACHES_OK" != 1 ]; then
    log "warning: config.caches is malformed; the job runs without the host's caches"
    return 0
  fi
  [ "$CACHE_REG_N" -gt 0 ] && apply_registry_mirrors
  [ -n "$CACHE_HTTP_URL" ] && apply_http_proxy
  return 0
}
