"""The sequential block runner: capture the inputs of block 0 and every block's call arguments, then hand
out one block at a time.

Each block's outputs are computed on the *quantized path* (after its steps ran) and become the next
block's inputs. Only the block being processed is moved to the compute device; the rest stay where they
are (CPU, or wherever accelerate's ``device_map`` put them), so peak accelerator memory does not grow with
depth.

Call arguments are captured *per block*: models with per-layer attention types (Gemma2/3 sliding-window
and full-attention layers, Mistral-style windows) or per-layer rotary bases give each block its own mask and
position embeddings. One pass of the model with every block replaced by a recorder (which returns its
input untouched) collects them at the cost of the embeddings alone.

>>> for ctx in run_blocks(model, calib_ids, device="cpu"):   # doctest: +SKIP
...     step(ctx)                  # edit ctx.block
...     ctx.advance()              # outputs of the edited block -> inputs of the next
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from normquant.models.arch import Architecture, get_architecture, get_blocks
from normquant.models.streaming import is_streamed, materialize_block
from normquant.quant.linear import calibrate_static_inputs


class _StopForward(Exception):
    pass


@dataclass
class BlockContext:
    """What a step sees of one block, and the few things it may ask of the pipeline.

    ``inputs``: ``[N, L, C]`` hidden states entering the block (quantized path, on the store device), or
    ``None`` in a data-free run; ``args`` / ``kwargs``: *this* block's other call arguments (masks, position
    embeddings, BLOOM's alibi), as captured with a batch of ``capture_batch`` samples; :meth:`forward` re-makes
    the per-batch ones for any batch size (calibration samples have equal length and no padding).
    ``quant_linears``: the block's target linears (block-relative name -> QuantLinear), activation
    quantizers off while the steps run.
    """

    index: int
    name: str  # dotted module name of the block in the model ("" for a whole-model data-free context)
    block: nn.Module
    arch: Architecture | None
    model: nn.Module
    inputs: torch.Tensor | None
    args: tuple
    kwargs: dict
    device: torch.device
    capture_batch: int
    batch_size: int = 8
    num_blocks: int = 1
    quant_linears: dict = field(default_factory=dict)
    _rebatched: dict = field(default_factory=dict, repr=False)

    @property
    def has_data(self) -> bool:
        return self.inputs is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run the block on hidden states ``[b, L, C]`` (any ``b``; moved to the compute device)."""
        b = hidden.shape[0]
        if b == self.capture_batch:
            args, kwargs = self.args, self.kwargs
        else:
            if b not in self._rebatched:
                self._rebatched[b] = (_rebatch(self.args, self.capture_batch, b),
                                      _rebatch(self.kwargs, self.capture_batch, b))
            args, kwargs = self._rebatched[b]
        out = self.block(hidden.to(self.device), *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def batches(self) -> Iterator[torch.Tensor]:
        if self.inputs is None:
            raise RuntimeError(f"block {self.name} has no calibration inputs (data-free run): a step that reads "
                               "them must declare needs_data = True")
        for i in range(0, self.inputs.shape[0], self.batch_size):
            yield self.inputs[i:i + self.batch_size]

    @torch.no_grad()
    def outputs(self) -> torch.Tensor:
        """Block outputs for all inputs, ``[N, L, C]`` on the store device."""
        return torch.cat([self.forward(x).to(self.inputs.device) for x in self.batches()])

    def advance(self) -> None:
        self.inputs = self.outputs()

    # ---- the contract with the pipeline: activation quantizers of this block's linears -----------------
    def _quantizers(self) -> list:
        return [ql.input_quant for ql in self.quant_linears.values() if ql.input_quant is not None]

    @contextlib.contextmanager
    def activations(self, enabled: bool) -> Iterator[None]:
        """Run the body with the block's activation quantizers on (``True``) or off; restores their state.

        Static quantizers must be calibrated before they are turned on (:meth:`calibrate_activations`).
        """
        quantizers = self._quantizers()
        saved = [q.enabled for q in quantizers]
        for q in quantizers:
            q.enabled = enabled
        try:
            yield
        finally:
            for q, e in zip(quantizers, saved):
                q.enabled = e

    def calibrate_activations(self) -> None:
        """(Re)calibrate the block's static input quantizers that no step fixed, on the block's current
        outputs pass. The pipeline calls this after the steps anyway; a step calls it when it needs the
        quantizers calibrated earlier (norm tweaking's joint W/A mode), and the pipeline's later call
        recalibrates them on the block as the steps left it."""
        calibrate_static_inputs(list(self.quant_linears.values()), self.outputs)


def _rebatch(v, captured: int, b: int):
    """Per-batch tensors of the call arguments re-made for batch ``b`` from their first sample.

    A tensor ``[captured·k, ...]`` (mask ``[B, 1, L, L]``: k = 1; BLOOM alibi ``[B·H, 1, L]``: k = H) becomes
    ``[b·k, ...]``; tensors of fewer than 3 dimensions, or whose first dimension is not a multiple of
    ``captured`` (shared position embeddings ``[1, L, d]``), are kept.
    """
    if isinstance(v, torch.Tensor):
        if v.dim() < 3 or v.shape[0] % captured:  # masks are 4-D, alibi 3-D; ids and cache positions stay
            return v
        k = v.shape[0] // captured
        first = v.reshape(captured, k, *v.shape[1:])[:1]  # [B·k, ...] -> [1, k, ...]
        return first.expand(b, *first.shape[1:]).reshape(b * k, *v.shape[1:])
    if isinstance(v, (tuple, list)):
        return type(v)(_rebatch(x, captured, b) for x in v)
    if isinstance(v, dict):
        return {k: _rebatch(x, captured, b) for k, x in v.items()}
    return v


def _move(v, device: torch.device):
    """Tensors (also inside tuples and dicts) moved to ``device``."""
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, tuple):
        return tuple(_move(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _move(x, device) for k, x in v.items()}
    return v


_DROPPED_KWARGS = ("hidden_states", "past_key_value", "past_key_values", "use_cache")


@contextlib.contextmanager
def _recorders(blocks: nn.ModuleList, record: Callable) -> Iterator[None]:
    """Replace every block's ``forward`` by ``record(i, args, kwargs)``; the originals are always restored
    (also an instance-level ``forward`` such as accelerate's offloading hook)."""
    saved = [block.__dict__.get("forward") for block in blocks]
    for i, block in enumerate(blocks):
        block.forward = lambda *args, _i=i, **kwargs: record(_i, args, kwargs)
    try:
        yield
    finally:
        for block, old in zip(blocks, saved):
            if old is None:
                del block.forward
            else:
                block.forward = old


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, device: torch.device,
                         batch_size: int) -> tuple[torch.Tensor, list[tuple[tuple, dict]], int]:
    """Block 0's inputs ``[N, L, C]`` (CPU), every block's other call arguments ``[(args, kwargs)]`` (of the
    first batch) and that batch's size.

    Some blocks take masks positionally (GPT-2), so positional arguments are kept as well. For the first
    batch every block records its arguments and passes its input through; later batches stop at block 0.
    """
    hidden: list[torch.Tensor] = []
    calls: list[tuple[tuple, dict]] = []
    last = len(blocks) - 1

    def record(i, args, kw):
        x = args[0] if args else kw["hidden_states"]
        if i == 0:
            hidden.append(x.detach().cpu())
        if len(hidden) == 1:  # first batch: every block's arguments
            calls.append((tuple(args[1:]), {k: v for k, v in kw.items() if k not in _DROPPED_KWARGS}))
        if i == last or len(hidden) > 1:
            raise _StopForward
        return x

    with _recorders(blocks, record):
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=input_ids[i:i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    if len(calls) != len(blocks):
        raise RuntimeError(f"captured the arguments of {len(calls)} of {len(blocks)} blocks: the model does not "
                           "call its blocks in order once per forward pass")
    return torch.cat(hidden), calls, hidden[0].shape[0]


def _offloaded(model: nn.Module) -> bool:
    return bool(getattr(model, "hf_device_map", None))


def run_blocks(model: nn.Module, input_ids: torch.Tensor, *, device: str | torch.device = "cpu",
               batch_size: int = 8) -> Iterator[BlockContext]:
    """Yield a :class:`BlockContext` per block, in order; the caller edits the block then calls ``advance()``.

    Without a ``device_map`` the blocks live on CPU and each is moved to ``device`` while processed, so the
    accelerator holds one block plus the activations. A streamed model's blocks are read from disk as they are
    reached (:mod:`normquant.models.streaming`).
    """
    device = torch.device(device)
    arch = get_architecture(model)
    blocks = get_blocks(model, arch)
    offloaded = _offloaded(model)
    if not offloaded:  # everything but the blocks goes to the compute device for the capture
        if not is_streamed(model):  # (a streamed model's blocks are on meta, the rest on CPU already)
            model.cpu()
        for name, child in model.named_children():
            _move_non_blocks(child, blocks, device)
    inputs, calls, capture_batch = capture_block_inputs(
        model, blocks, input_ids, device if not offloaded else next(model.parameters()).device, batch_size)
    prefix = blocks_name(model, blocks)
    for i, block in enumerate(blocks):
        materialize_block(model, block, f"{prefix}.{i}")
        dev = device if not offloaded else next(block.parameters()).device
        if not offloaded:
            block.to(dev)
        args, kwargs = calls[i]
        ctx = BlockContext(i, f"{prefix}.{i}", block, arch, model, inputs, _move(args, dev), _move(kwargs, dev), dev,
                           capture_batch, batch_size, num_blocks=len(blocks))
        yield ctx
        inputs = ctx.inputs
        if not offloaded:
            block.cpu()
    if not offloaded:
        model.to(device)


def walk_blocks(model: nn.Module) -> Iterator[BlockContext]:
    """Data-free contexts (``inputs`` None), one per block; a model of an unregistered architecture is one
    whole-model context, so data-free recipes keep working on any model."""
    try:
        arch = get_architecture(model)
    except ValueError:
        yield BlockContext(0, "", model, None, model, None, (), {}, _device_of(model), 0)
        return
    blocks = get_blocks(model, arch)
    prefix = blocks_name(model, blocks)
    for i, block in enumerate(blocks):
        materialize_block(model, block, f"{prefix}.{i}")
        yield BlockContext(i, f"{prefix}.{i}", block, arch, model, None, (), {}, _device_of(block), 0,
                           num_blocks=len(blocks))


def _device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _move_non_blocks(module: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    if module is blocks:
        return
    if any(m is blocks for m in module.modules()):
        for child in module.children():
            _move_non_blocks(child, blocks, device)
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device)
        for n, b in module.named_buffers(recurse=False):
            setattr(module, n, b.to(device))
    else:
        module.to(device)


def blocks_name(model: nn.Module, blocks: nn.ModuleList) -> str:
    """The dotted module name of the block list in ``model``."""
    return next(n for n, m in model.named_modules() if m is blocks)


__all__ = ["BlockContext", "run_blocks", "walk_blocks", "capture_block_inputs", "blocks_name"]
