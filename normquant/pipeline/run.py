"""One entry point: ``quantize(model, recipe, calib_ids)``.

1. **Model-wide phase**: every step's ``apply_model(model, arch)``, in recipe order (fusions, rotations).
2. **Block phase**: per block, the scheme's target linears become :class:`QuantLinear` (activation
   quantizers off), the steps' ``apply_block(ctx)`` run in order, weights no step quantized get
   round-to-nearest, static activation quantizers no step fixed are calibrated on the block's
   (quantized-path) inputs, activation quantization is switched on and the block's outputs feed the next
   block. A recipe that needs no data walks the blocks without capturing any inputs. A streamed model
   (:mod:`normquant.models.streaming`, ``--offload``) has each block read from disk when reached and packed
   (:func:`~normquant.quant.real.pack_weights`) once finished, so only one float block is ever in memory.
3. **Tail**: linears outside the blocks (``lm_head`` when targeted, BERT's pooler): RTN, and static inputs
   calibrated by a pass of the quantized model.

Steps only see the :class:`~normquant.pipeline.runner.BlockContext` contract; they never import this module.

Simulation → deployment seam: the result holds fake-quant :class:`QuantLinear` modules, each with its integer
codes recoverable exactly (:meth:`QuantLinear.integer_weight`). Exports read the integers from there; a real
integer kernel replaces a QuantLinear after ``quantize`` returns (``convert``, the real-execution issue), never
inside the steps.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from normquant.models.arch import get_architecture
from normquant.models.streaming import is_streamed
from normquant.pipeline.runner import BlockContext, run_blocks, walk_blocks
from normquant.progress import progress_bar
from normquant.quant.linear import QuantLinear, calibrate_static_inputs, is_linear, set_activation_quant
from normquant.quant.kv import set_kv_cache
from normquant.quant.prefix import float_prefix, prefix_of, prepend_prefix
from normquant.quant.real import pack_weights
from normquant.recipe import Recipe, RecipeError, Scheme

log = logging.getLogger(__name__)


def wrap_linears(root: nn.Module, scheme: Scheme, prefix: str = "") -> dict[str, QuantLinear]:
    """Replace the scheme's target linears under ``root`` by QuantLinear; return them by name (relative to root).

    A spec-less QuantLinear (a model-wide step put an online transform on it) gets the specs in place.
    Activation quantizers start disabled (``enabled=False``) until the block is finished.
    """
    wrapped = {}
    for name, module in list(root.named_modules()):
        if not is_linear(module) or (isinstance(module, QuantLinear) and module.has_specs):
            continue
        specs = scheme.specs_for(f"{prefix}{name}", module)
        if specs is None:
            continue
        if isinstance(module, QuantLinear):  # a carrier of an online transform (rotation): give it its specs
            module.set_specs(*specs)
            set_activation_quant([module], False)
            wrapped[name] = module
            continue
        ql = QuantLinear.wrap(module, *specs)
        set_activation_quant([ql], False)
        root.set_submodule(name, ql)
        wrapped[name] = ql
    return wrapped


def quantize(model: nn.Module, recipe: Recipe, calib_ids: torch.Tensor | None = None, *,
             device: str | torch.device = "cpu", progress: bool = True, checkpoint=None) -> nn.Module:
    """Quantize ``model`` in place following ``recipe``; ``calib_ids`` ``[N, L]`` when the recipe needs data.

    ``checkpoint`` (opt-in, :class:`~normquant.pipeline.resume.BlockCheckpoint`): every finished block is saved,
    and blocks an earlier, interrupted run of the same recipe, model and data finished are restored instead of
    quantized again; the result is byte-identical. Without it nothing is saved or read.
    """
    if recipe.needs_data and calib_ids is None:
        raise RecipeError("this recipe needs calibration data (a step or a static activation quantizer)")
    if checkpoint is not None and is_streamed(model):
        raise RecipeError("--resume does not work with --offload yet (a streamed block is packed once done); "
                          "drop one of them")
    model_wide = [s for s in recipe.steps if s.model_wide()]
    if model_wide:
        arch = get_architecture(model)
        for step in model_wide:
            step.apply_model(model, arch)
    prefix = prefix_of(model)  # PrefixQuant: prepended to every calibration sample, its positions left float
    if prefix is not None and calib_ids is not None:
        calib_ids = prepend_prefix(prefix, calib_ids)
    with float_prefix(0 if prefix is None else prefix.numel()):
        wrapped = _quantize_blocks(model, recipe, calib_ids, device, progress, checkpoint)
    if not wrapped and (recipe.scheme.weights or recipe.scheme.input_activations or recipe.scheme.overrides):
        raise RecipeError("the scheme's targets match no Linear module; check scheme.targets / scheme.ignore")
    if recipe.scheme.kv_cache is not None:  # the model runs (evaluator) and ships (export) with its KV cache
        set_kv_cache(model, recipe.scheme.kv_cache)
    return model


def _quantize_blocks(model: nn.Module, recipe: Recipe, calib_ids: torch.Tensor | None, device, progress: bool,
                     checkpoint) -> int:
    """The block phase and the tail; returns how many linears were wrapped."""
    if recipe.needs_data:
        contexts = run_blocks(model, calib_ids, device=device, batch_size=recipe.calibration.batch_size)
    else:
        contexts = walk_blocks(model)
    wrapped, done, streamed = 0, 0, is_streamed(model)
    with progress_bar(desc="blocks", unit="block", enabled=progress) as bar:
        for ctx in contexts:
            bar.total = ctx.num_blocks
            if checkpoint is not None and ctx.index == 0:  # resume hook: identify the run, restore what is done
                done = checkpoint.begin(model, recipe, calib_ids if recipe.needs_data else None,
                                        ctx.name.rpartition(".")[0])
            if ctx.index < done:
                checkpoint.restore(ctx, recipe.steps)
            else:
                if checkpoint is not None:
                    checkpoint.before_block(ctx)
                ctx.quant_linears = wrap_linears(ctx.block, recipe.scheme, prefix=f"{ctx.name}." if ctx.name else "")
                process_block(ctx, recipe)
            wrapped += len(ctx.quant_linears)
            if ctx.has_data:
                ctx.advance()
            if checkpoint is not None and ctx.index >= done:
                checkpoint.save(ctx, recipe.steps)
            if streamed:  # the block's float weights go; its quantized ones stay, packed
                pack_weights(ctx.block)
            bar.update(1)
    return wrapped + _quantize_tail(model, recipe.scheme, calib_ids if recipe.needs_data else None,
                                    recipe.calibration.batch_size)


def process_block(ctx: BlockContext, recipe: Recipe) -> None:
    """Steps, then RTN for weights no step quantized, then static activation calibration, then activations on."""
    qls = list(ctx.quant_linears.values())
    for step in recipe.steps:
        if step.per_block():
            set_activation_quant(qls, False)  # every step starts with the block's activation quantizers off
            step.apply_block(ctx)
    for ql in qls:
        if not ql.weight_quantized:
            ql.quantize_weight()
    if ctx.has_data:
        with ctx.activations(False):
            ctx.calibrate_activations()
    set_activation_quant(qls, True)


@torch.no_grad()
def _quantize_tail(model: nn.Module, scheme: Scheme, calib_ids: torch.Tensor | None, batch_size: int) -> int:
    """Linears outside the blocks (``lm_head``, BERT's pooler): RTN weights; static inputs calibrated by
    running the (now quantized) model on the calibration data. Returns how many were wrapped."""
    qls = list(wrap_linears(model, scheme).values())
    for ql in qls:
        ql.quantize_weight()
    if calib_ids is not None:
        device = next(model.parameters()).device

        def run():
            for i in range(0, calib_ids.shape[0], batch_size):
                model(input_ids=calib_ids[i:i + batch_size].to(device))

        calibrate_static_inputs(qls, run)
    set_activation_quant(qls, True)
    return len(qls)
