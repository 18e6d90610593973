#!/usr/bin/env bash
# Time the README's "Using it" commands, as shown, from a fresh clone: writes eval/readme_timing.md.
#
#   bash scripts/time_readme.sh            # from the checkout's root, after scripts/setup.sh (or with .venv ready)
#
# Each command runs once with stderr to eval/readme_timing/<n>.log (a redirected log: plain progress lines);
# outputs go to a scratch folder, so existing out/ and exports/ are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export NORMQUANT_DATA_DIR="${NORMQUANT_DATA_DIR:-../shared/data}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p eval/readme_timing
commands=(
  "normquant run recipes/w4a16_g64_gptq.yaml --calib-samples 16 --calib-seqlen 512 --windows 4 --export $scratch/w4-model --output $scratch/out-w4"
  "normquant eval --model $scratch/w4-model --windows 4 --json"
  "normquant export recipes/w8a16_rtn.yaml --output $scratch/exports/smollm2-w8"
  "normquant sensitivity recipes/w8a8_rtn.yaml --windows 2 --output $scratch/sensitivity.json"
  "normquant inspect smollm2-135m --output $scratch/inspect-smollm2"
)
{
  echo "# README commands, timed (\`scripts/time_readme.sh\`)"
  echo
  echo "$(date -u +%Y-%m-%d), $(nproc) CPU cores (shared with other jobs: wall times are upper bounds), commit $(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD -- normquant || echo -dirty)."
  echo "Scratch paths stand for the README's \`out/\` and \`exports/\`."
  echo
  echo "| # | command | wall time | exit |"
  echo "|---:|---|---:|---:|"
} > eval/readme_timing.md
n=0
for cmd in "${commands[@]}"; do
  n=$((n + 1))
  start=$(date +%s)
  set +e
  $cmd > "eval/readme_timing/$n.out" 2> "eval/readme_timing/$n.log"
  rc=$?
  set -e
  secs=$(( $(date +%s) - start ))
  shown="${cmd//$scratch\//}"
  printf '| %d | `%s` | %dm%02ds | %d |\n' "$n" "$shown" $((secs / 60)) $((secs % 60)) "$rc" >> eval/readme_timing.md
  echo "[$n] ${secs}s rc=$rc: $shown"
done
