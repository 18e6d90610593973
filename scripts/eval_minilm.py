"""MiniLM (real post-LN LayerNorm weights): SQNR of the final hidden states, naive vs RepQuant, at A8 and A6.

    python scripts/eval_minilm.py --data-dir ../shared/data --out eval/minilm_sqnr.json

Weights stay float (activations only, so the table isolates the activation quantizer). Calibration: C4
validation segments; evaluation: WikiText-2 test segments (disjoint text), both 128 tokens.
Rows: naive static per-tensor (min-max) on every linear input; RepQuant per-channel quantizers (percentile
init) at the inputs of the linears fed by a LayerNorm, naive elsewhere; dynamic per-token for reference.
BERT is post-LN: a LayerNorm output also feeds the residual stream, so folding the channel scales into the
LayerNorm is not function-preserving there (normquant refuses it); the RepQuant row is therefore its
per-channel quantizer (the simulation), which a per-tensor kernel could only use with a per-channel rescale
of the residual branch.
"""
from __future__ import annotations

import argparse
import copy
import math

import torch

from normquant.data.text import calibration_samples
from normquant.evaluation.records import environment, write_json
from normquant.models.loading import load_model
from normquant.pipeline.run import quantize
from normquant.recipe import parse_recipe


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - out).pow(2).sum().item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--out", default="eval/minilm_sqnr.json")
    args = ap.parse_args()
    model, tok = load_model("minilm-l6")
    calib = calibration_samples(tok, "c4", "validation", n=args.samples, seqlen=args.seqlen, seed=0,
                                data_dir=args.data_dir)
    from normquant.data.text import tokenize_eval

    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)[0]
    evalset = ids[: (ids.numel() // args.seqlen) * args.seqlen].reshape(-1, args.seqlen)[:64]  # [64, L]
    with torch.no_grad():
        ref = model(input_ids=evalset).last_hidden_state
    calib_cfg = {"samples": args.samples, "seqlen": args.seqlen, "seed": 0, "batch_size": 16}
    rows = []
    for bits in (8, 6):
        static = {"bits": bits, "symmetric": False, "granularity": "tensor"}
        variants = {
            "naive-static": ({"input_activations": static}, []),
            "repquant-per-channel": ({"input_activations": static},
                                     [{"repquant": {"mode": "per_channel", "learn_clipping": False}}]),
            "dynamic-token": ({"input_activations": {"bits": bits, "granularity": "token", "dynamic": True}}, []),
        }
        for name, (scheme, steps) in variants.items():
            r = parse_recipe({"name": name, "model": "minilm-l6", "scheme": {"ignore": [], **scheme}, "steps": steps,
                              "calibration": calib_cfg})
            m = quantize(copy.deepcopy(model), r, calib if r.needs_data else None, progress=False)
            with torch.no_grad():
                out = m(input_ids=evalset).last_hidden_state
            rows.append({"bits": f"A{bits}", "row": name, "sqnr_db": sqnr_db(ref, out)})
            print(rows[-1])
    write_json(args.out, {"model": "minilm-l6 (all-MiniLM-L6-v2)", "weights": "float",
                          "calibration": f"c4/validation {args.samples}x{args.seqlen} seed 0",
                          "evaluation": f"wikitext2/test first {evalset.shape[0]} segments of {args.seqlen} tokens",
                          "metric": "SQNR (dB) of last_hidden_state vs float", "rows": rows,
                          "environment": environment()})


if __name__ == "__main__":
    main()
