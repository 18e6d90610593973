"""Export a quantized model as a compressed-tensors checkpoint, and load it back as QuantLinear modules.

An export directory holds ``config.json`` (the HF config plus a ``quantization_config`` in the
compressed-tensors schema and a ``normquant`` section), ``model.safetensors``, the tokenizer files and, for
models that generate, ``generation_config.json``. It is written to a temporary sibling directory and
renamed into place, so a failed export never leaves a partial directory behind.

Tensors of a quantized linear ``<name>`` follow compressed-tensors 0.20 (``compressors/pack_quantized``,
``compressors/naive_quantized``, ``quantization/lifecycle/initialize.py``):

================================  =========================================================================
``<name>.weight_packed``          pack-quantized: int32 ``[out, ceil(in*b/32)]`` (:func:`pack_to_int32`)
``<name>.weight_shape``           pack-quantized: int64 ``[2]`` = ``[out, in]``
``<name>.weight``                 int-quantized: int8 codes ``[out, in]``; dense: the float weight
``<name>.weight_scale``           float32: tensor ``[1]``, channel ``[out, 1]``, group ``[out, in/g]``
``<name>.weight_zero_point``      asymmetric only, int8 in the scale's shape; pack-quantized channel/group
                                  zero points are packed along dim 0: int32 ``[ceil(out*b/32), n]``
``<name>.bias``                   float, the model's dtype
``<name>.input_scale``            static activations: float32 ``[1]``
``<name>.input_zero_point``       static asymmetric activations: int8 ``[1]``
================================  =========================================================================

compressed-tensors uses the signed grid ``[-2^(b-1), 2^(b-1)-1]`` for every int quantizer; normquant's
asymmetric grid is unsigned ``[0, 2^b-1]``, so asymmetric codes and zero points are shifted by ``-2^(b-1)``
on export (``q - z`` and therefore ``s * (q - z)`` are unchanged). Scales are stored in float32, so a
reloaded model reproduces the exported one exactly.

Format per config group (compressed-tensors' own inference, ``compressors/format.py``, except that <= 4-bit
weights are always packed): ``int-quantized`` for > 4-bit weights with quantized inputs (W8A8),
``pack-quantized`` for weight-only schemes and every <= 4-bit weight, ``dense`` for activation-only
quantization. Each group carries its ``format``; the top-level ``format`` is that format, or
``mixed-precision`` when groups differ. Groups target modules by exact name.

>>> path = export_model(model, tokenizer, "out/llama-w4")                         # doctest: +SKIP
>>> model, tokenizer = load_quantized(path)                                      # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from normquant.quant.linear import QuantLinear
from normquant.quant.primitives import dequantize, reduction_view
from normquant.quant.spec import QuantSpec

#: compressed-tensors release whose layout (dense LSB-first int32 packing) these files follow.
COMPRESSED_TENSORS_VERSION = "0.20.0"
#: version of the ``normquant`` section in config.json; bumped when its meaning changes.
EXPORT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"

PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
DENSE = "dense"
MIXED_PRECISION = "mixed-precision"


class ExportError(ValueError):
    """A model or checkpoint that cannot be exported or loaded; the message says what to change."""


# ---------------------------------------------------------------------------------------------------------
# int32 packing (compressed-tensors ``pack_to_int32`` / ``unpack_from_int32``)
# ---------------------------------------------------------------------------------------------------------


def pack_to_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed ``bits``-bit codes into int32 along ``dim``, densely (no padding bits between codes).

    Layout of compressed-tensors 0.20: along ``dim``, each code is offset by ``+2^(b-1)`` to ``[0, 2^b)``
    and code ``i`` occupies bits ``[i*b, (i+1)*b)`` of a little-endian bit stream (a code may straddle two
    words); the stream is cut into ceil(n*b/32) int32 words. For ``b = 4`` this is 8 nibbles per word, low
    nibble first.

    ``codes`` int ``[rows, cols]`` -> int32 ``[rows, ceil(cols*b/32)]`` (``dim=1``) or
    ``[ceil(rows*b/32), cols]`` (``dim=0``).
    """
    if dim == 0:
        return pack_to_int32(codes.t(), bits).t().contiguous()
    rows, cols = codes.shape
    n_groups = math.ceil(cols / 32)  # 32 codes fill exactly `bits` words
    u = codes.to(torch.int32) + 2 ** (bits - 1)
    u = nn.functional.pad(u, (0, n_groups * 32 - cols)).reshape(rows, n_groups, 32)  # [rows, cols] -> [rows, G, 32]
    u = u.permute(2, 0, 1).contiguous()  # [32, rows, G]: code i of every group
    words = torch.zeros(bits, rows, n_groups, dtype=torch.int32)  # [b, rows, G]
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        words[word] |= u[i] << offset  # wraps around: only the low 32 bits are kept
        if offset + bits > 32:  # the high bits spill into the next word
            words[word + 1] |= u[i] >> (32 - offset)
    words = words.permute(1, 2, 0).reshape(rows, n_groups * bits)  # [rows, G*b]
    return words[:, : math.ceil(cols * bits / 32)].contiguous()


