"""Benchmark (not a test): evaluator overhead and fake-quant cost, as ratios measured in one run.

    python scripts/bench_eval.py --data-dir ../shared/data --windows 8 --out eval/bench_eval.json

1. normquant's `evaluate_perplexity` vs a plain transformers forward loop over the same windows (float model);
   target: normquant within 10% of the plain loop's throughput.
2. W8A8 fake-quant (dynamic per-token activations, recipes/w8a8_rtn.yaml) vs float evaluation time;
   target: within 2x on CPU.
Runs alternate (plain, normquant, plain, normquant, ...) so drift in machine load hits both sides alike.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F

from normquant.data.text import tokenize_eval
from normquant.evaluation.perplexity import cut_windows, evaluate_perplexity
from normquant.evaluation.records import environment, write_json
from normquant.models.loading import load_model
from normquant.pipeline.run import quantize
from normquant.recipe import load_recipe


@torch.no_grad()
def plain_loop(model, windows: torch.Tensor) -> tuple[float, float]:
    """The reference: a bare transformers forward per window, NLL summed over predicted tokens."""
    t0 = time.perf_counter()
    nll, n = 0.0, 0
    for w in windows:
        logits = model(w[None]).logits
        nll += F.cross_entropy(logits[0, :-1].float(), w[1:], reduction="sum").item()
        n += w.numel() - 1
    return math.exp(nll / n), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="eval/bench_eval.json")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)
    windows = cut_windows(ids, 2048)[: args.windows]
    qmodel = quantize(copy.deepcopy(model), load_recipe("recipes/w8a8_rtn.yaml"), progress=False)
    times = {"plain": [], "normquant": [], "w8a8_fake_quant": []}
    ppl = {}
    for _ in range(args.repeats):
        ppl["plain"], t = plain_loop(model, windows)
        times["plain"].append(t)
        r = evaluate_perplexity(model, ids, seqlen=2048, windows=args.windows, progress=False)
        ppl["normquant"] = r.ppl
        times["normquant"].append(r.seconds)
        r = evaluate_perplexity(qmodel, ids, seqlen=2048, windows=args.windows, progress=False)
        ppl["w8a8_fake_quant"] = r.ppl
        times["w8a8_fake_quant"].append(r.seconds)
    best = {k: min(v) for k, v in times.items()}
    out = {
        "protocol": f"wikitext2/test, first {args.windows} windows of 2048, fp32, best of {args.repeats} "
                    "alternating runs",
        "seconds": times, "best_seconds": best, "ppl": ppl,
        "normquant_over_plain_time": best["normquant"] / best["plain"],
        "w8a8_over_float_time": best["w8a8_fake_quant"] / best["normquant"],
        "targets": {"normquant_over_plain_time": "<= 1.10", "w8a8_over_float_time": "<= 2.0"},
        "loadavg_at_end": os.getloadavg(), "environment": environment(),
    }
    write_json(args.out, out)
    print({k: out[k] for k in ("best_seconds", "ppl", "normquant_over_plain_time", "w8a8_over_float_time")})


if __name__ == "__main__":
    main()
