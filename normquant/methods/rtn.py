"""Round-to-nearest (RTN): every weight row (or group) on its min-max grid, or on the range the §5.2 clip
search picks (``mse: true``, :func:`normquant.quant.search.mse_clip_qparams`). The pipeline applies plain RTN
to every weight no step quantized; list the step to choose its options."""
from __future__ import annotations

from normquant.pipeline.step import Step, register_step
from normquant.quant.primitives import reduction_view
from normquant.quant.search import mse_clip_qparams


def rtn_quantize_linears(qls, mse: bool = False) -> None:
    """Quantize the weights of QuantLinear modules ``qls``: min-max RTN, or RTN on the searched range."""
    for ql in qls:
        if mse and ql.weight_spec is not None:
            wv, _ = reduction_view(ql.weight.data.float(), ql.weight_spec, channel_axis=0)  # [n, k]
            ql.quantize_weight(*mse_clip_qparams(wv, ql.weight_spec))
        else:
            ql.quantize_weight()


@register_step
class RTN(Step):
    """``rtn`` / ``rtn: {mse: true}``. Needs no data."""

    name = "rtn"
    quantizes_weights = True
    mse: bool = False

    def apply_block(self, ctx) -> None:
        rtn_quantize_linears(ctx.quant_linears.values(), self.mse)
