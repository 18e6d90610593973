"""Issue 10 probe: LLM.int8() decomposition on SmolLM2 against its threshold α. Each row is
``recipes/w8a8_int8_decomp.yaml`` with ``outlier_threshold: α``; the record also gives, per α, the share of input
columns that stayed float (summed over every quantized linear and every window) and the two limits the
decomposition moves between: α → ∞ is plain W8A8 dynamic per-token, α → 0 keeps every input float (W8A16).

    python scripts/probe_llm_int8_threshold.py --data-dir ../shared/data --windows 4 \\
        --thresholds 6,4,3,2,1 --out eval/outliers_llm_int8_threshold.json
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import normquant.quant.llm_int8 as llm_int8  # noqa: E402
from normquant.data.text import tokenize_eval  # noqa: E402
from normquant.evaluation.perplexity import evaluate_perplexity  # noqa: E402
from normquant.evaluation.records import environment, write_json  # noqa: E402
from normquant.models.loading import load_model  # noqa: E402
from normquant.pipeline.run import quantize  # noqa: E402
from normquant.recipe import load_recipe, parse_recipe  # noqa: E402

RECIPE = "recipes/w8a8_int8_decomp.yaml"


class ColumnCount:
    """Counts the columns :func:`normquant.quant.llm_int8.outlier_columns` marks (wraps it for one run)."""

    def __init__(self) -> None:
        self.float_columns = 0
        self.columns = 0
        self._orig = llm_int8.outlier_columns

    def __enter__(self) -> "ColumnCount":
        def counted(x: torch.Tensor, threshold: float) -> torch.Tensor:
            mask = self._orig(x, threshold)
            self.float_columns += int(mask.sum())
            self.columns += mask.numel()
            return mask

        llm_int8.outlier_columns = counted
        return self

    def __exit__(self, *exc) -> None:
        llm_int8.outlier_columns = self._orig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--thresholds", default="6,4,3,2,1", help="comma-separated α values")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="eval/outliers_llm_int8_threshold.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    model.eval()
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)
    base = load_recipe(RECIPE).to_dict()

    def ppl(m) -> float:
        return evaluate_perplexity(m, ids, seqlen=2048, windows=args.windows, progress=False).ppl

    def variant(inputs: dict | None):
        scheme = {**base["scheme"], "input_activations": inputs}
        return quantize(copy.deepcopy(model), parse_recipe({**base, "scheme": scheme}, RECIPE), None, progress=False)

    fppl = ppl(model)
    acts = base["scheme"]["input_activations"]
    out = {"environment": environment(), "recipe": RECIPE, "windows": args.windows, "float": fppl,
           "limits": {"w8a16 (every input float)": ppl(variant(None)),
                      "w8a8 dynamic per-token (no decomposition)": ppl(variant({**acts, "outlier_threshold": None}))},
           "thresholds": {}}
    print(f"float {fppl:.3f}; limits {out['limits']}", flush=True)
    for alpha in [float(a) for a in args.thresholds.split(",")]:
        m = variant({**acts, "outlier_threshold": alpha})
        with ColumnCount() as count:
            p = ppl(m)
        out["thresholds"][f"{alpha:g}"] = {"ppl": p, "vs_float": p / fppl - 1,
                                           "float_column_share": count.float_columns / max(count.columns, 1)}
        print(f"alpha {alpha:g}: {p:.3f} ({100 * (p / fppl - 1):+.2f}%), float columns "
              f"{100 * count.float_columns / max(count.columns, 1):.2f}%", flush=True)
        write_json(args.out, out)


if __name__ == "__main__":
    main()
