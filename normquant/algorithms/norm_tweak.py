"""Norm Tweaking (Li et al., AAAI 2024; METHODS.md §2): after the weights of a block are quantized, tune only
its normalization parameters so that the quantized block's output matches the float block's, channel by channel.

The math is here, as pure functions; the recipe step ``norm_tweak`` (:class:`normquant.steps.NormTweak`) wires
it into the sequential block runner.

* :func:`l_dist` (and the alternatives ``mse``, ``mean_std_mse``, in :data:`LOSSES`): the loss between the float
  block's outputs ``f_out`` and the quantized block's outputs ``q_out``, both ``[..., C]``.
* :func:`layer_lr`: the per-block learning rate ``lr0 · (1 + κ·l/L)``.
* :func:`tweak_block`: Adam on the norm parameters only (LayerNorm γ, β; RMSNorm γ; Gemma's ``w`` in γ = 1 + w).
* :func:`select_norm_tweak_lr`: the (lr0, κ) grid search scored by perplexity on held-out calibration text,
  with :func:`heldout_ids` to cut that text so it never overlaps the calibration segments.

>>> import torch
>>> f, q = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
>>> float(l_dist(f, f))
0.0
>>> round(layer_lr(1e-5, kappa=1.0, l=3, L=4), 12)  # lr0 · (1 + 1·3/4)
1.75e-05
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- losses
def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and *biased* variance over all tokens and the batch: ``[..., C]`` -> (``[C]``, ``[C]``)."""
    xt = x.reshape(-1, x.shape[-1])  # [..., C] -> [T, C]
    return xt.mean(dim=0), xt.var(dim=0, unbiased=False)


def l_dist(f_out: torch.Tensor, q_out: torch.Tensor) -> torch.Tensor:
    """Channel-wise distribution distance (METHODS.md §2.3), a scalar:

    ``L_dist = (1/C) · Σ_c ( |μ_f^c − μ_q^c| + |σ_f^c² − σ_q^c²| )``

    with ``μ^c`` / ``σ^c²`` the mean / biased variance of channel ``c`` over all tokens and the batch of the
    given tensors ``[..., C]`` (the paper's ``‖·‖₂`` of a scalar is ``|·|``).
    """
    _check_pair(f_out, q_out)
    mu_f, var_f = channel_stats(f_out)
    mu_q, var_q = channel_stats(q_out)
    return ((mu_f - mu_q).abs() + (var_f - var_q).abs()).mean()


def mse(f_out: torch.Tensor, q_out: torch.Tensor) -> torch.Tensor:
    """Element-wise mean squared error of the block outputs (llmc's NormTweaking loss [C3])."""
    _check_pair(f_out, q_out)
    return F.mse_loss(q_out, f_out)


def mean_std_mse(f_out: torch.Tensor, q_out: torch.Tensor) -> torch.Tensor:
    """``Σ_c (μ_f^c − μ_q^c)² + Σ_c (σ_f^c − σ_q^c)²``, biased σ (from a public script of unknown provenance [C3])."""
    _check_pair(f_out, q_out)
    mu_f, var_f = channel_stats(f_out)
    mu_q, var_q = channel_stats(q_out)
    tiny = torch.finfo(var_q.dtype).tiny  # keeps d√v/dv finite for a constant channel
    return ((mu_f - mu_q) ** 2).sum() + ((var_f + tiny).sqrt() - (var_q + tiny).sqrt()).pow(2).sum()


LOSSES: dict[str, LossFn] = {"l_dist": l_dist, "mse": mse, "mean_std_mse": mean_std_mse}


def get_loss(loss: str | LossFn) -> LossFn:
    """A loss by name (a key of :data:`LOSSES`) or the callable itself."""
    if callable(loss):
        return loss
    try:
        return LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown loss '{loss}' for norm tweaking; available: {', '.join(sorted(LOSSES))}") from None


def _check_pair(f_out: torch.Tensor, q_out: torch.Tensor) -> None:
    if f_out.shape != q_out.shape:
        raise ValueError(f"float and quantized outputs differ in shape: {tuple(f_out.shape)} vs {tuple(q_out.shape)}")


