"""Resumable quantization: per-block checkpoints, so a run killed at block k restarts at block k.

Opt-in: pass ``checkpoint=BlockCheckpoint(directory)`` to :func:`normquant.pipeline.run.quantize` (the CLI's
``--resume``). Without it the pipeline is unchanged. With it, after every finished block the directory gets

* ``block-<k>.pt``: the finished block as a module (its QuantLinear wrappers, quantized weights, calibrated
  activation ranges, anything a step replaced — RepQuant's ``RMSNormWithBias``), the next block when a step
  changed it (post-LN ``next:`` consumers), the tensors outside the blocks a step changed (BERT's embedding
  LayerNorm), the steps' private state and the torch random-number state;
* ``state.json`` (written after it, atomically): the run's identity — recipe hash, a sha256 of the model after
  its model-wide steps, of the calibration ids, the normquant and torch versions — the number of finished
  blocks and each block file's sha256.

A run with the same identity restores blocks ``0..k-1`` from their files, recomputes their outputs on the
calibration data (the inputs of block ``k``, bit-identical on the same machine) and continues, so the quantized
model, hence the export, is byte-identical to an uninterrupted run. A checkpoint file that fails its checksum
ends the restore there (those blocks are quantized again). Checkpoints of another recipe, model or calibration
set are refused (:class:`ResumeError`), never mixed in.

The block files are pickles (``torch.load(weights_only=False)``): load only checkpoint folders you wrote.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from normquant.io import atomic_file, atomic_write_text, file_sha256

log = logging.getLogger(__name__)

FORMAT = 1
STATE = "state.json"


class ResumeError(ValueError):
    """Checkpoints that cannot be used for this run; the message says what to do."""


def _bytes_view(t: torch.Tensor) -> memoryview:
    x = t.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.contiguous().reshape(-1)
    return memoryview(x.view(torch.uint8).numpy()) if x.numel() else memoryview(b"")


def tensors_sha256(items) -> str:
    """sha256 over ``(name, tensor)`` pairs: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_bytes_view(t))
    return h.hexdigest()



def _module_sig(module: nn.Module) -> tuple:
    """Identity of a module's structure and content: its submodules' ids and a sha256 of its tensors."""
    return (tuple((n, id(m)) for n, m in module.named_modules()),
            tensors_sha256(list(module.state_dict(keep_vars=True).items())))


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _swap_into(target: nn.Module, loaded: nn.Module) -> None:
    """Make ``target`` (kept by its parent and the runner) the module ``loaded`` is, in place."""
    if type(target) is not type(loaded):
        raise ResumeError(f"checkpointed block is a {type(loaded).__name__}, the model has a {type(target).__name__}")
    target.__dict__.clear()
    target.__dict__.update(loaded.__dict__)


