"""RepQuant on SmolLM2: naive static per-tensor vs per-channel vs RepQuant vs dynamic per-token, per bit setting.

    python scripts/eval_repquant.py --data-dir ../shared/data --windows 16 --bits w6a6 w4a8 w8a8 \
        --calib-samples 8 --calib-seqlen 1024 --calib-batch 1 --epochs 4 --lr 1e-2 --out eval/repquant_smollm2
    python scripts/eval_repquant.py ... --exactness-only   # (re)measure only the exactness entry of --out

Rows (every linear's input activations quantized, lm_head float; weights RTN symmetric per output channel;
one calibration set for every row; the linears no norm feeds — o_proj, down_proj — get static per-tensor
quantizers calibrated by ``--others`` (min-max by default) in the per-channel and RepQuant rows, so those rows
differ from naive-static (``--others minmax``) or static-pct (``--others percentile``) only at the norm
consumers q/k/v, gate/up):
  naive-static        static per-tensor asymmetric, min-max
  per-channel-sim     static per-channel, percentile-searched bounds, on the unchanged model (weights quantized
                      on the original W): what a per-channel kernel would give
  repquant            percentile init, range floor, learned dual clipping (weights in the loop),
                      reparameterized into the norms -> static per-tensor (s̃, integer z̃)
  repquant-floor      as repquant without the learning (the "percentile-only" row for learned vs not)
  repquant-pct        percentile init only (no floor, no learning), reparameterized
  dynamic-token       dynamic per-token symmetric (reference; not a static quantizer)
  static-pct          (not run by default) static per-tensor with the percentile search everywhere
Also an exactness check with float weights, in float64 and float32: the reparameterized per-tensor model vs its
per-channel simulation (see :func:`exactness`).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from normquant.data.text import calibration_samples, tokenize_eval
from normquant.evaluation.perplexity import evaluate_perplexity
from normquant.evaluation.records import environment, perplexity_record, reused_float_record, write_json
from normquant.models.arch import block_mappings, get_blocks
from normquant.models.loading import load_model
from normquant.pipeline.run import quantize
from normquant.recipe import parse_recipe
from normquant.methods.repquant import install_input_quantizers, reparameterize_block

BITS = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a8": (4, 8)}
ROW_ORDER = ["naive-static", "static-pct", "per-channel-sim", "repquant", "repquant-floor", "repquant-pct",
             "dynamic-token"]


def recipe(row: str, wbits: int | None, abits: int, calib: dict, epochs: int, lr: float, others: str = "minmax"):
    """``others``: the observer of the static per-tensor quantizers RepQuant does not set (o_proj, down_proj)."""
    static = {"bits": abits, "symmetric": False, "granularity": "tensor"}
    acts = {"dynamic-token": {"bits": abits, "symmetric": True, "granularity": "token", "dynamic": True},
            "naive-static": static,
            "static-pct": {**static, "observer": "percentile"}}.get(row, {**static, "observer": others})
    pct = {"learn_clipping": False, "range_floor": False}
    steps = {
        "naive-static": [],
        "static-pct": [],
        "dynamic-token": [],
        "per-channel-sim": [{"repquant": {"mode": "per_channel", **pct}}],
        "repquant": [{"repquant": {"mode": "reparameterize", "epochs": epochs, "lr": lr}}],
        "repquant-floor": [{"repquant": {"mode": "reparameterize", "learn_clipping": False}}],
        "repquant-pct": [{"repquant": {"mode": "reparameterize", **pct}}],
    }[row]
    scheme = {"ignore": ["lm_head"], "input_activations": acts}
    if wbits:
        scheme["weights"] = {"bits": wbits, "symmetric": True, "granularity": "channel"}
    return parse_recipe({"name": row, "scheme": scheme, "steps": steps, "calibration": calib})


def exactness(model, calib, probe, calib_cfg: dict, dtype: str) -> dict:
    """Float weights, A6 on every linear input: the per-channel model (percentile bounds) and the model
    reparameterized *from it* — same per-channel (s, z) folded into the norms, same o_proj/down_proj
    quantizers — so nothing is calibrated twice. Two comparisons on ``probe``:

    * per block, both fed the same input (the per-channel model's): max |Δ| of the block output, and how many
      output values differ by more than 1e-6 (a value on a bin edge that rounds the other way);
    * the whole model: leading blocks whose outputs are bit-identical, and the logits.
    """
    dt = getattr(torch, dtype)
    pc = quantize(copy.deepcopy(model).to(dt), recipe("per-channel-sim", None, 6, calib_cfg, 0, 5e-3), calib,
                  progress=False)
    rep = copy.deepcopy(pc)
    for i in range(len(get_blocks(rep))):
        maps = {m.norm: m for m in block_mappings(rep, i)}
        first = {n: rep.get_submodule(m.consumers[0]).input_quant for n, m in maps.items()}
        reps = reparameterize_block(rep, i, {n: (q.scale[:, 0], q.zero_point[:, 0]) for n, q in first.items()})
        for n, r in reps.items():
            install_input_quantizers([rep.get_submodule(c) for c in maps[n].consumers], r.s_tilde, r.z_tilde, 6)

    def run(m, feed=None):
        """Block inputs and outputs of one forward (``feed``: replace each block's input)."""
        ins, outs, hooks = [], [], []
        for i, block in enumerate(get_blocks(m)):
            def pre(mod, args, kwargs, i=i):
                ins.append(args[0].double())
                return ((feed[i].to(args[0].dtype),) + args[1:], kwargs) if feed is not None else None
            hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(block.register_forward_hook(lambda mod, a, o: outs.append((o[0] if isinstance(o, tuple) else o).double())))
        try:
            with torch.no_grad():
                logits = m(probe).logits.double()  # [1, L, V]
        finally:
            for h in hooks:
                h.remove()
        return ins, outs, logits

    pc_in, pc_out, pc_logits = run(pc)
    _, fed_out, _ = run(rep, feed=pc_in)
    per_block = [(a - b).abs().max().item() for a, b in zip(pc_out, fed_out)]
    flips = [int(((a - b).abs() > 1e-6).sum()) for a, b in zip(pc_out, fed_out)]
    _, rep_out, rep_logits = run(rep)
    chained = [(a - b).abs().max().item() for a, b in zip(pc_out, rep_out)]
    d = (pc_logits - rep_logits).abs()
    res = {"dtype": dtype, "blocks": len(per_block),
           "per_block_same_input": {"max_abs_diff": per_block, "values_off_by_more_than_1e-6": flips,
                                    "max": max(per_block), "blocks_with_a_flip": sum(f > 0 for f in flips)},
           "whole_model": {"identical_blocks": next((i for i, v in enumerate(chained) if v > 0), len(chained)),
                           "max_abs_diff_per_block": chained, "max_abs_logit_diff": d.max().item(),
                           "mean_abs_logit_diff": d.mean().item(),
                           "argmax_agreement": (pc_logits.argmax(-1) == rep_logits.argmax(-1)).double().mean().item()},
           "logit_scale": pc_logits.abs().max().item(), "block_output_scale": max(o.abs().max().item() for o in pc_out),
           "probe_tokens": probe.shape[1],
           "calibration": f"c4/validation {calib.shape[0]}x{calib.shape[1]} seed {calib_cfg['seed']}"}
    w = res["whole_model"]
    print(f"exactness {dtype}: per block (same input) max |Δ| {max(per_block):.3e}, blocks with a flip "
          f"{res['per_block_same_input']['blocks_with_a_flip']}/{len(per_block)}; whole model {w['identical_blocks']} "
          f"leading blocks identical, logits max |Δ| {w['max_abs_logit_diff']:.3e}, argmax agreement "
          f"{w['argmax_agreement']:.3f}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--bits", nargs="+", default=list(BITS))
    ap.add_argument("--rows", nargs="+", default=["naive-static", "per-channel-sim", "repquant", "repquant-floor",
                                                   "repquant-pct", "dynamic-token"])
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=1024)
    ap.add_argument("--calib-batch", type=int, default=4, help="samples per batch (per Adam step of the clipping)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--out", default="eval/repquant_smollm2")
    ap.add_argument("--float-from", help="reuse the float record of an earlier output JSON (same windows)")
    ap.add_argument("--skip-exactness", action="store_true")
    ap.add_argument("--exactness-only", action="store_true", help="only (re)measure the exactness entry of --out")
    ap.add_argument("--others", choices=["minmax", "percentile"], default="minmax",
                    help="observer of the per-tensor quantizers on the linears no norm feeds, in the RepQuant and "
                         "per-channel rows (naive-static is always min-max, static-pct always percentile)")
    ap.add_argument("--append", action="store_true",
                    help="add the rows to --out (replacing rows with the same bits and row; the calibration must match)")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)
    calib_cfg = {"samples": args.calib_samples, "seqlen": args.calib_seqlen, "seed": 0, "batch_size": args.calib_batch}
    calib = calibration_samples(tok, "c4", "validation", n=args.calib_samples, seqlen=args.calib_seqlen, seed=0,
                                data_dir=args.data_dir)
    out = {"model": "smollm2-135m", "environment": environment(), "calibration": {"dataset": "c4/validation",
           **calib_cfg}, "others": args.others, "rows": [],
           "exactness": None}
    if not args.skip_exactness:
        out["exactness"] = {dt: exactness(model, calib, ids[:, :2048], calib_cfg, dt) for dt in ("float64", "float32")}
    if args.exactness_only:  # refresh the exactness entry of an existing result
        old = json.loads(Path(f"{args.out}.json").read_text())
        old["exactness"] = out["exactness"]
        write_json(f"{args.out}.json", old)
        Path(f"{args.out}.md").write_text(markdown(old))
        return
    commit = out["environment"]["git_commit"]  # this run's (with --append, out is re-read from the file)
    if args.append:
        old = json.loads(Path(f"{args.out}.json").read_text())
        if old["calibration"] != out["calibration"] or old["float"]["windows"] != args.windows:
            raise SystemExit(f"--append: {args.out}.json has calibration {old['calibration']} and "
                             f"{old['float']['windows']} windows; this run {out['calibration']}, {args.windows}")
        out["float"] = old["float"]
    elif args.float_from:
        out["float"] = reused_float_record(args.float_from, args.windows, 2048)
    else:
        out["float"] = perplexity_record("smollm2-135m", "wikitext2", "test",
                                         evaluate_perplexity(model, ids, seqlen=2048, windows=args.windows))
    print(f"float {out['float']['ppl']:.3f}")

    for bits in args.bits:
        wb, ab = BITS[bits]
        for row in args.rows:
            r = recipe(row, wb, ab, calib_cfg, args.epochs, args.lr, args.others)
            t0 = time.perf_counter()
            m = quantize(copy.deepcopy(model), r, calib, progress=False)
            seconds = time.perf_counter() - t0
            res = evaluate_perplexity(m, ids, seqlen=2048, windows=args.windows)
            entry = {"bits": bits, "row": row, "ppl": res.ppl, "quantize_seconds": seconds,
                     "commit": commit, "recipe": r.to_dict(),
                     "repquant": next((s.report for s in r.steps if s.name == "repquant"), None),
                     "record": perplexity_record("smollm2-135m", "wikitext2", "test", res)}
            print(f"{bits} {row}: {res.ppl:.3f} ({seconds:.0f}s)")
            if args.append:  # re-read: another run may have added rows meanwhile
                out = json.loads(Path(f"{args.out}.json").read_text())
            out["rows"] = [e for e in out["rows"] if (e["bits"], e["row"]) != (bits, row)] + [entry]
            write_json(f"{args.out}.json", out)
            Path(f"{args.out}.md").write_text(markdown(out))


