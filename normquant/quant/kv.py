"""KV-cache quantization: the spec, the quantizer interface, per-token-head RTN, packed code storage and the
exact bits-per-element account.

A KV tensor is ``[B, H_kv, T, D]`` (batch, KV heads, tokens, head_dim), as transformers' attention hands it to
the cache. A :class:`KVQuantizer` turns ``n`` tokens of it into stored tensors — packed integer codes and their
quantization parameters — and back; every stored tensor has the tokens (or blocks of ``token_block`` tokens) on
axis 2, so a cache appends by concatenating along that axis (:mod:`normquant.quant.kv_cache`).

Methods are a registry (``method`` name -> key and value quantizers): ``rtn`` here, ``kivi`` in
:mod:`normquant.methods.kivi`, ``nsn`` in :mod:`normquant.methods.nsnquant`; a method module registers itself
with :func:`register_kv_method` and is imported with the steps (:func:`normquant.pipeline.step.discover_steps`).

``rtn`` with ``granularity: token_head`` is the layout of vLLM's per-token-head INT8/INT4 KV caches: one scale
(and zero point when asymmetric) per token per KV head, over its ``head_dim`` values, with compressed-tensors'
dynamic arithmetic (below), so compressed-tensors' args for it (:func:`normquant.export.schema.kv_cache_args`)
describe exactly this cache.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from normquant.quant.hadamard import hadamard_matrix
from normquant.quant.packing import pack_codes, packed_width, unpack_codes
from normquant.quant.primitives import serving_qparams_view
from normquant.quant.spec import QuantSpec

_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class KVCacheSpec(BaseModel):
    """``scheme.kv_cache``: how the KV cache is stored.

    * ``method``: ``rtn`` (uniform, ``granularity`` below), ``kivi`` (KIVI: keys per channel over groups of
      ``group_size`` tokens, values per token, asymmetric) or ``nsn`` (NSNQuant: normalize-shift-normalize,
      Hadamard and 8-dimensional vector quantization per window of ``group_size`` tokens).
    * ``bits``: code width, 2..8 (rtn, kivi); 1 or 2 (nsn).
    * ``granularity`` (rtn): ``token_head``, one scale per token per KV head.
    * ``symmetric`` (rtn): signed grid, zero point 0 (default); ``false``: unsigned grid with an integer zero point
      per token per head. KIVI is asymmetric by construction (a float minimum per group).
    * ``group_size`` (kivi, nsn): tokens sharing a key channel's scale and minimum (KIVI's G, default 32); NSN's
      window ``ws`` (default 64).
    * ``residual``: the most recent tokens kept in the model's float dtype, KIVI's full-precision window R; they are
      quantized once older than that (keys of ``kivi`` by whole groups).
    * ``scale_dtype``: precision of the stored scales / minima.
    * ``rotate_keys``: R3 (METHODS §4.2): keys quantized in the per-head Hadamard basis ``T k`` (after RoPE) and
      read back as ``Tᵀ Q(T k)``; attention then computes ``q · Tᵀ Q(T k) = (T q) · Q(T k)``, QuaRot's rotated
      scores, without an online transform of ``q``. Values are left alone (QuaRot's ``v`` rotation is offline).
    * ``pre_rope`` (nsn): keys normalized and mean-shifted before RoPE, as the paper does (METHODS §3.2; default
      true on a RoPE model): the cache un-rotates the post-RoPE keys it receives, takes the window mean there and
      reads ``ŝ1 (Tᵀ(s2' ŷ) + RoPE_p(ô))`` back. ``false``: the mean of the post-RoPE keys.
    * ``sink``: the first ``sink`` tokens of the cache (after a PrefixQuant prefix) stay in the model's float dtype,
      the attention sinks (NSNQuant's reference ``KV_SINK``, default 0 there and here).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["rtn", "kivi", "nsn"] = "rtn"
    bits: int = Field(ge=1, le=8, strict=True)
    granularity: Literal["token_head"] | None = None
    symmetric: StrictBool | None = None
    group_size: int | None = Field(default=None, gt=0, strict=True)
    residual: int = Field(default=0, ge=0, strict=True)
    scale_dtype: Literal["float16", "float32"] = "float16"
    rotate_keys: StrictBool = False
    pre_rope: StrictBool | None = None
    sink: int = Field(default=0, ge=0, strict=True)

    @model_validator(mode="after")
    def _check(self) -> "KVCacheSpec":
        if self.method == "nsn" and self.bits not in (1, 2):
            raise ValueError(f"nsn quantizes at 1 or 2 bits per element (got bits: {self.bits})")
        if self.method != "nsn" and self.bits < 2:
            raise ValueError(f"{self.method} needs bits 2..8 (1 bit is nsn's)")
        if self.method == "nsn" and (self.granularity is not None or self.symmetric is not None):
            raise ValueError("nsn fixes its own layout (vector quantization per window): remove granularity/symmetric")
        if self.method == "nsn" and self.rotate_keys:
            raise ValueError("nsn applies its own Hadamard to keys (a second one would cancel it): remove rotate_keys")
        if self.method != "nsn" and self.pre_rope is not None:
            raise ValueError(f"pre_rope is nsn's (its window mean of the keys before RoPE); {self.method} quantizes "
                             "the keys attention reads: remove pre_rope")
        if self.method == "kivi":
            if self.granularity is not None:
                raise ValueError("kivi fixes its own layout (keys per channel, values per token): remove granularity")
            if self.symmetric:
                raise ValueError("kivi is asymmetric (a minimum per group): remove symmetric")
        if self.method == "rtn" and self.group_size is not None:
            raise ValueError("group_size is kivi's key group or nsn's window; rtn quantizes per token_head: remove "
                             "group_size")
        return self

    @property
    def key_group(self) -> int:
        """Tokens quantized together in the keys (KIVI's G, NSN's window; 1 for per-token quantizers)."""
        return self.group_size or {"kivi": 32, "nsn": 64}.get(self.method, 1)

    @property
    def keys_pre_rope(self) -> bool:
        """NSN's key transform runs before RoPE (on a model with RoPE)."""
        return self.method == "nsn" and self.pre_rope is not False

    def short(self) -> str:
        """``kv-int4-sym-tokhead-res0``, ``kv-kivi2-g32-res128-rot`` (``rot``: R3), ``kv-nsn1-w64-res0``
        (``-postrope``: nsn with ``pre_rope: false``; ``-sinkN``: ``sink: N``)."""
        layout = {"kivi": f"kivi{self.bits}-g{self.key_group}", "nsn": f"nsn{self.bits}-w{self.key_group}"}.get(
            self.method, f"int{self.bits}-{'asym' if self.symmetric is False else 'sym'}-tokhead")
        tail = "".join(t for t, on in (("-rot", self.rotate_keys), ("-postrope", self.pre_rope is False),
                                       (f"-sink{self.sink}", self.sink > 0)) if on)
        return f"kv-{layout}-res{self.residual}{tail}"


# ---------------------------------------------------------------------------------------------- on the model
KV_ATTR = "normquant_kv_cache"


def kv_cache_of(model: torch.nn.Module) -> KVCacheSpec | None:
    """The KV-cache spec a quantized model runs with (``scheme.kv_cache`` of its recipe; None: a float cache)."""
    return getattr(model, KV_ATTR, None)


def set_kv_cache(model: torch.nn.Module, spec: KVCacheSpec | None) -> None:
    """Attach ``spec`` to ``model``: the evaluator runs its windows through a cache of that spec, and an export
    carries it (``config.json`` ``normquant.kv_cache``)."""
    model.__dict__[KV_ATTR] = spec  # a plain attribute: not a parameter, buffer or submodule


def head_dim_of(config) -> int:
    """Channels per attention head of a transformers config (``head_dim``, else ``hidden_size / heads``)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---------------------------------------------------------------------------------------------- storage
def scale_dtype(spec: KVCacheSpec) -> torch.dtype:
    return _SCALE_DTYPES[spec.scale_dtype]


def stored_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to its storage ``dtype`` (never below that dtype's smallest normal), so codes are computed
    with the scale that will be read back."""
    return scale.to(dtype).clamp_(min=torch.finfo(dtype).tiny)


#: RoPE of the tokens a quantizer handles: ``(cos, sin)`` ``[n, D]`` each, the pure rotation (transformers' half-split
#: layout: ``RoPE_p(x) = x cos + rotate_half(x) sin``), for quantizers with ``needs_rope``
Rope = tuple[torch.Tensor, torch.Tensor]


class KVQuantizer(ABC):
    """Quantizes ``n`` tokens ``[B, H, n, D]`` (``n`` a multiple of ``token_block``) into stored tensors whose axis 2
    counts tokens or token blocks, and dequantizes them back to ``[B, H, n, head_dim]`` in ``dtype``. A quantizer
    with ``needs_rope`` is handed the RoPE of those tokens (``rope``); the others ignore it."""

    token_block: int = 1
    needs_rope: bool = False

    @abstractmethod
    def quantize(self, x: torch.Tensor, rope: Rope | None = None) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def dequantize(self, stored: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype,
                   rope: Rope | None = None) -> torch.Tensor: ...

    @abstractmethod
    def bits_per_token_head(self, head_dim: int) -> tuple[float, float, float]:
        """Stored bits per token per head: ``(codes, scales, zero points or minima)``."""


# ---------------------------------------------------------------------------------------------- float-minimum grid
# KIVI's asymmetric quantizer (also NSNQuant's for its norms and means): a float minimum instead of an integer
# zero point, m = min x, s = (max x - m) / (2^b - 1), q = clamp(round((x - m) / s), 0, 2^b - 1), x̂ = q·s + m.
def minmax_qparams(x: torch.Tensor, bits: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Float-minimum parameters over ``dim`` (kept): ``s = (max - min) / (2^b - 1)`` and ``m = min``, in the storage
    ``dtype`` (``s`` computed from the stored ``m``)."""
    m = x.amin(dim=dim, keepdim=True).to(dtype)
    s = stored_scale((x.amax(dim=dim, keepdim=True) - m.to(x.dtype)) / (2**bits - 1), dtype)
    return s, m


def quantize_minmax(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """``q = clamp(round((x - m) / s), 0, 2^b - 1)`` (integer values, float32)."""
    return torch.clamp(torch.round((x.float() - m.float()) / s.float()), 0, 2**bits - 1)


def dequantize_minmax(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x̂ = q·s + m`` (float32)."""
    return q * s.float() + m.float()


# ---------------------------------------------------------------------------------------------- rtn per token-head
# compressed-tensors' dynamic activation arithmetic (normquant.quant.primitives, "serving" functions) per token-head:
# the computation compressed-tensors applies for a kv_cache_scheme with the ``group`` strategy and
# ``group_size = head_dim`` (normquant.export.schema.kv_cache_args), on the signed grid [-2^(b-1), 2^(b-1)-1]:
#   symmetric  s = absmax / ((2^b - 1) / 2),   z = 0
#   asymmetric s = (max - min) / (2^b - 1),    z = round(clamp(-2^(b-1) - min / s))      (the range holds 0)
#   q = round(clamp(x / s + z)),  x̂ = s (q - z)      (in x's dtype; z added before rounding)
def signed_grid(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def token_head_qparams(x: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Qparams of every token-head: ``x`` ``[B, H, n, D]`` -> scale ``[B, H, n, 1]`` (stored ``dtype``) and signed
    integer zero point ``[B, H, n, 1]`` (0 when symmetric), computed in ``x``'s dtype."""
    scale, zero = serving_qparams_view(x.reshape(-1, x.shape[-1]), spec)  # [B*H*n, 1]
    if dtype != x.dtype:  # a narrower stored scale: the zero point that keeps the minimum on its grid
        scale = stored_scale(scale, dtype).to(x.dtype)
        if not spec.symmetric:
            lo = torch.clamp(x.reshape(-1, x.shape[-1]).amin(dim=1, keepdim=True), max=0)
            qmin, qmax = signed_grid(spec.bits)
            zero = torch.round(torch.clamp(qmin - lo / scale, qmin, qmax))
    return scale.to(dtype).reshape(*x.shape[:-1], 1), zero.reshape(*x.shape[:-1], 1)


def quantize_token_head(x: torch.Tensor, spec: QuantSpec, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` ``[B, H, n, D]`` -> signed codes ``[B, H, n, D]`` (integer values in ``x``'s dtype), scale, zero
    ``[B, H, n, 1]``: ``q = round(clamp(x/s + z, -2^(b-1), 2^(b-1)-1))``."""
    scale, zero = token_head_qparams(x, spec, dtype)
    v = torch.div(x, scale.to(x.dtype))
    if not spec.symmetric:
        v.add_(zero)
    return v.clamp_(*signed_grid(spec.bits)).round_(), scale, zero


def dequantize_token_head(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    """``x̂ = s (q - z)`` ``[B, H, n, D]`` in ``dtype``."""
    return (codes.to(dtype) - zero.to(dtype)).mul_(scale.to(dtype))


class TokenHeadRTN(KVQuantizer):
    """Per-token-head RTN: packed signed codes ``[B, H, n, W]`` int32, scale ``[B, H, n, 1]`` in ``scale_dtype``,
    and for an asymmetric grid a signed zero point ``[B, H, n, 1]`` int8."""

    def __init__(self, bits: int, symmetric: bool, dtype: torch.dtype):
        self.spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="token", dynamic=True)
        self.dtype = dtype

    def quantize(self, x: torch.Tensor, rope: Rope | None = None) -> dict[str, torch.Tensor]:
        codes, scale, zero = quantize_token_head(x, self.spec, self.dtype)
        stored = {"codes": pack_codes(codes.to(torch.int32), self.spec.bits, signed=True), "scale": scale}
        if not self.spec.symmetric:
            stored["zero"] = zero.to(torch.int8)
        return stored

    def dequantize(self, stored: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype,
                   rope: Rope | None = None) -> torch.Tensor:
        codes = unpack_codes(stored["codes"], self.spec.bits, head_dim, signed=True)
        zero = stored["zero"] if "zero" in stored else torch.zeros_like(stored["scale"])
        return dequantize_token_head(codes, stored["scale"], zero, dtype)

    def bits_per_token_head(self, head_dim: int) -> tuple[float, float, float]:
        scale_bits = torch.finfo(self.dtype).bits
        return 32 * packed_width(head_dim, self.spec.bits), scale_bits, 0 if self.spec.symmetric else 8


# ---------------------------------------------------------------------------------------------- R3
@functools.lru_cache(maxsize=8)
def head_hadamard(n: int, device: torch.device) -> torch.Tensor:
    """The per-head Hadamard ``T [n, n]`` (float32, orthogonal) of :func:`normquant.quant.hadamard.hadamard_matrix`;
    ``y = x Tᵀ`` rotates rows, ``x = y T`` rotates them back."""
    return hadamard_matrix(n, torch.float32).to(device)


class HadamardRotated(KVQuantizer):
    """``inner`` applied to ``T x`` (``T`` the per-head Hadamard of :mod:`normquant.quant.hadamard`, orthogonal),
    dequantized back through ``Tᵀ``; stores exactly what ``inner`` stores."""

    def __init__(self, inner: KVQuantizer):
        self.inner, self.token_block = inner, inner.token_block

    def quantize(self, x: torch.Tensor, rope: Rope | None = None) -> dict[str, torch.Tensor]:
        t = head_hadamard(x.shape[-1], x.device)
        return self.inner.quantize(x.float() @ t.t())  # y_t = T x_t

    def dequantize(self, stored: dict[str, torch.Tensor], head_dim: int, dtype: torch.dtype,
                   rope: Rope | None = None) -> torch.Tensor:
        t = head_hadamard(head_dim, next(iter(stored.values())).device)
        return (self.inner.dequantize(stored, head_dim, torch.float32) @ t).to(dtype)  # x̂_t = Tᵀ ŷ_t

    def bits_per_token_head(self, head_dim: int) -> tuple[float, float, float]:
        return self.inner.bits_per_token_head(head_dim)


# ---------------------------------------------------------------------------------------------- registry
#: method name -> (spec -> (key quantizer, value quantizer))
KV_METHODS: dict[str, Callable[[KVCacheSpec], tuple[KVQuantizer, KVQuantizer]]] = {}


def register_kv_method(name: str):
    def register(build: Callable[[KVCacheSpec], tuple[KVQuantizer, KVQuantizer]]):
        KV_METHODS[name] = build
        return build
    return register


@register_kv_method("rtn")
def _rtn(spec: KVCacheSpec) -> tuple[KVQuantizer, KVQuantizer]:
    symmetric = spec.symmetric is not False
    return TokenHeadRTN(spec.bits, symmetric, scale_dtype(spec)), TokenHeadRTN(spec.bits, symmetric, scale_dtype(spec))


def kv_quantizers(spec: KVCacheSpec) -> tuple[KVQuantizer, KVQuantizer]:
    """The key and value quantizers of ``spec`` (method modules are imported with the steps on first use)."""
    if spec.method not in KV_METHODS:
        from normquant.pipeline.step import discover_steps

        discover_steps()
    keys, values = KV_METHODS[spec.method](spec)
    return (HadamardRotated(keys) if spec.rotate_keys else keys), values


# ---------------------------------------------------------------------------------------------- accounting
@dataclass(frozen=True)
class KVBits:
    """Stored bits per cached K/V element (keys and values together), by kind; ``zeros``: zero points, minima, or
    NSN's window means."""

    codes: float
    scales: float
    zeros: float
    residual: float  # float tokens (residual window, float prefix)

    @property
    def total(self) -> float:
        return self.codes + self.scales + self.zeros + self.residual


def quantized_tokens(seqlen: int, residual: int, token_block: int, float_prefix: int = 0) -> int:
    """Tokens of a ``seqlen`` cache held quantized: all but the ``float_prefix`` first (prefix and sink tokens) and
    at least the ``residual`` most recent, in whole blocks of ``token_block``."""
    return max(0, seqlen - float_prefix - residual) // token_block * token_block


def kv_bits_per_element(spec: KVCacheSpec, head_dim: int, seqlen: int, float_bits: int = 16,
                        float_prefix: int = 0) -> KVBits:
    """Exact stored bits per K/V element of a cache of ``seqlen`` tokens (per layer and head; keys and values
    averaged), float tokens counted at ``float_bits`` (the model's dtype); ``float_prefix``: PrefixQuant's prefixed
    tokens (``spec.sink`` tokens more stay float). :meth:`QuantizedKVCache.nbytes` holds this many bits for every
    element (tested)."""
    parts = [0.0, 0.0, 0.0, 0.0]
    for quantizer in kv_quantizers(spec):
        n_q = quantized_tokens(seqlen, spec.residual, quantizer.token_block, float_prefix + spec.sink)
        for i, bits in enumerate(quantizer.bits_per_token_head(head_dim)):
            parts[i] += n_q * bits
        parts[3] += (seqlen - n_q) * head_dim * float_bits
    elements = 2 * seqlen * head_dim
    return KVBits(*(p / elements for p in parts))
