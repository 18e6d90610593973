"""Models larger than memory: float weights stay on disk and are read one block at a time.

:func:`load_streamed` builds the model with every module but its blocks in memory (embeddings, final norm, head,
rotary tables) and the blocks on the ``meta`` device, attached to a :class:`CheckpointReader` over the model's
safetensors files. The pipeline (:mod:`normquant.pipeline.run`) reads each block's float weights when it
reaches it (:func:`materialize_block`), quantizes it as usual, and then keeps only its quantized weights,
packed at their bit width (:class:`~normquant.quant.real.PackedLinear`: the same numbers as the fake path, bit
for bit). Peak memory is therefore the non-block modules + the packed blocks done so far + one float block and
its calibration activations, instead of the whole float model::

    peak ≈ non-block + Σ packed(done blocks) + float(one block) + activations [N, L, C] x 2

Tensors are read with plain ``read`` calls, not ``mmap``: the pages of a file read once do not count against
the process (its resident set holds only what was copied out).

>>> model, tok = load_streamed("path/to/llama")          # doctest: +SKIP  (blocks on meta)
>>> quantize(model, recipe, calib)                        # doctest: +SKIP  (reads, quantizes, packs each block)
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from normquant.models.arch import get_architecture, get_blocks, resolve_path, tied_aliases
from normquant.models.loading import ModelLoadError, PACKAGED, materialize_packaged

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
_ATTR = "_normquant_checkpoint_reader"


class CheckpointReader:
    """Tensors of a safetensors checkpoint (``model.safetensors`` or a sharded ``model.safetensors.index.json``)
    by name, each read from its file on demand."""

    def __init__(self, folder: str | Path):
        from normquant.export.verify import ST_DTYPES, read_safetensors_header

        folder = Path(folder)
        if (folder / INDEX_NAME).is_file():
            try:
                files = sorted(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise ModelLoadError(f"{folder / INDEX_NAME} is not a valid safetensors index (no weight_map)") from None
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ModelLoadError(f"{folder} has no model.safetensors (or {INDEX_NAME}): --offload reads safetensors "
                                 "checkpoints only; load the model without --offload, or save it with "
                                 "save_pretrained (safetensors) first")
        self._dtypes = ST_DTYPES
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise ModelLoadError(f"{path} is listed in {INDEX_NAME} but missing; re-download the model")
            try:
                header, start = read_safetensors_header(path)
            except Exception as e:  # ExportError: truncated or garbled
                raise ModelLoadError(str(e).replace("; re-export", "; re-download the model")) from None
            for key, info in header.items():
                self.entries[key] = (path, start, info)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][2]["shape"])

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (its file's dtype), read with one ``readinto``."""
        path, start, info = self.entries[name]
        begin, stop = info["data_offsets"]
        buf = torch.empty(stop - begin, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buf.numpy()) != stop - begin:
                raise ModelLoadError(f"{path} ended inside tensor {name}: the file is truncated; re-download the model")
        dtype = self._dtypes[info["dtype"]]
        return (buf.view(dtype) if buf.numel() else torch.empty(0, dtype=dtype)).reshape(info["shape"])


def _folder(name_or_path: str) -> Path:
    """The local folder of ``name_or_path``: a packaged model (converted once), a local folder, or a hub id
    (its safetensors downloaded, or taken from the local cache)."""
    if name_or_path in PACKAGED:
        return materialize_packaged(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".gguf" or path.exists():
        raise ModelLoadError(f"{name_or_path}: --offload reads a folder of safetensors files (a packaged name, a "
                             "local HF folder or a hub id), not a single file")
    if name_or_path.count("/") != 1:
        raise ModelLoadError(f"model '{name_or_path}' is not a packaged model ({', '.join(PACKAGED)}), a local "
                             "folder or a hub id of the form owner/name")
    from huggingface_hub import snapshot_download

    from normquant.models.loading import _hub_reachable

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt",
                                                                    "*.model"],
                                      local_files_only=not _hub_reachable()))
    except Exception as e:
        raise ModelLoadError(f"cannot fetch '{name_or_path}' for --offload: {type(e).__name__}; give a local folder, "
                             "or download it where there is a network") from None


