"""Pure quantization primitives: qparams, quantize, dequantize, fake-quantize.

Every function works on a *reduction view* of the tensor: a 2-D view ``[n, k]`` whose rows each get one
``(scale, zero_point)`` pair, computed over the last dimension ``k``:

=============  ======================  =====================================
granularity    weights ``[out, in]``   activations ``[..., C]``
=============  ======================  =====================================
tensor         ``[1, out*in]``         ``[1, T*C]``
channel        ``[out, in]``           ``[C, T]`` (transposed: per channel)
group(g)       ``[out*in/g, g]``       ``[T*C/g, g]``
token          ``[out, in]``           ``[T, C]``
=============  ======================  =====================================

``channel_axis`` says which axis "channel" means: 0 for weights (output rows), -1 for activations.

This module is normquant's only quantizer arithmetic: :func:`qparams_from_range` is the only qparams formula
of the min-max grid (RepQuant's differentiable bounds use :func:`normquant.quant.search.channel_qparams`), and
:func:`quantize_view` / :func:`dequantize_view` / :func:`fake_quantize_view` are the only round/clamp code for
weights — QuantLinear, GPTQ, the clip searches and the export call them. Input activations, whose arithmetic a
server recomputes on every forward, use :func:`fake_quantize_activation`: compressed-tensors' own formulas and op
order (see "Input activations" below), so what normquant measures is what the exported model computes.

>>> import torch
>>> spec = QuantSpec(bits=8, granularity="channel")
>>> w = torch.randn(4, 16)
>>> s, z = choose_qparams(w, spec)
>>> (fake_quantize(w, s, z, spec) - w).abs().max() <= s.max() / 2
tensor(True)
"""
from __future__ import annotations

from typing import Callable

import torch

from normquant.quant.spec import QuantSpec


class QuantError(ValueError):
    """Bad input to a quantizer (shape, group size, non-finite values)."""


def reduction_view(x: torch.Tensor, spec: QuantSpec, channel_axis: int = 0) -> tuple[torch.Tensor, Callable]:
    """Return ``(xv, restore)``: ``xv`` is ``[n, k]`` (one qparam row per row), ``restore(xv)`` gives ``x``'s shape."""
    shape = x.shape
    g = spec.granularity
    if g == "tensor":
        return x.reshape(1, -1), lambda v: v.reshape(shape)
    if g == "token" or (g == "channel" and channel_axis == 0):
        k = shape[-1] if g == "token" else x[0].numel()
        return x.reshape(-1, k), lambda v: v.reshape(shape)  # [rows, k]
    if g == "channel":  # activations: one row per hidden channel
        c = shape[-1]
        return x.reshape(-1, c).t(), lambda v: v.t().reshape(shape)  # [T, C] -> [C, T]
    gs = spec.group_size
    if shape[-1] % gs:
        raise QuantError(
            f"group_size {gs} does not divide the last dimension {shape[-1]} (shape {tuple(shape)}); "
            f"choose a group size that divides it (e.g. {_divisor_hint(shape[-1], gs)}) or ignore this module"
        )
    return x.reshape(-1, gs), lambda v: v.reshape(shape)  # [..., C] -> [.. * C/g, g]


def _divisor_hint(n: int, g: int) -> int:
    return max(d for d in range(1, g + 1) if n % d == 0)


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise QuantError(f"{what} has {bad} non-finite values (NaN/Inf); fix the model weights or the calibration data")


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer-valued zero point from a range ``[xmin, xmax]`` (any broadcastable shape).

    symmetric:  ``s = max(|xmin|, |xmax|) / qmax``, ``z = 0`` (``/ (qmax + 1/2)`` with ``spec.full_range``)
    asymmetric: ``s = (xmax - xmin) / (2^b - 1)``, ``z = round(-xmin / s)``, the range always holding 0.
    """
    xmin = torch.clamp(xmin, max=0) * spec.clip_ratio
    xmax = torch.clamp(xmax, min=0) * spec.clip_ratio
    tiny = torch.finfo(torch.float32).tiny * 1e6
    if spec.symmetric:
        scale = torch.maximum(xmin.abs(), xmax) / (spec.qmax + 0.5 if spec.full_range else spec.qmax)
        scale = scale.clamp(min=tiny)
        return scale, torch.zeros_like(scale)
    scale = ((xmax - xmin) / (spec.qmax - spec.qmin)).clamp(min=tiny)
    zero = torch.clamp(torch.round(-xmin / scale), spec.qmin, spec.qmax)
    return scale, zero


def minmax_qparams_view(xv: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams ``[n, 1]`` of each row of a reduction view ``xv`` ``[n, k]`` (differentiable)."""
    return qparams_from_range(xv.amin(dim=1, keepdim=True), xv.amax(dim=1, keepdim=True), spec)


