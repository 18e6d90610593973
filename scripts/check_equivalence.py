"""Fingerprint every shipped recipe's quantized model, to show a refactor changed no arithmetic.

For each ``recipes/*.yaml``: SmolLM2-135M cut to its first ``--layers`` blocks, calibration shrunk to
``--samples`` x ``--seqlen`` C4 tokens (self-generated data replaced by C4, RepQuant to 1 epoch), quantized;
then the SHA-256 of its state dict (names, dtypes, shapes, bytes) and of its logits on the first
``--seqlen`` WikiText-2 test tokens, and the perplexity of those tokens. Run it on two commits and compare
the JSON files: equal hashes mean bit-identical models.

    PYTHONPATH=/tmp/old python scripts/check_equivalence.py --out /tmp/old.json
    python scripts/check_equivalence.py --out /tmp/new.json --compare /tmp/old.json
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
from pathlib import Path

import torch
import yaml


def _quantize_fn():
    try:
        from normquant.pipeline.run import quantize
    except ImportError:  # before the pipeline package
        from normquant.quantize import quantize
    return quantize


def state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--data-dir", default=None, help="offline data (default $NORMQUANT_DATA_DIR)")
    ap.add_argument("--recipes", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from normquant.data import calibration_ids
    from normquant.data.text import tokenize_eval
    from normquant.models.loading import load_model
    from normquant.recipe import parse_recipe

    quantize = _quantize_fn()
    base, tok = load_model("smollm2-135m")
    base.model.layers = base.model.layers[:args.layers]
    base.config.num_hidden_layers = args.layers
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)[:, :args.seqlen]
    files = args.recipes or sorted(str(p) for p in Path("recipes").glob("*.yaml"))
    out = {}
    for f in files:
        data = yaml.safe_load(Path(f).read_text())
        data["calibration"] = {**(data.get("calibration") or {}), "dataset": "c4", "samples": args.samples,
                               "seqlen": args.seqlen, "batch_size": 2}
        for step in data.get("steps") or []:
            if isinstance(step, dict) and "repquant" in step:
                step["repquant"] = {**(step["repquant"] or {}), "epochs": 1}
        recipe = parse_recipe(data, f)
        model = copy.deepcopy(base)
        calib = calibration_ids(recipe.calibration, model, tok, args.data_dir) if recipe.needs_data else None
        quantize(model, recipe, calib, progress=False)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:]).item()
        out[Path(f).stem] = {"state": state_hash(model),
                             "logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest()[:16],
                             "ppl": math.exp(nll)}
        print(f"{Path(f).stem:<24} {out[Path(f).stem]}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        diff = [k for k in out if k in old and out[k] != old[k]]
        print(f"{len(out) - len(diff)}/{len(out)} recipes identical; differ: {diff}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
