"""A transformers :class:`~transformers.Cache` that stores keys and values quantized (:mod:`normquant.quant.kv`).

Per layer, keys and values are each a :class:`QuantizedKVStream`: a float prefix (``float_prefix`` first tokens,
PrefixQuant's prefixed tokens), the quantized tokens (packed integer codes and their scales, concatenated along
the token axis; never their float values) and a float residual window (the ``residual`` most recent tokens, and
up to ``token_block - 1`` more until a whole block can be quantized). ``update`` appends the new tokens, moves
what has left the window into quantized storage, and returns the full ``[B, H_kv, T, D]`` keys and values as
attention reads them: float prefix, dequantized tokens, float window.

NSN's pre-RoPE keys (``pre_rope``) need the RoPE of the tokens they quantize: the cache takes the model's rotary
embedding (``rotary``) and hands each key quantizer that ``needs_rope`` the cos/sin of its tokens' positions,
which are their indices in the cache (checked against the ``position_ids`` attention passes, where it does). The
cos/sin table is a model constant, computed once per cache and not counted in :meth:`QuantizedKVCache.nbytes`.

Prefill and decode share this path, so ``model(ids, past_key_values=cache, use_cache=True)`` attends to quantized
keys and values at every position (the quantized cache a token-by-token decode would have built, for per-token
quantizers; KIVI's key groups are quantized as soon as they are whole), and ``model.generate(...,
past_key_values=cache)`` decodes through it.

>>> cache = QuantizedKVCache(model.config, KVCacheSpec(method="rtn", bits=8))   # doctest: +SKIP
>>> model.generate(ids, past_key_values=cache, max_new_tokens=32)                # doctest: +SKIP
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from normquant.models.arch import rotary_embedding
from normquant.quant.kv import KVCacheSpec, KVQuantizer, Rope, kv_quantizers
from normquant.quant.primitives import QuantError


class RopeTable:
    """``(cos, sin)`` ``[n, D]`` of positions ``first .. first+n-1`` from a model's rotary embedding, as a pure
    rotation (its ``attention_scaling`` divided out); computed once and grown on demand, shared by the layers."""

    def __init__(self, rotary: torch.nn.Module):
        self.rotary = rotary
        self.cos = self.sin = None

    def __call__(self, first: int, n: int, device: torch.device) -> Rope:
        if self.cos is None or self.cos.shape[0] < first + n:
            size = max(first + n, 2 * (0 if self.cos is None else self.cos.shape[0]))
            probe = torch.ones(1, dtype=torch.float32, device=device)  # the rotary reads its dtype and device
            cos, sin = self.rotary(probe, torch.arange(size, device=device)[None])  # [1, size, D]
            a = float(getattr(self.rotary, "attention_scaling", 1.0))
            self.cos, self.sin = cos[0].float() / a, sin[0].float() / a
        return self.cos[first:first + n].to(device), self.sin[first:first + n].to(device)


class QuantizedKVStream:
    """One of a layer's keys or values: float prefix, quantized tokens, float residual window."""

    def __init__(self, quantizer: KVQuantizer, residual: int, float_prefix: int, rope: RopeTable | None = None):
        self.quantizer, self.residual, self.float_prefix = quantizer, residual, float_prefix
        self.rope = rope if quantizer.needs_rope else None
        self.prefix: torch.Tensor | None = None  # [B, H, <=P, D] float
        self.stored: dict[str, torch.Tensor] = {}  # axis 2: tokens or token blocks
        self.window: torch.Tensor | None = None  # [B, H, r, D] float
        self.quantized_tokens = 0

    @property
    def length(self) -> int:
        return sum(t.shape[2] for t in (self.prefix, self.window) if t is not None) + self.quantized_tokens

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Store ``x`` ``[B, H, n, D]``; return the whole stream ``[B, H, T, D]`` as attention reads it."""
        if self.prefix is None:
            self.prefix, self.window = x[:, :, :0].clone(), x[:, :, :0].clone()
        take = min(self.float_prefix - self.prefix.shape[2], x.shape[2])
        if take > 0:
            self.prefix = torch.cat([self.prefix, x[:, :, :take]], dim=2)
            x = x[:, :, take:]
        window = torch.cat([self.window, x], dim=2)
        n = max(0, window.shape[2] - self.residual) // self.quantizer.token_block * self.quantizer.token_block
        if n:
            new = self.quantizer.quantize(window[:, :, :n], rope=self._rope(self.quantized_tokens, n, x.device))
            self.stored = {k: torch.cat([self.stored[k], v], dim=2) if self.stored else v for k, v in new.items()}
            self.quantized_tokens += n
        self.window = window[:, :, n:].clone()  # a copy: never a view keeping the quantized tokens' floats alive
        parts = [self.prefix, self.dequantized(), self.window]
        return torch.cat([p for p in parts if p is not None], dim=2)

    def _rope(self, start: int, n: int, device: torch.device) -> Rope | None:
        """The RoPE of quantized tokens ``start .. start+n-1`` (they follow the float prefix), if the quantizer
        takes it."""
        return None if self.rope is None else self.rope(self.prefix.shape[2] + start, n, device)

    def dequantized(self) -> torch.Tensor | None:
        if not self.stored:
            return None
        rope = self._rope(0, self.quantized_tokens, self.window.device)
        return self.quantizer.dequantize(self.stored, self.window.shape[-1], self.window.dtype, rope=rope)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.prefix, self.window) if t is not None] + list(self.stored.values())

    def apply(self, fn) -> None:
        """Replace every held tensor ``t`` by ``fn(t)`` (batch reordering / selection along axis 0)."""
        self.prefix = None if self.prefix is None else fn(self.prefix)
        self.window = None if self.window is None else fn(self.window)
        self.stored = {k: fn(v) for k, v in self.stored.items()}


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's quantized cache (the transformers layer interface)."""

    is_croppable = False

    def __init__(self, spec: KVCacheSpec, float_prefix: int = 0, rope: RopeTable | None = None):
        super().__init__()
        self.spec, self.float_prefix, self.rope = spec, float_prefix + spec.sink, rope
        self.reset()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.key.rope is not None:
            self._check_positions(kwargs.get("kwargs", kwargs).get("position_ids"), key_states.shape[2])
        return self.key.append(key_states), self.value.append(value_states)

    def _check_positions(self, position_ids: torch.Tensor | None, n: int) -> None:
        """RoPE'd quantizers take a token's cache index as its position: refuse anything else (left padding)."""
        if position_ids is None:
            return
        start = self.key.length
        expected = torch.arange(start, start + n, device=position_ids.device)
        if not bool((position_ids == expected).all()):
            raise QuantError(f"nsn's pre-RoPE keys take each token's index in the cache as its position; attention "
                             f"passed positions {position_ids[0, :4].tolist()}... for cache indices {start}.. (left "
                             f"padding?): batch prompts without padding, or use pre_rope: false")

    def get_seq_length(self) -> int:
        return self.key.length

    def reset(self) -> None:
        key_quantizer, value_quantizer = kv_quantizers(self.spec)
        self.key = QuantizedKVStream(key_quantizer, self.spec.residual, self.float_prefix, self.rope)
        self.value = QuantizedKVStream(value_quantizer, self.spec.residual, self.float_prefix, self.rope)
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise QuantError("a quantized KV cache cannot be cropped (assisted or speculative decoding): its quantized "
                         "tokens cannot be un-quantized; use a float cache for that")

    def _apply(self, fn) -> None:
        self.key.apply(fn)
        self.value.apply(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def offload(self):
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized:
            self._apply(lambda t: t.to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.key.tensors() + self.value.tensors())


class QuantizedKVCache(Cache):
    """The KV cache of a model whose attention layers are all full attention, stored as ``spec`` says; the first
    ``float_prefix`` tokens stay float (PrefixQuant's prefix), and ``spec.sink`` more. ``rotary``: the model's
    rotary embedding (:func:`normquant.models.arch.rotary_embedding`), needed by NSN's pre-RoPE keys.

    >>> QuantizedKVCache.for_model(model, spec)   # doctest: +SKIP
    """

    def __init__(self, config, spec: KVCacheSpec, float_prefix: int = 0, rotary: torch.nn.Module | None = None):
        config = config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(config)
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise QuantError(f"a quantized KV cache is built for full-attention layers; this model also has "
                             f"{', '.join(other)} layers")
        if spec.keys_pre_rope and rotary is None and getattr(config, "rope_parameters", None) is not None:
            raise QuantError("nsn's pre-RoPE keys need the model's rotary embedding: QuantizedKVCache(config, spec, "
                             "rotary=rotary_embedding(model)), or set pre_rope: false")
        rope = None if rotary is None else RopeTable(rotary)
        super().__init__(layers=[QuantizedKVLayer(spec, float_prefix, rope) for _ in layer_types])
        self.spec = spec

    @classmethod
    def for_model(cls, model: torch.nn.Module, spec: KVCacheSpec, float_prefix: int = 0) -> "QuantizedKVCache":
        """The cache for ``model``: its config and its rotary embedding."""
        return cls(model.config, spec, float_prefix, rotary=rotary_embedding(model))

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (codes, scales, zero points/minima, float tokens)."""
        return sum(layer.nbytes() for layer in self.layers)
