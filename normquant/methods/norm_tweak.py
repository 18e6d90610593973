"""Norm Tweaking (Li et al., AAAI 2024; METHODS.md §2): after the weights of a block are quantized, tune only
its normalization parameters so that the quantized block's output matches the float block's, channel by channel.

The math is here, as pure functions; the recipe step ``norm_tweak`` (:class:`NormTweak`, at the end of this module) wires
it into the sequential block runner.

* :func:`l_dist` (and the alternatives ``mse``, ``mean_std_mse``, in :data:`LOSSES`): the loss between the float
  block's outputs ``f_out`` and the quantized block's outputs ``q_out``, both ``[..., C]``.
* :func:`layer_lr`: the per-block learning rate ``lr0 · (1 + κ·l/L)``.
* :func:`tweak_block`: Adam on the norm parameters only (LayerNorm γ, β; RMSNorm γ; Gemma's ``w`` in γ = 1 + w).
* choosing lr0/κ: :func:`normquant.evaluation.norm_tweak_lr.select_norm_tweak_lr`, scored on held-out text cut
  by :func:`normquant.data.text.heldout_ids`.

>>> import torch
>>> f, q = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
>>> float(l_dist(f, f))
0.0
>>> round(layer_lr(1e-5, kappa=1.0, l=3, L=4), 12)  # lr0 · (1 + 1·3/4)
1.75e-05
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from normquant.methods.gptq import GPTQ
from normquant.models.arch import Architecture, block_mappings, block_norms
from normquant.methods.rtn import RTN
from normquant.pipeline.step import Step, StepError, register_step

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- losses
def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and *biased* variance over all tokens and the batch: ``[..., C]`` -> (``[C]``, ``[C]``)."""
    xt = x.reshape(-1, x.shape[-1])  # [..., C] -> [T, C]
    return xt.mean(dim=0), xt.var(dim=0, unbiased=False)


def l_dist(f_out: torch.Tensor, q_out: torch.Tensor) -> torch.Tensor:
    """Channel-wise distribution distance (METHODS.md §2.3), a scalar:

    ``L_dist = (1/C) · Σ_c ( |μ_f^c − μ_q^c| + |σ_f^c² − σ_q^c²| )``

    with ``μ^c`` / ``σ^c²`` the mean / biased variance of channel ``c`` over all tokens and the batch of the
    given tensors ``[..., C]`` (the paper's ``‖·‖₂`` of a scalar is ``|·|``).
    """
    _check_pair(f_out, q_out)
    mu_f, var_f = channel_stats(f_out)
    mu_q, var_q = channel_stats(q_out)
    return ((mu_f - mu_q).abs() + (var_f - var_q).abs()).mean()


def mse(f_out: torch.Tensor, q_out: torch.Tensor) -> torch.Tensor:
    """Element-wise mean squared error of the block outputs (llmc's NormTweaking loss [C3])."""
    _check_pair(f_out, q_out)
    return F.mse_loss(q_out, f_out)


def mean_std_mse(f_out: torch.Tensor, q_out: torch.Tensor) -> torch.Tensor:
    """``Σ_c (μ_f^c − μ_q^c)² + Σ_c (σ_f^c − σ_q^c)²``, biased σ (from a public script of unknown provenance [C3])."""
    _check_pair(f_out, q_out)
    mu_f, var_f = channel_stats(f_out)
    mu_q, var_q = channel_stats(q_out)
    tiny = torch.finfo(var_q.dtype).tiny  # keeps d√v/dv finite for a constant channel
    return ((mu_f - mu_q) ** 2).sum() + ((var_f + tiny).sqrt() - (var_q + tiny).sqrt()).pow(2).sum()


LOSSES: dict[str, LossFn] = {"l_dist": l_dist, "mse": mse, "mean_std_mse": mean_std_mse}


