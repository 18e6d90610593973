"""NSNQuant (Son, Choi, Yoo, NeurIPS 2025; METHODS §3): calibration-free vector quantization of the KV cache at 1
and 2 bits per element.

Per layer, KV head and window ``X [ws, d]`` of ``ws`` tokens (keys or values):

1. ``s1_t = ‖x_t‖/√d``, stored as 4-bit float-minimum codes per window; ``x_t ← x_t / ŝ1_t``
2. ``o = mean_t x_t`` (per channel), stored as 4-bit codes with a (scale, minimum) per 32 channels; ``x_t ← x_t − ô``
3. ``s2_t = ‖x_t‖/√d``; ``x_t ← x_t / s2_t``
4. keys: ``x_t ← RoPE_{p_t}(x_t)`` (norm-preserving); ``y_t = T x_t`` (``T`` the normalized Hadamard of
   :mod:`normquant.quant.hadamard`), ``‖y_t‖ = √d``
5. every 8-dimensional sub-vector of ``y_t`` replaced by its nearest codeword: 1 bit — an index into a 256-entry
   codebook of ``N(0, I_8)``; 2 bits [UNVERIFIED, METHODS §3.3] — an 8-bit sign mask and an index into a 256-entry
   codebook of ``|N(0, I_8)|``, ``ŷ = sign · c``
6. ``s2'_t = s2_t ‖y_t‖² / ⟨y_t, ŷ_t⟩`` (fp16), so that the projection of ``s2' ŷ`` on ``y`` is ``s2 y``

and ``v̂_t = ŝ1_t (Tᵀ(s2'_t ŷ_t) + ô)``, ``k̂_t = ŝ1_t (Tᵀ(s2'_t ŷ_t) + RoPE_{p_t}(ô))`` (a post-RoPE key). Steps
1-3 run on the pre-RoPE key ``R_tᵀ k_t``: the cache receives post-RoPE keys ``k_t = R_t x_t`` and un-rotates
them for the mean only (``‖k_t‖ = ‖x_t‖``, and ``R_t(x_t/ŝ1 − ô) = k_t/ŝ1 − R_t ô``), so the stored codes are
the paper's; positions are the cache's token indices (``pre_rope: false``: the mean of the post-RoPE keys, the
former [NQ] deviation). The codebooks are built here, deterministically: Lloyd's k-means on 16,384 samples of
``N(0, I_8)`` (or their absolute values) with a fixed seed, in float64 (the official learned codebooks are not
used) [NQ].

Deviation [NQ]: values are rotated online (no Hadamard folded into ``v_proj``/``o_proj``). The float window
(METHODS §3.4) is the cache's residual window: a partial window stays float.

Recipe: ``scheme: {kv_cache: {method: nsn, bits: 1, group_size: 64}}``.
"""
from __future__ import annotations

import functools

import torch

from normquant.quant.kv import (KVCacheSpec, KVQuantizer, Rope, dequantize_minmax, head_hadamard, minmax_qparams,
                                quantize_minmax, register_kv_method)
from normquant.quant.packing import pack_codes, packed_width, unpack_codes
from normquant.quant.primitives import QuantError

SUBVECTOR = 8  # dimensions per codeword
CODEWORDS = 256  # 8-bit indices
META_BITS = 4  # s1 and o codes
MEAN_GROUP = 32  # channels per (scale, minimum) pair of o


@functools.lru_cache(maxsize=2)
def gaussian_codebook(positive: bool, samples: int = 16384, iterations: int = 50, seed: int = 0) -> torch.Tensor:
    """``[256, 8]`` float32 centroids of Lloyd's k-means on ``samples`` draws of ``N(0, I_8)`` (``|N(0, I_8)|`` when
    ``positive``), initialized with the first 256 draws; deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(samples, SUBVECTOR, generator=g, dtype=torch.float64)
    data = data.abs() if positive else data
    centroids = data[:CODEWORDS].clone()
    for _ in range(iterations):
        assign = torch.cdist(data, centroids).argmin(dim=1)  # [samples]
        counts = torch.bincount(assign, minlength=CODEWORDS).unsqueeze(1)  # [256, 1]
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # an empty cluster keeps its place
    return centroids.float()


def nearest_codeword(y: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index ``[N]`` of the nearest (Euclidean) codeword to each row of ``y`` ``[N, 8]``."""
    return (2 * y @ codebook.t() - (codebook**2).sum(1)).argmax(dim=1)  # argmin ‖y - c‖²


