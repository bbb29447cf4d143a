#!/bin/bash
# Started by civm-agent (as the runner user, via runuser) with the JIT config or
# registration token on stdin, so the secret is in no argv of runuser, env or
# this script (argv is world-readable in /proc). The GitHub runner scripts only
# take it as an argument, so it is in run.sh's or config.sh's argv while they
# run: the unavoidable part. Never print the secret here.
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

case $mode in
  jit)
    exec ./run.sh --jitconfig "$secret"
    ;;
  register)
    url=$3 name=$4 labels=$5 group=$6
    set -- --unattended --ephemeral --url "$url" --token "$secret" --name "$name"
    secret=
    if [ -n "$labels" ]; then
      set -- "$@" --labels "$labels"
    fi
    if [ -n "$group" ]; then
      set -- "$@" --runnergroup "$group"
    fi
    ./config.sh "$@" || exit
    exec ./run.sh
    ;;
  *)
    echo "civm-runner: unknown mode '$mode'" >&2
    exit 2
    ;;
esac
