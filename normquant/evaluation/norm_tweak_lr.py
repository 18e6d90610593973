"""Choosing norm tweaking's learning rate (METHODS.md §2.4): a grid of ``(lr0, κ)``, each point a full
quantize-and-tweak run scored by perplexity on held-out calibration-side text (never the test split).

>>> best, table = select_norm_tweak_lr(lambda: load_model("smollm2-135m")[0], recipe,  # doctest: +SKIP
...                                    heldout_ids(tok, tokens=16 * 2048), calib_ids=calib)
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Callable, Iterable

import torch
from torch import nn

from normquant.evaluation.perplexity import evaluate_perplexity
from normquant.pipeline.run import quantize

log = logging.getLogger(__name__)

DEFAULT_GRID: tuple[tuple[float, float], ...] = tuple(
    (lr0, kappa) for lr0 in (1e-4, 5e-5, 1e-5, 5e-6, 1e-6) for kappa in (0.0, 1.0, 5.0))
"""[NQ] (lr0, κ) grid of METHODS.md §2.4: lr0 ∈ {1e-4, 5e-5, 1e-5, 5e-6, 1e-6} × κ ∈ {0, 1, 5}."""


def _with_lr(recipe, lr0: float | None, kappa: float | None):
    """A deep copy of ``recipe`` whose norm_tweak steps use (lr0, κ); ``lr0=None``: tweaking off (epochs 0)."""
    r = copy.deepcopy(recipe)
    found = False
    for i, step in enumerate(r.steps):
        if step.name == "norm_tweak":
            found = True
            update = {"epochs": 0} if lr0 is None else {"lr": lr0, "kappa": kappa}
            r.steps[i] = step.model_copy(update=update)
    if not found:
        raise ValueError("the recipe has no norm_tweak step to tune")
    return r


def select_norm_tweak_lr(model_factory: Callable[[], nn.Module], recipe, heldout: torch.Tensor,
                         grid: Iterable[tuple[float, float]] | None = None, *, calib_ids: torch.Tensor,
                         seqlen: int | None = None, windows: int | None = None, device: str | torch.device = "cpu",
                         baseline: bool = True, progress: bool = False) -> tuple[dict, list[dict]]:
    """Grid search of (lr0, κ) for the recipe's ``norm_tweak`` step, scored by held-out perplexity.

    For each ``(lr0, κ)`` of ``grid`` (default :data:`DEFAULT_GRID`): a fresh float model from
    ``model_factory()`` is quantized with the recipe (its norm_tweak step set to that lr0, κ) on ``calib_ids``
    ``[N, L]``, then its perplexity is measured on ``heldout`` — ``[1, n]`` text cut into ``seqlen`` windows
    (default ``recipe.evaluation.seqlen``), or ``[W, L]`` ready windows — under the GPTQ protocol of
    :func:`normquant.evaluation.perplexity.evaluate_perplexity`. ``heldout`` must be calibration-side text not
    used for calibration (:func:`heldout_ids`), never the evaluation test split. With ``baseline`` the table
    also holds the same recipe without tweaking (``lr0 = None``: the weight algorithm alone).

    Returns ``(best, table)``: ``table`` rows ``{"lr0", "kappa", "ppl", "nll", "windows", "seqlen"}`` in grid
    order, ``best`` the tweaked row with the lowest perplexity.

    >>> best, table = select_norm_tweak_lr(lambda: load_model("smollm2-135m")[0], recipe,  # doctest: +SKIP
    ...                                    heldout_ids(tok, tokens=16 * 2048), calib_ids=calib)
    """
    grid = list(DEFAULT_GRID if grid is None else grid)
    if heldout.dim() != 2:
        raise ValueError(f"heldout must be [1, n] text or [W, L] windows, got shape {tuple(heldout.shape)}")
    if heldout.shape[0] > 1:
        seqlen = heldout.shape[1]
    seqlen = seqlen or recipe.evaluation.seqlen
    stream = heldout.reshape(1, -1)
    configs: list[tuple[float | None, float | None]] = ([(None, None)] if baseline else []) + grid
    table = []
    for lr0, kappa in configs:
        model = model_factory()
        quantize(model, _with_lr(recipe, lr0, kappa), calib_ids, device=device, progress=progress)
        res = evaluate_perplexity(model, stream, seqlen=seqlen, windows=windows, progress=progress)
        row = {"lr0": lr0, "kappa": kappa, "ppl": res.ppl, "nll": res.nll, "windows": res.windows, "seqlen": seqlen}
        log.info("norm_tweak lr selection: lr0=%s kappa=%s held-out ppl %.4f", lr0, kappa, res.ppl)
        table.append(row)
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    tweaked = [r for r in table if r["lr0"] is not None and math.isfinite(r["ppl"])]
    if not tweaked:
        raise ValueError("no (lr0, kappa) in the grid gave a finite held-out perplexity")
    return min(tweaked, key=lambda r: r["ppl"]), table
