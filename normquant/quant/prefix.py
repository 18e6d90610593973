"""Prefixed tokens whose activations stay float (the mechanism of :mod:`normquant.methods.prefixquant`).

A model quantized with a ``prefix`` step carries the token ids ``[P]`` as the buffer ``normquant_prefix``.
Whoever runs it on text (calibration, perplexity) prepends them with :func:`prepend_prefix` and runs the
forward pass inside :func:`float_prefix`, where every activation quantizer passes the first ``P`` positions of
its ``[B, T, C]`` input unchanged (not observed, not quantized) — what a KV cache of the prefix computed once
with float activations gives the following tokens.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import nn

PREFIX_BUFFER = "normquant_prefix"
_LENGTH = contextvars.ContextVar("normquant_float_prefix", default=0)


def float_prefix_length() -> int:
    """Positions the activation quantizers leave float now (0 outside :func:`float_prefix`)."""
    return _LENGTH.get()


@contextlib.contextmanager
def float_prefix(length: int) -> Iterator[None]:
    """Inside this block the first ``length`` positions of every activation quantizer's input stay float."""
    token = _LENGTH.set(length)
    try:
        yield
    finally:
        _LENGTH.reset(token)


def prefix_of(model: nn.Module) -> torch.Tensor | None:
    """The model's prefix token ids ``[P]`` (``None`` when it has none)."""
    return getattr(model, PREFIX_BUFFER, None)


def prepend_prefix(prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[N, L] -> [N, P + L]``: the prefix ``[P]`` in front of every row."""
    return torch.cat([prefix.to(ids.device).expand(ids.shape[0], -1), ids], dim=1)


def set_prefix(model: nn.Module, ids: list[int]) -> None:
    """Store ``ids`` as the model's prefix: a non-persistent buffer, so it follows ``.to(device)`` and stays out
    of the state dict. Ids outside the vocabulary raise ``ValueError`` (one line)."""
    emb = model.get_input_embeddings().weight
    if not ids or any(not 0 <= i < emb.shape[0] for i in ids):
        raise ValueError(f"prefix token ids must lie in [0, {emb.shape[0]}); got {ids}")
    model.register_buffer(PREFIX_BUFFER, torch.tensor(ids, dtype=torch.long, device=emb.device), persistent=False)
