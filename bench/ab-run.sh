#!/bin/bash
# A/B of two civm builds on the same instance, alternating runs; prints each build's median
# internal start -> QEMU spawn and QEMU exit -> civm exit (ms, from --timings-file).
# Usage: bench/ab-run.sh OLD/bin/civm NEW/bin/civm INSTANCES_FILE NAME [RUNS]
# (e.g. OLD from `git worktree add /tmp/old <commit> && cd /tmp/old && npm ci && npm run build`)
set -euo pipefail
old=$1 new=$2 file=$3 name=$4 runs=${5:-10}
work=$(mktemp -d); chmod 755 "$work"; trap 'rm -rf "$work"' EXIT
for _ in $(seq 1 "$runs"); do
  for v in old new; do
    bin=$old; [ "$v" = new ] && bin=$new
    CIVM_STATE_DIR=$work/s-$v CIVM_LOGS_DIR=$work/l-$v CIVM_ACCEL=tcg "$bin" run "$name" -f "$file" --timings-file "$work/t.json" >/dev/null 2>&1
    node -e 'const t=require(process.argv[1]); console.log(process.argv[2], t.spawnedAt, t.exitAt - t.exitedAt)' "$work/t.json" "$v"
  done
done | node -e '
const rows = require("fs").readFileSync(0, "utf8").trim().split("\n").map((l) => l.split(" "));
const med = (xs) => { const s = xs.map(Number).sort((a, b) => a - b); return s[Math.floor((s.length - 1) / 2)].toFixed(1); };
for (const v of ["old", "new"]) { const r = rows.filter((x) => x[0] === v); console.log(`${v}: start->spawn median ${med(r.map((x) => x[1]))} ms, exit->exit median ${med(r.map((x) => x[2]))} ms (${r.length} runs)`); }'
