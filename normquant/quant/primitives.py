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

    symmetric:  ``s = max(|xmin|, |xmax|) / qmax``, ``z = 0``
    asymmetric: ``s = (xmax - xmin) / (2^b - 1)``, ``z = round(-xmin / s)``, the range always holding 0.
    """
    xmin = torch.clamp(xmin, max=0) * spec.clip_ratio
    xmax = torch.clamp(xmax, min=0) * spec.clip_ratio
    tiny = torch.finfo(torch.float32).tiny * 1e6
    if spec.symmetric:
        scale = torch.maximum(xmin.abs(), xmax) / spec.qmax
        scale = scale.clamp(min=tiny)
        return scale, torch.zeros_like(scale)
    scale = ((xmax - xmin) / (spec.qmax - spec.qmin)).clamp(min=tiny)
    zero = torch.clamp(torch.round(-xmin / scale), spec.qmin, spec.qmax)
    return scale, zero


def choose_qparams(x: torch.Tensor, spec: QuantSpec, channel_axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams, shape ``[n, 1]`` on the reduction view of ``x``."""
    xv, _ = reduction_view(x, spec, channel_axis)
    return qparams_from_range(xv.amin(dim=1, keepdim=True), xv.amax(dim=1, keepdim=True), spec)


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """``round`` with a straight-through gradient."""
    return v + (torch.round(v) - v).detach()


def quantize_view(xv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as float values) on the reduction view: ``clamp(round(x/s) + z, qmin, qmax)``.

    With autograd recording, rounding is straight-through; otherwise the ops run in place on one buffer
    (this is the hot path of fake-quant evaluation).
    """
    if torch.is_grad_enabled() and (xv.requires_grad or scale.requires_grad):
        return torch.clamp(round_ste(xv / scale) + zero, spec.qmin, spec.qmax)
    q = torch.div(xv, scale).round_()
    if spec.symmetric:  # zero point is 0
        return q.clamp_(spec.qmin, spec.qmax)
    return q.add_(zero).clamp_(spec.qmin, spec.qmax)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, channel_axis: int = 0) -> torch.Tensor:
    """Integer codes of ``x`` (int8 tensor of ``x``'s shape)."""
    xv, restore = reduction_view(x, spec, channel_axis)
    return restore(quantize_view(xv, scale, zero, spec)).to(torch.int8 if spec.symmetric or spec.bits < 8 else torch.int16)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, channel_axis: int = 0) -> torch.Tensor:
    """``s * (q - z)`` back in ``q``'s shape (float32)."""
    qv, restore = reduction_view(q.float(), spec, channel_axis)
    return restore(scale * (qv - zero))


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, channel_axis: int = 0) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, differentiable (straight-through rounding)."""
    xv, restore = reduction_view(x, spec, channel_axis)
    return restore(scale * (quantize_view(xv, scale, zero, spec) - zero)).to(x.dtype)


def fake_quantize_dynamic(x: torch.Tensor, spec: QuantSpec, channel_axis: int = -1) -> torch.Tensor:
    """Fake-quantize with qparams computed from ``x`` itself (dynamic activations, RTN weights)."""
    xv, restore = reduction_view(x, spec, channel_axis)
    with torch.no_grad():
        if spec.symmetric:  # one reduction instead of two
            amax = xv.abs().amax(dim=1, keepdim=True)
            scale, zero = qparams_from_range(-amax, amax, spec)
        else:
            scale, zero = qparams_from_range(xv.amin(dim=1, keepdim=True), xv.amax(dim=1, keepdim=True), spec)
    q = quantize_view(xv, scale, zero, spec)
    if not spec.symmetric:
        q = q - zero
    return restore(q.mul_(scale) if not q.requires_grad else q * scale).to(x.dtype)
