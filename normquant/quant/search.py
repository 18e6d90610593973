"""Clip-range searches: the §5.2 MSE clip search for weights (RTN, GPTQ), per-channel qparams from bounds and the RepQ-ViT percentile
search (METHODS §1.2, §5.2). Used by RepQuant (per-channel, on norm outputs) and by static activation
quantizers with ``observer: percentile`` (per-tensor: the search on the flattened values).
"""
from __future__ import annotations

from typing import Sequence

import torch

from normquant.quant.primitives import check_finite, fake_quantize, fake_quantize_view, qparams_from_range, round_ste
from normquant.quant.spec import QuantSpec

Bounds = tuple[torch.Tensor, torch.Tensor]  # (lower [C], upper [C])

#: §5.2: shrink factors p = 1 − i/MSE_GRID for i < MSE_MAXSHRINK·MSE_GRID; error Σ|Q(w) − w|^MSE_NORM.
MSE_GRID = 100
MSE_MAXSHRINK = 0.8
MSE_NORM = 2.4


def channel_qparams(lower: torch.Tensor, upper: torch.Tensor, bits: int,
                    symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(s [C], z [C])`` from clipping bounds ``[lower, upper]`` (each ``[C]``).

    asymmetric: ``s = (u − l)/(2^b − 1)``, ``z = round(−l/s)`` (integer; the range need not contain 0);
    symmetric:  ``s = max(|l|, |u|)/(2^(b−1) − 1)``, ``z = 0``.
    Differentiable w.r.t. the bounds (straight-through rounding). A channel whose range is empty
    (``u − l`` below 1e-8) is widened to contain 0, so ``s`` stays positive and ``z`` bounded.
    """
    tiny = 1e-8
    if symmetric:
        s = torch.maximum(lower.abs(), upper.abs()).clamp(min=tiny) / (2 ** (bits - 1) - 1)
        return s, torch.zeros_like(s)
    empty = (upper - lower) < tiny
    lower = torch.where(empty, lower.clamp(max=0), lower)
    upper = torch.where(empty, upper.clamp(min=0), upper)
    s = ((upper - lower) / (2**bits - 1)).clamp(min=tiny)
    return s, round_ste(-lower / s)


def fake_quantize_channels(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int,
                           symmetric: bool = False) -> torch.Tensor:
    """Per-channel fake-quant of ``x [..., C]`` with ``s, z [C]`` (straight-through, differentiable in s, z)."""
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel")
    return fake_quantize(x, s.to(x.dtype)[:, None], z.to(x.dtype)[:, None], spec, channel_axis=-1)


@torch.no_grad()
def percentile_init(x: torch.Tensor, bits: int, percentiles: Sequence[float] = (0.999, 0.9999, 0.99999),
                    symmetric: bool = False, chunk_elements: int = 2**24) -> Bounds:
    """RepQ-ViT initialization: per channel, the percentile clip with the lowest fake-quant MSE.

    ``x [T, C]`` (or ``[..., C]``): samples of one norm output. For each ``p``, the candidate is
    ``l = quantile(x_c, 1 − p)``, ``u = quantile(x_c, p)`` (``torch.quantile``'s linear interpolation;
    symmetric: ``±max(|l|, |u|)``); each channel keeps the candidate whose fake-quantized values are closest
    (MSE) to ``x_c``. Returns ``(lower [C], upper [C])`` in float32. Works on chunks of channels of about
    ``chunk_elements`` values and only partially sorts (top-k): T = 1e5, C = 576 takes ~4 s on one CPU core.
    """
    x = x.detach().reshape(-1, x.shape[-1])  # [T, C]
    check_finite(x, "percentile_init input")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_tokens, n_p = x.shape[0], len(percentiles)
    p = torch.tensor(percentiles, dtype=torch.float64)
    if not ((p > 0.5) & (p <= 1)).all():
        raise ValueError(f"percentiles must lie in (0.5, 1], got {tuple(percentiles)}")
    pos = (1 - p) * (n_tokens - 1)  # [P], distance of each quantile from the sorted ends
    k = min(n_tokens, int(pos.max().floor()) + 2)
    lowers, uppers = [], []
    width = max(1, chunk_elements // n_tokens)
    for c0 in range(0, x.shape[1], width):
        xc = x[:, c0:c0 + width].to(dtype).t().contiguous()  # [T, w] -> [w, T]
        lower = _interpolate_sorted(torch.topk(xc, k, dim=1, largest=False).values, pos)  # [P, w]
        upper = _interpolate_sorted(torch.topk(xc, k, dim=1).values, pos)  # [P, w]
        if symmetric:
            upper = torch.maximum(lower.abs(), upper.abs())
            lower = -upper
        mse = torch.stack([_channel_mse(xc, *channel_qparams(lower[i], upper[i], bits, symmetric), bits, symmetric)
                           for i in range(n_p)])  # [P, w]
        best = mse.argmin(dim=0, keepdim=True)  # [1, w]
        lowers.append(lower.gather(0, best)[0])
        uppers.append(upper.gather(0, best)[0])
    return torch.cat(lowers).float(), torch.cat(uppers).float()


def _interpolate_sorted(ends: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Values at fractional positions ``pos [P]`` of rows sorted from one end, ``ends [w, k]`` -> ``[P, w]``."""
    lo, frac = pos.floor().long(), (pos - pos.floor()).to(ends.dtype).to(ends.device)
    a, b = ends[:, lo], ends[:, (lo + 1).clamp(max=ends.shape[1] - 1)]  # [w, P]
    return (a + (b - a) * frac).t()


def _channel_mse(xc: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Per-row fake-quant MSE ``[w]`` of ``xc [w, T]`` (same grid as :func:`fake_quantize_channels`)."""
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="channel")
    err = fake_quantize_view(xc, s[:, None], z[:, None], spec).sub_(xc)
    return err.square_().mean(dim=1)


def mse_clip_qparams(xv: torch.Tensor, spec: QuantSpec, *, grid: int = MSE_GRID, maxshrink: float = MSE_MAXSHRINK,
                     norm: float = MSE_NORM) -> tuple[torch.Tensor, torch.Tensor]:
    """§5.2 clip search: per row of ``xv`` ``[n, k]``, the qparams ``[n, 1]`` of the shrunk range ``p·[min, max]``,
    ``p = 1 − i/grid`` (``i < maxshrink·grid``), that minimize ``Σ|Q(x) − x|^norm``.

    Ties keep the larger ``p`` (``p = 1`` is tried first), so the result is never worse than min-max in that norm.
    """
    xmin, xmax = xv.amin(dim=1, keepdim=True), xv.amax(dim=1, keepdim=True)  # [n, 1]
    best_err = torch.full_like(xmin, float("inf"))
    best_scale, best_zero = torch.empty_like(xmin), torch.empty_like(xmin)
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        scale, zero = qparams_from_range(p * xmin, p * xmax, spec)
        err = fake_quantize_view(xv, scale, zero, spec).sub_(xv).abs_().log_().mul_(norm).exp_()  # |e|^norm, 2x faster than pow on CPU
        err = err.sum(dim=1, keepdim=True)  # [n, k] -> [n, 1]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
