"""Parity table: the same SmolLM2 export through ``normquant eval`` and through transformers + compressed-tensors.

    python scripts/parity_smollm2.py --data-dir ../shared/data --windows 4 --out eval/parity_smollm2

Per export kind: quantize SmolLM2-135M (float32, CPU) with the recipe, export it (compressed-tensors), then
load the export twice — ``normquant.load`` (what ``normquant eval --model <export>`` runs) and
``transformers.AutoModelForCausalLM.from_pretrained`` with compressed-tensors (with ``dequantize=True`` where the
export's ``serving`` section says that is the route) — and run both on the same WikiText-2 test windows (2048
tokens, GPTQ protocol). Reports logits max |Δ| over every window and both perplexities. Both sides use
transformers' default attention (sdpa), which matters: dynamic per-token A8 puts each row's extreme on a
rounding tie, so different attention kernels alone would flip a few codes.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import normquant as nq
from normquant.data.text import tokenize_eval
from normquant.evaluation.records import environment, write_json
from normquant.io import atomic_write_text

W8 = {"bits": 8, "symmetric": True, "granularity": "channel"}
A8_DYN = {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}
SMALL_CALIBRATION = {"samples": 8, "seqlen": 512}  # static ranges only: enough for a parity check

KINDS = [  # (kind, recipe, calibration overrides)
    ("W8A16 (int8 sym per-channel)", "recipes/w8a16_rtn.yaml", None),
    ("W4A16 g64 (int4 sym)", "recipes/w4a16_g64_rtn.yaml", None),
    ("W8A8 dynamic (per-token A8)", "recipes/w8a8_rtn.yaml", None),
    ("W8A8 static (asym per-tensor A8)", "recipes/w8a8_static.yaml", SMALL_CALIBRATION),
    ("W8A8 mixed (down_proj inputs float)", "recipes/w8a8_mixed.yaml", None),
    ("W4A8 g64 dynamic", {"name": "w4a8-g64-dyn", "scheme": {
        "ignore": ["lm_head"], "weights": {"bits": 4, "granularity": "group", "group_size": 64},
        "input_activations": A8_DYN}, "steps": ["rtn"]}, None),
    ("W3A16 g64 asym", "recipes/w3a16_g64_rtn.yaml", None),
]


@torch.no_grad()
def compare(ours, theirs, windows: torch.Tensor) -> dict:
    """Logits max |Δ| and both perplexities over ``windows`` ``[n, seqlen]`` (one window at a time)."""
    max_diff, nll_ours, nll_theirs, tokens = 0.0, 0.0, 0.0, 0
    for w in windows:
        batch = w[None]
        lo = ours(input_ids=batch, use_cache=False).logits
        lt = theirs(input_ids=batch, use_cache=False).logits
        max_diff = max(max_diff, (lo - lt).abs().max().item())
        target = batch[:, 1:].reshape(-1)
        nll_ours += F.cross_entropy(lo[:, :-1].reshape(-1, lo.shape[-1]).float(), target, reduction="sum").item()
        nll_theirs += F.cross_entropy(lt[:, :-1].reshape(-1, lt.shape[-1]).float(), target, reduction="sum").item()
        tokens += target.numel()
        del lo, lt
    return {"logits_max_abs_diff": max_diff, "ppl_normquant": math.exp(nll_ours / tokens),
            "ppl_transformers": math.exp(nll_theirs / tokens), "predicted_tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default="eval/parity_smollm2", help="writes OUT.json and OUT.md")
    ap.add_argument("--only", help="run only kinds whose name contains this text")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    float_model, tok = nq.load("smollm2-135m")
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)
    seqlen = 2048
    windows = ids.reshape(-1)[: ids.numel() // seqlen * seqlen].reshape(-1, seqlen)[: args.windows]
    del float_model
    rows = []
    for kind, recipe, calibration in KINDS:
        if args.only and args.only.lower() not in kind.lower():
            continue
        model, tok = nq.load("smollm2-135m")
        nq.quantize(model, recipe, calibration, tokenizer=tok, data_dir=args.data_dir)
        with tempfile.TemporaryDirectory() as tmp:
            path = nq.export(model, Path(tmp) / "export", tokenizer=tok)
            del model
            config = json.loads((path / "config.json").read_text())
            serving = config["normquant"]["serving"]
            fmt = config["quantization_config"]["format"]
            ours, _ = nq.load(path)
            dequantize = serving["parity"] == "exact-with-dequantize"
            kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
            theirs = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
            row = {"kind": kind, "recipe": recipe,
                   "calibration": calibration, "format": fmt, "serving_parity": serving["parity"],
                   "transformers_route": "dequantize=True" if dequantize else "default (compressed, QDQ forward)",
                   "attention": [ours.config._attn_implementation, theirs.config._attn_implementation],
                   **compare(ours, theirs, windows)}
            del ours, theirs
        print(f"{kind:<40} max|dlogits| {row['logits_max_abs_diff']:.3g}  ppl {row['ppl_normquant']:.3f} / "
              f"{row['ppl_transformers']:.3f}", flush=True)
        rows.append(row)
    record = {"model": "smollm2-135m", "dtype": "float32", "protocol": f"wikitext2/test, first {args.windows} "
              f"windows of {seqlen} tokens (GPTQ protocol)", "rows": rows, "environment": environment()}
    import compressed_tensors
    import transformers

    record["versions"] = {"transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__}
    write_json(f"{args.out}.json", record)
    lines = [f"# normquant vs transformers + compressed-tensors on the same export (SmolLM2-135M)", "",
             f"Written by `scripts/parity_smollm2.py --windows {args.windows}`. {record['protocol']}; float32, CPU; "
             f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}; both "
             "sides with transformers' default attention. `normquant` = `normquant.load(export)` (what "
             "`normquant eval --model <export>` runs); `transformers` = `AutoModelForCausalLM.from_pretrained(export)`.",
             "", "| export kind | format | transformers route | logits max abs diff | ppl normquant | "
             "ppl transformers + CT |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | `{r['format']}` | {r['transformers_route']} | {r['logits_max_abs_diff']:.3g} | "
                     f"{r['ppl_normquant']:.3f} | {r['ppl_transformers']:.3f} |")
    atomic_write_text(f"{args.out}.md", "\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