class BlockCheckpoint:
    """Per-block checkpoints of one quantization run in ``directory`` (see the module docstring).

    ``quantize`` calls :meth:`begin` after the model-wide phase, :meth:`restore` for each block already done,
    :meth:`save` after each block it processed; the caller removes the folder (:meth:`remove`) once everything
    that used the quantized model (evaluation, export) succeeded.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.done = 0
        self.enabled = True
        self._key: dict = {}
        self._files: dict[str, str] = {}
        self._outside: dict[str, str] = {}  # name -> sha256 at begin (tensors outside the blocks)
        self._outside_modules: tuple = ()
        self._next_sig: tuple | None = None
        self._blocks_prefix = ""

    # ------------------------------------------------------------------------------------------ begin
    def begin(self, model: nn.Module, recipe, calib_ids: torch.Tensor | None, blocks_prefix: str) -> int:
        """Identify the run, check the folder, return how many blocks can be restored."""
        from normquant import __version__

        self._blocks_prefix = blocks_prefix
        if not blocks_prefix:  # one whole-model context (unregistered architecture): nothing to split
            log.warning("--resume: this model is processed as one unit, so there are no per-block checkpoints")
            self.enabled = False
            return 0
        state = model.state_dict(keep_vars=True)
        if any(t.device.type == "meta" for t in state.values()):  # accelerate offloading: not picklable as is
            log.warning("--resume: this model is offloaded (device_map); per-block checkpoints are off")
            self.enabled = False
            return 0
        self._key = {
            "format": FORMAT, "recipe_hash": recipe.hash(), "normquant": __version__, "torch": torch.__version__,
            "model_sha256": tensors_sha256(sorted(state.items())),
            "calibration_sha256": None if calib_ids is None else tensors_sha256([("ids", calib_ids)]),
        }
        self._outside = {n: tensors_sha256([(n, t)]) for n, t in state.items() if not self._in_blocks(n)}
        self._outside_modules = self._outside_structure(model)
        self.done = self._read_state()
        if self.done:
            log.warning("resuming from %s: %d finished blocks restored, quantization continues at block %d",
                        self.directory, self.done, self.done)
        return self.done

    def _in_blocks(self, name: str) -> bool:
        return bool(self._blocks_prefix) and name.startswith(self._blocks_prefix + ".")

    def _outside_structure(self, model: nn.Module) -> tuple:
        return tuple((n, id(m)) for n, m in model.named_modules() if not self._in_blocks(n)
                     and n != self._blocks_prefix)

    def _read_state(self) -> int:
        path = self.directory / STATE
        if not path.is_file():
            if self.directory.exists() and any(self.directory.glob("block-*.pt")):
                log.warning("%s has block files but no %s; starting over", self.directory, STATE)
            return 0
        try:
            state = json.loads(path.read_text())
            key, files, done = state["key"], state["files"], int(state["done"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s is unreadable (%s); starting over", path, type(e).__name__)
            return 0
        if key != self._key:
            diff = sorted(k for k in set(key) | set(self._key) if key.get(k) != self._key.get(k))
            raise ResumeError(f"the checkpoints in {self.directory} belong to another run ({', '.join(diff)} "
                              "differ); delete that folder to start over, or choose another output folder")
        ok = 0
        for k in range(done):
            name = f"block-{k:05d}.pt"
            p = self.directory / name
            if name not in files or not p.is_file() or file_sha256(p) != files[name]:
                log.warning("checkpoint %s is missing or corrupt; resuming at block %d", p, k)
                break
            ok += 1
        self._files = {f"block-{k:05d}.pt": files[f"block-{k:05d}.pt"] for k in range(ok)}
        return ok

    # ------------------------------------------------------------------------------------------ restore
    def restore(self, ctx, steps) -> None:
        """Put block ``ctx.index`` back as it was when it finished (and what its processing changed elsewhere)."""
        p = self.directory / f"block-{ctx.index:05d}.pt"
        try:
            record = torch.load(p, map_location=ctx.device, weights_only=False)
        except Exception as e:
            raise ResumeError(f"cannot read checkpoint {p} ({type(e).__name__}); delete {self.directory} to start "
                              "over") from None
        _swap_into(ctx.block, record["block"])
        if record.get("next") is not None:
            _swap_into(ctx.model.get_submodule(f"{self._blocks_prefix}.{ctx.index + 1}"), record["next"])
        if record["outside"]:
            state = ctx.model.state_dict(keep_vars=True)
            with torch.no_grad():
                for name, t in record["outside"].items():
                    state[name].data.copy_(t.to(state[name].device))
        for step, private in zip(steps, record["steps"]):
            if private is not None:
                step.__pydantic_private__ = private
        from normquant.quant.linear import QuantLinear

        ctx.quant_linears = {n: m for n, m in ctx.block.named_modules() if isinstance(m, QuantLinear)}
        if ctx.index == self.done - 1:
            _set_rng_state(record["rng"])
        if ctx.index + 1 < ctx.num_blocks:
            self._next_sig = None

    # ------------------------------------------------------------------------------------------ save
    def before_block(self, ctx) -> None:
        """Called before block ``ctx.index`` is processed: remember the next block as it is."""
        if not self.enabled or ctx.index + 1 >= ctx.num_blocks:
            self._next_sig = None
            return
        self._next_sig = _module_sig(ctx.model.get_submodule(f"{self._blocks_prefix}.{ctx.index + 1}"))

    def save(self, ctx, steps) -> None:
        """Write block ``ctx.index``'s checkpoint, then the state file that makes it count."""
        if not self.enabled:
            return
        model = ctx.model
        if self._outside_structure(model) != self._outside_modules:
            log.warning("a step replaced modules outside the blocks; --resume checkpoints are off for this run")
            self.enabled = False
            return
        nxt = None
        if self._next_sig is not None:
            module = model.get_submodule(f"{self._blocks_prefix}.{ctx.index + 1}")
            if _module_sig(module) != self._next_sig:
                nxt = module
        state = model.state_dict(keep_vars=True)
        outside = {}
        for name, t in state.items():
            if not self._in_blocks(name) and tensors_sha256([(name, t)]) != self._outside.get(name):
                outside[name] = t.detach().cpu().clone()
        record = {"block": ctx.block, "next": nxt, "outside": outside, "rng": _rng_state(),
                  "steps": [getattr(s, "__pydantic_private__", None) for s in steps], "index": ctx.index}
        name = f"block-{ctx.index:05d}.pt"
        try:
            with atomic_file(self.directory / name) as tmp:
                torch.save(record, tmp)
        except Exception as e:  # a module that cannot be pickled, a full disk: the run goes on, unprotected
            log.warning("--resume: cannot save block %d (%s: %s); checkpoints are off for the rest of this run",
                        ctx.index, type(e).__name__, str(e)[:200])
            self.enabled = False
            return
        self._files[name] = file_sha256(self.directory / name)
        self.done = ctx.index + 1
        atomic_write_text(self.directory / STATE, json.dumps(
            {"key": self._key, "done": self.done, "files": self._files}, indent=1, sort_keys=True) + "\n")

    def remove(self) -> None:
        """Delete the checkpoints (call once the run's results are safely written)."""
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


__all__ = ["BlockCheckpoint", "ResumeError", "tensors_sha256"]