def get_loss(loss: str | LossFn) -> LossFn:
    """A loss by name (a key of :data:`LOSSES`) or the callable itself."""
    if callable(loss):
        return loss
    try:
        return LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown loss '{loss}' for norm tweaking; available: {', '.join(sorted(LOSSES))}") from None


def _check_pair(f_out: torch.Tensor, q_out: torch.Tensor) -> None:
    if f_out.shape != q_out.shape:
        raise ValueError(f"float and quantized outputs differ in shape: {tuple(f_out.shape)} vs {tuple(q_out.shape)}")


# ---------------------------------------------------------------------------------------------- schedule
def layer_lr(lr0: float, kappa: float, l: int, L: int) -> float:
    """Learning rate of block ``l`` (0-based) of ``L``: ``lr0 · (1 + κ·l/L)``, growing with depth (METHODS.md §2.4).

    [UNVERIFIED] schedule: the form of two third-party implementations (smpanaro ``lr_scale``, llmc ``gamma``);
    like smpanaro, ``l`` counts from 0, so block 0 gets ``lr0`` and the last block ``lr0·(1 + κ(L−1)/L)``.
    """
    if L <= 0 or not 0 <= l < L:
        raise ValueError(f"block index {l} out of range for {L} blocks")
    return lr0 * (1.0 + kappa * l / L)


# ---------------------------------------------------------------------------------------------- norms
def find_norms(model: nn.Module, index: int, arch: Architecture | None = None, *,
               mapped_only: bool = False) -> dict[str, nn.Module]:
    """The norms of block ``index`` that have parameters to tune, by full module path, from the architecture
    table (:func:`normquant.models.arch.block_norms`): every norm of the block (LLaMA: ``input_layernorm``,
    ``post_attention_layernorm``; Qwen3 also ``self_attn.q_norm``/``k_norm``; Gemma2 also its post-norms), or
    with ``mapped_only`` those feeding linears (the norm → linears mappings that live in the block).
    """
    found = block_norms(model, index, arch)
    if mapped_only:
        mapped = {m.norm for m in block_mappings(model, index, arch)}
        found = {n: m for n, m in found.items() if n in mapped}
    return {n: m for n, m in found.items() if any(True for _ in m.parameters(recurse=False))}


