"""Issue 10 probe: how much of the rotated W4A4 (RTN weights) perplexity is the rotation's random signs? The
table's row (``recipes/w4a4_rotated_gptq.yaml`` with ``steps: [rotate, rtn]``) for R1 seeds 0..N-1, first
``--windows`` WikiText-2 windows, one JSON record.

    python scripts/probe_rotation_seeds.py --data-dir ../shared/data --seeds 5 --windows 4 \\
        --out eval/outliers_rotation_seeds.json
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from normquant.data.text import tokenize_eval  # noqa: E402
from normquant.evaluation.perplexity import evaluate_perplexity  # noqa: E402
from normquant.evaluation.records import environment, write_json  # noqa: E402
from normquant.models.loading import load_model  # noqa: E402
from normquant.pipeline.run import quantize  # noqa: E402
from normquant.recipe import load_recipe, parse_recipe  # noqa: E402

RECIPE = "recipes/w4a4_rotated_gptq.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="eval/outliers_rotation_seeds.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    model.eval()
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)
    base = load_recipe(RECIPE).to_dict()
    out = {"environment": environment(), "recipe": RECIPE, "steps": "[rotate: {seed: S}, rtn]", "windows": args.windows,
           "float": evaluate_perplexity(model, ids, seqlen=2048, windows=args.windows, progress=False).ppl, "seeds": {}}
    for seed in range(args.seeds):
        recipe = parse_recipe({**base, "steps": [{"rotate": {"seed": seed}}, "rtn"]}, RECIPE)
        m = quantize(copy.deepcopy(model), recipe, None, progress=False)
        out["seeds"][seed] = evaluate_perplexity(m, ids, seqlen=2048, windows=args.windows, progress=False).ppl
        print(f"seed {seed}: {out['seeds'][seed]:.3f}", flush=True)
        values = list(out["seeds"].values())
        out.update(min=min(values), max=max(values), median=statistics.median(values))
        write_json(args.out, out)


if __name__ == "__main__":
    main()