def choose_qparams(x: torch.Tensor, spec: QuantSpec, channel_axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams, shape ``[n, 1]`` on the reduction view of ``x``."""
    return minmax_qparams_view(reduction_view(x, spec, channel_axis)[0], spec)


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """``round`` with a straight-through gradient."""
    return v + (torch.round(v) - v).detach()


def _records_grad(xv: torch.Tensor, scale: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (xv.requires_grad or scale.requires_grad)


# The quantizer core: every fake-quant, code and dequantization in normquant goes through the three functions
# below. Their op order is part of the contract (float rounding): ``x/s``, round, ``+z``, clamp; ``-z``, ``*s``.
# The no-grad path skips ``+z``/``-z`` for symmetric specs (z = 0), so a code that rounds to -0.0 stays -0.0.


def quantize_view(xv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as float values) on the reduction view: ``clamp(round(x/s) + z, qmin, qmax)``.

    With autograd recording, rounding is straight-through; otherwise the ops run in place on one new buffer
    (this is the hot path of fake-quant evaluation). ``xv`` is never modified.
    """
    if _records_grad(xv, scale):
        return torch.clamp(round_ste(xv / scale) + zero, spec.qmin, spec.qmax)
    q = torch.div(xv, scale).round_()
    if spec.symmetric:  # zero point is 0
        return q.clamp_(spec.qmin, spec.qmax)
    return q.add_(zero).clamp_(spec.qmin, spec.qmax)


def dequantize_view(qv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``s * (q - z)`` on the reduction view (a new tensor; differentiable)."""
    return scale * (qv - zero)


def fake_quantize_view(xv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``s * (clamp(round(x/s) + z, qmin, qmax) - z)`` on the reduction view ``[n, k]`` (qparams ``[n, 1]``, or
    anything that broadcasts, e.g. one column ``[n]`` with ``[n]`` qparams).

    Without autograd recording (GPTQ's column loop, the clip searches, RTN, inference) it runs in place on one
    new buffer and ``round(result/s) + z`` recovers the codes exactly; with it, rounding is straight-through.
    ``xv`` is never modified.
    """
    if _records_grad(xv, scale):
        return dequantize_view(quantize_view(xv, scale, zero, spec), scale, zero)
    q = quantize_view(xv, scale, zero, spec)
    if not spec.symmetric:
        q.sub_(zero)
    return q.mul_(scale)


def code_dtype(spec: QuantSpec) -> torch.dtype:
    """The smallest integer dtype holding ``spec``'s codes: int8, or int16 for unsigned 8-bit codes."""
    return torch.int8 if spec.symmetric or spec.bits < 8 else torch.int16


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, channel_axis: int = 0) -> torch.Tensor:
    """Integer codes of ``x`` (:func:`code_dtype` tensor of ``x``'s shape)."""
    xv, restore = reduction_view(x, spec, channel_axis)
    return restore(quantize_view(xv, scale, zero, spec)).to(code_dtype(spec))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, channel_axis: int = 0) -> torch.Tensor:
    """``s * (q - z)`` back in ``q``'s shape (float32)."""
    qv, restore = reduction_view(q.float(), spec, channel_axis)
    return restore(dequantize_view(qv, scale, zero))


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, channel_axis: int = 0) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, differentiable (straight-through rounding)."""
    xv, restore = reduction_view(x, spec, channel_axis)
    return restore(fake_quantize_view(xv, scale, zero, spec)).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Input activations: the serving stack's arithmetic
# ---------------------------------------------------------------------------------------------------------
# An export stores weights as integers and static input scales as numbers, so a server reproduces those exactly;
# what it *recomputes* on every forward is the activation fake-quant itself, and dynamic qparams. normquant's
# activation quantizers therefore compute, op for op, what compressed-tensors 0.20 applies when it runs an export
# (``quantization/utils/helpers.py``: ``calculate_qparams``, ``compute_dynamic_scales_and_zp``;
# ``quantization/lifecycle/forward_helpers.py``: ``_quantize_dequantize``), on its signed grid
# ``[-2^(b-1), 2^(b-1)-1]``:
#
#   dynamic symmetric    s = absmax / ((2^b - 1) / 2)       (255/2 = 127.5 at 8 bits, not normquant's 127)
#   dynamic asymmetric   s = (max - min) / (2^b - 1),  z = round(clamp(-2^(b-1) - min / s, grid))   (range holds 0)
#   zero scales          replaced by eps(dtype) (an all-zero row; its z is 0)
#   fake-quant           s * (round(clamp(x / s + z, grid)) - z)   (z added before rounding; 0 for symmetric)
#   granularity token    one row per (dim 0, dim 1) entry: [B, T, C] -> B*T rows; a 2-D input is one tensor row
#
# Weights keep normquant's own grid (:func:`qparams_from_range`, ``absmax / (2^(b-1) - 1)``) and core above:
# their codes and scales are stored, so a server dequantizes the same ``s * (q - z)``.


def activation_view(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, Callable]:
    """Reduction view of an activation as compressed-tensors groups it (token: all dims after the first two)."""
    if spec.granularity == "token":
        shape = x.shape
        if x.dim() < 3:  # compressed-tensors reduces over no dim -> its aminmax over the whole tensor
            return x.reshape(1, -1), lambda v: v.reshape(shape)
        return x.reshape(shape[0] * shape[1], -1), lambda v: v.reshape(shape)
    return reduction_view(x, spec, channel_axis=-1)


def serving_qparams_view(xv: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic qparams ``[n, 1]`` of each row of ``xv`` exactly as compressed-tensors computes them: scale in
    ``xv``'s dtype, zero point on the **signed** grid (zeros for symmetric specs). No gradient. A ``clip_ratio`` < 1
    (QuaRot's 0.9; compressed-tensors has none, so such exports say parity none) shrinks the range first."""
    with torch.no_grad():
        lo = torch.clamp(xv.amin(dim=1, keepdim=True), max=0) * spec.clip_ratio  # x 1.0: exact
        hi = torch.clamp(xv.amax(dim=1, keepdim=True), min=0) * spec.clip_ratio
        qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
        bit_range = torch.tensor(float(qmax - qmin), device=xv.device).to(xv.dtype)
        if spec.symmetric:
            scale = torch.maximum(lo.abs(), hi) / (bit_range / 2)
            zero = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / bit_range
            zero = torch.round(torch.clamp(qmin - lo / scale, qmin, qmax))
            zero = torch.where(scale == 0, torch.zeros_like(zero), zero)  # 0/0: compressed-tensors' int8 cast gives 0
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype,
                                                     device=scale.device), scale)
    return scale, zero