def unpack_from_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_to_int32`: int32 words -> int8 signed codes of ``shape`` (the unpacked shape)."""
    if dim == 0:
        return unpack_from_int32(packed.t(), bits, (shape[1], shape[0])).t().contiguous()
    rows, cols = shape
    n_groups = math.ceil(cols / 32)
    words = nn.functional.pad(packed, (0, n_groups * bits - packed.shape[1])).reshape(rows, n_groups, bits)
    words = words.permute(2, 0, 1).contiguous()  # [b, rows, G]
    u = torch.empty(32, rows, n_groups, dtype=torch.int32)  # [32, rows, G]: code i of every group
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        value = words[word] >> offset
        if offset + bits > 32:  # drop the sign-extension bits, then take the low bits of the next word
            value = (value & (2 ** (32 - offset) - 1)) | (words[word + 1] << (32 - offset))
        u[i] = value & (2**bits - 1)
    u = u.permute(1, 2, 0).reshape(rows, n_groups * 32)  # [rows, G*32]
    return (u[:, :cols] - 2 ** (bits - 1)).to(torch.int8)


# ---------------------------------------------------------------------------------------------------------
# QuantSpec <-> compressed-tensors QuantizationArgs, and the format of a group
# ---------------------------------------------------------------------------------------------------------


def quantization_args(spec: QuantSpec, role: str) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` dict of ``spec``; ``role``: ``"weights"`` or ``"input_activations"``.

    Weight ``token`` granularity (one scale per output row) is the ``channel`` strategy. compressed-tensors has
    no per-channel activation strategy, so such specs are refused.
    """
    strategy = spec.granularity
    if role == "weights" and strategy == "token":
        strategy = "channel"
    if role == "input_activations" and strategy == "channel":
        raise ExportError(f"activation spec {spec.short()} cannot be exported: compressed-tensors has no per-channel "
                          "activation strategy; use granularity tensor (static) or token (dynamic)")
    dynamic = spec.dynamic and role == "input_activations"
    args: dict[str, Any] = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "group_size": spec.group_size,
        "strategy": strategy,
        "dynamic": dynamic,
        "observer": None if dynamic else spec.observer,  # metadata: how the range was calibrated
    }
    if not spec.symmetric:
        args["zp_dtype"] = "torch.int8"
    return args


def weight_format(weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> str:
    """compressed-tensors format of a linear with these specs (see the module docstring)."""
    if weight_spec is None:
        return DENSE
    if weight_spec.bits > 4 and input_spec is not None:
        return INT_QUANTIZED
    return PACK_QUANTIZED


# ---------------------------------------------------------------------------------------------------------
# one QuantLinear <-> its checkpoint tensors
# ---------------------------------------------------------------------------------------------------------


def _signed_offset(spec: QuantSpec) -> int:
    """What to subtract from normquant codes to land on compressed-tensors' signed grid."""
    return 0 if spec.symmetric else 2 ** (spec.bits - 1)


