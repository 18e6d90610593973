"""RepQuant / RepQ-ViT: per-channel quantization of norm outputs, reparameterized into one per-tensor quantizer.

Math (METHODS §1.2–1.4), names as in the paper. For a norm output ``X [T, C]`` with per-channel scales
``s [C]`` and integer zero points ``z [C]``:

    s̃ = mean(s),  z̃ = round(mean(z)),  r1 = s / s̃,  r2 = z − z̃
    norm:      γ' = γ / r1,  β' = β / r1 + s̃·r2              (so X' = X / r1 + s̃·r2)
    consumer:  W' = W·diag(r1),  b' = b − W (s ⊙ r2)          (original W)
    quantizer: clamp(round(X'/s̃) + z̃, 0, 2^b−1) == clamp(round(X/s_c) + z_c, 0, 2^b−1)   (z̃ integer)

RMSNorm has no β: symmetric qparams give ``z = 0``, hence ``r2 = 0`` and only γ and W change (option A);
asymmetric ones wrap the norm in :class:`~normquant.models.fold.RMSNormWithBias` and give every consumer a
bias (option B). Gemma's γ is ``1 + w``. Only pre-LN models qualify: in a post-LN model (BERT) the norm
output also feeds the residual stream, which the fold cannot compensate.

Per block of the block-sequential runner (``ctx`` a :class:`~normquant.pipeline.runner.BlockContext`),
before any weight quantization of the block::

    maps = block_mappings(ctx.model, ctx.index)                      # full paths: norm -> consumers
    with observe_modules(ctx.model, {m.norm: make_observer("percentile", size=65536) for m in maps},
                         where="output") as obs, torch.no_grad():
        targets = [ctx.forward(x) for x in ctx.batches()]           # float block outputs
    init = {m.norm: percentile_init(obs[m.norm][0].compute()["sample"], bits, symmetric=sym) for m in maps}
    norms = {m.norm: ctx.model.get_submodule(m.norm) for m in maps}
    consumers = {m.norm: [ctx.model.get_submodule(c) for c in m.consumers] for m in maps}
    init, rho = search_range_floor(ctx.forward, norms, consumers, list(ctx.batches()), targets, init, bits,
                                   symmetric=sym)                    # [NQ] floor on narrow channels
    if learn:                                                        # optional dual clipping
        init = learn_dual_clipping(ctx.forward, norms, list(ctx.batches()), targets, init, bits,
                                   symmetric=sym, consumers=consumers).bounds   # RTN weights in the loop
    reps = reparameterize_block(ctx.model, ctx.index,
                                {n: channel_qparams(lo, hi, bits, sym) for n, (lo, hi) in init.items()})
    for m in maps:                                                   # consumers wrapped as QuantLinear
        install_input_quantizers([ctx.model.get_submodule(c) for c in m.consumers],
                                 reps[m.norm].s_tilde, reps[m.norm].z_tilde, bits, sym)
    # then quantize the (reparameterized) weights: RTN / GPTQ, and ctx.advance()

``sym=True`` is option A (RMSNorm stays an HF RMSNorm); ``sym=False`` on an RMSNorm model is option B.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, PrivateAttr
from torch import nn

from normquant.models.arch import block_mappings, get_architecture, split_ref
from normquant.models.fold import (
    FoldError,
    add_consumer_bias,
    add_norm_bias,
    consumer_input_response,
    scale_consumer_inputs,
    scale_norm_output,
)
from normquant.pipeline.step import Step, StepError, register_step
from normquant.quant.linear import ActivationQuantizer, QuantLinear
from normquant.quant.observers import make_observer, observe_modules
from normquant.quant.primitives import QuantError, choose_qparams, fake_quantize
from normquant.quant.search import Bounds, channel_qparams, fake_quantize_channels, percentile_init
from normquant.quant.spec import QuantSpec

# --------------------------------------------------------------------------------------------------
# Reparameterization


class Reparameterization(NamedTuple):
    """The layer-wise quantizer ``(s_tilde, z_tilde)`` (0-d) and the per-channel factors ``r1, r2 [C]``."""

    s_tilde: torch.Tensor
    z_tilde: torch.Tensor
    r1: torch.Tensor
    r2: torch.Tensor


def reparameterize(s: torch.Tensor, z: torch.Tensor) -> Reparameterization:
    """``s̃ = mean(s)``, ``z̃ = round(mean(z))`` (integer: required for exactness), ``r1 = s/s̃``, ``r2 = z − z̃``.

    ``s, z [C]``; computed in float64.
    """
    s, z = s.detach().double(), z.detach().double()
    if not torch.equal(z, torch.round(z)):
        raise QuantError("per-channel zero points must be integers (use channel_qparams)")
    s_tilde, z_tilde = s.mean(), torch.round(z.mean())
    return Reparameterization(s_tilde, z_tilde, s / s_tilde, z - z_tilde)


def apply_reparameterization(norm: nn.Module, norm_kind: str, consumers: Iterable[nn.Module],
                             rep: Reparameterization) -> nn.Module:
    """Fold ``rep`` into a norm and all the linears reading its output (in place, float64, cast back).

    Returns the module to use in the norm's place: ``norm`` itself, or an ``RMSNormWithBias`` wrapping it
    when an RMSNorm needs the β ``s̃·r2`` (``r2 ≠ 0``, option B); the caller installs it in the parent.
    The fold preserves the function for any ``r1 > 0`` and any ``r2``; exactness of the per-tensor
    quantizer additionally needs an integer ``z̃`` (see :func:`reparameterize`).
    """
    r1, r2, s_tilde = rep.r1.double(), rep.r2.double(), rep.s_tilde.double()
    s = r1 * s_tilde  # [C], the per-channel scales
    shifted = bool((r2 != 0).any())
    consumers = list(consumers)
    for linear in consumers:
        if shifted:
            add_consumer_bias(linear, -consumer_input_response(linear, s * r2))  # b' = b − W (s ⊙ r2), original W
        scale_consumer_inputs(linear, r1)  # W' = W diag(r1)
    scale_norm_output(norm, norm_kind, r1)  # γ' = γ / r1, β / r1
    return add_norm_bias(norm, s_tilde * r2) if shifted else norm  # β' = β / r1 + s̃ r2


def reparameterize_block(model: nn.Module, index: int,
                         qparams: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Reparameterization]:
    """Reparameterize the norms of block ``index`` given their per-channel ``(s [C], z [C])``.

    ``qparams`` is keyed by the full norm paths of :func:`~normquant.models.arch.block_mappings`; norms left
    out are not touched. Consumers may be ``nn.Linear``, GPT-2 ``Conv1D`` or not-yet-weight-quantized
    ``QuantLinear``. Returns, per norm path, the :class:`Reparameterization` whose ``(s_tilde, z_tilde)`` is
    the per-tensor quantizer to install on the consumers (:func:`install_input_quantizers`).
    """
    arch = get_architecture(model)
    if arch.is_post_ln(model.config):
        raise FoldError(f"{model.config.model_type} is post-LN here: norm outputs also feed the residual stream, "
                        "so reparameterizing them would change the model")
    maps = {m.norm: m for m in block_mappings(model, index, arch)}
    unknown = sorted(set(qparams) - set(maps))
    if unknown:
        raise KeyError(f"block {index} has no mapped norm {', '.join(unknown)}; its norms: {', '.join(maps)}")
    reps = {}
    for name, (s, z) in qparams.items():
        reps[name] = rep = reparameterize(s, z)
        norm = model.get_submodule(name)
        new = apply_reparameterization(norm, arch.norm_kind, [model.get_submodule(c) for c in maps[name].consumers], rep)
        if new is not norm:
            model.set_submodule(name, new)
    return reps


# --------------------------------------------------------------------------------------------------
# Static activation quantizers on the consumers


def static_input_quantizer(scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool = False) -> ActivationQuantizer:
    """A frozen static ``ActivationQuantizer``: per-tensor for 0-d ``scale``/``zero``, per-channel for ``[C]``.

    Asymmetric: ``clamp(round(x/s) + z, 0, 2^b − 1)``; symmetric: signed grid, ``zero`` must be 0.
    """
    if symmetric and bool((zero != 0).any()):
        raise QuantError("a symmetric quantizer needs zero points of 0; use symmetric=False for (s_tilde, z_tilde) "
                         "from asymmetric qparams")
    granularity = "tensor" if scale.dim() == 0 else "channel"
    quantizer = ActivationQuantizer(QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity))
    quantizer.scale = scale.detach().reshape(-1, 1).clone()  # [1, 1] or [C, 1]
    quantizer.zero_point = zero.detach().reshape(-1, 1).to(quantizer.scale.dtype).clone()
    quantizer.observing = False
    quantizer.fixed = True  # the pipeline's calibration leaves a step's range alone
    return quantizer


def install_input_quantizers(consumers: Iterable[nn.Module], scale: torch.Tensor, zero: torch.Tensor, bits: int,
                             symmetric: bool = False) -> None:
    """Give every consumer ``QuantLinear`` its own frozen static input quantizer (see :func:`static_input_quantizer`).

    After :func:`reparameterize_block`: ``scale, zero = rep.s_tilde, rep.z_tilde`` (per-tensor). For the
    per-channel simulation on the original model: ``scale, zero = s, z``.
    """
    for linear in consumers:
        if not isinstance(linear, QuantLinear):
            raise TypeError(f"expected a QuantLinear consumer, got {type(linear).__name__}; wrap it with QuantLinear.wrap first")
        linear.input_quant = static_input_quantizer(scale, zero, bits, symmetric).to(linear.weight.device)


# --------------------------------------------------------------------------------------------------
# Learned dual clipping (METHODS §1.2, [NQ] defaults)


@contextlib.contextmanager
def fake_quantize_norm_outputs(norms: Mapping[str, nn.Module], bounds: Callable[[str], Bounds], bits: int,
                               symmetric: bool = False) -> Iterator[None]:
    """Replace each norm's output by its per-channel fake-quant, with ``bounds(name) -> (lower, upper)``
    evaluated at every call (so learnable bounds build a fresh graph). Hooks are always removed.

    >>> with fake_quantize_norm_outputs(norms, lambda n: (lower[n], upper[n]), bits=4):  # doctest: +SKIP
    ...     y = block_forward(x)
    """
    def hook_for(name: str) -> Callable:
        def hook(module, args, out):
            s, z = channel_qparams(*bounds(name), bits, symmetric)
            return fake_quantize_channels(out.float(), s, z, bits, symmetric).to(out.dtype)
        return hook

    handles = []
    try:
        for name, norm in norms.items():
            handles.append(norm.register_forward_hook(hook_for(name)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def quantize_consumers_as_reparameterized(consumers: Mapping[str, Sequence[nn.Module]],
                                          qparams: Callable[[str], tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Make each consumer compute, in the original basis, what it will compute after the reparameterization
    with RTN (min-max) weights, so that learned bounds see the weight error they cause.

    ``consumers``: per norm name, the ``QuantLinear`` layers reading its output (those without a weight spec
    stay float); ``qparams(name) -> (s [C], z [C])``: the norm's current per-channel qparams, evaluated at
    every call (differentiable). With ``W' = W·diag(s/s̃)`` and per-row (or per-group) weight quantization,
    ``Q(W') = Q(W·diag(s))/s̃`` (a common factor passes through min-max RTN), so the reparameterized layer on
    the per-channel fake-quantized input ``X̂`` is, with ``r2 = z − round(mean(z))``::

        y = W_eff X̂ + b + (Q(W·diag(s)) − W·diag(s)) r2,    W_eff = Q(W·diag(s))·diag(1/s)

    (the last term: the zero-point shift's bias ``−W' s̃ r2`` was folded with float weights but now meets the
    quantized ones; 0 for symmetric qparams). Rounding is straight-through. Forwards are restored on exit.
    """
    def forward_for(name: str, linear: QuantLinear) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            dtype = torch.promote_types(x.dtype, torch.float32)
            s, z = (v.to(dtype) for v in qparams(name))
            w_s = linear.weight.to(dtype) * s[None, :]  # W·diag(s), [out, C]
            q_ws = fake_quantize(w_s, *choose_qparams(w_s, linear.weight_spec), linear.weight_spec)
            y = F.linear(x.to(dtype), q_ws / s[None, :], None if linear.bias is None else linear.bias.to(dtype))
            r2 = z - torch.round(z.detach().mean())
            if bool((r2 != 0).any()):
                y = y + (q_ws - w_s) @ r2
            return y.to(x.dtype)
        return forward

    patched = [(linear, forward_for(name, linear)) for name, linears in consumers.items() for linear in linears
               if isinstance(linear, QuantLinear) and linear.weight_spec is not None]
    try:
        for linear, forward in patched:
            linear.forward = forward  # instance attribute: shadows QuantLinear.forward
        yield
    finally:
        for linear, _ in patched:
            del linear.forward