def _with_layers(config, n: int):
    """A copy of ``config`` with ``n`` blocks (``layer_types`` cut to match where the config has them)."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = n
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[:n]
    return small


def load_streamed(name_or_path: str, *, dtype: str | torch.dtype = "float32") -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` with the blocks' weights left on disk (module docstring); eval mode.

    The non-block modules come from a one-block instance of the architecture (so computed buffers such as rotary
    tables are the architecture's own), the blocks are ``meta`` until :func:`materialize_block`. Every tensor
    the model needs must be in the checkpoint under its module name, with its shape: anything else is a
    :class:`ModelLoadError` before any weight is read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from normquant.export import is_normquant_export
    from normquant.models.loading import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    folder = _folder(str(name_or_path))
    if is_normquant_export(folder):
        raise ModelLoadError(f"{folder} is a normquant export, already quantized: --offload reads float checkpoints "
                             "to quantize them; evaluate the export without --offload")
    reader = CheckpointReader(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    except Exception as e:
        raise ModelLoadError(f"cannot read the config or tokenizer of {folder}: {type(e).__name__}") from None
    arch = get_architecture(config.model_type)  # one line for an unregistered architecture
    if arch.head is None:
        raise ModelLoadError(f"--offload streams causal language models; {config.model_type} is an encoder: load it "
                             "without --offload")
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    blocks_path = resolve_path(full, arch.blocks)
    with no_init_weights():  # the non-block modules, on CPU; their weights are replaced by the checkpoint's below
        model = AutoModelForCausalLM.from_config(_with_layers(config, 1), dtype=torch_dtype)
    block = get_blocks(model, arch)[0]
    if dict(block.named_buffers()).keys() - block.state_dict().keys():
        raise ModelLoadError(f"the blocks of {type(model).__name__} hold buffers the checkpoint does not store; "
                             "--offload cannot rebuild them: load the model without --offload")
    model.set_submodule(blocks_path, full.get_submodule(blocks_path))  # the meta blocks
    for m in model.modules():  # the one-block config objects become the full model's again
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = config.num_hidden_layers
            if isinstance(getattr(config, "layer_types", None), list):
                cfg.layer_types = list(config.layer_types)
    aliases = tied_aliases(full)  # (ties are made outside no_init_weights)
    _check_names(full, reader, folder, aliases)
    state = {}
    for key, t in model.state_dict().items():
        if key.startswith(f"{blocks_path}.") or key in aliases:
            continue
        state[key] = reader.read(key).to(t.dtype)
    model.load_state_dict(state, strict=False, assign=True)  # the read tensors themselves: no second copy
    if aliases:
        model.tie_weights()  # assign replaced the tied parameter; its aliases follow it again
    setattr(model, _ATTR, (reader, blocks_path))
    return model.eval(), tokenizer


def _check_names(full: nn.Module, reader: CheckpointReader, folder: Path, aliases: set[str]) -> None:
    for key, t in full.state_dict().items():
        if key in aliases:
            continue
        if key not in reader:
            raise ModelLoadError(f"{folder}: the checkpoint has no tensor {key}; --offload reads tensors by module "
                                 "name, so checkpoints with other names cannot stream: load the model without --offload")
        if reader.shape(key) != tuple(t.shape):
            raise ModelLoadError(f"{folder}: tensor {key} has shape {list(reader.shape(key))}, the config implies "
                                 f"{list(t.shape)}; the checkpoint does not match its config.json")


def is_streamed(model: nn.Module) -> bool:
    """True when ``model`` came from :func:`load_streamed` (its blocks are read from disk when reached)."""
    return getattr(model, _ATTR, None) is not None


def materialize_block(model: nn.Module, block: nn.Module, name: str) -> None:
    """Read block ``name`` (dotted, e.g. ``model.layers.3``) of a streamed model from disk, in place, on CPU;
    a no-op for an in-memory model or a block already read."""
    source = getattr(model, _ATTR, None)
    if source is None or not any(p.is_meta for p in block.parameters()):
        return
    reader = source[0]
    block.to_empty(device="cpu")
    with torch.no_grad():
        for key, t in block.state_dict(keep_vars=True).items():
            t.copy_(reader.read(f"{name}.{key}"))


def check_materialized(model: nn.Module) -> None:
    """Refuse (one line) to run a streamed model whose blocks were never read (quantize it first)."""
    if is_streamed(model) and any(p.is_meta for p in model.parameters()):
        raise ModelLoadError("this model was loaded with --offload: its blocks stay on disk until quantize() reads "
                             "them one at a time; quantize it first (or load it without --offload)")


__all__ = ["CheckpointReader", "load_streamed", "is_streamed", "materialize_block", "check_materialized"]
