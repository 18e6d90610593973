"""Export a quantized model as a compressed-tensors checkpoint directory, and load it back as QuantLinear modules.

An export directory holds ``config.json`` (the HF config plus a ``quantization_config`` in the
compressed-tensors schema, :mod:`normquant.export.schema`, with online transforms as its ``transform_config``,
:mod:`normquant.export.transforms`, and a ``normquant`` section: ``export_version``,
each group's exact ``quant_specs``, free ``metadata`` and ``serving``: whether transformers + compressed-tensors
compute the same model, :mod:`normquant.export.serving`), ``model.safetensors`` (quantized linears as in
:mod:`normquant.export.layers`, every other tensor under its HF name and dtype, tied aliases once), the
tokenizer files, for models that generate ``generation_config.json``, and last ``normquant_manifest.json``
(per-tensor dtype, shape and sha256, :mod:`normquant.export.verify`); the matrix of each online transform is a
tensor of ``model.safetensors`` too. It is written to a temporary sibling
directory and renamed into place (:func:`normquant.io.atomic_directory`), so a failed export never leaves a
partial directory behind. :func:`load_quantized` verifies the config against the tensors and the manifest
before it builds anything: a corrupt or hand-edited export is an :class:`ExportError` naming the tensor.

>>> path = export_model(model, tokenizer, "out/llama-w4")                         # doctest: +SKIP
>>> model, tokenizer = load_quantized(path)                                      # doctest: +SKIP
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from normquant.export.layers import compress_linear, decompress_linear
from normquant.export.schema import ConfigGroup, ExportError, kv_cache_args, quant_specs, quantization_config
from normquant.export.serving import serving_notes, vanilla_keys
from normquant.export.transforms import (install_transforms, read_transform_config, transform_config,
                                         transform_tensor_names)
from normquant.export.verify import (check_config, check_layer_tensors, read_manifest, read_safetensors_header,
                                     verify_manifest, write_manifest)
from normquant.io import atomic_directory, check_destination
from normquant.messages import one_line, show
from normquant.models.arch import tied_aliases
from normquant.quant.linear import QuantLinear, is_linear
from normquant.quant.real import QUANTIZED_LINEARS
from normquant.quant.kv import KVCacheSpec, head_dim_of, kv_cache_of, set_kv_cache
from normquant.quant.prefix import prefix_of, set_prefix
from normquant.quant.targets import matches_any

log = logging.getLogger(__name__)

#: version of the ``normquant`` section in config.json; bumped when its meaning changes.
#: 2: the export carries ``normquant_manifest.json`` (required from this version on).
#: 3: ``quantization_config.transform_config`` may carry online transforms and ``model.safetensors`` their matrices.
EXPORT_VERSION = 3
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------------------------
# whole model -> (tensors, quantization_config, quant_specs)
# ---------------------------------------------------------------------------------------------------------


def _quant_groups(model: nn.Module) -> list[ConfigGroup]:
    """QuantLinear modules grouped by ``(weight_spec, input_spec)``, in module order; plain ones left out."""
    groups: dict[tuple, ConfigGroup] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QUANTIZED_LINEARS):
            continue
        aspec = module.input_quant.spec if module.input_quant is not None else None
        if module.weight_spec is None and aspec is None:
            continue
        groups.setdefault((module.weight_spec, aspec), ConfigGroup(module.weight_spec, aspec)).modules.append(name)
    return list(groups.values())


def compressed_checkpoint(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(tensors, quantization_config, quant_specs)`` of a model whose quantized linears are QuantLinear modules.

    Tensors of non-quantized modules keep their HF names and dtypes; tied aliases are stored once; online input
    transforms add their matrices (:mod:`normquant.export.transforms`). ``quant_specs`` holds each config group's
    exact QuantSpecs.
    """
    groups, kv = _quant_groups(model), kv_cache_of(model)
    if not groups and kv is None:
        raise ExportError("model has no quantized QuantLinear modules and no quantized KV cache; quantize it before "
                          "exporting")
    quantized = [name for g in groups for name in g.modules]
    ignore = [name for name, m in model.named_modules() if is_linear(m) and name not in quantized]
    transforms, tensors = transform_config(model)  # first: refuses what compressed-tensors cannot express
    qconfig = quantization_config(groups, ignore, transforms)  # kv_cache_scheme stays null: normquant.serving
    for name in quantized:
        for key, t in compress_linear(model.get_submodule(name), name).items():
            tensors[f"{name}.{key}"] = t
    aliases, prefixes = tied_aliases(model), tuple(f"{name}." for name in quantized)
    for key, t in model.state_dict().items():
        if key not in aliases and not key.startswith(prefixes):
            tensors[key] = t.detach().cpu().contiguous()
    _check_reloadable(model, tensors, prefixes, transform_tensor_names(read_transform_config(qconfig, "export")))
    return tensors, qconfig, quant_specs(groups)


