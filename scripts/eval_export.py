"""Export -> reload -> the same perplexity, and the size of the exported INT4 weights.

    python scripts/eval_export.py --data-dir ../shared/data --windows 4 --out eval/export_roundtrip.json

Quantizes SmolLM2 with recipes/w4a16_g64_rtn.yaml and recipes/w8a8_rtn.yaml, evaluates, exports
(compressed-tensors), reloads with `normquant.load_quantized`, evaluates again on the same windows, and
compares the bytes of the packed INT4 weights with the float16 bytes of the same layers.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from safetensors import safe_open

from normquant.data.text import tokenize_eval
from normquant.evaluation.perplexity import evaluate_perplexity
from normquant.evaluation.records import environment, write_json
from normquant.export import export_model, load_quantized
from normquant.models.loading import load_model
from normquant.pipeline.run import quantize
from normquant.recipe import load_recipe


def weight_bytes(path: Path) -> dict:
    """Bytes of the quantized weight tensors vs float16 bytes of the same layers."""
    q = fp16 = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith(("weight_packed", ".weight")) and f"{key.rsplit('.', 1)[0]}.weight_scale" in f.keys():
                t = f.get_tensor(key)
                q += t.numel() * t.element_size()
                shape_key = key.replace("weight_packed", "weight_shape")
                shape = f.get_tensor(shape_key).tolist() if shape_key in f.keys() else list(t.shape)
                fp16 += shape[0] * shape[1] * 2
    return {"quantized_weight_bytes": q, "float16_bytes": fp16, "ratio": q / fp16}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default="eval/export_roundtrip.json")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)
    rows = []
    for recipe_file in ("recipes/w4a16_g64_rtn.yaml", "recipes/w8a8_rtn.yaml"):
        recipe = load_recipe(recipe_file)
        m = quantize(copy.deepcopy(model), recipe, progress=False)
        before = evaluate_perplexity(m, ids, seqlen=2048, windows=args.windows)
        with tempfile.TemporaryDirectory() as d:
            path = export_model(m, tok, Path(d) / "export")
            size = weight_bytes(path)
            reloaded, _ = load_quantized(path)
            after = evaluate_perplexity(reloaded, ids, seqlen=2048, windows=args.windows)
        rows.append({"recipe": recipe_file, "ppl_before_export": before.ppl, "ppl_after_reload": after.ppl,
                     "identical": before.ppl == after.ppl, **size})
        print(rows[-1])
    write_json(args.out, {"model": "smollm2-135m", "protocol": f"wikitext2/test, first {args.windows} of "
                          f"{before.windows_total} windows of 2048", "rows": rows, "environment": environment()})


if __name__ == "__main__":
    main()
