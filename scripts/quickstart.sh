#!/usr/bin/env bash
# Set up, then quantize the packaged SmolLM2-135M to W8A8 and report WikiText-2 perplexity (offline copy).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export NORMQUANT_DATA_DIR=${NORMQUANT_DATA_DIR:-$(cd .. && pwd)/shared/data}
normquant run recipes/w8a8_rtn.yaml --windows "${WINDOWS:-16}" --output out/quickstart "$@"
