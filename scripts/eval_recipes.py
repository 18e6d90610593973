"""Evaluate the float model and a list of recipes on the same windows and calibration set; write JSON + Markdown.

    python scripts/eval_recipes.py --data-dir ../shared/data --windows 16 --out eval/core_smollm2 \
        recipes/w8a16_rtn.yaml recipes/w8a8_rtn.yaml ...

Every recipe starts from a fresh copy of the float model; recipes that need data share one calibration set
(``--calib-samples`` overrides the recipes' sample count, recorded in the output). Results are rewritten
after each recipe, so a long run can be read while it goes.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from normquant.data import calibration_ids
from normquant.data.text import tokenize_eval
from normquant.evaluation.perplexity import evaluate_perplexity
from normquant.evaluation.records import environment, perplexity_record, reused_float_record, write_json
from normquant.models.loading import load_model
from normquant.pipeline.run import quantize
from normquant.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, help="override the recipes' calibration sample count")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    ap.add_argument("--float-from", help="reuse the float record of an earlier output JSON (same windows/seqlen)")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)
    if args.float_from:
        float_record = reused_float_record(args.float_from, args.windows, args.seqlen)
    else:
        float_record = perplexity_record(args.model, "wikitext2", "test",
                                         evaluate_perplexity(model, ids, seqlen=args.seqlen, windows=args.windows))
    fl_ppl = float_record["ppl"]
    print(f"float: {fl_ppl:.3f}")
    out = {"model": args.model, "environment": environment(), "float": float_record, "rows": []}
    calib: dict[tuple, torch.Tensor] = {}
    for path in args.recipes:
        over = {"calibration": {"samples": args.calib_samples}} if args.calib_samples else {}
        recipe = load_recipe(path, over)
        c = recipe.calibration
        key = (c.dataset, c.split, c.samples, c.seqlen, c.seed)
        if recipe.needs_data and key not in calib:
            calib[key] = calibration_ids(c, model, tok, args.data_dir)
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        quantize(m, recipe, calib.get(key) if recipe.needs_data else None)
        seconds = time.perf_counter() - t0
        res = evaluate_perplexity(m, ids, seqlen=args.seqlen, windows=args.windows)
        row = {"recipe": recipe.name, "recipe_file": path, "recipe_hash": recipe.hash(),
               "quantize_seconds": seconds, "ppl": res.ppl, "delta_pct": 100 * (res.ppl / fl_ppl - 1),
               "calibration": dict(zip(("dataset", "split", "samples", "seqlen", "seed"), key))
               if recipe.needs_data else None,
               "record": perplexity_record(args.model, "wikitext2", "test", res)}
        out["rows"].append(row)
        print(f"{recipe.name}: {res.ppl:.3f} ({row['delta_pct']:+.2f}%), quantize {seconds:.1f}s")
        del m
        write_json(f"{args.out}.json", out)
        Path(f"{args.out}.md").write_text(markdown(out))


def markdown(out: dict) -> str:
    f = out["float"]
    lines = [f"Model `{out['model']}`, {f['protocol']}, fp32 CPU, commit `{out['environment']['git_commit']}`.", "",
             "| recipe | calibration | ppl | vs float |", "|---|---|---:|---:|",
             f"| float | — | {f['ppl']:.3f} | — |"]
    for r in out["rows"]:
        c = r["calibration"]
        cal = f"{c['dataset']} {c['samples']}×{c['seqlen']} seed {c['seed']}" if c else "none"
        lines.append(f"| {r['recipe']} | {cal} | {r['ppl']:.3f} | {r['delta_pct']:+.2f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
