"""Quick look at one recipe variant on SmolLM2: WikiText-2 ppl on the first N windows (C4 8×1024 calibration,
seed 0, as in eval_repquant.py), appended as one JSON line to --log. For exploring before a full table run.

    python scripts/explore_recipe.py w4a8-naive 4 '{"scheme": {"ignore": ["lm_head"], ...}, "steps": []}' \
        --data-dir ../shared/data --log eval/repquant_explore_smollm2.jsonl
"""
from __future__ import annotations

import argparse
import json
import time

from normquant.data.text import calibration_samples, tokenize_eval
from normquant.evaluation.perplexity import evaluate_perplexity
from normquant.models.loading import load_model
from normquant.quantize import quantize
from normquant.recipe import parse_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("windows", type=int)
    ap.add_argument("recipe", help="the recipe as JSON (calibration defaults to C4 8x1024 seed 0, batch 1)")
    ap.add_argument("--data-dir")
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    spec = json.loads(args.recipe)
    spec.setdefault("calibration", {"samples": 8, "seqlen": 1024, "seed": 0, "batch_size": 1})
    spec.setdefault("name", args.name)
    recipe = parse_recipe(spec)
    model, tok = load_model("smollm2-135m")
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)
    c = recipe.calibration
    calib = calibration_samples(tok, c.dataset, c.split, n=c.samples, seqlen=c.seqlen, seed=c.seed, data_dir=args.data_dir)
    t0 = time.perf_counter()
    quantize(model, recipe, calib, progress=False)
    seconds = time.perf_counter() - t0
    res = evaluate_perplexity(model, ids, seqlen=2048, windows=args.windows)
    line = json.dumps({"name": args.name, "windows": args.windows, "ppl": res.ppl, "quant_s": round(seconds),
                       "spec": spec})
    print(line)
    with open(args.log, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
