"""One entry point: ``quantize(model, recipe, calib_ids)``.

1. Target linears (by the recipe's scheme) are replaced by :class:`QuantLinear` with their specs.
2. If any step needs data, or an activation quantizer is static, the sequential block runner walks the
   blocks: per block, the steps run in order, weights not yet quantized get round-to-nearest, static
   activation quantizers are calibrated on the block's (quantized-path) inputs, and the block's outputs feed
   the next block. Otherwise every weight is rounded to nearest directly (no data needed).
3. Linears outside the blocks (``lm_head`` when targeted, BERT's pooler) are handled last.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm import tqdm

from normquant.calibration.runner import BlockContext, run_blocks
from normquant.models.arch import get_architecture, get_blocks
from normquant.quant.linear import QuantLinear
from normquant.recipe import Recipe, RecipeError, Scheme
from normquant.steps import RTN

log = logging.getLogger(__name__)


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def wrap_linears(root: nn.Module, scheme: Scheme, prefix: str = "") -> dict[str, QuantLinear]:
    """Replace the scheme's target linears under ``root`` by QuantLinear; return them by name (relative to root).

    Activation quantizers start disabled (``enabled=False``) until the block is finished.
    """
    wrapped = {}
    for name, module in list(root.named_modules()):
        if not _quantizable(module) or isinstance(module, QuantLinear):
            continue
        specs = scheme.specs_for(f"{prefix}{name}", module)
        if specs is None:
            continue
        ql = QuantLinear.wrap(module, *specs)
        parent_name, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, attr, ql)
        wrapped[name] = ql
    return wrapped


def set_activation_quant(qls, enabled: bool) -> None:
    for ql in qls:
        if ql.input_quant is not None:
            ql.input_quant.enabled = enabled


@torch.no_grad()
def calibrate_static_activations(qls: list[QuantLinear], run) -> None:
    """Observe min/max of static input quantizers while ``run()`` feeds data, then freeze them."""
    static = [ql.input_quant for ql in qls if ql.input_quant is not None and not ql.input_quant.spec.dynamic
              and ql.input_quant.scale is None]  # those a step (RepQuant) set stay as they are
    if not static:
        return
    for q in static:
        q.enabled, q.observing = True, True
    run()
    for q in static:
        q.freeze()


def quantize(model: nn.Module, recipe: Recipe, calib_ids: torch.Tensor | None = None, *,
             device: str | torch.device = "cpu", progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place following ``recipe``; ``calib_ids`` ``[N, L]`` when the recipe needs data."""
    scheme = recipe.scheme
    if not recipe.needs_data:
        qls = wrap_linears(model, scheme)
        if not qls:
            raise RecipeError("the scheme's targets match no Linear module; check scheme.targets / scheme.ignore")
        rtn = next((step for step in recipe.steps if isinstance(step, RTN)), RTN())  # the only step without data
        rtn.quantize_linears(tqdm(qls.values(), desc="rtn", disable=not progress, leave=False))
        set_activation_quant(qls.values(), True)
        return model
    if calib_ids is None:
        raise RecipeError("this recipe needs calibration data (a step or a static activation quantizer)")
    arch = get_architecture(model)
    blocks = get_blocks(model, arch)
    bar = tqdm(total=len(blocks), desc="blocks", disable=not progress, leave=False)
    for ctx in run_blocks(model, calib_ids, device=device, batch_size=recipe.calibration.batch_size):
        ctx.quant_linears = wrap_linears(ctx.block, scheme, prefix=ctx.name + ".")
        process_block(ctx, recipe)
        ctx.advance()
        bar.update(1)
    bar.close()
    _quantize_tail(model, scheme, calib_ids, recipe.calibration.batch_size)
    return model


def process_block(ctx: BlockContext, recipe: Recipe) -> None:
    """Steps, then RTN for weights no step quantized, then static activation calibration."""
    qls = list(ctx.quant_linears.values())
    set_activation_quant(qls, False)
    for step in recipe.steps:
        step.apply_block(ctx)
    for ql in qls:
        if not ql.weight_quantized:
            ql.quantize_weight()
    calibrate_static_activations(qls, ctx.outputs)
    set_activation_quant(qls, True)


@torch.no_grad()
def _quantize_tail(model: nn.Module, scheme: Scheme, calib_ids: torch.Tensor, batch_size: int) -> None:
    """Linears outside the blocks (``lm_head``, BERT's pooler): RTN weights; static inputs calibrated by
    running the (now quantized) model on the calibration data."""
    qls = list(wrap_linears(model, scheme).values())
    for ql in qls:
        ql.quantize_weight()
    device = next(model.parameters()).device

    def run():
        for i in range(0, calib_ids.shape[0], batch_size):
            model(input_ids=calib_ids[i:i + batch_size].to(device))

    calibrate_static_activations(qls, run)
    set_activation_quant(qls, True)