# ---------------------------------------------------------------------------------------------- schedule
def layer_lr(lr0: float, kappa: float, l: int, L: int) -> float:
    """Learning rate of block ``l`` (0-based) of ``L``: ``lr0 · (1 + κ·l/L)``, growing with depth (METHODS.md §2.4).

    [UNVERIFIED] schedule: the form of two third-party implementations (smpanaro ``lr_scale``, llmc ``gamma``);
    like smpanaro, ``l`` counts from 0, so block 0 gets ``lr0`` and the last block ``lr0·(1 + κ(L−1)/L)``.
    """
    if L <= 0 or not 0 <= l < L:
        raise ValueError(f"block index {l} out of range for {L} blocks")
    return lr0 * (1.0 + kappa * l / L)


# ---------------------------------------------------------------------------------------------- norms
def is_norm(module: nn.Module) -> bool:
    """A normalization module: ``nn.LayerNorm`` or any class whose name contains "Norm" (HF ``*RMSNorm``)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def find_norms(block: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The normalization modules of ``block`` that have parameters, by block-relative name.

    ``names=None`` finds every norm in the block (LLaMA: ``input_layernorm``, ``post_attention_layernorm``;
    Qwen3 also ``self_attn.q_norm``/``k_norm``; Gemma2 also its post-norms); otherwise exactly the given ones.
    """
    if names is None:
        found = {n: m for n, m in block.named_modules() if n and is_norm(m)}
    else:
        found = {n: block.get_submodule(n) for n in names}
    return {n: m for n, m in found.items() if any(True for _ in m.parameters(recurse=False))}


