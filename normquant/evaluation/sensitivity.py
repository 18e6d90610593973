"""Sensitivity: quantize one module kind at a time (weights or input activations) and rank the perplexity cost.

A module kind is the leaf name of a targeted linear inside the blocks (``q_proj``, ``down_proj``, ...). Each
row quantizes only that kind with the recipe's weight spec (through the recipe's steps) or only its input
activations (after the recipe's steps that do not quantize weights: rotation, SmoothQuant, RepQuant), on a fresh
copy of the float model, and reports ``ppl - float ppl``. Recipes can then keep the
worst offenders at higher precision with ``scheme.overrides``.
"""
from __future__ import annotations

import copy

from normquant.pipeline.runner import blocks_name
from normquant.data import calibration_ids
from normquant.data.text import tokenize_eval
from normquant.evaluation.perplexity import evaluate_perplexity
from normquant.evaluation.records import environment
from normquant.models.arch import get_blocks
from normquant.models.loading import load_model
from normquant.pipeline.run import quantize
from normquant.progress import progress_bar
from normquant.quant.linear import is_linear
from normquant.recipe import Recipe


def module_kinds(model, recipe: Recipe) -> list[str]:
    """Leaf names of the scheme's target linears inside the blocks, in model order."""
    blocks = blocks_name(model, get_blocks(model))
    kinds: list[str] = []
    for name, m in model.named_modules():
        if name.startswith(blocks + ".") and is_linear(m) and recipe.scheme.specs_for(name, m) is not None:
            leaf = name.rsplit(".", 1)[1]
            if leaf not in kinds:
                kinds.append(leaf)
    return kinds


def sensitivity_report(recipe: Recipe, *, data_dir=None, progress: bool = True) -> dict:
    model, tok = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
    ev = recipe.evaluation
    ids = tokenize_eval(tok, ev.dataset, ev.split, data_dir)

    def ppl(m):
        return evaluate_perplexity(m, ids, seqlen=ev.seqlen, windows=ev.windows, progress=progress)

    base = ppl(model)
    rows = []
    calib = None
    todo = [(kind, part) for kind in module_kinds(model, recipe) for part in ("weights", "input_activations")
            if getattr(recipe.scheme, part) is not None]
    for kind, part in progress_bar(todo, desc="sensitivity rows", unit="row", enabled=progress):  # one row each
        spec = getattr(recipe.scheme, part)
        scheme = recipe.scheme.model_copy(update={
            "targets": [f"re:.*\\.{kind}$"], "overrides": [],  # re: matches from the start (compressed-tensors)
            "weights": spec if part == "weights" else None,
            "input_activations": spec if part == "input_activations" else None})
        # input rows keep the transforms (rotation, SmoothQuant, RepQuant) and drop the weight quantizers
        steps = recipe.steps if part == "weights" else [s for s in recipe.steps if not s.quantizes_weights]
        one = recipe.model_copy(update={"scheme": scheme, "steps": steps})
        if one.needs_data and calib is None:
            calib = calibration_ids(recipe.calibration, model, tok, data_dir)
        m = quantize(copy.deepcopy(model), one, calib if one.needs_data else None, progress=False)
        res = evaluate_perplexity(m, ids, seqlen=ev.seqlen, windows=ev.windows, progress=False)
        rows.append({"module": kind, "part": part, "spec": spec.short(), "ppl": res.ppl,
                     "delta_ppl": res.ppl - base.ppl, "delta_pct": 100 * (res.ppl / base.ppl - 1)})
        del m
    rows.sort(key=lambda r: -r["delta_ppl"])
    lines = [f"float ppl {base.ppl:.3f} ({base.windows}/{base.windows_total} windows of {base.seqlen})",
             f"{'rank':>4} {'module':<12} {'part':<18} {'spec':<18} {'ppl':>9} {'delta':>8}"]
    lines += [f"{i + 1:>4} {r['module']:<12} {r['part']:<18} {r['spec']:<18} {r['ppl']:>9.3f} {r['delta_pct']:>+7.2f}%"
              for i, r in enumerate(rows)]
    return {"recipe": recipe.to_dict(), "recipe_hash": recipe.hash(), "model": recipe.model,
            "dataset": ev.dataset, "split": ev.split, "seqlen": ev.seqlen, "windows": base.windows,
            "windows_total": base.windows_total, "float_ppl": base.ppl, "rows": rows, "table": "\n".join(lines),
            "environment": environment()}
