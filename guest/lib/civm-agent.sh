# shellcheck shell=bash
# civm guest agent: functions only (sourced by bin/civm-agent, no side effects).
#
# Each boot: read instance.json from the `instance-configuration` CD-ROM, eject
# it, set up SSH keys and 9p mounts, run exactly one workload (GitHub Actions
# runner or a command), then power off whatever happened. Every external
# command is called by name through PATH and every fixed path can be moved with
# an env var, so tests can run this in a temp dir with stub commands.

log() { printf 'civm-agent: %s\n' "$*"; }

# Exit; the EXIT trap powers off, so a broken VM never idles holding a host slot.
fail() {
  log "error: $*"
  exit 1
}

# A guest path as seen from here: CIVM_ROOT is empty in a VM, a temp dir in tests.
gpath() { printf '%s%s' "$CIVM_ROOT" "$1"; }

civm_init() {
  CIVM_ROOT=${CIVM_ROOT:-}
  CIVM_LABEL=${CIVM_LABEL:-instance-configuration}
  CIVM_WAIT_SECONDS=${CIVM_WAIT_SECONDS:-60}
  CIVM_RUN_DIR=${CIVM_RUN_DIR:-$CIVM_ROOT/run/civm}
  CIVM_BY_LABEL_DIR=${CIVM_BY_LABEL_DIR:-$CIVM_ROOT/dev/disk/by-label}
  CIVM_RUNNER_USER=${CIVM_RUNNER_USER:-runner}
  CIVM_LIB_DIR=${CIVM_LIB_DIR:-/usr/local/lib/civm}
  CIVM_CMDLINE=${CIVM_CMDLINE:-$CIVM_ROOT/proc/cmdline}
  CONFIG=$CIVM_RUN_DIR/instance.json
  # civm.snapshot on the kernel command line: civm boots this VM to save it as a snapshot
  # (docs/images.md "Snapshots"): wait for the disc without a time limit, and once it
  # comes (the VM is a restored copy) make this copy unique before the workload.
  SNAPSHOT=0
  case " $(cat "$CIVM_CMDLINE" 2>/dev/null) " in
    *" civm.snapshot "*) SNAPSHOT=1 ;;
  esac
  case $CIVM_WAIT_SECONDS in
    '' | *[!0-9]*) fail "CIVM_WAIT_SECONDS must be a whole number of seconds" ;;
  esac
}

# EXIT trap. Not run when systemd kills the agent at shutdown (no double poweroff).
# The VM is thrown away after this, so stopping every unit one by one (1.5-2.5 s under
# emulation) buys nothing: `poweroff -f` has systemd kill what runs, unmount or remount
# read-only, sync and power off. journald is flushed first so every line the job wrote
# reaches the serial console (it forwards in order; the sync request is served after the
# data already queued). A plain poweroff is the fallback.
on_exit() {
  log "powering off"
  if command -v journalctl >/dev/null; then
    timeout 10 journalctl --sync 2>/dev/null || true
  fi
  sync
  poweroff -f || {
    log "poweroff -f failed (status $?); trying an orderly poweroff"
    poweroff || log "poweroff failed (status $?)"
  }
}

# The workload (a CI job) needs the network and the grown disk; reading the CD-ROM needs
# neither. So the unit is not ordered after network-online.target or civm-growfs.service
# (it only wants them) and the agent waits for both here, after the CD-ROM work, which
# overlaps with DHCP, the resolver and the resize. A unit that fails is a warning, as
# ordering alone would have been. Without systemd (no /run/systemd/system) there is
# nothing to wait for.
BOOT_UNITS="civm-growfs.service network-online.target"
wait_for_boot_units() {
  [ -d "$(gpath /run/systemd/system)" ] || return 0
  command -v systemctl >/dev/null || return 0
  # shellcheck disable=SC2086 # two unit names
  systemctl start $BOOT_UNITS ||
    log "warning: starting $BOOT_UNITS failed (status $?); starting the workload anyway"
}

# VERSION sits next to the library once installed, one level up in the repo.
guest_version() {
  cat "$CIVM_LIB_DIR/VERSION" 2>/dev/null || cat "$CIVM_LIB_DIR/../VERSION" 2>/dev/null || echo unknown
}

# --- instance configuration CD-ROM --------------------------------------------

