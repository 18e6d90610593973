"""Fold primitives: edit a norm's affine parameters and its consumer linears in place.

All edits run under ``torch.no_grad()`` in float64, are cast back to the parameter's dtype and are checked
for non-finite values. Conventions (HF layout, METHODS §0.3):

* a norm's effective scale γ is ``weight`` (LayerNorm, RMSNorm) or ``1 + weight`` (Gemma RMSNorm);
* a consumer computes ``y = x Wᵀ + b`` with ``W [out, in]``; GPT-2 ``Conv1D`` stores ``W`` as ``[in, out]``.

A plain fold is function-preserving for any positive ``r [C]`` (pre-LN models only):

>>> scale_norm_output(norm, "rmsnorm", r)            # doctest: +SKIP
>>> for linear in consumers: scale_consumer_inputs(linear, r)   # doctest: +SKIP
"""
from __future__ import annotations

import torch
from torch import nn

from normquant.quant.linear import is_conv1d
from normquant.quant.primitives import check_finite

# γ = GAMMA_OFFSET[norm_kind] + weight
GAMMA_OFFSET: dict[str, float] = {"layernorm": 0.0, "rmsnorm": 0.0, "gemma_rmsnorm": 1.0}


class FoldError(ValueError):
    """A module that cannot be folded into (unknown norm kind, no affine weight, quantized weights)."""


class RMSNormWithBias(nn.Module):
    """``norm(x) + bias``: an RMSNorm (any HF variant, kept as is) followed by an explicit β ``[C]``.

    Used by RepQuant option B (METHODS §1.4), where the zero-point shift ``s̃·r2`` must be absorbed after
    an RMSNorm that has no β. ``weight`` is the wrapped norm's weight, so γ edits work unchanged. State-dict
    keys become ``<norm>.norm.weight`` and ``<norm>.bias``: plain HF classes cannot load such a checkpoint.
    """

    def __init__(self, norm: nn.Module, bias: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> nn.Parameter:
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + self.bias


class RMSNorm(nn.Module):
    """``(offset + w) ⊙ x / sqrt(mean(x²) + ε)`` computed in float32 (float64 for float64 inputs), cast back:
    the norm a LayerNorm becomes after norm fusion on a zero-mean residual stream (γ starts at 1). Unlike the
    HF RMSNorms it keeps float64 inputs in float64 (exactness tests); ``offset`` 1 is Gemma's ``1 + w``."""

    def __init__(self, width: int, eps: float = 1e-5, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((width,), 1.0 - offset))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(dt)
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return ((self.offset + self.weight.to(dt)) * h).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (f", offset={self.offset:g}" if self.offset else "")


def hf_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of a linear as ``[out, in]`` (a view: GPT-2's Conv1D stores ``[in, out]``); edits write through."""
    return linear.weight.t() if is_conv1d(linear) else linear.weight


def _offset(norm_kind: str) -> float:
    try:
        return GAMMA_OFFSET[norm_kind]
    except KeyError:
        raise FoldError(f"unknown norm kind '{norm_kind}'; supported: {', '.join(GAMMA_OFFSET)}") from None


def _weight(norm: nn.Module) -> nn.Parameter:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise FoldError(f"{type(norm).__name__} has no affine weight (γ) to fold into")
    return weight


def _write(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    check_finite(value, what)
    param.data.copy_(value.to(param.dtype))


def effective_gamma(norm: nn.Module, norm_kind: str) -> torch.Tensor:
    """γ ``[C]`` in float64: ``weight``, or ``1 + weight`` for ``gemma_rmsnorm``."""
    return _offset(norm_kind) + _weight(norm).detach().double()


@torch.no_grad()
def scale_norm_output(norm: nn.Module, norm_kind: str, r: torch.Tensor) -> None:
    """Make the norm output ``X / r``: γ ← γ / r and β ← β / r (β where it exists). ``r [C]``, nonzero."""
    r = r.detach().double().to(_weight(norm).device)
    gamma = effective_gamma(norm, norm_kind) / r
    _write(_weight(norm), gamma - _offset(norm_kind), "folded norm weight")
    if getattr(norm, "bias", None) is not None:
        _write(norm.bias, norm.bias.double() / r, "folded norm bias")


def add_norm_bias(norm: nn.Module, delta: torch.Tensor) -> nn.Module:
    """Make the norm output ``X + delta`` (``delta [C]``); returns the module to use in the norm's place.

    A norm with a β (LayerNorm) is edited in place and returned; a LayerNorm built without one gets a
    β; an RMSNorm is wrapped in :class:`RMSNormWithBias` (install the returned module in the parent).
    """
    delta = delta.detach().double().to(_weight(norm).device)
    with torch.no_grad():
        if getattr(norm, "bias", None) is not None:
            _write(norm.bias, norm.bias.double() + delta, "norm bias")
            return norm
        check_finite(delta, "norm bias")
        bias = delta.to(_weight(norm).dtype)
    if isinstance(norm, nn.LayerNorm):
        norm.bias = nn.Parameter(bias, requires_grad=_weight(norm).requires_grad)
        return norm
    return RMSNormWithBias(norm, bias)


def _check_consumer(linear: nn.Module) -> None:
    if getattr(linear, "weight_quantized", False):
        raise FoldError("consumer weights are already quantized; fold/reparameterize before weight quantization")
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise FoldError(f"{type(linear).__name__} is not a linear layer (no 2-D weight)")


@torch.no_grad()
def scale_consumer_inputs(linear: nn.Module, r: torch.Tensor) -> None:
    """W ← W · diag(r) (HF ``[out, in]``: column c times ``r_c``), so that ``linear(X / r)`` is unchanged."""
    _check_consumer(linear)
    r = r.detach().double().to(linear.weight.device)
    w = linear.weight.double()
    w = w * r[:, None] if is_conv1d(linear) else w * r[None, :]  # Conv1D [in, out]: row c
    _write(linear.weight, w, "folded consumer weight")


@torch.no_grad()
def consumer_input_response(linear: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """``W v`` ``[out]`` in float64 for an input vector ``v [in]`` (the bias change a shift ``v`` causes)."""
    _check_consumer(linear)
    v = v.detach().double().to(linear.weight.device)
    return v @ linear.weight.double() if is_conv1d(linear) else linear.weight.double() @ v


@torch.no_grad()
def add_consumer_bias(linear: nn.Module, delta: torch.Tensor) -> None:
    """b ← b + delta (``delta [out]``), creating the bias when the layer has none."""
    _check_consumer(linear)
    delta = delta.detach().double().to(linear.weight.device)
    if linear.bias is None:
        check_finite(delta, "consumer bias")
        linear.bias = nn.Parameter(delta.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
    else:
        _write(linear.bias, linear.bias.double() + delta, "consumer bias")
