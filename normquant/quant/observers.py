"""Per-channel activation statistics and the hook context manager that feeds them.

An :class:`Observer` sees activations ``[..., C]`` (any leading shape; the last axis is the channel) through
``update(x)``, returns its statistics as a dict of tensors from ``compute()`` and forgets them on ``reset()``.
Observers are registered by name (:data:`OBSERVERS`, :func:`make_observer`).

``observe_modules`` attaches observers to modules' inputs or outputs with forward hooks and always removes
the hooks, even when the forward pass raises.

>>> import torch
>>> norm = torch.nn.LayerNorm(8)
>>> with observe_modules(norm, {"": make_observer("minmax")}, where="output") as obs:
...     _ = norm(torch.randn(4, 3, 8))
>>> obs[""][0].compute()["max"].shape
torch.Size([8])
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from normquant.quant.primitives import check_finite


class Observer(Protocol):
    def update(self, x: torch.Tensor) -> None: ...

    def compute(self) -> dict[str, torch.Tensor]: ...

    def reset(self) -> None: ...


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """``[..., C] -> [N, C]``, detached, after a finiteness check."""
    x = x.detach()
    check_finite(x, f"input of the '{name}' observer")
    return x.reshape(-1, x.shape[-1])


def _need_data(seen: bool, name: str) -> None:
    if not seen:
        raise ValueError(f"the '{name}' observer saw no data; run calibration batches through the observed module first")


class MinMaxObserver:
    """Per-channel ``min``, ``max`` and ``absmax`` (each ``[C]``, the input's dtype)."""

    name = "minmax"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = _rows(x, self.name)
        lo, hi = x.amin(dim=0), x.amax(dim=0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def compute(self) -> dict[str, torch.Tensor]:
        _need_data(self.min is not None, self.name)
        return {"min": self.min, "max": self.max, "absmax": torch.maximum(self.min.abs(), self.max.abs())}


class AbsMaxObserver:
    """Per-channel ``absmax`` ``[C]`` (SmoothQuant's statistic)."""

    name = "absmax"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.absmax: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        a = _rows(x, self.name).abs().amax(dim=0)
        self.absmax = a if self.absmax is None else torch.maximum(self.absmax, a)

    def compute(self) -> dict[str, torch.Tensor]:
        _need_data(self.absmax is not None, self.name)
        return {"absmax": self.absmax}


class MomentsObserver:
    """Per-channel ``mean``, ``var`` (population), ``second_moment`` ``[C]`` and ``count``, from float64 sums."""

    name = "moments"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = _rows(x, self.name).double()
        s, sq = x.sum(dim=0), (x * x).sum(dim=0)
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.count += x.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        _need_data(self.count > 0, self.name)
        mean, second = self.sum / self.count, self.sum_sq / self.count
        return {"mean": mean, "var": (second - mean * mean).clamp(min=0), "second_moment": second,
                "count": torch.tensor(self.count)}


class ReservoirObserver:
    """A uniform sample of at most ``size`` rows (tokens), kept with bounded memory; per-channel quantiles.

    Bottom-k sampling: every row gets a random key from a seeded generator and the ``size`` rows with the
    smallest keys are kept, which is a uniform sample without replacement of all rows seen. All channels
    share the sampled rows. ``compute()`` gives ``sample`` ``[k, C]`` (feed it to
    :func:`normquant.methods.repquant.percentile_init`) and ``quantiles`` ``[len(q), C]``.
    """

    name = "percentile"

    def __init__(self, size: int = 4096, q: Sequence[float] = (0.001, 0.999), seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"reservoir size must be positive, got {size}")
        self.size, self.q, self.seed = size, tuple(q), seed
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self.sample: torch.Tensor | None = None  # [k, C]
        self.keys: torch.Tensor | None = None  # [k]

    def update(self, x: torch.Tensor) -> None:
        x = _rows(x, self.name)
        keys = torch.rand(x.shape[0], generator=self.generator).to(x.device)
        if self.sample is not None:
            x, keys = torch.cat([self.sample, x]), torch.cat([self.keys, keys])
        if x.shape[0] > self.size:
            keep = torch.topk(keys, self.size, largest=False).indices
            x, keys = x[keep], keys[keep]
        self.sample, self.keys = x, keys

    def compute(self) -> dict[str, torch.Tensor]:
        _need_data(self.sample is not None, self.name)
        q = torch.tensor(self.q, dtype=torch.float64)
        return {"sample": self.sample, "quantiles": torch.quantile(self.sample.double(), q, dim=0).to(self.sample.dtype)}


class OutlierObserver:
    """Per-channel count of entries with ``|x| > threshold`` (``counts`` ``[C]``) and the row ``count``.

    The default threshold 6.0 is LLM.int8()'s outlier magnitude.
    """

    name = "outliers"

    def __init__(self, threshold: float = 6.0) -> None:
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.counts: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = _rows(x, self.name)
        c = (x.abs() > self.threshold).sum(dim=0)
        self.counts = c if self.counts is None else self.counts + c
        self.count += x.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        _need_data(self.counts is not None, self.name)
        return {"counts": self.counts, "count": torch.tensor(self.count)}


OBSERVERS: dict[str, Callable[..., Observer]] = {
    cls.name: cls for cls in (MinMaxObserver, AbsMaxObserver, MomentsObserver, ReservoirObserver, OutlierObserver)
}


def make_observer(name: str, **kwargs) -> Observer:
    """Build a registered observer: ``make_observer("percentile", size=2048)``."""
    try:
        return OBSERVERS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown observer '{name}'; registered: {', '.join(sorted(OBSERVERS))}") from None


@contextlib.contextmanager
def observe_modules(model: nn.Module, observers: Mapping[str, Observer | Sequence[Observer]],
                    where: str = "input") -> Iterator[dict[str, list[Observer]]]:
    """Feed each named module's first input (``where="input"``) or output (``"output"``) to its observers.

    ``observers`` maps module paths (as in ``model.named_modules()``) to one observer or a list. Yields the
    same mapping with every value as a list. The hooks are removed on exit, also when the body raises.
    """
    if where not in ("input", "output"):
        raise ValueError(f"where must be 'input' or 'output', got '{where}'")
    as_lists = {name: list(obs) if isinstance(obs, (list, tuple)) else [obs] for name, obs in observers.items()}
    handles = []
    try:
        for name, obs in as_lists.items():
            module = model.get_submodule(name)
            if where == "input":
                handles.append(module.register_forward_pre_hook(_feeder(obs, lambda args, out: args[0])))
            else:
                handles.append(module.register_forward_hook(_feeder(obs, lambda args, out: out)))
        yield as_lists
    finally:
        for h in handles:
            h.remove()


def _feeder(observers: list[Observer], pick: Callable) -> Callable:
    def hook(module, args, output=None):
        x = pick(args, output)
        x = x[0] if isinstance(x, (tuple, list)) else x
        for obs in observers:
            obs.update(x)

    return hook
