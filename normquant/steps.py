"""The built-in recipe steps: thin wrappers that call the math in ``algorithms/`` and ``transforms/``.

Each step's pydantic fields are its YAML keys; ``apply_block(ctx)`` runs it on one block
(:class:`normquant.calibration.runner.BlockContext`).
"""
from __future__ import annotations

import torch
from pydantic import Field

from normquant.algorithms.gptq import HessianAccumulator, gptq_quantize
from normquant.recipe import Step, register_step


@register_step
class RTN(Step):
    """Round-to-nearest weights with min-max qparams (what every weight gets when no other step quantizes it)."""

    name = "rtn"

    def apply_block(self, ctx) -> None:
        for ql in ctx.quant_linears.values():
            ql.quantize_weight()


@register_step
class GPTQ(Step):
    """GPTQ weights (METHODS.md §6.2) from Hessians of the block's quantized-path inputs.

    All linears of a block collect their Hessians in one pass over the calibration inputs, then each is
    quantized column by column with error feedback. ``act_order`` uses static groups, so an export needs no
    reordering. ``mse`` adds the per-row/group clip search (§5.2).
    """

    name = "gptq"
    needs_data = True
    block_size: int = Field(128, gt=0)
    dampening: float = Field(0.01, gt=0)
    act_order: bool = False
    mse: bool = False

    @torch.no_grad()
    def apply_block(self, ctx) -> None:
        qls = {n: ql for n, ql in ctx.quant_linears.items() if ql.weight_spec is not None}
        accs = {n: HessianAccumulator(ql.in_features, name=f"{ctx.name}.{n}") for n, ql in qls.items()}
        hooks = [ql.register_forward_pre_hook(lambda _m, args, acc=accs[n]: acc.add(args[0])) for n, ql in qls.items()]
        try:
            for x in ctx.batches():
                ctx.forward(x)
        finally:
            for h in hooks:
                h.remove()
        for n, ql in qls.items():
            res = gptq_quantize(ql.weight.data, accs.pop(n).H, ql.weight_spec, block_size=self.block_size,
                                percdamp=self.dampening, act_order=self.act_order, mse=self.mse,
                                layer_name=f"{ctx.name}.{n}")
            ql.set_quantized_weight(res.weight, res.scale, res.zero)
