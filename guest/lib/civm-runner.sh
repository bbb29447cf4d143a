#!/bin/bash
# Started by civm-agent (as the runner user, via runuser) with the JIT config or
# registration token on stdin, so the secret is in no argv of runuser, env or
# this script (argv is world-readable in /proc). The GitHub runner scripts only
# take it as an argument, so it is in run.sh's or config.sh's argv while they
# run: the unavoidable part. Never print the secret here. The scripts run as children (not
# exec'd) so that a failure can be followed by the runner's _diag logs.
#   civm-runner.sh jit DIR
#   civm-runner.sh register DIR URL NAME LABELS GROUP
set -u

mode=${1:-}
dir=${2:-}
secret=
IFS= read -r secret
# The runner must not read anything else from our stdin.
exec </dev/null
if [ -z "$secret" ]; then
  echo "civm-runner: no secret on stdin" >&2
  exit 2
fi
cd "$dir" || exit 2

# When the runner fails, the end of its newest _diag logs goes to the console (the VM and
# its disk are gone afterwards). Lines holding the secret are dropped; grep reads it from a
# pipe, not from its argv.
diag_tail() {
  local f
  [ -d _diag ] || return 0
  # shellcheck disable=SC2012 # the runner names its logs Runner_DATE-TIME-utc.log, Worker_...
  for f in $(ls -1t _diag/*.log 2>/dev/null | head -n 2); do
    echo "civm-runner: last lines of $dir/$f:" >&2
    if [ -n "$secret" ]; then
      tail -n 40 "$f" | grep -vF -f <(printf '%s\n' "$secret") >&2
    else
      tail -n 40 "$f" >&2
    fi
  done
}

# Runs the runner script; on failure shows its _diag logs. The exit status is the runner's.
runner() {
  local status
  "$@"
  status=$?
  if [ "$status" -ne 0 ]; then
    echo "civm-runner: ${1#./} exited with status $status" >&2
    diag_tail
  fi
  return "$status"
}

case $mode in
  jit)
    runner ./run.sh --jitconfig "$secret"
    exit
    ;;
  register)
    url=$3 name=$4 labels=$5 group=$6
    # --disableupdate: the image pins its runner version; a runner that updated itself would
    # differ from the image's and be lost with the VM anyway.
    set -- --unattended --ephemeral --disableupdate --url "$url" --token "$secret" --name "$name"
    if [ -n "$labels" ]; then
      set -- "$@" --labels "$labels"
    fi
    if [ -n "$group" ]; then
      set -- "$@" --runnergroup "$group"
    fi
    runner ./config.sh "$@" || exit
    runner ./run.sh
    exit
    ;;
  *)
    echo "civm-runner: unknown mode '$mode'" >&2
    exit 2
    ;;
esac