def fake_quantize_serving_view(xv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                               spec: QuantSpec) -> torch.Tensor:
    """compressed-tensors' fake-quant on a view: ``s * (round(clamp(x/s + z, -2^(b-1), 2^(b-1)-1)) - z)``, ``z``
    on the signed grid (ignored for symmetric specs). Straight-through rounding when autograd records."""
    qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    if _records_grad(xv, scale):
        v = xv / scale
        if not spec.symmetric:
            v = v + zero
        q = round_ste(torch.clamp(v, qmin, qmax))
        return ((q - zero) if not spec.symmetric else q) * scale
    v = torch.div(xv, scale)
    if not spec.symmetric:
        v.add_(zero)
    q = v.clamp_(qmin, qmax).round_()
    if not spec.symmetric:
        q.sub_(zero)
    return q.mul_(scale)


def fake_quantize_activation(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                             zero: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize an input activation ``[..., C]`` the way the serving stack does (see above).

    Dynamic (``scale`` None): qparams from ``x`` itself (:func:`serving_qparams_view`). Static: ``scale`` /
    ``zero`` as normquant stores them (reduction-view rows, ``zero`` on normquant's grid: unsigned for asymmetric
    specs), moved to the signed grid here — ``q - z`` is unchanged, but ``x/s + z`` rounds as the server's does.
    """
    xv, restore = activation_view(x, spec)
    if scale is None:
        scale, zero = serving_qparams_view(xv, spec)
    else:
        scale = scale.to(x.dtype)
        zero = (zero - 2 ** (spec.bits - 1)).to(x.dtype) if not spec.symmetric else torch.zeros_like(scale)
    return restore(fake_quantize_serving_view(xv, scale, zero, spec)).to(x.dtype)