# ---------------------------------------------------------------------------------------------- forward
# ---------------------------------------------------------------------------------------------- tweak
@dataclass
class TweakResult:
    """What :func:`tweak_block` did: the loss of every optimizer step, in order, and the epoch means."""

    lr: float
    steps: int
    params: int  # trainable scalars (γ, β entries)
    losses: list[float] = field(default_factory=list)
    epoch_means: list[float] = field(default_factory=list)


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Parameters without repeats (by identity: tensors must not be compared with ``==``)."""
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tweak_block(block_forward: Callable[[torch.Tensor], torch.Tensor], norms: Sequence[nn.Module] | dict,
                inputs: torch.Tensor, targets: torch.Tensor, *, loss: str | LossFn = "l_dist", lr: float,
                epochs: int = 1, batch_size: int = 1, block: nn.Module | None = None) -> TweakResult:
    """Tune the parameters of ``norms`` with Adam so that ``block_forward(inputs)`` matches ``targets``.

    ``block_forward``: ``[b, L, C] -> [b, L, C]``, the *quantized* block (its weights already fake-quantized;
    activation fake-quant may be on: its rounding is straight-through, so gradients reach the norms).
    ``inputs``: ``[N, L, C]`` quantized-path inputs; ``targets``: ``[N, L, C]`` the *float* block's outputs on
    the same inputs (any device; batches are moved to the output's device).

    Per epoch the samples are visited in order, ``batch_size`` per Adam step (the paper: 1 sample per step,
    1 epoch) — [NQ] no shuffling. Only the norm parameters get gradients: every parameter of ``block`` (when
    given) is frozen during the loop, and all ``requires_grad`` flags are restored afterwards. Half-precision
    norm parameters are optimized through float32 master copies (a 1e-5 step is below bf16's resolution
    around γ≈1) and cast back after every step. The loss is computed in float32 (float64 for float64 models).
    """
    loss_fn = get_loss(loss)
    norm_list = list(norms.values()) if isinstance(norms, dict) else list(norms)
    params = _unique(p for m in norm_list for p in m.parameters(recurse=False))
    if not params:
        raise ValueError("norm tweaking found no norm parameters to tune (weightless norms, e.g. after a "
                         "rotation's γ-fusion: re-insert a per-channel γ̃ = 1 first, METHODS.md §2.7)")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
    everything = _unique([*(block.parameters() if block is not None else ()), *params])
    saved = [(p, p.requires_grad) for p in everything]
    masters = [p.detach().to(_master_dtype(p.dtype)).clone().requires_grad_(True) for p in params]
    result = TweakResult(lr=lr, steps=0, params=sum(p.numel() for p in params))
    try:
        for p in everything:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(masters, lr=lr)
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            for _ in range(epochs):
                epoch = [_adam_step(block_forward, loss_fn, opt, params, masters, inputs[i:i + batch_size],
                                    targets[i:i + batch_size]) for i in range(0, inputs.shape[0], batch_size)]
                result.losses += epoch
                result.steps += len(epoch)
                result.epoch_means.append(sum(epoch) / len(epoch))
    finally:
        for p in params:
            p.grad = None
        for p, flag in saved:
            p.requires_grad_(flag)
    return result


def _adam_step(block_forward, loss_fn: LossFn, opt: torch.optim.Optimizer, params: list[nn.Parameter],
               masters: list[torch.Tensor], x: torch.Tensor, target: torch.Tensor) -> float:
    """One Adam step on batch ``x`` ``[b, L, C]``: loss, backward to the norms, step their masters, copy back."""
    for p in params:
        p.grad = None
    q_out = block_forward(x)  # [b, L, C]
    f_out = target.to(q_out.device)
    dt = torch.float64 if q_out.dtype == torch.float64 else torch.float32
    value = loss_fn(f_out.to(dt), q_out.to(dt))
    if not torch.isfinite(value):
        raise FloatingPointError("norm tweaking: non-finite loss; lower the learning rate")
    value.backward()
    for m, p in zip(masters, params):
        m.grad = None if p.grad is None else p.grad.to(m.dtype)
    opt.step()
    with torch.no_grad():
        for m, p in zip(masters, params):
            p.copy_(m)
    return value.item()


@torch.no_grad()
def block_loss(block_forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
               loss: str | LossFn = "l_dist", batch_size: int = 1) -> float:
    """Mean of ``loss`` over the batches of ``inputs`` ``[N, L, C]`` (the quantity :func:`tweak_block` lowers)."""
    loss_fn = get_loss(loss)
    values = []
    for i in range(0, inputs.shape[0], batch_size):
        q_out = block_forward(inputs[i:i + batch_size])
        f_out = targets[i:i + batch_size].to(q_out.device)
        dt = torch.float64 if q_out.dtype == torch.float64 else torch.float32
        values.append(loss_fn(f_out.to(dt), q_out.to(dt)).item())
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------- lr selection
DEFAULT_GRID: tuple[tuple[float, float], ...] = tuple(
    (lr0, kappa) for lr0 in (1e-4, 5e-5, 1e-5, 5e-6, 1e-6) for kappa in (0.0, 1.0, 5.0))
"""[NQ] (lr0, κ) grid of METHODS.md §2.4: lr0 ∈ {1e-4, 5e-5, 1e-5, 5e-6, 1e-6} × κ ∈ {0, 1, 5}."""


def heldout_ids(tokenizer, name: str = "c4", split: str = "validation", *, tokens: int, calib_samples: int = 128,
                calib_seqlen: int = 2048, calib_seed: int = 0, data_dir=None) -> torch.Tensor:
    """Held-out text ``[1, n >= tokens]`` from the calibration source, disjoint from the calibration segments.

    :func:`normquant.data.text.calibration_samples` shuffles the rows with ``calib_seed`` and reads a *prefix*
    of that order; this takes rows from the *end* of the same order (joined with ``"\\n\\n"``) and checks that
    none of them is in the prefix the calibration read. Use it to score lr choices: never the test split.
    """
    from normquant.data.text import DataError, load_rows

    if split == "test":
        raise DataError("the held-out slice for lr selection must not come from a test split")
    rows = [r for r in load_rows(name, split, data_dir) if r.strip()]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(calib_seed)).tolist()
    need, used, count = max(calib_samples * calib_seqlen, calib_seqlen * 2), 0, 0
    for i in order:  # the prefix calibration_samples reads (same tokenization)
        count += len(tokenizer(rows[i] + "\n\n").input_ids)
        used += 1
        if count >= need:
            break
    ids: list[int] = []
    taken = 0
    for i in reversed(order[used:]):
        ids.extend(tokenizer(rows[i] + "\n\n").input_ids)
        taken += 1
        if len(ids) >= tokens:
            break
    if len(ids) < tokens:
        raise DataError(f"{name}/{split}: only {len(ids)} tokens remain outside the {used} calibration rows, "
                        f"{tokens} asked for")
    log.info("held-out slice: %d rows (%d tokens) of %s/%s, disjoint from the %d calibration rows",
             taken, len(ids), name, split, used)
    return torch.tensor(ids).unsqueeze(0)  # [1, n]


def _with_lr(recipe, lr0: float | None, kappa: float | None):
    """A deep copy of ``recipe`` whose norm_tweak steps use (lr0, κ); ``lr0=None``: tweaking off (epochs 0)."""
    r = copy.deepcopy(recipe)
    found = False
    for i, step in enumerate(r.steps):
        if step.name == "norm_tweak":
            found = True
            update = {"epochs": 0} if lr0 is None else {"lr": lr0, "kappa": kappa}
            r.steps[i] = step.model_copy(update=update)
    if not found:
        raise ValueError("the recipe has no norm_tweak step to tune")
    return r


def select_norm_tweak_lr(model_factory: Callable[[], nn.Module], recipe, heldout: torch.Tensor,
                         grid: Iterable[tuple[float, float]] | None = None, *, calib_ids: torch.Tensor,
                         seqlen: int | None = None, windows: int | None = None, device: str | torch.device = "cpu",
                         baseline: bool = True, progress: bool = False) -> tuple[dict, list[dict]]:
    """Grid search of (lr0, κ) for the recipe's ``norm_tweak`` step, scored by held-out perplexity.

    For each ``(lr0, κ)`` of ``grid`` (default :data:`DEFAULT_GRID`): a fresh float model from
    ``model_factory()`` is quantized with the recipe (its norm_tweak step set to that lr0, κ) on ``calib_ids``
    ``[N, L]``, then its perplexity is measured on ``heldout`` — ``[1, n]`` text cut into ``seqlen`` windows
    (default ``recipe.evaluation.seqlen``), or ``[W, L]`` ready windows — under the GPTQ protocol of
    :func:`normquant.evaluation.perplexity.evaluate_perplexity`. ``heldout`` must be calibration-side text not
    used for calibration (:func:`heldout_ids`), never the evaluation test split. With ``baseline`` the table
    also holds the same recipe without tweaking (``lr0 = None``: the weight algorithm alone).

    Returns ``(best, table)``: ``table`` rows ``{"lr0", "kappa", "ppl", "nll", "windows", "seqlen"}`` in grid
    order, ``best`` the tweaked row with the lowest perplexity.

    >>> best, table = select_norm_tweak_lr(lambda: load_model("smollm2-135m")[0], recipe,  # doctest: +SKIP
    ...                                    heldout_ids(tok, tokens=16 * 2048), calib_ids=calib)
    """
    from normquant.evaluation.perplexity import evaluate_perplexity
    from normquant.quantize import quantize

    grid = list(DEFAULT_GRID if grid is None else grid)
    if heldout.dim() != 2:
        raise ValueError(f"heldout must be [1, n] text or [W, L] windows, got shape {tuple(heldout.shape)}")
    if heldout.shape[0] > 1:
        seqlen = heldout.shape[1]
    seqlen = seqlen or recipe.evaluation.seqlen
    stream = heldout.reshape(1, -1)
    configs: list[tuple[float | None, float | None]] = ([(None, None)] if baseline else []) + grid
    table = []
    for lr0, kappa in configs:
        model = model_factory()
        quantize(model, _with_lr(recipe, lr0, kappa), calib_ids, device=device, progress=progress)
        res = evaluate_perplexity(model, stream, seqlen=seqlen, windows=windows, progress=progress)
        row = {"lr0": lr0, "kappa": kappa, "ppl": res.ppl, "nll": res.nll, "windows": res.windows, "seqlen": seqlen}
        log.info("norm_tweak lr selection: lr0=%s kappa=%s held-out ppl %.4f", lr0, kappa, res.ppl)
        table.append(row)
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    tweaked = [r for r in table if r["lr0"] is not None and math.isfinite(r["ppl"])]
    if not tweaked:
        raise ValueError("no (lr0, kappa) in the grid gave a finite held-out perplexity")
    return min(tweaked, key=lambda r: r["ppl"]), table
