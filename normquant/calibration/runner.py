"""The sequential block runner: capture the inputs of block 0, then process one block at a time.

Each block's outputs are computed on the *quantized path* (after its steps ran) and become the next
block's inputs. Only the block being processed is moved to the compute device; the rest stay where they
are (CPU, or wherever accelerate's ``device_map`` put them), so peak accelerator memory does not grow with
depth.

>>> for ctx in run_blocks(model, calib_ids, device="cpu"):   # doctest: +SKIP
...     step(ctx)                  # edit ctx.block
...     ctx.advance()              # outputs of the edited block -> inputs of the next
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from normquant.models.arch import Architecture, get_architecture, get_blocks


class _StopForward(Exception):
    pass


@dataclass
class BlockContext:
    """What a step sees of one block.

    ``inputs``: ``[N, L, C]`` hidden states entering the block (quantized path, on ``store_device``);
    ``args`` / ``kwargs``: the block's other call arguments (masks, position embeddings, BLOOM's alibi), as
    captured with a batch of ``capture_batch`` samples; :meth:`forward` re-makes the per-batch ones for any
    batch size (calibration samples have equal length and no padding, so their rows are equal).
    """

    index: int
    name: str  # dotted module name of the block in the model
    block: nn.Module
    arch: Architecture
    model: nn.Module
    inputs: torch.Tensor
    args: tuple
    kwargs: dict
    device: torch.device
    capture_batch: int
    batch_size: int = 8
    quant_linears: dict = field(default_factory=dict)  # block-relative name -> QuantLinear
    _rebatched: dict = field(default_factory=dict, repr=False)

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
        for i in range(0, self.inputs.shape[0], self.batch_size):
            yield self.inputs[i:i + self.batch_size]

    @torch.no_grad()
    def outputs(self) -> torch.Tensor:
        """Block outputs for all inputs, ``[N, L, C]`` on the store device."""
        return torch.cat([self.forward(x).to(self.inputs.device) for x in self.batches()])

    def advance(self) -> None:
        self.inputs = self.outputs()


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


@torch.no_grad()
def capture_block0_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, device: torch.device,
                          batch_size: int) -> tuple[torch.Tensor, tuple, dict, int]:
    """Run the model up to block 0; return its inputs ``[N, L, C]`` (CPU), the other call args and kwargs (of
    the first batch) and that batch's size.

    Some blocks take masks positionally (GPT-2), so positional arguments are kept as well.
    """
    hidden: list[torch.Tensor] = []
    kwargs: dict = {}
    extra: list[tuple] = [()]

    def hook(_module, args, kw):
        x = args[0] if args else kw.pop("hidden_states")
        hidden.append(x.detach().cpu())
        if len(hidden) == 1:
            extra[0] = tuple(args[1:])
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=input_ids[i:i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
    return torch.cat(hidden), extra[0], kwargs, hidden[0].shape[0]


def _offloaded(model: nn.Module) -> bool:
    return bool(getattr(model, "hf_device_map", None))


def run_blocks(model: nn.Module, input_ids: torch.Tensor, *, device: str | torch.device = "cpu",
               batch_size: int = 8) -> Iterator[BlockContext]:
    """Yield a :class:`BlockContext` per block, in order; the caller edits the block then calls ``advance()``.

    Without a ``device_map`` the blocks live on CPU and each is moved to ``device`` while processed, so the
    accelerator holds one block plus the activations.
    """
    device = torch.device(device)
    arch = get_architecture(model)
    blocks = get_blocks(model, arch)
    offloaded = _offloaded(model)
    if not offloaded:  # everything but the blocks goes to the compute device for the capture
        model.cpu()
        for name, child in model.named_children():
            _move_non_blocks(child, blocks, device)
    inputs, args, kwargs, capture_batch = capture_block0_inputs(model, blocks, input_ids, device if not offloaded else
                                           next(model.parameters()).device, batch_size)
    prefix = _blocks_name(model, blocks)
    for i, block in enumerate(blocks):
        dev = device if not offloaded else next(block.parameters()).device
        if not offloaded:
            block.to(dev)
        ctx = BlockContext(i, f"{prefix}.{i}", block, arch, model, inputs, _move(args, dev), _move(kwargs, dev), dev,
                           capture_batch, batch_size)
        yield ctx
        inputs = ctx.inputs
        if not offloaded:
            block.cpu()
    if not offloaded:
        model.to(device)


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


def _blocks_name(model: nn.Module, blocks: nn.ModuleList) -> str:
    return next(n for n, m in model.named_modules() if m is blocks)