def block_output_mse(block_forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
    """MSE between ``block_forward(x)`` (a tuple's first element) and the float target ``y``, in float32."""
    out = block_forward(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return F.mse_loss(out.float(), y.to(out.device).float())


@dataclass
class ClippingResult:
    """Learned per-channel bounds per norm; ``losses``: mean block-output MSE at the initial bounds, then the
    mean training loss of each epoch."""

    bounds: dict[str, Bounds]
    losses: list[float]


def learn_dual_clipping(block_forward: Callable[[torch.Tensor], torch.Tensor], norms: Mapping[str, nn.Module],
                        inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                        init: Mapping[str, Bounds], bits: int, *, symmetric: bool = False,
                        lr: float = 5e-3, epochs: int = 20,
                        consumers: Mapping[str, Sequence[nn.Module]] | None = None) -> ClippingResult:
    """Learn per-channel clipping bounds of the norm outputs of one block by block-output MSE.

    * ``block_forward(x) -> y``: runs the block on one stored input (the runner binds attention mask,
      position embeddings, ...); it may return a tuple, whose first element is used.
    * ``norms``: the block's norm modules by name; their outputs get a differentiable per-channel
      fake-quant (forward hooks, removed on return).
    * ``inputs`` / ``targets``: block inputs (quantized path) and float block outputs, one batch each.
    * ``init``: ``(lower⁰ [C], upper⁰ [C])`` per norm, e.g. from :func:`percentile_init`.
    * ``consumers`` (optional): per norm, the ``QuantLinear`` layers reading it; they then compute with the
      weights they will have after the reparameterization and RTN (:func:`quantize_consumers_as_reparameterized`),
      so the bounds trade activation clipping against the weight error that wide channel ranges cause.

    Parameterization ``u = u⁰·2σ(θ_u)``, ``l = l⁰·2σ(θ_l)``, ``θ = 0`` at start (symmetric: one bound
    ``m = max(|l⁰|, |u⁰|)·2σ(θ)``, range ``±m``); straight-through rounding; Adam on θ only (the block's
    parameters get no gradient). Returns the final bounds (float32) and the loss history.
    """
    if len(inputs) != len(targets) or not inputs:
        raise ValueError(f"need as many targets as inputs (got {len(inputs)} inputs, {len(targets)} targets)")
    if set(init) != set(norms):
        raise KeyError(f"init bounds are for {sorted(init)} but the norms are {sorted(norms)}")
    lower0 = {n: lo.detach().float() for n, (lo, _) in init.items()}
    upper0 = {n: hi.detach().float() for n, (_, hi) in init.items()}
    if symmetric:
        upper0 = {n: torch.maximum(lower0[n].abs(), upper0[n].abs()) for n in init}
    theta_u = {n: torch.zeros_like(upper0[n], requires_grad=True) for n in init}
    theta_l = {} if symmetric else {n: torch.zeros_like(lower0[n], requires_grad=True) for n in init}
    params = [*theta_u.values(), *theta_l.values()]

    def bounds(name: str) -> Bounds:
        upper = upper0[name] * 2 * torch.sigmoid(theta_u[name])
        return (-upper, upper) if symmetric else (lower0[name] * 2 * torch.sigmoid(theta_l[name]), upper)

    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    weights_in_loop = quantize_consumers_as_reparameterized(
        consumers or {}, lambda name: channel_qparams(*bounds(name), bits, symmetric))
    with fake_quantize_norm_outputs(norms, bounds, bits, symmetric), weights_in_loop, torch.enable_grad():
        with torch.no_grad():
            losses.append(sum(block_output_mse(block_forward, x, y).item()
                              for x, y in zip(inputs, targets)) / len(inputs))
        for _ in range(epochs):
            total = 0.0
            for x, y in zip(inputs, targets):
                loss = block_output_mse(block_forward, x, y)
                for p, g in zip(params, torch.autograd.grad(loss, params)):  # θ only: no .grad on the block
                    p.grad = g
                optimizer.step()
                total += loss.item()
            losses.append(total / len(inputs))
    with torch.no_grad():
        return ClippingResult({n: tuple(b.detach().clone() for b in bounds(n)) for n in norms}, losses)


def floor_bounds(bounds: Bounds, rho: float, symmetric: bool = False) -> Bounds:
    """Widen every channel's range to at least ``rho`` times the widest one (about its centre; symmetric:
    ``±max(m_c, rho·max m)``). Nothing is clipped that was not before; narrow channels get coarser steps and
    the reparameterization's factors ``r1 = s/s̃`` span at most ``1/rho`` (``rho = 1``: one range for all
    channels, i.e. plain per-tensor; ``rho = 0``: unchanged)."""
    lower, upper = bounds
    if symmetric:
        m = torch.maximum(lower.abs(), upper.abs())
        m = torch.maximum(m, rho * m.max())
        return -m, m
    width, centre = upper - lower, (upper + lower) / 2
    half = torch.maximum(width, rho * width.max()) / 2
    return centre - half, centre + half


def search_range_floor(block_forward: Callable[[torch.Tensor], torch.Tensor], norms: Mapping[str, nn.Module],
                       consumers: Mapping[str, Sequence[nn.Module]], inputs: Sequence[torch.Tensor],
                       targets: Sequence[torch.Tensor], init: Mapping[str, Bounds], bits: int, *,
                       symmetric: bool = False, grid: Sequence[float] = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
                       ) -> tuple[dict[str, Bounds], dict[str, float]]:
    """[NQ] Per norm, the range floor ``rho`` (:func:`floor_bounds`) from ``grid`` with the lowest block-output
    MSE, the consumers computing with their post-reparameterization RTN weights
    (:func:`quantize_consumers_as_reparameterized`). Norms are searched one after the other (coordinate
    descent from ``rho = 0``). Why: the reparameterization scales weight column c by ``r1_c``, so at 4-bit
    per-row weights a channel range 10× the mean costs the whole row its resolution; a floor trades
    activation resolution of the narrow channels for weight resolution. Returns the bounds and the chosen
    ``rho`` per norm."""
    rho = {n: 0.0 for n in norms}

    def mse(candidate: Mapping[str, float]) -> float:
        bounds = {n: floor_bounds(init[n], candidate[n], symmetric) for n in norms}
        qparams = {n: channel_qparams(*bounds[n], bits, symmetric) for n in norms}
        with torch.no_grad(), fake_quantize_norm_outputs(norms, lambda n: bounds[n], bits, symmetric), \
                quantize_consumers_as_reparameterized(consumers, lambda n: qparams[n]):
            return sum(block_output_mse(block_forward, x, y).item() for x, y in zip(inputs, targets)) / len(inputs)

    for name in norms:
        rho[name] = min(grid, key=lambda r: mse({**rho, name: r}))
    return {n: floor_bounds(init[n], rho[n], symmetric) for n in norms}, rho


# --------------------------------------------------------------------------------------------------
# log√2 quantizer for attention probabilities, and its bit-shift (log2) form (METHODS §1.5)


def log_sqrt2_quantize(a: torch.Tensor, s: float | torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``q = clamp(round(−2·log2(a/s)), 0, 2^b − 1)`` of probabilities ``a ∈ [0, 1]`` and the mask of
    entries that dequantize to 0 (``round(−2·log2(a/s)) ≥ 2^b``, including ``a = 0``)."""
    q_raw = torch.round(-2 * torch.log2(a / s))  # a = 0 -> +inf
    return q_raw.clamp(0, 2**bits - 1), q_raw >= 2**bits


def log_sqrt2_dequantize(q: torch.Tensor, is_zero: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """``â = s·2^(−q/2)`` (``√2``-spaced levels), 0 where ``is_zero``."""
    return torch.where(is_zero, 0.0, s * torch.exp2(-q / 2))


def log2_shift_dequantize(q: torch.Tensor, is_zero: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """The same values as a log2 (bit-shift) quantizer with a parity-dependent scale:
    ``â = s·2^(−⌈q/2⌉)·(1 + [q odd]·(√2 − 1))``, so ``â·v`` is ``v >> ⌈q/2⌉`` times ``s`` or ``√2·s``."""
    parity_scale = 1 + (q % 2) * (2**0.5 - 1)
    return torch.where(is_zero, 0.0, s * torch.exp2(-torch.ceil(q / 2)) * parity_scale)


# --------------------------------------------------------------------------------------------------
# The step


@register_step
class RepQuant(Step):
    """RepQuant (METHODS.md §1): per-channel quantizers on norm outputs, reparameterized to per-tensor.

    Per block: sample each mapped norm's output on the calibration inputs, initialize per-channel bounds by
    the RepQ-ViT percentile search, optionally learn dual clipping (block-output MSE, Adam; [NQ] defaults
    lr 5e-3, 20 epochs; with ``weights_in_loop`` (default) the consumers compute with the RTN weights they
    will have after the reparameterization, so the bounds also pay for the weight error a wide channel
    range causes — the paper's "quantized weight reconstruction", whose details are UNVERIFIED); before it,
    ``range_floor`` [NQ, not in the paper] picks per norm the floor ``rho`` that widens narrow channels to
    ``rho``× the widest (grid 0 … 1, block-output MSE with the same weights in the loop), bounding the weight
    column factors ``r1`` by ``1/rho``; then either fold the channel scales into the norm and its consumers and install
    one per-tensor quantizer ``(s̃, integer z̃)`` on the consumers (``mode: reparameterize``), or install the
    per-channel quantizers on the unchanged model (``mode: per_channel``, the simulation the
    reparameterization must reproduce). Bits and symmetry come from the consumers' ``input_activations``
    spec; symmetric on RMSNorm is option A, asymmetric is option B (norm bias + consumer bias).
    Weights are quantized after this step (on the reparameterized weights).
    """

    name = "repquant"
    needs_data = True
    needs_float_weights = True
    mode: Literal["reparameterize", "per_channel"] = "reparameterize"
    percentiles: list[float] = [0.999, 0.9999, 0.99999]
    learn_clipping: bool = True
    weights_in_loop: bool = True
    range_floor: bool = True
    lr: float = Field(5e-3, gt=0)
    epochs: int = Field(20, ge=1)
    sample_rows: int = Field(65536, gt=0)
    _report: dict = PrivateAttr(default_factory=dict)  # per norm: chosen rho, clipping losses (for eval records)

    @property
    def report(self) -> dict:
        return self._report

    def apply_block(self, ctx) -> None:
        maps = block_mappings(ctx.model, ctx.index, ctx.arch)
        fused = [c for m in maps for c in m.consumers if split_ref(c)[1] is not None]
        if fused:
            raise StepError(f"repquant: {fused[0]} is a fused expert parameter, not a linear; RepQuant supports "
                            "models whose norms feed nn.Linear modules (MoE experts as 3-D parameters are not)")
        consumers = {m.norm: [ctx.model.get_submodule(c) for c in m.consumers] for m in maps}
        specs = {n: _static_input_spec(n, cs) for n, cs in consumers.items()}
        maps = [m for m in maps if specs[m.norm] is not None]
        if not maps:
            return
        observers = {m.norm: make_observer("percentile", size=self.sample_rows) for m in maps}
        inside = {n: o for n, o in observers.items() if n.startswith(ctx.name + ".")}
        with observe_modules(ctx.model, inside, where="output"), torch.no_grad():
            targets = [ctx.forward(x) for x in ctx.batches()]  # float block outputs
        for n in set(observers) - set(inside):  # a norm before block 0 (BERT's embeddings): its output is the input
            for x in ctx.batches():
                observers[n].update(x)
        bounds = {m.norm: percentile_init(observers[m.norm].compute()["sample"], specs[m.norm].bits,
                                          tuple(self.percentiles), specs[m.norm].symmetric) for m in maps}
        if self.learn_clipping or self.range_floor:
            bits = {specs[m.norm].bits for m in maps}
            sym = {specs[m.norm].symmetric for m in maps}
            if len(bits) > 1 or len(sym) > 1:
                raise StepError("repquant tunes all norms of a block together: give their consumers one input spec")
            bits, sym = bits.pop(), sym.pop()
            norms = {m.norm: ctx.model.get_submodule(m.norm) for m in maps}
            inputs = list(ctx.batches())
            # per_channel mode keeps the original weights, so the reparameterized ones have no place in its loop
            in_loop = {n: cs for n, cs in consumers.items() if n in norms} \
                if self.weights_in_loop and self.mode == "reparameterize" else {}
            if self.range_floor:
                bounds, rho = search_range_floor(ctx.forward, norms, in_loop, inputs, targets, bounds, bits, symmetric=sym)
                self._report.update({n: {"rho": r} for n, r in rho.items()})
            if self.learn_clipping:
                result = learn_dual_clipping(ctx.forward, norms, inputs, targets, bounds, bits, symmetric=sym,
                                             lr=self.lr, epochs=self.epochs, consumers=in_loop)
                bounds = result.bounds
                for n in norms:
                    self._report.setdefault(n, {})["clipping_losses"] = result.losses
        qparams = {n: channel_qparams(lo, hi, specs[n].bits, specs[n].symmetric) for n, (lo, hi) in bounds.items()}
        if self.mode == "reparameterize":
            reps = reparameterize_block(ctx.model, ctx.index, qparams)
            qparams = {n: (r.s_tilde, r.z_tilde) for n, r in reps.items()}
        for n, (s, z) in qparams.items():
            install_input_quantizers(consumers[n], s, z, specs[n].bits, specs[n].symmetric)


def _static_input_spec(norm: str, consumers) -> QuantSpec | None:
    """The shared static input spec of a norm's consumers, or None if they quantize no input activation."""
    specs = {c.input_quant.spec for c in consumers if isinstance(c, QuantLinear) and c.input_quant is not None}
    if not specs:
        return None
    if len(specs) > 1 or any(s.dynamic for s in specs):
        raise StepError(f"repquant needs one static input_activations spec for the consumers of {norm}, "
                          f"got {sorted(s.short() for s in specs)}")
    return specs.pop()