# ---------------------------------------------------------------------------------------------- tweak
@dataclass
class TweakResult:
    """What :func:`tweak_block` did: the loss of every optimizer step, in order, and the epoch means."""

    lr: float
    steps: int
    params: int  # trainable scalars (γ, β entries)
    losses: list[float] = field(default_factory=list)
    epoch_means: list[float] = field(default_factory=list)


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Parameters without repeats (by identity: tensors must not be compared with ``==``)."""
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tweak_block(block_forward: Callable[[torch.Tensor], torch.Tensor], norms: Sequence[nn.Module] | dict,
                inputs: torch.Tensor, targets: torch.Tensor, *, loss: str | LossFn = "l_dist", lr: float,
                epochs: int = 1, batch_size: int = 1, block: nn.Module | None = None) -> TweakResult:
    """Tune the parameters of ``norms`` with Adam so that ``block_forward(inputs)`` matches ``targets``.

    ``block_forward``: ``[b, L, C] -> [b, L, C]``, the *quantized* block (its weights already fake-quantized;
    activation fake-quant may be on: its rounding is straight-through, so gradients reach the norms).
    ``inputs``: ``[N, L, C]`` quantized-path inputs; ``targets``: ``[N, L, C]`` the *float* block's outputs on
    the same inputs (any device; batches are moved to the output's device).

    Per epoch the samples are visited in order, ``batch_size`` per Adam step (the paper: 1 sample per step,
    1 epoch) — [NQ] no shuffling. Only the norm parameters get gradients: every parameter of ``block`` (when
    given) is frozen during the loop, and all ``requires_grad`` flags are restored afterwards. Half-precision
    norm parameters are optimized through float32 master copies (a 1e-5 step is below bf16's resolution
    around γ≈1) and cast back after every step. The loss is computed in float32 (float64 for float64 models).
    """
    loss_fn = get_loss(loss)
    norm_list = list(norms.values()) if isinstance(norms, dict) else list(norms)
    params = _unique(p for m in norm_list for p in m.parameters(recurse=False))
    if not params:
        raise ValueError("norm tweaking found no norm parameters to tune (weightless norms, e.g. after a "
                         "rotation's γ-fusion: re-insert a per-channel γ̃ = 1 first, METHODS.md §2.7)")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
    everything = _unique([*(block.parameters() if block is not None else ()), *params])
    saved = [(p, p.requires_grad) for p in everything]
    masters = [p.detach().to(_master_dtype(p.dtype)).clone().requires_grad_(True) for p in params]
    result = TweakResult(lr=lr, steps=0, params=sum(p.numel() for p in params))
    try:
        for p in everything:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(masters, lr=lr)
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            for _ in range(epochs):
                epoch = [_adam_step(block_forward, loss_fn, opt, params, masters, inputs[i:i + batch_size],
                                    targets[i:i + batch_size]) for i in range(0, inputs.shape[0], batch_size)]
                result.losses += epoch
                result.steps += len(epoch)
                result.epoch_means.append(sum(epoch) / len(epoch))
    finally:
        for p in params:
            p.grad = None
        for p, flag in saved:
            p.requires_grad_(flag)
    return result


def _adam_step(block_forward, loss_fn: LossFn, opt: torch.optim.Optimizer, params: list[nn.Parameter],
               masters: list[torch.Tensor], x: torch.Tensor, target: torch.Tensor) -> float:
    """One Adam step on batch ``x`` ``[b, L, C]``: loss, backward to the norms, step their masters, copy back."""
    for p in params:
        p.grad = None
    q_out = block_forward(x)  # [b, L, C]
    f_out = target.to(q_out.device)
    dt = torch.float64 if q_out.dtype == torch.float64 else torch.float32
    value = loss_fn(f_out.to(dt), q_out.to(dt))
    if not torch.isfinite(value):
        raise FloatingPointError("norm tweaking: non-finite loss; lower the learning rate")
    value.backward()
    for m, p in zip(masters, params):
        m.grad = None if p.grad is None else p.grad.to(m.dtype)
    opt.step()
    with torch.no_grad():
        for m, p in zip(masters, params):
            p.copy_(m)
    return value.item()


@torch.no_grad()
def block_loss(block_forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
               loss: str | LossFn = "l_dist", batch_size: int = 1) -> float:
    """Mean of ``loss`` over the batches of ``inputs`` ``[N, L, C]`` (the quantity :func:`tweak_block` lowers)."""
    loss_fn = get_loss(loss)
    values = []
    for i in range(0, inputs.shape[0], batch_size):
        q_out = block_forward(inputs[i:i + batch_size])
        f_out = targets[i:i + batch_size].to(q_out.device)
        dt = torch.float64 if q_out.dtype == torch.float64 else torch.float32
        values.append(loss_fn(f_out.to(dt), q_out.to(dt)).item())
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------- the step
@register_step
class NormTweak(Step):
    """Norm Tweaking (METHODS.md §2): quantize the block's weights, then tune its norm parameters with Adam so
    that the quantized block's per-channel output statistics match the float block's.

    The step quantizes the weights *itself*, because the targets are the float block's outputs on the
    quantized-path inputs and QuantLinear keeps no float weights once quantized. Per block it
    (a) computes the float targets ``[N, L, C]`` (weights still float, activation quantizers off),
    (b) runs the weight algorithm ``weights`` (the ``gptq`` step with the options under ``gptq:``, or ``rtn``),
    (c) tunes the norms (LayerNorm γ, β; RMSNorm γ; Gemma's w) with
    :func:`tweak_block`
    at lr ``lr · (1 + kappa·l/L)`` for block ``l`` (0-based) of ``L``.
    So a recipe lists it *instead of* its weight step (an earlier step that quantizes the weights is refused)::

        steps:
          - norm_tweak: {weights: gptq, gptq: {block_size: 128, act_order: true}, lr: 1.0e-5, kappa: 1, loss: l_dist}

    Function-preserving transforms (SmoothQuant, RepQuant) may come before it. Joint W/A mode (§2.6): with
    ``activations: true`` (default) and input quantizers in the scheme, they are on during tuning (static ones
    calibrated first on the pre-tweak block; the pipeline recalibrates them after the step). ``norms: all``
    tunes every norm inside the block (incl. Qwen3 q/k norms, Gemma2 post-norms) [NQ]; ``mapped`` only those
    of the architecture's norm→linear map. ``epochs: 0`` quantizes the weights without tweaking (a baseline).
    Defaults [NQ]: lr 1e-5 (the paper's initial grid value), kappa 1 [UNVERIFIED schedule], 1 epoch, 1 sample
    per Adam step; choose lr/kappa with :func:`~normquant.evaluation.norm_tweak_lr.select_norm_tweak_lr`.
    """

    name = "norm_tweak"
    needs_data = True
    needs_float_weights = True
    quantizes_weights = True
    weights: Literal["gptq", "rtn"] = "gptq"
    gptq: GPTQ = Field(default_factory=GPTQ)  # options of the gptq weight step (weights: gptq)
    lr: float = Field(1e-5, ge=0)
    kappa: float = Field(1.0, ge=0)
    loss: str = "l_dist"
    epochs: int = Field(1, ge=0)
    batch_size: int = Field(1, gt=0)
    norms: Literal["all", "mapped"] = "all"
    activations: bool = True

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        if v not in LOSSES:
            raise ValueError(f"unknown loss '{v}'; available: {', '.join(sorted(LOSSES))}")
        return v

    @model_validator(mode="after")
    def _options_match_weights(self) -> "NormTweak":
        if self.weights != "gptq" and self.gptq != GPTQ():
            raise ValueError(f"gptq options given but weights is '{self.weights}'; set weights: gptq or drop them")
        return self

    def weight_step(self) -> Step:
        return self.gptq if self.weights == "gptq" else RTN()

    def apply_block(self, ctx) -> None:
        done = [n for n, ql in ctx.quant_linears.items() if ql.weight_spec is not None and ql.weight_quantized]
        if done:
            raise StepError(f"norm_tweak: {ctx.name}.{done[0]} is already quantized, so the float targets are lost; "
                            "norm_tweak quantizes the weights itself: remove the earlier weight step and set "
                            "norm_tweak's `weights` (and `gptq:` options) instead")
        if self.epochs == 0:
            self.weight_step().apply_block(ctx)
            return
        norms = find_norms(ctx.model, ctx.index, ctx.arch, mapped_only=self.norms == "mapped")
        if not norms:
            raise StepError(f"norm_tweak: block {ctx.name} has no norm parameters to tune (weightless norms, e.g. "
                            "after a rotation's γ-fusion)")
        with ctx.activations(False), torch.no_grad():  # [N, L, C]: the float block on the quantized-path inputs
            targets = ctx.outputs()
        self.weight_step().apply_block(ctx)
        joint = self.activations and any(ql.input_quant is not None for ql in ctx.quant_linears.values())
        if joint:  # static ranges from the pre-tweak block; the pipeline recalibrates them after this step
            with ctx.activations(False):
                ctx.calibrate_activations()
        lr = layer_lr(self.lr, self.kappa, ctx.index, ctx.num_blocks)
        with ctx.activations(joint):
            res = tweak_block(ctx.forward, norms, ctx.inputs, targets, loss=self.loss, lr=lr, epochs=self.epochs,
                              batch_size=self.batch_size, block=ctx.block)
        log.info("norm_tweak %s: lr %.3g, %d params, %s per epoch %s", ctx.name, lr, res.params, self.loss,
                 ", ".join(f"{v:.4g}" for v in res.epoch_means))
