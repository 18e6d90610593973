"""LLM.int8() mixed-precision decomposition (Dettmers et al., 2022; METHODS §5.1) as an activation-quantizer
mode: per forward pass, the input columns holding any value of magnitude ≥ α (6.0 in the paper) stay in float,
the rest is quantized per token.

    O = {j : ∃t |X[t, j]| ≥ α}
    Y ≈ X[:, O] Ŵ[:, O]ᵀ + Q(X[:, ¬O]) Ŵ[:, ¬O]ᵀ

Outlier entries are zeroed before the per-token absmax (bitsandbytes), and the float columns multiply the
layer's quantized weight columns (bitsandbytes' fp16 path uses the dequantized int8 weight). Select it with
``outlier_threshold`` on a dynamic per-token input spec. compressed-tensors has no such scheme: exporting it
is refused.
"""
from __future__ import annotations

from typing import Callable

import torch


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``O`` as a mask ``[C]``: channels of ``x [..., C]`` with any ``|x| ≥ threshold`` in this pass."""
    return (x.detach().abs() >= threshold).reshape(-1, x.shape[-1]).any(dim=0)


def decompose(x: torch.Tensor, threshold: float, fake_quant: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x [..., C]`` with the outlier columns kept and the others through ``fake_quant`` (computed with the
    outlier columns zeroed, so they do not set the per-token scales)."""
    mask = outlier_columns(x, threshold)  # [C]
    if not bool(mask.any()):
        return fake_quant(x)
    return torch.where(mask, x, fake_quant(x.masked_fill(mask, 0)))
