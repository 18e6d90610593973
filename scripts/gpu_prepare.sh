#!/usr/bin/env bash
# Prepare what scripts/bench_gpu.py needs on a bare CUDA machine with no network, in .carry/ (git-ignored here via
# .git/info/exclude): the SmolLM2 GGUF in two parts of < 64 MiB, WikiText-2's test text, and wheels of the
# packages the CUDA image lacks (pydantic and its dependencies, gguf) for Python 3.12.
#
#   bash scripts/gpu_prepare.sh
#   call 1: carry [.carry/part0]                           command: true
#   call 2: carry [.carry/part1, .carry/data, .carry/whl]  command:
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site:. &&
#     cat .carry/part0/* .carry/part1/* > /tmp/smollm2.gguf && PYTHONUNBUFFERED=1 python3 scripts/bench_gpu.py
#     --gguf /tmp/smollm2.gguf --data-dir .carry/data --out $OUT/gpu_real.json
# (the machine keeps call 1's carried files while it is warm; the JSON then goes to eval/gpu_real.json)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
rm -rf .carry && mkdir -p .carry/part0 .carry/part1 .carry/data .carry/whl
gguf=$(python -c "from normquant.models.loading import _packaged_source; print(_packaged_source('smollm2-135m')[1])")
split -b 50M "$gguf" .carry/split.
mv .carry/split.aa .carry/part0/smollm2.gguf.aa
mv .carry/split.ab .carry/part1/smollm2.gguf.ab
data="${NORMQUANT_DATA_DIR:-../shared/data}"
cp "$data/wiki.test.raw" .carry/data/
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .carry/whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0
du -sh .carry/*
