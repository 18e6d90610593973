#!/usr/bin/env bash
# Set up, then run the whole test suite (offline: packaged models + ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export NORMQUANT_DATA_DIR=${NORMQUANT_DATA_DIR:-$(cd .. && pwd)/shared/data}
python -m pytest -q "$@"