def _clipping(out: dict) -> str:
    """The (epochs, lr) of the rows that learned their clipping, from their recipes."""
    runs = {(s["repquant"]["epochs"], s["repquant"]["lr"]) for r in out["rows"] for s in r["recipe"]["steps"]
            if "repquant" in s and s["repquant"].get("learn_clipping", True)}
    return ", ".join(f"{e} epochs lr {lr:g}" for e, lr in sorted(runs)) or "none"


def markdown(out: dict) -> str:
    f = out["float"]
    c = out["calibration"]
    lines = [f"SmolLM2-135M, {f['protocol']}; calibration {c['dataset']} {c['samples']}×{c['seqlen']} seed "
             f"{c['seed']} (same set for every row); o_proj/down_proj inputs in the per-channel and RepQuant rows: "
             f"{out.get('others', 'minmax')}; learned clipping {_clipping(out)}; commits "
             f"{', '.join(sorted({r.get('commit', out['environment']['git_commit']) for r in out['rows']}))} "
             "(per row in the JSON).", "", f"Float ppl {f['ppl']:.3f}.", ""]
    for e in (out["exactness"] or {}).values():
        if not isinstance(e, dict):
            continue
        pb, w = e["per_block_same_input"], e["whole_model"]
        lines += [f"Exactness ({e['dtype']}; A6 on every linear input, float weights, percentile bounds, the "
                  f"reparameterized model derived from the per-channel one, first {e['probe_tokens']} test tokens, "
                  f"calibration {e['calibration']}): each block fed the same input: max |Δ| {pb['max']:.3e} "
                  f"(block outputs up to {e['block_output_scale']:.1f}), {pb['blocks_with_a_flip']} of {e['blocks']} "
                  f"blocks with a value off by > 1e-6; whole model: {w['identical_blocks']} leading blocks "
                  f"bit-identical, max |Δlogit| {w['max_abs_logit_diff']:.3e}, argmax agreement "
                  f"{w['argmax_agreement']:.3f} (logits up to {e['logit_scale']:.1f}).", ""]
    bits = [b for b in BITS if any(r["bits"] == b for r in out["rows"])]
    rows = sorted(dict.fromkeys(r["row"] for r in out["rows"]), key=lambda r: ROW_ORDER.index(r) if r in ROW_ORDER else 99)
    lines += ["| row | " + " | ".join(bits) + " |", "|---|" + "---:|" * len(bits)]
    for row in rows:
        cells = [next((f"{r['ppl']:.3f}" for r in out["rows"] if r["bits"] == b and r["row"] == row), "") for b in bits]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
