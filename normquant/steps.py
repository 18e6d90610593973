"""The built-in recipe steps: thin wrappers that call the math in ``algorithms/`` and ``transforms/``.

Each step's pydantic fields are its YAML keys; ``apply_block(ctx)`` runs it on one block
(:class:`normquant.calibration.runner.BlockContext`).
"""
from __future__ import annotations

from normquant.recipe import Step, register_step


@register_step
class RTN(Step):
    """Round-to-nearest weights with min-max qparams (what every weight gets when no other step quantizes it)."""

    name = "rtn"

    def apply_block(self, ctx) -> None:
        for ql in ctx.quant_linears.values():
            ql.quantize_weight()
