// A fake actions/runner release for tests (this machine cannot reach GitHub): a .tar.gz with
// the real layout (config.sh, run.sh, bin/Runner.Listener, bin/installdependencies.sh) whose
// scripts accept the real flags, refuse root as the real ones do, and talk to the suite's
// fake GitHub:
//   config.sh --unattended --ephemeral --disableupdate --url U --token T --name N [--labels L]
//     POSTs to <origin of U>/actions/runner-registration ("RemoteAuth T", as the real one
//     starts) and keeps the JIT config it gets in .runner;
//   run.sh [--jitconfig J]: bin/Runner.Listener run, which reads .env (as the real runner does),
//     takes the job server from the JIT config's "serverUrl" (fake-github's runnerServerUrl,
//     a serve-harness hub), POSTs /register, polls /job, runs the script from /script with
//     bash, prints its output and "fake-runner: job finished with status N", POSTs /done and
//     exits 0 (an ephemeral runner ends after its one job whatever the job's result).
// Every step is logged under _diag/ like the real runner's logs. The archive is byte-for-byte
// the same on every run (sorted, fixed times and owners, gzip -n), so the image built with
// it keeps its cache key.
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** What bin/installdependencies.sh of the real runner installs on Debian 12 (the fake checks them). */
export const RUNNER_DEBIAN_DEPENDENCIES = ["liblttng-ust1", "libkrb5-3", "zlib1g", "libssl3", "libicu72"];

// Sourced text; the script has already changed to the runner's folder.
const COMMON = `
mkdir -p _diag
diag="_diag/Runner_$(date -u +%Y%m%d-%H%M%S)-utc.log"
say() { printf '[%s INFO] %s\\n' "$(date -u +%H:%M:%S)" "$*" >>"$diag"; }
die() { printf '[%s ERR ] %s\\n' "$(date -u +%H:%M:%S)" "$*" >>"$diag"; echo "$*" >&2; exit 1; }
if [ "$(id -u)" = 0 ] && [ -z "\${RUNNER_ALLOW_RUNASROOT:-}" ]; then
  die "Must not run with sudo"
fi
`;

const CONFIG_SH = `#!/bin/bash
# fake actions/runner config.sh (civm tests)
cd "$(dirname "$0")" || exit 1
${COMMON}
unattended= ephemeral= disableupdate= url= token= name= labels= group=
while [ $# -gt 0 ]; do
  case $1 in
    --unattended) unattended=1; shift ;;
    --ephemeral) ephemeral=1; shift ;;
    --disableupdate) disableupdate=1; shift ;;
    --replace) shift ;;
    --url) url=$2; shift 2 ;;
    --token) token=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --labels) labels=$2; shift 2 ;;
    --runnergroup) group=$2; shift 2 ;;
    --work) shift 2 ;;
    *) die "Unrecognized command-line input arguments: '$1'" ;;
  esac
done
[ -n "$unattended" ] || die "fake config.sh: only --unattended is supported"
[ -n "$url" ] && [ -n "$token" ] && [ -n "$name" ] || die "fake config.sh: --url, --token and --name are required"
say "registering $name at $url (ephemeral=\${ephemeral:-0} disableupdate=\${disableupdate:-0} labels=$labels)"
origin=$(printf '%s' "$url" | sed -E 's#^(https?://[^/]+).*#\\1#')
body=$(jq -cn --arg url "$url" --arg name "$name" --arg labels "$labels" --arg group "$group" \\
  --argjson e "\${ephemeral:-0}" --argjson d "\${disableupdate:-0}" \\
  '{url: $url, name: $name, labels: ($labels | split(",") | map(select(. != ""))), ephemeral: ($e == 1), disableupdate: ($d == 1)} + (if $group == "" then {} else {runnergroup: $group} end)')
# The token goes to curl in a header read from stdin, not in curl's argv.
out=$(printf 'Authorization: RemoteAuth %s\\n' "$token" | curl -sS -H @- -H 'content-type: application/json' \\
  --data-binary "$body" -w '\\n%{http_code}' "$origin/actions/runner-registration") || die "cannot reach $origin"
code=$(printf '%s' "$out" | tail -n 1)
[ "$code" = 201 ] || die "Http response code: $code from 'POST $origin/actions/runner-registration': $(printf '%s' "$out" | head -n 1)"
(umask 077 && printf '%s' "$out" | head -n 1 | jq -r .encoded_jit_config > .runner)
say "registered"
echo "√ Runner successfully added"
echo "√ Settings Saved."
`;