def vector_quantize(y: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``y`` ``[..., d]`` -> indices ``[..., d/8]``, sign masks ``[..., d/8]`` (2 bits; None at 1 bit), ``ŷ``."""
    sub = y.reshape(-1, SUBVECTOR)  # [N, 8]
    if bits == 1:
        codebook = gaussian_codebook(positive=False).to(y.device)
        idx = nearest_codeword(sub, codebook)
        return idx.reshape(*y.shape[:-1], -1), None, codebook[idx].reshape(y.shape)
    codebook = gaussian_codebook(positive=True).to(y.device)
    idx = nearest_codeword(sub.abs(), codebook)
    negative = sub < 0  # [N, 8]
    mask = (negative.to(torch.int32) << torch.arange(SUBVECTOR, device=y.device)).sum(1)  # bit j: sign of dim j
    y_hat = torch.where(negative, -codebook[idx], codebook[idx])
    return idx.reshape(*y.shape[:-1], -1), mask.reshape(*y.shape[:-1], -1), y_hat.reshape(y.shape)


def vector_dequantize(idx: torch.Tensor, mask: torch.Tensor | None, bits: int) -> torch.Tensor:
    """``ŷ`` ``[..., d]`` from indices (and sign masks) ``[..., d/8]``."""
    codebook = gaussian_codebook(positive=bits == 2).to(idx.device)
    c = codebook[idx.long()]  # [..., d/8, 8]
    if mask is not None:
        negative = (mask.long().unsqueeze(-1) >> torch.arange(SUBVECTOR, device=idx.device)) & 1
        c = torch.where(negative.bool(), -c, c)
    return c.reshape(*idx.shape[:-1], idx.shape[-1] * SUBVECTOR)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """``‖x_t‖ / √d`` ``[..., 1]`` (never 0)."""
    return (x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5).clamp(min=torch.finfo(x.dtype).tiny)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``R_p x = x cos + rotate_half(x) sin`` (transformers' half-split RoPE; ``cos``/``sin`` broadcast to ``x``
    ``[..., d]``); ``inverse``: ``R_pᵀ x = x cos − rotate_half(x) sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos - rotated * sin if inverse else x * cos + rotated * sin


def _window_rope(rope: Rope | None, ws: int) -> Rope | None:
    """``(cos, sin)`` ``[n, d]`` of ``n = W·ws`` tokens -> ``[W, ws, d]`` (broadcasts over ``[B, H, W, ws, d]``)."""
    return None if rope is None else tuple(r.float().reshape(-1, ws, r.shape[-1]) for r in rope)


def _shift(o: torch.Tensor, rope: Rope | None, ws: int) -> torch.Tensor:
    """The mean as the window's tokens see it: ``ô`` ``[..., 1, d]``, or ``RoPE_{p_t}(ô)`` ``[..., ws, d]``."""
    if rope is None:
        return o
    return rope_rotate(o.expand(*o.shape[:-2], ws, o.shape[-1]), *rope)


def _mean_qparams(o: torch.Tensor):
    """4-bit codes of a mean ``[..., 1, d]`` with a (scale, minimum) per 32 channels, and ``ô`` ``[..., 1, d]``."""
    *lead, _, d = o.shape
    og = o.reshape(*lead, 1, d // MEAN_GROUP, MEAN_GROUP)  # [..., 1, d/32, 32]
    o_scale, o_min = minmax_qparams(og, META_BITS, dim=-1, dtype=torch.float16)
    o_q = quantize_minmax(og, o_scale, o_min, META_BITS)
    return o_q, o_scale, o_min, dequantize_minmax(o_q, o_scale, o_min).reshape(*lead, 1, d)


def normalize_shift_normalize(x: torch.Tensor, rope: Rope | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Steps 1-4 on windows ``x`` ``[B, H, W, ws, d]``: ``y`` ``[B, H, W, ws, d]`` (``‖y_t‖ = √d``), ``s2``
    ``[B, H, W, ws, 1]`` and the stored metadata: ``s1_q`` ``[B, H, W, ws, 1]`` 4-bit codes with ``s1_scale`` /
    ``s1_min`` ``[B, H, W, 1, 1]``, ``o_q`` ``[B, H, W, 1, d]`` 4-bit codes with ``o_scale`` / ``o_min``
    ``[B, H, W, 1, d/32]``. ``rope`` (keys): ``(cos, sin)`` ``[W·ws, d]`` of the tokens, which arrive post-RoPE;
    the mean is taken before RoPE."""
    x = x.float()
    *lead, ws, d = x.shape
    rope = _window_rope(rope, ws)
    s1 = _norm(x)  # 1. [B, H, W, ws, 1]
    s1_scale, s1_min = minmax_qparams(s1, META_BITS, dim=-2, dtype=torch.float16)
    s1_q = quantize_minmax(s1, s1_scale, s1_min, META_BITS)
    x = x / dequantize_minmax(s1_q, s1_scale, s1_min).clamp(min=torch.finfo(torch.float32).tiny)
    pre = x if rope is None else rope_rotate(x, *rope, inverse=True)  # the tokens before RoPE
    o_q, o_scale, o_min, o_hat = _mean_qparams(pre.mean(dim=-2, keepdim=True))  # 2.
    x = x - _shift(o_hat, rope, ws)  # = R_t(x_t − ô): the shifted pre-RoPE token, rotated again (step 4's RoPE)
    s2 = _norm(x)  # 3.
    y = (x / s2) @ head_hadamard(d, x.device).t()  # 4. y_t = T x_t
    meta = {"s1_q": s1_q, "s1_scale": s1_scale, "s1_min": s1_min, "o_q": o_q.reshape(*lead, 1, d),
            "o_scale": o_scale.squeeze(-1), "o_min": o_min.squeeze(-1)}
    return y, s2, meta


def inverse_nsn(y: torch.Tensor, s2: torch.Tensor, meta: dict[str, torch.Tensor], rope: Rope | None = None
                ) -> torch.Tensor:
    """``x̂_t = ŝ1_t (Tᵀ(s2_t y_t) + ô)`` ``[B, H, W, ws, d]`` (float32; keys with ``rope``: ``+ RoPE_{p_t}(ô)``):
    the inverse of :func:`normalize_shift_normalize` (exact up to rounding when ``y`` is not vector-quantized)."""
    *_, ws, d = y.shape
    x = (s2.float() * y) @ head_hadamard(d, y.device)  # Tᵀ on every row
    o_q = meta["o_q"]
    og = o_q.reshape(*o_q.shape[:-1], d // MEAN_GROUP, MEAN_GROUP)
    o = dequantize_minmax(og, meta["o_scale"].unsqueeze(-1), meta["o_min"].unsqueeze(-1)).reshape(o_q.shape)
    s1 = dequantize_minmax(meta["s1_q"], meta["s1_scale"], meta["s1_min"])
    return s1 * (x + _shift(o, _window_rope(rope, ws), ws))


def adjusted_scale(s2: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """Step 6: ``s2' = s2 ‖y‖² / ⟨y, ŷ⟩`` (``s2`` where ``⟨y, ŷ⟩ ≤ 0``), fp16."""
    dot = (y * y_hat).sum(-1, keepdim=True)
    return torch.where(dot > 0, s2 * (y * y).sum(-1, keepdim=True) / dot, s2).half()


def nsn_quantize(x: torch.Tensor, bits: int, rope: Rope | None = None) -> dict[str, torch.Tensor]:
    """Windows ``x`` ``[B, H, W, ws, d]`` -> the stored fields: the metadata of :func:`normalize_shift_normalize`,
    ``idx`` (and ``mask`` at 2 bits) ``[B, H, W, ws, d/8]`` uint8 and ``s2`` = ``s2'`` ``[B, H, W, ws, 1]`` fp16."""
    y, s2, meta = normalize_shift_normalize(x, rope)
    idx, mask, y_hat = vector_quantize(y, bits)  # 5.
    stored = {**meta, "idx": idx.to(torch.uint8), "s2": adjusted_scale(s2, y, y_hat)}
    if mask is not None:
        stored["mask"] = mask.to(torch.uint8)
    return stored


def nsn_dequantize(stored: dict[str, torch.Tensor], bits: int, rope: Rope | None = None) -> torch.Tensor:
    """``x̂_t = ŝ1_t (Tᵀ(s2'_t ŷ_t) + ô)`` ``[B, H, W, ws, d]`` (float32) from :func:`nsn_quantize`'s fields."""
    return inverse_nsn(vector_dequantize(stored["idx"], stored.get("mask"), bits), stored["s2"], stored, rope)


class NSNQuantizer(KVQuantizer):
    """Stores, per window of ``ws`` tokens (axis 2 of the cache counts windows): uint8 indices (and sign masks)
    ``[B, H, W, ws·d/8]``, fp16 ``s2'`` ``[B, H, W, ws]``, packed 4-bit ``s1`` codes ``[B, H, W, ws/8]`` int32 with
    fp16 (scale, minimum) ``[B, H, W, 2]``, packed 4-bit ``o`` codes ``[B, H, W, d/8]`` int32 with fp16 scales and
    minima ``[B, H, W, d/32]`` each. ``pre_rope`` (keys): handed the tokens' RoPE, the mean is taken before it."""

    def __init__(self, bits: int, window: int, pre_rope: bool = False):
        self.bits, self.token_block, self.needs_rope = bits, window, pre_rope

    def quantize(self, x: torch.Tensor, rope: Rope | None = None) -> dict[str, torch.Tensor]:
        b, h, n, d = x.shape
        if d % MEAN_GROUP:
            raise QuantError(f"nsn needs a head_dim divisible by {MEAN_GROUP} (its mean's channel groups); this "
                             f"model's is {d}: use method rtn or kivi")
        f = nsn_quantize(x.reshape(b, h, n // self.token_block, self.token_block, d), self.bits, rope)
        flat = {k: v.reshape(b, h, n // self.token_block, -1) for k, v in f.items()}  # one row per window
        flat["s1_qparams"] = torch.cat([flat.pop("s1_scale"), flat.pop("s1_min")], dim=-1)  # [B, H, W, 2]
        for codes in ("s1_q", "o_q"):
            flat[codes] = pack_codes(flat[codes].to(torch.int32), META_BITS, signed=False)
        return flat

    def dequantize(self, stored: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype,
                   rope: Rope | None = None) -> torch.Tensor:
        b, h, w, _ = stored["s2"].shape
        ws, d = self.token_block, head_dim
        groups = d // MEAN_GROUP
        shaped = {"idx": stored["idx"].reshape(b, h, w, ws, d // SUBVECTOR), "s2": stored["s2"].reshape(b, h, w, ws, 1),
                  "s1_q": unpack_codes(stored["s1_q"], META_BITS, ws, signed=False).reshape(b, h, w, ws, 1),
                  "s1_scale": stored["s1_qparams"][..., :1, None], "s1_min": stored["s1_qparams"][..., 1:, None],
                  "o_q": unpack_codes(stored["o_q"], META_BITS, d, signed=False).reshape(b, h, w, 1, d),
                  "o_scale": stored["o_scale"].reshape(b, h, w, 1, groups),
                  "o_min": stored["o_min"].reshape(b, h, w, 1, groups)}
        if "mask" in stored:
            shaped["mask"] = stored["mask"].reshape(b, h, w, ws, d // SUBVECTOR)
        return nsn_dequantize(shaped, self.bits, rope).reshape(b, h, w * ws, d).to(dtype)

    def bits_per_token_head(self, head_dim: int) -> tuple[float, float, float]:
        """codes: indices (and sign masks); scales: ``s2'``, ``s1`` codes and their (scale, minimum); zeros: the
        mean's codes and their (scale, minimum) — per token, the window's share."""
        ws, d = self.token_block, head_dim
        codes = 8 * (d // SUBVECTOR) * self.bits
        scales = 16 + 32 * packed_width(ws, META_BITS) / ws + 2 * 16 / ws
        means = (32 * packed_width(d, META_BITS) + 2 * 16 * d / MEAN_GROUP) / ws
        return codes, scales, means


@register_kv_method("nsn")
def nsn_quantizers(spec: KVCacheSpec) -> tuple[KVQuantizer, KVQuantizer]:
    return NSNQuantizer(spec.bits, spec.key_group, spec.keys_pre_rope), NSNQuantizer(spec.bits, spec.key_group)
