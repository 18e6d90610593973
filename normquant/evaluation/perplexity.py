"""Perplexity, with one protocol (GPTQ/AWQ/SmoothQuant/QuaRot papers).

The evaluation text (WikiText-2 raw test rows joined with ``"\\n\\n"``) is tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens; the tail is dropped. Every window predicts its ``seqlen - 1``
next tokens; ``ppl = exp(mean NLL over all predicted tokens)``. ``windows=N`` evaluates the first N windows
only and is labelled so in the record. A model quantized with PrefixQuant's ``prefix`` step
(:mod:`normquant.methods.prefixquant`) reads ``[prefix | window]`` with the prefix positions float and predicts
the same ``seqlen - 1`` tokens; the record says how many prefix tokens it had (``prefix_tokens``).

``kv_cache=spec`` (:class:`normquant.quant.kv.KVCacheSpec`; by default the model's own, which a recipe with
``scheme.kv_cache`` or an export carrying one attaches, :func:`normquant.quant.kv.kv_cache_of`) runs every window
through a fresh
:class:`normquant.quant.kv_cache.QuantizedKVCache` (``use_cache=True``): attention reads the keys and values
the quantized cache holds, at every position; a PrefixQuant prefix stays float in it, as its float KV cache.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from normquant.progress import progress_bar
from normquant.quant.kv import KVCacheSpec, head_dim_of, kv_bits_per_element, kv_cache_of
from normquant.quant.kv_cache import QuantizedKVCache
from normquant.quant.prefix import float_prefix, prefix_of, prepend_prefix

from normquant.models.arch import cache_argument
from normquant.data.text import DataError
from normquant.models.streaming import check_materialized


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL per predicted token
    windows: int
    windows_total: int
    seqlen: int
    tokens: int  # predicted tokens
    seconds: float
    tokens_per_s: float
    peak_memory_mb: float
    device: str
    dtype: str
    prefix_tokens: int = 0  # PrefixQuant tokens read before every window (not predicted)
    kv_cache: str | None = None  # KVCacheSpec.short() of the quantized KV cache the windows ran through
    kv_bits_per_element: float | None = None  # stored bits per cached K/V element of one window (exact account)

    def to_dict(self) -> dict:
        return asdict(self)


def cut_windows(input_ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """``[1, n]`` -> ``[n // seqlen, seqlen]`` non-overlapping windows, tail dropped."""
    n = input_ids.numel() // seqlen
    if n == 0:
        raise DataError(f"evaluation text has {input_ids.numel()} tokens, fewer than one window of {seqlen}; "
                        "use a shorter --seqlen or a longer text")
    return input_ids.reshape(-1)[: n * seqlen].reshape(n, seqlen)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
    except ImportError:  # pragma: no cover
        return float("nan")


@torch.no_grad()
def evaluate_perplexity(model, input_ids: torch.Tensor, *, seqlen: int = 2048, windows: int | None = None,
                        batch_size: int = 1, progress: bool = True, kv_cache: KVCacheSpec | None = None
                        ) -> PerplexityResult:
    """Perplexity of ``model`` on ``input_ids`` ``[1, n]`` under the protocol above (through a quantized KV cache
    when ``kv_cache`` is given or the model carries one)."""
    check_materialized(model)
    prefix = prefix_of(model)
    p = 0 if prefix is None else prefix.numel()
    kv_cache = kv_cache if kv_cache is not None else kv_cache_of(model)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and seqlen + p > max_pos:
        raise DataError(f"evaluation seqlen {seqlen}{f' + {p} prefix tokens' if p else ''} exceeds the model's "
                        f"max_position_embeddings {max_pos}; use --seqlen {max_pos - p} or less")
    all_windows = cut_windows(input_ids, seqlen)  # [n_windows, seqlen]
    total = all_windows.shape[0]
    use = all_windows[: min(windows, total)] if windows else all_windows
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    nll_sum, count = 0.0, 0
    cache_key = cache_argument(model)
    start = time.perf_counter()
    bar = progress_bar(total=use.shape[0], desc="perplexity", unit="window", enabled=progress)
    for i in range(0, use.shape[0], batch_size):
        batch = use[i:i + batch_size].to(device)  # [b, seqlen]
        run = ({"use_cache": False} if kv_cache is None else  # a fresh quantized cache per window
               {"use_cache": True, cache_key: QuantizedKVCache.for_model(model, kv_cache, float_prefix=p)})
        if prefix is None:
            logits = model(input_ids=batch, **run).logits  # [b, seqlen, vocab]
        else:  # PrefixQuant: [prefix | window], prefix positions float, the same tokens predicted
            with float_prefix(prefix.numel()):
                logits = model(input_ids=prepend_prefix(prefix, batch), **run).logits[:, prefix.numel():]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                              reduction="sum")
        if not torch.isfinite(nll):
            raise FloatingPointError(f"non-finite loss in window {i}: the model computes NaN/inf logits (a diverged "
                                     "quantization, or a float16 overflow: try --dtype float32)")
        nll_sum += nll.item()
        count += batch[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.3f}")
        bar.update(batch.shape[0])
    bar.close()
    seconds = time.perf_counter() - start
    mean = nll_sum / count
    dtype = next(model.parameters()).dtype
    kv_bits = None if kv_cache is None else kv_bits_per_element(kv_cache, head_dim_of(model.config), seqlen + p,
                                                                torch.finfo(dtype).bits, float_prefix=p).total
    return PerplexityResult(ppl=math.exp(mean), nll=mean, windows=use.shape[0], windows_total=total, seqlen=seqlen,
                            tokens=count, seconds=seconds, tokens_per_s=use.numel() / seconds,
                            peak_memory_mb=_peak_memory_mb(device), device=str(device),
                            dtype=str(dtype).replace("torch.", ""),
                            prefix_tokens=0 if prefix is None else prefix.numel(),
                            kv_cache=None if kv_cache is None else kv_cache.short(),
                            kv_bits_per_element=kv_bits)
