"""SmoothQuant (Xiao et al., ICML 2023; METHODS §6.1): migrate activation outliers into the weights with a
per-input-channel scale, folded into whatever produces the activation.

``s_j = max|X_j|^α / max|W_j|^(1−α)`` (both clamped to ≥ 1e-5), ``X → X diag(s)⁻¹``, ``W → diag(s) W`` (HF
layout: consumer column ``j`` times ``s_j``), where ``max|X_j|`` is the absmax of input channel ``j`` over the
calibration tokens and ``max|W_j|`` the absmax of column ``j`` over every consumer sharing that input.

Sources, from the architecture table's mappings (:mod:`normquant.models.arch`):

* **norm → linears** (q/k/v, gate/up, fc1): ``γ ← γ/s``, ``β ← β/s`` — the paper's case;
* **linear → linear** (``v_proj → o_proj`` through attention, ``up_proj → down_proj`` through the GLU, OPT's
  ``fc1 → fc2`` through ReLU, s > 0): the source's output rows ``W_src[j] ← W_src[j]/s_j`` (and bias); through
  attention ``s`` lives on the kv heads' rows and every query head sharing a kv head reads the same factor
  (``max|X|`` is taken over those query heads' columns). Not in the paper's code (it smooths only norm → linear
  pairs) [NQ]; ``linears: false`` turns it off. A consumer with an online input transform (rotate's R4 before
  ``down_proj``, ``online_o`` before ``o_proj``) cannot take the fold and is refused.

α: one value, or per mapping keyed by the norm's or the source linear's leaf name (``{post_attention_layernorm:
0.8, up_proj: 0.5}``); with ``search`` [NQ] each block picks one α from ``grid`` by the block-output MSE of the
block quantized as the scheme says (RTN weights, static inputs calibrated) on ``search_samples`` calibration
samples.
"""
from __future__ import annotations

import copy

import torch
from pydantic import Field, field_validator
from torch import nn

from normquant.models.arch import block_linear_mappings, block_mappings
from normquant.models.fold import hf_weight, scale_consumer_inputs, scale_norm_output
from normquant.pipeline.step import Step, StepError, register_step
from normquant.quant.linear import QuantLinear, calibrate_static_inputs, set_activation_quant
from normquant.quant.observers import make_observer, observe_modules

