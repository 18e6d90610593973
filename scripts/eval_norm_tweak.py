"""Norm Tweaking on top of GPTQ on SmolLM2: per bit setting, GPTQ alone vs GPTQ + tweak at the (lr0, κ) that
wins a grid search on held-out C4 text (never the test split); both then measured on WikiText-2.

    python scripts/eval_norm_tweak.py --data-dir ../shared/data --windows 16 --settings w4 w3 w2 w4a8 \
        --calib-samples 8 --calib-seqlen 1024 --lr0 1e-5 1e-4 1e-3 --kappa 1 --out eval/norm_tweak_smollm2

Per setting, one calibration set (self-generated, METHODS.md §2.5) for every row; the GPTQ-only row is the same
recipe with ``epochs: 0``. Selection score: perplexity on ``--heldout-windows`` windows of C4 validation text
disjoint from the calibration rows (:func:`normquant.data.text.heldout_ids`). Only the GPTQ row and
the selected tweak row are evaluated on WikiText-2. Results are rewritten after every row.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from normquant.data.text import heldout_ids
from normquant.data.selfgen import generate_calibration
from normquant.data.text import tokenize_eval
from normquant.evaluation.perplexity import evaluate_perplexity
from normquant.evaluation.records import environment, perplexity_record, reused_float_record, write_json
from normquant.models.loading import load_model
from normquant.pipeline.run import quantize
from normquant.recipe import parse_recipe

# setting -> weight spec (groups of 64: SmolLM2's 576 = 9 × 64) and input-activation spec (None: float)
SETTINGS = {
    "w4": ({"bits": 4, "symmetric": True, "granularity": "group", "group_size": 64}, None),
    "w3": ({"bits": 3, "symmetric": False, "granularity": "group", "group_size": 64}, None),
    "w2": ({"bits": 2, "symmetric": False, "granularity": "group", "group_size": 64}, None),
    "w4a8": ({"bits": 4, "symmetric": True, "granularity": "group", "group_size": 64},
             {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}),
}
GPTQ = {"block_size": 128, "dampening": 0.01, "act_order": True}


def recipe(setting: str, lr0: float | None, kappa: float, calib: dict):
    weights, acts = SETTINGS[setting]
    scheme = {"ignore": ["lm_head"], "weights": weights}
    if acts:
        scheme["input_activations"] = acts
    tweak = {"weights": "gptq", "gptq": GPTQ, "loss": "l_dist"}
    tweak.update({"epochs": 0} if lr0 is None else {"lr": lr0, "kappa": kappa})
    name = f"{setting}-gptq" + ("" if lr0 is None else f"-tweak-lr{lr0:g}-k{kappa:g}")
    return parse_recipe({"name": name, "scheme": scheme, "steps": [{"norm_tweak": tweak}], "calibration": calib})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=1024)
    ap.add_argument("--lr0", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    ap.add_argument("--kappa", type=float, nargs="+", default=[1.0])
    ap.add_argument("--heldout-windows", type=int, default=4)
    ap.add_argument("--heldout-seqlen", type=int, default=1024)
    ap.add_argument("--float-from", help="reuse the float record of an earlier output JSON (same windows)")
    ap.add_argument("--out", default="eval/norm_tweak_smollm2")
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m")
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)
    calib_cfg = {"dataset": "selfgen", "samples": args.calib_samples, "seqlen": args.calib_seqlen, "seed": 0}
    calib = generate_calibration(model, tok, n=args.calib_samples, seqlen=args.calib_seqlen, seed=0)
    heldout = heldout_ids(tok, "c4", "validation", tokens=args.heldout_windows * args.heldout_seqlen,
                          data_dir=args.data_dir)
    if args.float_from:
        fl = reused_float_record(args.float_from, args.windows, 2048)
    else:
        fl = perplexity_record("smollm2-135m", "wikitext2", "test", evaluate_perplexity(model, ids, windows=args.windows))
    out = {"model": "smollm2-135m", "environment": environment(), "float": fl, "calibration": calib_cfg,
           "gptq": GPTQ, "selection": {"data": "c4/validation rows disjoint from calibration",
                                       "windows": args.heldout_windows, "seqlen": args.heldout_seqlen,
                                       "grid": {"lr0": args.lr0, "kappa": args.kappa}},
           "settings": {}}
    grid = [(None, 0.0)] + [(lr0, k) for lr0 in args.lr0 for k in args.kappa]
    for setting in args.settings:
        rows, models = [], {}
        for lr0, kappa in grid:
            r = recipe(setting, lr0, kappa, calib_cfg)
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            quantize(m, r, calib, progress=False)
            seconds = time.perf_counter() - t0
            h = evaluate_perplexity(m, heldout, seqlen=args.heldout_seqlen, windows=args.heldout_windows,
                                    progress=False)
            rows.append({"lr0": lr0, "kappa": kappa, "heldout_ppl": h.ppl, "quantize_seconds": seconds,
                         "recipe": r.to_dict()})
            models[(lr0, kappa)] = m
            print(f"{setting} lr0={lr0} kappa={kappa}: held-out ppl {h.ppl:.3f} ({seconds:.0f}s)", flush=True)
            best = min((x for x in rows if x["lr0"] is not None), key=lambda x: x["heldout_ppl"], default=None)
            for key in list(models):  # keep only the GPTQ model and the current best tweak
                if key != (None, 0.0) and (best is None or key != (best["lr0"], best["kappa"])):
                    del models[key]
            out["settings"][setting] = {"selection": rows}
            write_json(f"{args.out}.json", out)
        entry = out["settings"][setting]
        for label, key in (("gptq", (None, 0.0)), ("gptq+tweak", (best["lr0"], best["kappa"]))):
            res = evaluate_perplexity(models[key], ids, windows=args.windows)
            entry[label] = {"lr0": key[0], "kappa": key[1], "ppl": res.ppl, "delta_pct": 100 * (res.ppl / fl["ppl"] - 1),
                            "record": perplexity_record("smollm2-135m", "wikitext2", "test", res)}
            print(f"{setting} {label}: wikitext2 ppl {res.ppl:.3f}", flush=True)
            write_json(f"{args.out}.json", out)
            Path(f"{args.out}.md").write_text(markdown(out))
        del models


def markdown(out: dict) -> str:
    f, c, s = out["float"], out["calibration"], out["selection"]
    grid = f"lr0 ∈ {{{', '.join(f'{x:g}' for x in s['grid']['lr0'])}}} × κ ∈ {{{', '.join(f'{x:g}' for x in s['grid']['kappa'])}}}"
    lines = [f"SmolLM2-135M, {f['protocol']}; calibration {c['dataset']} {c['samples']}×{c['seqlen']} seed {c['seed']} "
             f"(same set for every row); GPTQ {out['gptq']}, groups of 64; tweak: L_dist, Adam, 1 epoch, 1 sample "
             f"per step, lr0·(1+κ·l/L). Grid {grid}, selected by perplexity on {s['windows']}×{s['seqlen']} tokens "
             f"of {s['data']}. Commit `{out['environment']['git_commit']}`.", "",
             f"Float ppl {f['ppl']:.3f}.", "",
             "| setting | GPTQ | GPTQ + tweak | selected (lr0, κ) | held-out ppl: GPTQ → grid |",
             "|---|---:|---:|---|---|"]
    for name, e in out["settings"].items():
        if "gptq+tweak" not in e:
            continue
        g, t = e["gptq"], e["gptq+tweak"]
        sel = ", ".join(f"{r['heldout_ppl']:.3f}" for r in e["selection"])
        lines.append(f"| {name} | {g['ppl']:.3f} | {t['ppl']:.3f} | ({t['lr0']:g}, {t['kappa']:g}) | {sel} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