# Sets DEVICE. blkid first; the udev by-label link covers a stale blkid cache.
find_config_device() {
  local link=$CIVM_BY_LABEL_DIR/$CIVM_LABEL
  if DEVICE=$(blkid -L "$CIVM_LABEL" 2>/dev/null) && [ -n "$DEVICE" ]; then
    return 0
  fi
  if [ -e "$link" ]; then
    DEVICE=$(readlink -f "$link")
    return 0
  fi
  return 1
}

# The CD-ROM can appear after the agent starts (udev still probing), so poll. In a snapshot
# boot there is no time limit and the poll is 0.1 s: the disc is inserted right after a
# restore, and opening the drive (blkid) is what makes the kernel notice the new medium.
wait_for_config_device() {
  local waited=0
  if [ "$SNAPSHOT" -eq 1 ]; then
    until find_config_device; do sleep 0.1; done
    return 0
  fi
  until find_config_device; do
    if [ "$waited" -ge "$CIVM_WAIT_SECONDS" ]; then
      return 1
    fi
    if [ "$waited" -eq 0 ]; then
      log "waiting up to ${CIVM_WAIT_SECONDS}s for the CD-ROM labelled $CIVM_LABEL"
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

# A failed eject only means the host keeps the ISO attached; the job can still run.
eject_config_device() {
  local status
  eject "$DEVICE"
  status=$?
  if [ "$status" -ne 0 ]; then
    log "warning: eject $DEVICE failed (status $status); continuing"
  fi
}

# Copy instance.json to a root-only file on /run (tmpfs), then unmount and
# eject so later, untrusted processes cannot read the secrets on the CD-ROM.
read_config() {
  local mnt=$CIVM_RUN_DIR/cdrom copied=0
  if ! { mkdir -p "$mnt" && chmod 700 "$CIVM_RUN_DIR" "$mnt"; }; then
    fail "cannot create $mnt"
  fi
  mount -o ro "$DEVICE" "$mnt" || fail "cannot mount $DEVICE on $mnt"
  if (umask 077 && cp "$mnt/instance.json" "$CONFIG.tmp"); then
    copied=1
  fi
  umount "$mnt" || log "warning: umount $mnt failed"
  rmdir "$mnt" 2>/dev/null
  eject_config_device
  [ "$copied" -eq 1 ] || fail "no instance.json on $DEVICE"
  if ! { chmod 600 "$CONFIG.tmp" && mv -f "$CONFIG.tmp" "$CONFIG"; }; then
    fail "cannot write $CONFIG"
  fi
  parse_config
}

# The whole of instance.json in one jq run: each jq start costs 0.3-0.4 s under emulation
# (TCG), and the agent used to start it nine times. jq prints shell assignments (quoted
# with @sh) that are eval'd here. Secrets reach variables through jq's stdout only,
# never through anyone's argv. What it sets:
#   CFG[KEY]         config[KEY] as text (strings as they are, anything else as JSON);
#                    absent when null or false
#   CFG_NAME         .name as text
#   CFG_KEYS_OK      1, or 0 when ssh_authorized_keys is not a string or a list of strings
#   CFG_KEYS         the keys, one a line
#   CFG_MOUNTS_N     the number of mounts, or "bad" when config.mounts is malformed
#   CFG_MOUNT_TAG[i], CFG_MOUNT_PATH[i], CFG_MOUNT_RO[i] (true or false)
#   CFG_LABELS_OK    1, or 0 when config.labels cannot be joined; CFG_LABELS joined with ","
#   CACHES_OK        1, or 0 when config.caches is malformed (then no cache is used)
#   CACHE_REG_N, CACHE_REG_NAME[i], CACHE_REG_URL[i]   config.caches.registry (mirrors)
#   CACHE_HTTP_URL, CACHE_NO_PROXY                     config.caches.http (the proxy)
# shellcheck disable=SC2016 # the $names are jq's
PARSE_CONFIG_JQ='
def txt: if type == "string" then . else tojson end;
if type != "object" or ((.config // {}) | type) != "object" then error("not an object") else . end
| (.config // {}) as $c
| ($c | to_entries[] | select(.value != null and .value != false)
    | "CFG[\(.key | @sh)]=\(.value | txt | @sh)"),
  "CFG_NAME=\(.name // "" | txt | @sh)",
  "RTC_LAG_US=\(.restore.rtcLagMicros // 0 | if type == "number" and . >= 0 and . < 1000000 then floor else 0 end)",
  (try ([$c.ssh_authorized_keys // empty
          | (if type == "array" then .[] else . end)
          | if type == "string" then . else error("not a string") end]
        | "CFG_KEYS_OK=1", "CFG_KEYS=\(join("\n") | @sh)")
   catch "CFG_KEYS_OK=0"),
  (try (($c.mounts // []) as $m
        | if ($m | type) == "array" and all($m[]; type == "object"
              and (.tag | type) == "string" and .tag != ""
              and (.path | type) == "string" and (.path | startswith("/")))
          then "CFG_MOUNTS_N=\($m | length)",
            ($m | to_entries[]
              | "CFG_MOUNT_TAG[\(.key)]=\(.value.tag | @sh)",
                "CFG_MOUNT_PATH[\(.key)]=\(.value.path | @sh)",
                "CFG_MOUNT_RO[\(.key)]=\(.value.ro == true)")
          else error("bad mounts") end)
   catch "CFG_MOUNTS_N=bad"),
  (try ($c.labels // empty | if type == "array" then join(",") else tostring end
        | "CFG_LABELS=\(@sh)")
   catch "CFG_LABELS_OK=0"),
  (try (($c.caches // {}) as $k
        | "^https?://([A-Za-z0-9.-]+|\\[[0-9A-Fa-f:]+\\])(:[0-9]{1,5})?/?$" as $url
        | if ($k | type) != "object" then error("bad caches") else . end
        | (($k.registry // []) as $r
           | if ($r | type) == "array" and all($r[]; type == "object"
                 and (.registry | type) == "string" and (.registry | test("^[A-Za-z0-9.-]+(:[0-9]{1,5})?$"))
                 and (.url | type) == "string" and (.url | test($url)))
             then "CACHE_REG_N=\($r | length)",
               ($r | to_entries[]
                 | "CACHE_REG_NAME[\(.key)]=\(.value.registry | @sh)",
                   "CACHE_REG_URL[\(.key)]=\(.value.url | rtrimstr("/") | @sh)")
             else error("bad registry") end),
          (($k.http // null) as $h
           | if $h == null then empty
             elif ($h | type) == "object" and ($h.url | type) == "string" and ($h.url | test($url))
                  and (($h.noProxy // "") | type) == "string" and (($h.noProxy // "") | test("^[A-Za-z0-9.,:/\\[\\]_-]*$"))
             then "CACHE_HTTP_URL=\($h.url | rtrimstr("/") | @sh)", "CACHE_NO_PROXY=\($h.noProxy // "" | @sh)"
             else error("bad http") end))
   catch "CACHES_OK=0")
'

parse_config() {
  local out
  out=$(jq -r "$PARSE_CONFIG_JQ" "$CONFIG" 2>/dev/null) ||
    fail "instance.json is not a JSON object with an object \"config\""
  declare -gA CFG=()
  # shellcheck disable=SC2034 # the CACHE_* variables are civm-caches.sh's
  declare -ga CFG_MOUNT_TAG=() CFG_MOUNT_PATH=() CFG_MOUNT_RO=() CACHE_REG_NAME=() CACHE_REG_URL=()
  RTC_LAG_US=0 CFG_NAME='' CFG_KEYS_OK=1 CFG_KEYS='' CFG_MOUNTS_N=0 CFG_LABELS_OK=1 CFG_LABELS=''
  # shellcheck disable=SC2034
  CACHES_OK=1 CACHE_REG_N=0 CACHE_HTTP_URL='' CACHE_NO_PROXY=''
  eval "$out"
}

# config[KEY] as text; empty when absent, null or false.
cfg() {
  printf '%s' "${CFG[$1]-}"
}

# Sets USER_HOME (CIVM_ROOT-prefixed) for an existing user; fails otherwise.
user_home() {
  local entry
  entry=$(getent passwd "$1") || return 1
  USER_HOME=$(gpath "$(printf '%s\n' "$entry" | cut -d: -f6)")
}

# --- SSH keys (dev VMs) ----------------------------------------------------------

# Append keys not already there: keeps any key baked into the image.
add_authorized_keys() {
  local user=$1 keys=$2 dir=$3/.ssh key count=0
  local file=$dir/authorized_keys
  mkdir -p "$dir" && chmod 700 "$dir" && (umask 077 && : >>"$file") || return 1
  while IFS= read -r key; do
    [ -n "$key" ] || continue
    grep -qxF -- "$key" "$file" || printf '%s\n' "$key" >>"$file" || return 1
    count=$((count + 1))
  done <<<"$keys"
  chmod 600 "$file" && chown "$user:" "$dir" "$file" || return 1
  log "installed $count authorized key(s) for $user"
}

install_authorized_keys() {
  local keys user
  [ "$CFG_KEYS_OK" = 1 ] || fail "config.ssh_authorized_keys must be a string or a list of strings"
  keys=$CFG_KEYS
  [ -n "$keys" ] || return 0
  # manage: the debugging account of images like civm-gha (seed 000's), when the image has it.
  for user in root "$CIVM_RUNNER_USER" manage; do
    if ! user_home "$user"; then
      [ "$user" = manage ] || log "no user $user in the image; not installing keys for it"
      continue
    fi
    add_authorized_keys "$user" "$keys" "$USER_HOME" || fail "cannot install authorized keys for $user"
  done
}

# --- what SSH from the host needs -------------------------------------------------------

# `civm wait` reads these lines to say at once what is missing instead of timing out on
# SSH: an address (QEMU's user network hands one out by DHCP; the image needs a client)
# and an sshd that starts. Only looks; never fatal. An address may come a little after
# network-online.target (an image whose network is not systemd's): up to
# CIVM_ADDRESS_WAIT seconds.
report_ssh_path() {
  local addrs waited=0 limit=${CIVM_ADDRESS_WAIT:-10}
  while :; do
    addrs=$(hostname -I 2>/dev/null | tr -s ' ' ' ')
    addrs=${addrs% }
    if [ -n "$addrs" ] || [ "$waited" -ge "$limit" ]; then break; fi
    sleep 1
    waited=$((waited + 1))
  done
  if [ -n "$addrs" ]; then
    log "network: $addrs"
  else
    log "network: none: no address on any interface after ${waited}s (the image configures no DHCP client: civm's images get systemd-networkd with DHCP on en*/eth*; an image built otherwise needs one)"
  fi
  if [ ! -x "$(gpath /usr/sbin/sshd)" ]; then
    log "sshd: not installed (add openssh-server to the image's packages)"
  elif [ -d "$(gpath /run/systemd/system)" ] &&
    ! systemctl is-enabled --quiet ssh.service 2>/dev/null && ! systemctl is-enabled --quiet ssh.socket 2>/dev/null; then
    log "sshd: not enabled (systemctl enable ssh in the image)"
  fi
}

# --- 9p host mounts ----------------------------------------------------------------

mount_share() {
  local tag=$1 path=$2 ro=$3 target opts=trans=virtio,version=9p2000.L
  target=$(gpath "$path")
  if [ "$ro" = true ]; then
    opts=$opts,ro
  fi
  mkdir -p "$target" || fail "cannot create mount point $path"
  mount -t 9p -o "$opts" "$tag" "$target" || fail "cannot mount 9p tag $tag on $path"
  log "mounted 9p tag $tag on $path ($opts)"
}

# A requested mount that fails is fatal: the job would otherwise run without it.
mount_shares() {
  local i
  [ "$CFG_MOUNTS_N" != bad ] ||
    fail "config.mounts must be a list of {tag, path, ro} with a non-empty tag and an absolute path"
  for ((i = 0; i < CFG_MOUNTS_N; i++)); do
    mount_share "${CFG_MOUNT_TAG[i]}" "${CFG_MOUNT_PATH[i]}" "${CFG_MOUNT_RO[i]}"
  done
}

# --- choosing and running the workload ----------------------------------------------

# Runner names must be unique per registration; instance names repeat across boots.
random_suffix() { od -An -N4 -tx1 /dev/urandom | tr -d ' \n'; }

# config.repo is OWNER/REPO or ORG (seed shape); a full URL is taken as-is.
registration_url() {
  local repo=$1 base
  case $repo in
    http://* | https://*) printf '%s' "$repo" ;;
    *)
      base=$(cfg github_url)
      base=${base:-https://github.com}
      printf '%s/%s' "${base%/}" "${repo#/}"
      ;;
  esac
}

# The workload gets a clean environment: nothing of the agent's leaks into jobs.
build_runner_env() {
  local event
  RUNNER_ENV=(env -i "HOME=$USER_HOME" "USER=$RUN_USER" "LOGNAME=$RUN_USER" "PATH=$PATH" "LANG=C.UTF-8")
  event=$(cfg whitelisted-event)
  if [ -n "$event" ]; then
    RUNNER_ENV+=("RUST_WHITELISTED_EVENT_NAME=$event")
  fi
}

plan_runner_dir() {
  local dir
  dir=$(cfg runner_dir)
  RUNNER_DIR=$(gpath "${dir:-/home/runner/actions-runner}")
  [ -f "$RUNNER_DIR/run.sh" ] || fail "no run.sh in $RUNNER_DIR: is the actions runner installed in the image?"
}

plan_registration() {
  local repo
  repo=$(cfg repo)
  [ -n "$repo" ] || fail "config.token needs config.repo (OWNER/REPO or ORG)"
  [ -f "$RUNNER_DIR/config.sh" ] || fail "no config.sh in $RUNNER_DIR"
  [ "$CFG_LABELS_OK" = 1 ] || fail "config.labels must be a string or a list of strings"
  REG_LABELS=$CFG_LABELS
  REG_URL=$(registration_url "$repo")
  # config.runner_name (civm serve: <runner.name>-<vm id>) is used as it is.
  REG_NAME=$(cfg runner_name)
  [ -n "$REG_NAME" ] || REG_NAME=${CFG_NAME:-civm}-$(random_suffix)
  REG_GROUP=$(cfg runnergroup)
}

# Sets MODE (jit, register, command or none) and everything run_* needs. All
# checks happen here, so `ready` means the workload is about to start.
plan_workload() {
  SECRET=$(cfg jitconfig)
  COMMAND=$(cfg command)
  if [ -n "$SECRET" ]; then
    MODE=jit
  elif SECRET=$(cfg token) && [ -n "$SECRET" ]; then
    MODE=register
  elif [ -n "$COMMAND" ]; then
    MODE="command"
  else
    MODE=none
    return 0
  fi
  RUN_USER=$(cfg user)
  RUN_USER=${RUN_USER:-$CIVM_RUNNER_USER}
  user_home "$RUN_USER" || fail "user $RUN_USER does not exist in the image"
  # The runner refuses root unless RUNNER_ALLOW_RUNASROOT is set, and a job must never get it.
  if [ "$MODE" = jit ] || [ "$MODE" = register ]; then
    [ "$(getent passwd "$RUN_USER" | cut -d: -f3)" != 0 ] ||
      fail "config.user is $RUN_USER (uid 0): the GitHub Actions runner never runs as root; leave config.user out (default $CIVM_RUNNER_USER) or name an unprivileged user"
  fi
  case $MODE in
    jit) plan_runner_dir ;;
    register) plan_runner_dir && plan_registration ;;
    command) [ -d "$USER_HOME" ] || fail "home of $RUN_USER ($USER_HOME) does not exist" ;;
  esac
  build_runner_env
}

# The secret goes to the wrapper on stdin, so it is in no argv of runuser, env
# or the wrapper; run.sh/config.sh only accept it as an argument (see README).
run_wrapper() {
  printf '%s\n' "$SECRET" | runuser -u "$RUN_USER" -- "${RUNNER_ENV[@]}" bash "$CIVM_LIB_DIR/civm-runner.sh" "$@"
  return "${PIPESTATUS[1]}"
}

run_jit() {
  log "starting the GitHub Actions runner (JIT config) in $RUNNER_DIR as $RUN_USER"
  run_wrapper jit "$RUNNER_DIR"
}

run_register() {
  log "registering ephemeral runner $REG_NAME at $REG_URL (labels: ${REG_LABELS:-runner defaults}${REG_GROUP:+, group: $REG_GROUP}) as $RUN_USER"
  run_wrapper register "$RUNNER_DIR" "$REG_URL" "$REG_NAME" "$REG_LABELS" "$REG_GROUP"
}

run_command() {
  log "running config.command as $RUN_USER in $USER_HOME"
  (cd "$USER_HOME" && runuser -u "$RUN_USER" -- "${RUNNER_ENV[@]}" sh -c "$COMMAND" </dev/null)
}

# --- snapshots -----------------------------------------------------------------
# The line civm waits for before it saves the VM (src/vm/snapshot.ts SNAPSHOT_POINT).
SNAPSHOT_POINT="snapshot point: waiting for the configuration disc"

# A snapshot boot saves a settled system: every unit of the boot has finished (host keys,
# network, growfs), so a restored copy has nothing of the boot left to do. On a loaded host a
# boot under TCG can take minutes: civm gives the make 600 s in all, so wait up to 480 s, and
# say whether it settled (a snapshot saved mid-boot makes every restore finish that boot: a
# civm-gha snapshot made at load 15 took 2.5-4.7 s from restore to its config, one made on a
# quiet host 0.6 s).
SNAPSHOT_SETTLE_SECONDS=${CIVM_SNAPSHOT_SETTLE_SECONDS:-480}
snapshot_settle() {
  local state started=$SECONDS
  if [ -d "$(gpath /run/systemd/system)" ] && command -v systemctl >/dev/null; then
    state=$(timeout "$SNAPSHOT_SETTLE_SECONDS" systemctl is-system-running --wait 2>/dev/null)
    case $state in
      running | degraded) log "snapshot: the boot settled ($state) after $((SECONDS - started)) s" ;;
      *) log "warning: snapshot: the boot had not settled after $((SECONDS - started)) s (${state:-no answer from systemctl}); the snapshot keeps that unfinished work and every restore redoes it" ;;
    esac
  fi
  log "$SNAPSHOT_POINT"
}

# Steps the clock to the RTC, which QEMU keeps at the host's time (the guest's own clock
# resumes where the snapshot stopped), plus RTC_LAG_US: QEMU's RTC ticks at the sub-second
# point its QEMU started at, which civm measured (instance.json's restore.rtcLagMicros). The
# RTC counts whole seconds, so wait for its tick (at most a second) and step from there. All
# of it happens in one perl process (perl-base is Essential in Debian): under emulation and
# load, starting `date -s` after the tick was seen cost up to a second of error. Without
# perl, the same in the shell (less precise).
# shellcheck disable=SC2016 # perl's variables
STEP_CLOCK_PL='
my ($rtc, $lag) = @ARGV;
sub now { my $tv = pack("q q", 0, 0); syscall(96, $tv, 0) == 0 or die "gettimeofday: $!\n"; my ($s, $u) = unpack("q q", $tv); return $s * 1000000 + $u }
sub rtc { open(my $f, "<", $rtc) or die "$rtc: $!\n"; my $v = <$f>; close $f; chomp $v; return $v }
my $first = rtc(); my ($v, $edge);
for (1 .. 1500) { select(undef, undef, undef, 0.001); $v = rtc(); $edge = now(); last if $v != $first }
die "the RTC did not tick\n" if $v == $first;
my $t = $v * 1000000 + $lag + (now() - $edge);
syscall(164, pack("q q", int($t / 1000000), $t % 1000000), 0) == 0 or die "settimeofday: $!\n";
'
step_clock() {
  local rtc first now tries=0
  rtc=$(gpath /sys/class/rtc/rtc0/since_epoch)
  if ! read -r first <"$rtc" 2>/dev/null; then
    log "warning: no RTC at $rtc; the clock is not stepped"
    return 0
  fi
  if command -v perl >/dev/null; then
    perl -e "$STEP_CLOCK_PL" "$rtc" "${RTC_LAG_US:-0}" || log "warning: stepping the clock to the RTC failed"
    return 0
  fi
  now=$first
  while [ "$now" = "$first" ] && [ "$tries" -lt 150 ]; do
    sleep 0.01
    read -r now <"$rtc" || break
    tries=$((tries + 1))
  done
  date -s "@$now.$(printf %06d "${RTC_LAG_US:-0}")" >/dev/null || log "warning: date -s failed; the clock is not stepped"
}

# A random 128-bit id in hex, after the kernel's RNG was reseeded.
new_id128() {
  local u
  read -r u <"$(gpath /proc/sys/kernel/random/uuid)" || return 1
  printf '%s\n' "${u//-/}"
}

# Everything a restored copy shares with its siblings and must not (docs/images.md lists what
# else is identity-bound): kernel RNG (QEMU's vmgenid device changed its generation id; Linux
# reseeds on that, checked here), machine-id, boot_id (the kernel's cannot be written: a fresh
# one is bind-mounted over the file), hostname, SSH host keys, the clock, the DHCP lease.
become_unique() {
  local id host old link clock_pid links=()
  if dmesg 2>/dev/null | grep -q 'crng reseeded due to virtual machine fork'; then
    log "restored: RNG reseeded (VM generation ID changed)"
  else
    log "warning: restored: the kernel did not report a VM generation change; random numbers may repeat across restored VMs"
  fi
  step_clock &
  clock_pid=$!
  id=$(new_id128) || fail "cannot read a random id from /proc/sys/kernel/random/uuid"
  printf '%s\n' "$id" >"$(gpath /etc/machine-id)" || log "warning: cannot write /etc/machine-id"
  if new_id128 >"$CIVM_RUN_DIR/boot_id" 2>/dev/null; then
    read -r id <"$CIVM_RUN_DIR/boot_id"
    printf '%s-%s-%s-%s-%s\n' "${id:0:8}" "${id:8:4}" "${id:12:4}" "${id:16:4}" "${id:20:12}" >"$CIVM_RUN_DIR/boot_id"
    mount --bind "$CIVM_RUN_DIR/boot_id" "$(gpath /proc/sys/kernel/random/boot_id)" ||
      log "warning: cannot replace boot_id"
  fi
  old=$(cat "$(gpath /etc/hostname)" 2>/dev/null) || old=civm
  old=${old%%.*}
  host="${old:0:54}-$(new_id128 | cut -c1-8)"
  printf '%s\n' "$host" >"$(gpath /etc/hostname)" || log "warning: cannot write /etc/hostname"
  printf '%s' "$host" >"$(gpath /proc/sys/kernel/hostname)" 2>/dev/null || log "warning: cannot set the hostname to $host"
  if [ -f "$(gpath /etc/hosts)" ] && [ -n "$old" ]; then
    sed -i "s/\([[:space:]]\)$old\([[:space:]]\|\$\)/\1$host\2/" "$(gpath /etc/hosts)" || true
  fi
  # The old keys go now, before the workload, so sshd never serves them again. New ones are
  # made beside the workload (a CI job does not need sshd; ~1 s of CPU under emulation),
  # then sshd is reloaded (it re-executes itself and reads them).
  rm -f "$(gpath /etc/ssh)"/ssh_host_* || log "warning: cannot remove the snapshot's SSH host keys"
  if command -v civm-hostkeys >/dev/null; then
    (
      if nice -n 19 civm-hostkeys; then
        [ ! -d "$(gpath /run/systemd/system)" ] || systemctl try-reload-or-restart ssh.service >/dev/null 2>&1 || true
      else
        log "warning: civm-hostkeys failed; sshd has no host keys"
      fi
    ) &
  fi
  if command -v networkctl >/dev/null && [ -d "$(gpath /run/systemd/system)" ]; then
    for link in "$(gpath /sys/class/net)"/*; do
      [ "${link##*/}" = lo ] || [ ! -e "$link" ] || links+=("${link##*/}")
    done
    [ "${#links[@]}" -eq 0 ] || networkctl renew "${links[@]}" >/dev/null 2>&1 ||
      log "warning: networkctl renew failed; keeping the old lease"
  fi
  wait "$clock_pid"
  log "restored: unique now (hostname $host, machine-id $(cat "$(gpath /etc/machine-id)" 2>/dev/null), clock $(date -u +%Y-%m-%dT%H:%M:%SZ))"
}

civm_agent_main() {
  local status
  civm_init
  trap on_exit EXIT
  log "starting (guest runtime version $(guest_version))"
  command -v jq >/dev/null || fail "jq is not installed in the image"
  [ "$SNAPSHOT" -eq 0 ] || snapshot_settle
  wait_for_config_device ||
    fail "no CD-ROM labelled $CIVM_LABEL appeared within ${CIVM_WAIT_SECONDS}s; was the VM started with an instance configuration ISO?"
  log "reading instance configuration from $DEVICE"
  read_config
  [ "$SNAPSHOT" -eq 0 ] || become_unique
  install_authorized_keys
  mount_shares
  plan_workload
  # Nothing to run needs no network: ready at once.
  if [ "$MODE" != none ]; then
    wait_for_boot_units
    # Registry mirrors and the HTTP proxy of the host's caches (civm-caches.sh); never fatal.
    apply_caches
    # Dev VMs (SSH keys given): what SSH from the host needs, on the console for civm wait.
    if [ -n "$CFG_KEYS" ]; then report_ssh_path; fi
  fi
  log "ready"
  if [ "$MODE" = none ]; then
    log "nothing to run: instance.json has no config.jitconfig, config.token (with config.repo) or config.command"
    exit 0
  fi
  "run_$MODE"
  status=$?
  log "runner exited with status $status"
  exit "$status"
}