const RUN_SH = `#!/bin/bash
# fake actions/runner run.sh (civm tests)
cd "$(dirname "$0")" || exit 1
exec bin/Runner.Listener run "$@"
`;

const LISTENER = `#!/bin/bash
# fake actions/runner bin/Runner.Listener (civm tests)
cd "$(dirname "$0")/.." || exit 1
${COMMON}
[ "\${1:-}" = run ] || die "fake Runner.Listener: only 'run' is supported"
shift
jit=
if [ "\${1:-}" = --jitconfig ]; then jit=\${2:-}; shift 2; fi
[ -n "$jit" ] || jit=$(cat .runner 2>/dev/null) || true
[ -n "$jit" ] || die "Not configured. Run config.(sh/cmd) to configure the runner."
# The real runner loads .env from its folder into its (and the jobs') environment.
if [ -f .env ]; then
  while IFS='=' read -r k v; do
    case $k in ''|'#'*) continue ;; esac
    export "$k=$v"
  done < .env
fi
server=$(printf '%s' "$jit" | base64 -d 2>/dev/null | jq -r '.serverUrl // empty') || true
[ -n "$server" ] || die "fake Runner.Listener: the JIT config has no serverUrl"
post() { printf '%s' "$jit" | curl -sS -f --data-binary @- "$server/$1"; }
post register >/dev/null || die "cannot register with $server"
say "listening for jobs at $server"
echo "√ Connected to GitHub"
echo "Listening for Jobs"
for _ in $(seq 1 600); do
  answer=$(post job) || answer=wait
  [ "$answer" = run ] && break
  sleep 1
done
[ "$answer" = run ] || die "no job within 600 s"
echo "Running job: fake"
mkdir -p _work
post script > _work/job.sh || die "cannot fetch the job script"
bash _work/job.sh </dev/null 2>&1 | sed 's/^/fake-job: /'
status=\${PIPESTATUS[0]}
echo "fake-runner: job finished with status $status"
if [ "$status" = 0 ]; then echo "Job fake completed with result: Succeeded"; else echo "Job fake completed with result: Failed"; fi
say "job finished with status $status"
post done >/dev/null || say "POST /done failed"
exit 0
`;

const INSTALLDEPS = `#!/bin/bash
# fake actions/runner bin/installdependencies.sh (civm tests): the real one apt-installs these
# on Debian; this one only checks that they are installed.
missing=
for p in ${RUNNER_DEBIAN_DEPENDENCIES.join(" ")}; do
  dpkg-query -W -f='\${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
[ -z "$missing" ] || { echo "Missing dependencies:$missing"; exit 1; }
echo "-----------------------------"
echo " Finish Install Dependencies"
echo "-----------------------------"
`;

export interface FakeRunnerArchive {
  path: string;
  sha256: string;
  version: string;
}

export const FAKE_RUNNER_VERSION = "2.999.0";

/** Writes the fake runner's .tar.gz into `dir` (deterministic bytes). */
export function makeFakeRunnerArchive(dir: string): FakeRunnerArchive {
  const tree = join(dir, "fake-runner-tree");
  rmSync(tree, { recursive: true, force: true });
  mkdirSync(join(tree, "bin"), { recursive: true });
  const files: [string, string][] = [
    ["config.sh", CONFIG_SH],
    ["run.sh", RUN_SH],
    ["bin/Runner.Listener", LISTENER],
    ["bin/installdependencies.sh", INSTALLDEPS],
  ];
  for (const [name, text] of files) {
    writeFileSync(join(tree, name), text);
    chmodSync(join(tree, name), 0o755);
  }
  chmodSync(join(tree, "bin"), 0o755);
  const tar = join(dir, `actions-runner-linux-x64-${FAKE_RUNNER_VERSION}.tar`);
  execFileSync("tar", ["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "--format=gnu", "-C", tree, "-cf", tar, "."]);
  execFileSync("gzip", ["-n", "-f", "-9", tar]);
  rmSync(tree, { recursive: true, force: true });
  const path = `${tar}.gz`;
  return { path, sha256: createHash("sha256").update(readFileSync(path)).digest("hex"), version: FAKE_RUNNER_VERSION };
}