def _scale_shape(spec: QuantSpec, out_features: int, in_features: int) -> tuple[int, ...]:
    """compressed-tensors' shape of a weight scale (``initialize_qparams``)."""
    if spec.granularity == "tensor":
        return (1,)
    if spec.granularity == "group":
        return (out_features, in_features // spec.group_size)
    return (out_features, 1)  # channel / token


def integer_codes(ql: QuantLinear, name: str) -> torch.Tensor:
    """Integer codes ``round(W / s) + z`` of a quantized ``ql.weight`` ``[out, in]``, on normquant's grid (int16).

    Raises :class:`ExportError` when the weight is not on its quantization grid (it was changed after
    ``quantize_weight``): the codes would not reproduce it.
    """
    spec, w = ql.weight_spec, ql.weight.detach().cpu()
    wv, restore = reduction_view(w.float(), spec, channel_axis=0)  # [n, k], one (s, z) per row
    s, z = ql.weight_scale.cpu(), ql.weight_zero_point.cpu()  # [n, 1]
    q = torch.clamp(torch.round(wv / s) + z, spec.qmin, spec.qmax)
    w_hat = (s * (q - z)).to(w.dtype).float()
    eps = torch.finfo(w.dtype).eps
    off_grid = (w_hat - wv).abs() > 4 * eps * wv.abs() + torch.finfo(torch.float32).eps * s
    if off_grid.any():
        raise ExportError(f"weight of {name} is off its quantization grid at {int(off_grid.sum())} entries "
                          "(changed after quantize_weight?); re-run quantize_weight before exporting")
    return restore(q).to(torch.int16)


def compress_linear(ql: QuantLinear, name: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one QuantLinear, keyed by local name (``weight_packed``, ``weight_scale``, ...)."""
    wspec, aspec = ql.weight_spec, ql.input_quant.spec if ql.input_quant is not None else None
    fmt = weight_format(wspec, aspec)
    out: dict[str, torch.Tensor] = {}
    if fmt == DENSE:
        out["weight"] = ql.weight.detach()
    else:
        if not ql.weight_quantized:
            raise ExportError(f"{name} has weight spec {wspec.short()} but its weight was never quantized; "
                              "call quantize_weight() (or run the recipe) before exporting")
        offset = _signed_offset(wspec)
        codes = (integer_codes(ql, name) - offset).to(torch.int8)  # [out, in], signed grid
        scale_shape = _scale_shape(wspec, ql.out_features, ql.in_features)
        out["weight_scale"] = ql.weight_scale.detach().float().reshape(scale_shape)
        zero = (ql.weight_zero_point.detach() - offset).to(torch.int8).reshape(scale_shape)
        if fmt == PACK_QUANTIZED:
            out["weight_packed"] = pack_to_int32(codes, wspec.bits)
            out["weight_shape"] = torch.tensor([ql.out_features, ql.in_features], dtype=torch.int64)
            if wspec.granularity != "tensor":  # compressed-tensors packs channel/group zero points (PACK_ZP_STRATS)
                zero = pack_to_int32(zero, wspec.bits, dim=0)
        else:
            out["weight"] = codes
        if not wspec.symmetric:
            out["weight_zero_point"] = zero
    if ql.bias is not None:
        out["bias"] = ql.bias.detach()
    if aspec is not None and not aspec.dynamic:
        if ql.input_quant.scale is None:
            raise ExportError(f"static activation quantizer of {name} is not calibrated; run calibration "
                              "(observe, then freeze) before exporting")
        out["input_scale"] = ql.input_quant.scale.detach().float().reshape(1)
        if not aspec.symmetric:
            zero = ql.input_quant.zero_point.detach() - _signed_offset(aspec)
            out["input_zero_point"] = zero.to(torch.int8).reshape(1)
    return {k: v.cpu().contiguous() for k, v in out.items()}


def decompress_linear(tensors: dict[str, torch.Tensor], fmt: str, weight_spec: QuantSpec | None,
                      input_spec: QuantSpec | None, dtype: torch.dtype) -> QuantLinear:
    """Rebuild a QuantLinear from its checkpoint tensors (local names); inverse of :func:`compress_linear`.

    The weight is ``s * (q - z)`` in float32 cast to ``dtype``, exactly what ``quantize_weight`` computes.
    """
    bias = tensors.get("bias")
    bias = None if bias is None else bias.to(dtype)
    if fmt == DENSE:
        ql = QuantLinear(tensors["weight"].to(dtype), bias, None, input_spec)
    else:
        if fmt == PACK_QUANTIZED:
            shape = tuple(int(d) for d in tensors["weight_shape"])
            codes = unpack_from_int32(tensors["weight_packed"], weight_spec.bits, shape)
        elif fmt == INT_QUANTIZED:
            codes, shape = tensors["weight"], tuple(tensors["weight"].shape)
        else:
            raise ExportError(f"unsupported compressed-tensors format '{fmt}'; normquant reads {PACK_QUANTIZED}, "
                              f"{INT_QUANTIZED} and {DENSE}")
        offset = _signed_offset(weight_spec)
        scale = tensors["weight_scale"].float()
        if weight_spec.symmetric:
            zero = torch.zeros_like(scale)
        else:
            zero = tensors["weight_zero_point"]
            if fmt == PACK_QUANTIZED and weight_spec.granularity != "tensor":
                zero = unpack_from_int32(zero, weight_spec.bits, tuple(scale.shape), dim=0)
            zero = zero.float() + offset
        scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)  # [n, 1] on the reduction view
        weight = dequantize(codes.to(torch.int16) + offset, scale, zero, weight_spec, channel_axis=0)
        ql = QuantLinear(weight.reshape(shape).to(dtype), bias, weight_spec, input_spec)
        ql.weight_scale, ql.weight_zero_point = scale, zero
    if input_spec is not None and not input_spec.dynamic:
        scale = tensors["input_scale"].float().reshape(1, 1)
        if input_spec.symmetric:
            zero = torch.zeros_like(scale)
        else:
            zero = tensors["input_zero_point"].float().reshape(1, 1) + _signed_offset(input_spec)
        ql.input_quant.scale, ql.input_quant.zero_point = scale, zero
        ql.input_quant.observing = False
    return ql


# ---------------------------------------------------------------------------------------------------------
# whole model -> (tensors, quantization_config, quant_specs)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Group:
    weight_spec: QuantSpec | None
    input_spec: QuantSpec | None
    modules: list[str] = field(default_factory=list)

    @property
    def format(self) -> str:
        return weight_format(self.weight_spec, self.input_spec)


def _quant_groups(model: nn.Module) -> list[_Group]:
    """QuantLinear modules grouped by ``(weight_spec, input_spec)``, in module order; plain ones left out."""
    groups: dict[tuple, _Group] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        aspec = module.input_quant.spec if module.input_quant is not None else None
        if module.weight_spec is None and aspec is None:
            continue
        groups.setdefault((module.weight_spec, aspec), _Group(module.weight_spec, aspec)).modules.append(name)
    return list(groups.values())


def _tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names that alias an earlier parameter or buffer (tied weights), e.g. ``lm_head.weight``."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    every |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    unique = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return every - unique


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear)) or type(module).__name__ == "Conv1D"


def compressed_checkpoint(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(tensors, quantization_config, quant_specs)`` of a model whose quantized linears are QuantLinear modules.

    Tensors of non-quantized modules keep their HF names and dtypes; tied aliases are stored once.
    ``quant_specs`` holds each config group's exact QuantSpecs (``clip_ratio`` and weight ``token``
    granularity have no compressed-tensors field).
    """
    groups = _quant_groups(model)
    if not groups:
        raise ExportError("model has no quantized QuantLinear modules; quantize it before exporting")
    config_groups = {}  # built first: refuses inexpressible specs before any tensor work
    for i, g in enumerate(groups):
        config_groups[f"group_{i}"] = {
            "targets": g.modules,
            "weights": quantization_args(g.weight_spec, "weights") if g.weight_spec else None,
            "input_activations": quantization_args(g.input_spec, "input_activations") if g.input_spec else None,
            "output_activations": None,
            "format": g.format,
        }
    quantized = [name for g in groups for name in g.modules]
    tensors: dict[str, torch.Tensor] = {}
    for name in quantized:
        for key, t in compress_linear(model.get_submodule(name), name).items():
            tensors[f"{name}.{key}"] = t
    aliases, prefixes = _tied_aliases(model), tuple(f"{name}." for name in quantized)
    for key, t in model.state_dict().items():
        if key not in aliases and not key.startswith(prefixes):
            tensors[key] = t.detach().cpu().contiguous()
    formats = {g.format for g in groups}
    ignore = [name for name, m in model.named_modules() if _is_linear(m) and name not in quantized]
    quantization_config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED_PRECISION,
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }
    quant_specs = {
        f"group_{i}": {
            "weights": g.weight_spec.model_dump() if g.weight_spec else None,
            "input_activations": g.input_spec.model_dump() if g.input_spec else None,
        }
        for i, g in enumerate(groups)
    }
    return tensors, quantization_config, quant_specs


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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_export(model, tokenizer, tmp, extra_metadata)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_export(model: nn.Module, tokenizer: Any, directory: Path, extra_metadata: dict | None) -> None:
    tensors, quantization_config, quant_specs = compressed_checkpoint(model)
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quantization_config
    config["normquant"] = {"export_version": EXPORT_VERSION, "quant_specs": quant_specs,
                           "metadata": dict(extra_metadata or {})}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first and deleted after."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old)


def _read_config(path: Path) -> dict | None:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None


def is_normquant_export(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by :func:`export_model`."""
    config = _read_config(Path(path))
    return (config is not None
            and (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"
            and isinstance(config.get("normquant"), dict) and "export_version" in config["normquant"])


def _matches(name: str, module: nn.Module, targets: list[str]) -> bool:
    """compressed-tensors target matching: exact name, ``re:<regex>`` on the name, or a class name."""
    return any(re.match(t[3:], name) if t.startswith("re:") else t in (name, type(module).__name__) for t in targets)


def _spec(data: dict | None) -> QuantSpec | None:
    return None if data is None else QuantSpec.model_validate(data)


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Load an :func:`export_model` directory: ``(model, tokenizer)``, tokenizer None when none was saved.

    The model is built from its config (``architectures[0]``, without ``quantization_config``), its quantized
    linears become QuantLinear modules with the exported specs, dequantized weights ``s * (q - z)``,
    static input scales and fresh dynamic activation quantizers, so it computes what the exported model did.
    """
    path = Path(path)
    if not is_normquant_export(path):
        raise ExportError(f"{path} is not a normquant export (needs config.json with quantization_config "
                          "and normquant sections)")
    raw = _read_config(path)
    section, qconfig = raw["normquant"], raw["quantization_config"]
    if section["export_version"] > EXPORT_VERSION:
        raise ExportError(f"{path} has export version {section['export_version']}, newer than this normquant "
                          f"reads ({EXPORT_VERSION}); upgrade normquant")
    model = _build_model(path, dtype)
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    replaced = _install_quant_linears(model, tensors, qconfig, section["quant_specs"], dtype)
    prefixes = tuple(f"{name}." for name in replaced)
    rest = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items() if not k.startswith(prefixes)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    aliases = _tied_aliases(model)
    missing = [k for k in missing if not k.startswith(prefixes) and k not in aliases]
    if missing or unexpected:
        raise ExportError(f"{path / WEIGHTS_NAME} does not match {raw['architectures'][0]}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    tokenizer = None
    if (path / "tokenizer_config.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def _install_quant_linears(model: nn.Module, tensors: dict[str, torch.Tensor], qconfig: dict,
                           quant_specs: dict, dtype: torch.dtype) -> list[str]:
    """Replace every linear targeted by a config group with its decompressed QuantLinear; return their names."""
    replaced: list[str] = []
    ignore = qconfig.get("ignore") or []
    for group_name, group in qconfig["config_groups"].items():
        wspec, aspec = (_spec(quant_specs[group_name][role]) for role in ("weights", "input_activations"))
        fmt = group.get("format") or qconfig["format"]
        for name, module in list(model.named_modules()):
            if (name in replaced or not _is_linear(module) or not _matches(name, module, group["targets"])
                    or _matches(name, module, ignore)):
                continue
            local = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(f"{name}.")}
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, decompress_linear(local, fmt, wspec, aspec, dtype))
            replaced.append(name)
    return replaced


def _build_model(path: Path, dtype: torch.dtype) -> nn.Module:
    """A randomly initialized model of the export's architecture, from its config minus the quantization parts."""
    config = transformers.AutoConfig.from_pretrained(path)
    for key in ("quantization_config", "normquant"):
        if hasattr(config, key):
            delattr(config, key)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ExportError(f"{path}/config.json names architecture {architecture!r}, which transformers "
                          f"{transformers.__version__} does not provide")
    return model_class._from_config(config, dtype=dtype)