CLAMP = 1e-5


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s [C] = max|X_j|^α / max|W_j|^(1−α)`` from ``act_absmax [C]`` and ``weight_absmax [C]`` (float64)."""
    a = act_absmax.double().clamp(min=CLAMP)
    w = weight_absmax.double().clamp(min=CLAMP)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=CLAMP)


def column_absmax(linears: list[nn.Module]) -> torch.Tensor:
    """``max|W_j|`` ``[in]`` over the output rows of every linear (HF ``[out, in]`` layout)."""
    return torch.stack([hf_weight(lin).detach().abs().amax(dim=0).double() for lin in linears]).amax(dim=0)


@torch.no_grad()
def smooth_linear_pair(source: nn.Module, consumer: nn.Module, rows: range, s_rows: torch.Tensor,
                       s_cols: torch.Tensor) -> None:
    """Source output rows ``rows`` divided by ``s_rows``, consumer input columns multiplied by ``s_cols``
    (``s_cols`` is ``s_rows`` laid out on the consumer's columns)."""
    w = hf_weight(source)
    block = w[rows.start:rows.stop]
    block.copy_((block.double() / s_rows[:, None].to(block.device)).to(block.dtype))
    if source.bias is not None:
        b = source.bias[rows.start:rows.stop]
        b.copy_((b.double() / s_rows.to(b.device)).to(b.dtype))
    scale_consumer_inputs(consumer, s_cols)


class _Plan:
    """The statistics of one block's mappings, so that smoothing can be applied for any α."""

    def __init__(self, ctx, linears: bool):
        model, prefix = ctx.model, ctx.name + "."
        self.norms = [m for m in block_mappings(model, ctx.index, ctx.arch) if m.norm.startswith(prefix)]
        self.pairs = [m for m in block_linear_mappings(model, ctx.index, ctx.arch) if m.scales != "none"] \
            if linears else []
        for path in [c for m in self.norms for c in m.consumers] + [m.consumer for m in self.pairs]:
            if getattr(model.get_submodule(path), "input_transform", None) is not None:
                raise StepError(f"smoothquant: {path} applies an online transform (rotate's r4 / online_o) to its "
                                f"input, which smoothing cannot be folded through: set smoothquant 'linears: false' "
                                f"or turn that rotation off")
        watched = {m.consumers[0]: make_observer("absmax") for m in self.norms}
        watched.update({m.consumer: make_observer("absmax") for m in self.pairs})
        with observe_modules(model, watched, where="input"), torch.no_grad():
            for x in ctx.batches():
                ctx.forward(x)
        self.act = {name: obs.compute()["absmax"].double() for name, obs in watched.items()}  # [in]

    @staticmethod
    def key(path: str) -> str:
        return path.rsplit(".", 1)[-1]

    def apply(self, root: nn.Module, prefix: str, norm_kind: str, alpha) -> None:
        """Smooth the block ``root`` (the block itself or a copy; paths relative to ``prefix``)."""
        get = lambda path: root.get_submodule(path[len(prefix):])  # noqa: E731
        for m in self.norms:
            consumers = [get(c) for c in m.consumers]
            s = smoothing_factors(self.act[m.consumers[0]], column_absmax(consumers), alpha(self.key(m.norm)))
            scale_norm_output(get(m.norm), norm_kind, s)
            for c in consumers:
                scale_consumer_inputs(c, s)
        for p in self.pairs:
            consumer = get(p.consumer)
            act, wmax = self.act[p.consumer], column_absmax([consumer])  # [in] on the consumer's columns
            if p.head_dim is not None and p.groups > 1:  # one factor per kv-head row: max over its query heads
                act = act.reshape(-1, p.groups, p.head_dim).amax(dim=1).flatten()
                wmax = wmax.reshape(-1, p.groups, p.head_dim).amax(dim=1).flatten()
            s = smoothing_factors(act, wmax, alpha(self.key(p.source.split(":")[0])))
            smooth_linear_pair(get(p.source), consumer, p.rows, s, p.consumer_columns(s))


@register_step
class SmoothQuant(Step):
    """``smoothquant: {alpha, linears, search, grid, search_samples}`` — per block, before weight quantization."""

    name = "smoothquant"
    needs_data = True
    needs_float_weights = True
    alpha: float | dict[str, float] = 0.5
    linears: bool = True
    search: bool = False
    grid: list[float] = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    search_samples: int = Field(4, gt=0)

    @field_validator("alpha", "grid")
    @classmethod
    def _in_unit_interval(cls, v):
        values = list(v.values()) if isinstance(v, dict) else v if isinstance(v, list) else [v]
        bad = [a for a in values if not 0 < a < 1]
        if bad:
            raise ValueError(f"smoothquant: alpha must lie in (0, 1), got {bad[0]}")
        return v

    def conflict_with(self, earlier: Step) -> str | None:
        if self.linears and earlier.online_input_transforms():
            return (f"smoothquant after '{earlier.name}': its online transforms on down_proj/o_proj inputs (r4, "
                    f"online_o) cannot take smoothing's linear -> linear folds: set smoothquant 'linears: false' "
                    f"or turn those rotations off")
        return None

    def _alpha_for(self, chosen: float | None):
        """α by mapping key: the searched one, the single ``alpha``, or the table (``default`` for the rest)."""
        if chosen is not None or isinstance(self.alpha, float):
            value = self.alpha if chosen is None else chosen
            return lambda key: value
        table = dict(self.alpha)
        default = table.pop("default", 0.5)
        return lambda key: table.get(key, default)

    def apply_block(self, ctx) -> None:
        plan = _Plan(ctx, self.linears)
        if not plan.norms and not plan.pairs:
            return
        chosen = min(self.grid, key=lambda a: self._quantized_error(ctx, plan, a)) if self.search else None
        plan.apply(ctx.block, ctx.name + ".", ctx.arch.norm_kind, self._alpha_for(chosen))

    @torch.no_grad()
    def _quantized_error(self, ctx, plan: _Plan, alpha: float) -> float:
        """Block-output MSE of a copy of the block smoothed with ``alpha`` and quantized as the scheme says."""
        inputs = ctx.inputs[:self.search_samples]
        target = torch.cat([ctx.forward(x) for x in inputs.split(ctx.batch_size)])  # float block
        original = ctx.block
        trial = copy.deepcopy(original)
        plan.apply(trial, ctx.name + ".", ctx.arch.norm_kind, lambda key: alpha)
        qls = [m for m in trial.modules() if isinstance(m, QuantLinear)]
        for ql in qls:
            ql.quantize_weight()
        ctx.block = trial
        try:
            def run():
                for x in inputs.split(ctx.batch_size):
                    ctx.forward(x)
            calibrate_static_inputs(qls, run)
            set_activation_quant(qls, True)
            out = torch.cat([ctx.forward(x) for x in inputs.split(ctx.batch_size)])
        finally:
            ctx.block = original
        return (out - target.to(out.device)).pow(2).mean().item()
