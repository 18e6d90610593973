"""KIVI (Liu et al., ICML 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"): keys quantized
per channel over groups of ``G`` tokens, values per token, both asymmetric with a float minimum, the most recent
tokens kept in full precision (:class:`normquant.quant.kv_cache.QuantizedKVCache` keeps them).

Per group of elements ``x`` (a key channel over ``G`` tokens, or a value token over ``head_dim`` channels):

    m = min x,  s = (max x - m) / (2^b - 1),  q = clamp(round((x - m) / s), 0, 2^b - 1),  x̂ = q·s + m

``s`` and ``m`` are stored in the spec's ``scale_dtype`` and the codes are computed with the stored values
(:func:`normquant.quant.kv.minmax_qparams`, shared with NSNQuant's metadata).

Residual window [NQ]: KIVI keeps ``n mod R`` key tokens and ``R`` value tokens in full precision; normquant keeps
the ``R`` most recent tokens of both, and keys up to ``G - 1`` more until a whole group can be quantized.

Recipe: ``scheme: {kv_cache: {method: kivi, bits: 2, group_size: 32, residual: 128}}``.
"""
from __future__ import annotations

import torch

from normquant.quant.kv import (KVCacheSpec, KVQuantizer, Rope, dequantize_minmax, minmax_qparams, quantize_minmax,
                                register_kv_method, scale_dtype)
from normquant.quant.packing import pack_codes, packed_width, unpack_codes


def quantize_keys(k: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel key quantization: ``k`` ``[B, H, n, D]`` (``n`` a multiple of ``G``) -> codes ``[B, H, n, D]``,
    ``s``, ``m`` ``[B, H, n/G, D]``."""
    b, h, n, d = k.shape
    kg = k.reshape(b, h, n // group_size, group_size, d)  # [B, H, n/G, G, D]
    s, m = minmax_qparams(kg, bits, dim=3, dtype=dtype)  # [B, H, n/G, 1, D]
    return quantize_minmax(kg, s, m, bits).reshape(b, h, n, d), s.squeeze(3), m.squeeze(3)


def dequantize_keys(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_keys`: codes ``[B, H, n, D]``, ``s``, ``m`` ``[B, H, n/G, D]`` -> ``[B, H, n, D]``."""
    b, h, n, d = q.shape
    groups = s.shape[2]
    qg = q.reshape(b, h, groups, n // groups, d)  # [B, H, n/G, G, D]
    return dequantize_minmax(qg, s.unsqueeze(3), m.unsqueeze(3)).reshape(b, h, n, d)


def quantize_values(v: torch.Tensor, bits: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token value quantization: ``v`` ``[B, H, n, D]`` -> codes ``[B, H, n, D]``, ``s``, ``m`` ``[B, H, n, 1]``."""
    s, m = minmax_qparams(v, bits, dim=-1, dtype=dtype)
    return quantize_minmax(v, s, m, bits), s, m


class _KIVIQuantizer(KVQuantizer):
    """Stores packed codes ``[B, H, n, W]`` int32 with ``s``, ``m`` per key group / per value token."""

    def __init__(self, bits: int, dtype: torch.dtype, token_block: int):
        self.bits, self.dtype, self.token_block = bits, dtype, token_block

    def _stored(self, q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"codes": pack_codes(q.to(torch.int32), self.bits, signed=False), "scale": s, "minimum": m}

    def _codes(self, stored: dict[str, torch.Tensor], head_dim: int) -> torch.Tensor:
        return unpack_codes(stored["codes"], self.bits, head_dim, signed=False)


class KIVIKeys(_KIVIQuantizer):
    def __init__(self, bits: int, dtype: torch.dtype, group_size: int):
        super().__init__(bits, dtype, token_block=group_size)

    def quantize(self, x: torch.Tensor, rope: Rope | None = None) -> dict[str, torch.Tensor]:
        return self._stored(*quantize_keys(x, self.bits, self.token_block, self.dtype))

    def dequantize(self, stored: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype,
                   rope: Rope | None = None) -> torch.Tensor:
        return dequantize_keys(self._codes(stored, head_dim), stored["scale"], stored["minimum"]).to(dtype)

    def bits_per_token_head(self, head_dim: int) -> tuple[float, float, float]:
        per_group = head_dim * torch.finfo(self.dtype).bits / self.token_block  # one s (and one m) per channel per G
        return 32 * packed_width(head_dim, self.bits), per_group, per_group


class KIVIValues(_KIVIQuantizer):
    def __init__(self, bits: int, dtype: torch.dtype):
        super().__init__(bits, dtype, token_block=1)

    def quantize(self, x: torch.Tensor, rope: Rope | None = None) -> dict[str, torch.Tensor]:
        return self._stored(*quantize_values(x, self.bits, self.dtype))

    def dequantize(self, stored: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype,
                   rope: Rope | None = None) -> torch.Tensor:
        return dequantize_minmax(self._codes(stored, head_dim), stored["scale"], stored["minimum"]).to(dtype)

    def bits_per_token_head(self, head_dim: int) -> tuple[float, float, float]:
        scale_bits = torch.finfo(self.dtype).bits
        return 32 * packed_width(head_dim, self.bits), scale_bits, scale_bits


@register_kv_method("kivi")
def kivi_quantizers(spec: KVCacheSpec) -> tuple[KVQuantizer, KVQuantizer]:
    return KIVIKeys(spec.bits, scale_dtype(spec), spec.key_group), KIVIValues(spec.bits, scale_dtype(spec))