def _check_reloadable(model: nn.Module, tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...],
                      matrices: set[str]) -> None:
    """Refuse (one line) an export :func:`load_quantized` could not rebuild: tensors outside the quantized layers
    that the model's class lacks, or class parameters with no tensor (RepQuant's norms with a bias; norm fusion
    of a LayerNorm model leaves a bias-free RMSNorm and an ``lm_head`` bias)."""
    vanilla = vanilla_keys(model)
    if vanilla is None:
        return
    extra = sorted(k for k in tensors if k not in vanilla and not k.startswith(prefixes) and k not in matrices)
    missing = sorted(k for k in vanilla if k not in tensors and not k.startswith(prefixes))
    if extra or missing:
        arch = type(model).__name__
        raise ExportError(f"cannot export: the model no longer has {arch}'s structure (tensors {arch} lacks: "
                          f"{extra[:3]}; {arch} parameters it no longer has: {missing[:3]}), so neither normquant nor "
                          "transformers could load the export back; RepQuant's reparameterized norms and LayerNorm "
                          "models after norm fusion/rotation are evaluation-only for now")


# ---------------------------------------------------------------------------------------------------------
# export_model / load_quantized / is_normquant_export
# ---------------------------------------------------------------------------------------------------------


def export_model(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, *, force: bool = False,
                 extra_metadata: dict | None = None) -> Path:
    """Write ``model`` (with QuantLinear modules) as a compressed-tensors checkpoint to ``out_dir``; return its path.

    Everything is written to a temporary directory next to ``out_dir`` and renamed into place; on any
    failure the temporary directory is removed. An existing ``out_dir`` raises ``FileExistsError`` unless
    ``force``, in which case it is replaced only once the new export is complete. ``tokenizer`` may be None.
    ``extra_metadata`` (JSON-serializable: recipe hash, versions...) goes to ``config.json["normquant"]["metadata"]``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"export directory {out_dir} exists; pass --force to overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"export path {out_dir} exists and is not a directory")
    tensors, qconfig, specs = compressed_checkpoint(model)
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    check_destination(out_dir, force=force, need_bytes=need)
    with atomic_directory(out_dir, force=force) as tmp:
        _write_export(model, tokenizer, tmp, extra_metadata, (tensors, qconfig, specs))
    return out_dir


def _write_export(model: nn.Module, tokenizer: Any, directory: Path, extra_metadata: dict | None,
                  checkpoint: tuple | None = None) -> None:
    tensors, qconfig, specs = checkpoint or compressed_checkpoint(model)
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = qconfig
    serving = serving_notes(model, qconfig, tensors)  # parity with transformers + compressed-tensors
    for note in serving["notes"]:
        log.warning("export: %s", note)
    config["normquant"] = {"export_version": EXPORT_VERSION, "quant_specs": specs,
                           "metadata": dict(extra_metadata or {}), "serving": serving}
    prefix = prefix_of(model)
    if prefix is not None:  # PrefixQuant: part of the quantized model (normquant.quant.prefix)
        config["normquant"]["prefix_ids"] = prefix.tolist()
    kv = kv_cache_of(model)
    if kv is not None:  # the recipe's scheme.kv_cache; the compressed-tensors args where they exist (not applied)
        config["normquant"]["kv_cache"] = kv.model_dump()
        config["normquant"]["kv_cache_scheme"] = kv_cache_args(kv, head_dim_of(model.config))[0]
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_manifest(directory, WEIGHTS_NAME)  # last: an export without its manifest was never completed


def _read_config(path: Path) -> dict | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) else None


def is_normquant_export(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by :func:`export_model` (its config.json has a ``normquant``
    section; whether the rest is intact is :func:`load_quantized`'s to check)."""
    config = _read_config(Path(path))
    return config is not None and isinstance(config.get("normquant"), dict) and "export_version" in config["normquant"]


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Load an :func:`export_model` directory: ``(model, tokenizer)``, tokenizer None when none was saved.

    The export is verified first (:mod:`normquant.export.verify`): the safetensors file is complete, the config's
    quantization sections are well-formed and agree with each other, every quantized layer's tensors have the
    dtypes and shapes its specs and ``[out, in]`` imply, and (exports from version 2 on) the manifest's checksums
    hold. Any mismatch is an :class:`ExportError` naming the tensor or file. The model is then built from its
    config (``architectures[0]``, without ``quantization_config``), its quantized linears become QuantLinear
    modules with the exported specs, dequantized weights ``s * (q - z)``, static input scales and fresh dynamic
    activation quantizers, and the layers of each ``transform_config`` scheme get their
    :class:`~normquant.quant.hadamard.OnlineHadamard` back (its stored matrix checked against the one normquant
    builds), so it computes what the exported model did.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ExportError(f"{path} is not a normquant export (no config.json)")
    raw = _read_config(path)
    if raw is None:
        raise ExportError(f"{path / 'config.json'} is not a valid JSON mapping; restore it or re-export")
    if not is_normquant_export(path):
        raise ExportError(f"{path} is not a normquant export (needs config.json with quantization_config "
                          "and normquant sections)")
    version = raw["normquant"]["export_version"]
    if not isinstance(version, int) or version < 1:
        raise ExportError(f"{path / 'config.json'}: normquant.export_version is {show(version)}; re-export")
    if version > EXPORT_VERSION:
        raise ExportError(f"{path} has export version {version}, newer than this normquant "
                          f"reads ({EXPORT_VERSION}); upgrade normquant")
    qconfig, groups = check_config(raw, str(path / "config.json"))
    transforms = read_transform_config(qconfig, str(path / "config.json"))
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ExportError(f"{weights} is missing; re-export")
    header, data_start = read_safetensors_header(weights)
    manifest = read_manifest(path) if version >= 2 else None
    model = _build_model(path, dtype)
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own checks (corrupt file)
        raise ExportError(f"cannot read {weights}: {one_line(e, 160)}; re-export") from None
    matrices = {k: tensors.pop(k) for k in transform_tensor_names(transforms) if k in tensors}
    replaced = _install_quant_linears(model, tensors, qconfig, groups, dtype)  # structural checks, per tensor
    if manifest is not None:
        verify_manifest(path, manifest, raw, weights, header, data_start)  # then every checksum
    else:
        log.warning("%s was exported before normquant wrote manifests (version %d): checksums not verified", path,
                    version)
    prefixes = tuple(f"{name}." for name in replaced)
    rest = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items() if not k.startswith(prefixes)}
    expected = model.state_dict()
    for k, t in rest.items():
        if k in expected and tuple(expected[k].shape) != tuple(t.shape):
            raise ExportError(f"{weights}: tensor {k} has shape {list(t.shape)}, the model "
                              f"({raw.get('architectures', ['?'])[0]}) needs {list(expected[k].shape)}; re-export")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ExportError(f"{weights}: tensor {k} holds NaN or inf values; the export is corrupt: re-export")
    missing, unexpected = model.load_state_dict(rest, strict=False)
    aliases = tied_aliases(model)
    missing = [k for k in missing if not k.startswith(prefixes) and k not in aliases]
    if missing or unexpected:
        raise ExportError(f"{weights} does not match {raw['architectures'][0]}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    install_transforms(model, transforms, matrices, str(weights))
    if raw["normquant"].get("prefix_ids") is not None:  # PrefixQuant (the manifest covers this section)
        set_prefix(model, raw["normquant"]["prefix_ids"])
    set_kv_cache(model, _read_kv_cache(raw, qconfig, str(path / "config.json")))
    tokenizer = None
    if (path / "tokenizer_config.json").exists():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise ExportError(f"cannot load the tokenizer saved in {path}: {type(e).__name__}: {one_line(e, 160)}; "
                              "re-export") from None
    return model.to(device).eval(), tokenizer


def _read_kv_cache(raw: dict, qconfig: dict, where: str) -> KVCacheSpec | None:
    """The export's KV-cache spec (``normquant.kv_cache``); normquant never writes ``kv_cache_scheme``."""
    from pydantic import ValidationError

    if qconfig.get("kv_cache_scheme") is not None:
        raise ExportError(f"{where}: quantization_config.kv_cache_scheme is set, but normquant exports carry their "
                          "KV cache in normquant.kv_cache only; the config was edited: restore it or re-export")
    data = raw["normquant"].get("kv_cache")
    try:
        return None if data is None else KVCacheSpec.model_validate(data)
    except (ValidationError, TypeError) as e:
        msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise ExportError(f"{where}: normquant.kv_cache is not a valid KV-cache spec ({one_line(msg, 120)}); "
                          "re-export") from None


def _install_quant_linears(model: nn.Module, tensors: dict[str, torch.Tensor], qconfig: dict,
                           groups: dict[str, tuple], dtype: torch.dtype) -> list[str]:
    """Replace every linear targeted by a config group with its decompressed QuantLinear (after checking its
    tensors, :func:`~normquant.export.verify.check_layer_tensors`); return their names."""
    replaced: list[str] = []
    ignore = qconfig.get("ignore") or []
    for group_name, group in qconfig["config_groups"].items():
        wspec, aspec, fmt = groups[group_name]
        hits = 0
        for name, module in list(model.named_modules()):
            if (name in replaced or not is_linear(module) or not matches_any(group["targets"], name, module)
                    or matches_any(ignore, name, module)):
                continue
            local = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(f"{name}.")}
            weight = module.weight.t() if type(module).__name__ == "Conv1D" else module.weight  # [out, in]
            check_layer_tensors(name, local, fmt, wspec, aspec, weight.shape[0], weight.shape[1])
            model.set_submodule(name, decompress_linear(local, fmt, wspec, aspec, dtype))
            replaced.append(name)
            hits += 1
        if not hits:
            raise ExportError(f"config_groups.{group_name} targets {one_line(group['targets'][:3], 160)}, which match "
                              f"no linear of {type(model).__name__}; the config was edited: re-export")
    return replaced


def _build_model(path: Path, dtype: torch.dtype) -> nn.Module:
    """A randomly initialized model of the export's architecture, from its config minus the quantization parts."""
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as e:  # unknown model_type, wrong-typed fields...
        raise ExportError(f"{path / 'config.json'} cannot be read by transformers {transformers.__version__}: "
                          f"{one_line(e, 200)}") from None
    for key in ("quantization_config", "normquant"):
        if hasattr(config, key):
            delattr(config, key)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    if model_class is None:
        raise ExportError(f"{path}/config.json names architecture {show(architecture)}, which transformers "
                          f"{transformers.__version__} does not provide")
    try:
        return model_class._from_config(config, dtype=dtype)
    except Exception as e:  # a config transformers accepts but cannot build (edited sizes)
        raise ExportError(f"cannot build {architecture} from {path / 'config.json'}: {type(e).__name__}: "
                          f"{one_line(e, 200)}") from None
