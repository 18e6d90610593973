"""QuantSpec <-> the compressed-tensors ``quantization_config`` schema: quantization args, formats, grids.

``config.json["quantization_config"]`` follows compressed-tensors 0.20 (``QuantizationConfig``): one config
group per distinct ``(weight spec, input spec)``, each targeting its modules by exact name, plus ``ignore``
(every other linear). Specs map to ``QuantizationArgs`` by :func:`quantization_args` (a KV cache's args:
:func:`kv_cache_args`, recorded in the ``normquant`` section only).

Format per config group (compressed-tensors' own inference, ``compressors/format.py``, except that <= 4-bit
weights are always packed): ``int-quantized`` for > 4-bit weights with quantized inputs (W8A8),
``pack-quantized`` for weight-only schemes and every <= 4-bit weight, ``dense`` for activation-only
quantization. Each group carries its ``format``; the top-level ``format`` is that format, or
``mixed-precision`` when groups differ. Online transforms (the rotation's R4) are its ``transform_config``
(:mod:`normquant.export.transforms`).

compressed-tensors uses the signed grid ``[-2^(b-1), 2^(b-1)-1]`` for every int quantizer; normquant's
asymmetric grid is unsigned ``[0, 2^b-1]``, so asymmetric codes and zero points are shifted by
``-2^(b-1)`` (:func:`signed_offset`) in the checkpoint (``q - z`` and therefore ``s * (q - z)`` are unchanged).
Scales are stored in float32, so a reloaded model reproduces the exported one exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from normquant.quant.kv import KVCacheSpec
from normquant.quant.spec import QuantSpec

#: compressed-tensors release whose layout (dense LSB-first int32 packing) these files follow.
COMPRESSED_TENSORS_VERSION = "0.20.0"

PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
DENSE = "dense"
MIXED_PRECISION = "mixed-precision"


class ExportError(ValueError):
    """A model or checkpoint that cannot be exported or loaded; the message says what to change."""


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
    if spec.outlier_threshold is not None:
        raise ExportError(f"activation spec {spec.short()} uses the LLM.int8 decomposition (outlier_threshold), which "
                          "compressed-tensors cannot express; export a scheme without it")
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


def kv_cache_args(spec: KVCacheSpec, head_dim: int) -> tuple[dict[str, Any] | None, str]:
    """``(args, why not)``: compressed-tensors ``QuantizationArgs`` dict of a KV-cache spec — per-token-head RTN is
    its dynamic ``group`` strategy with ``group_size = head_dim`` (one group per token per head of the
    ``[B, H, T, D]`` keys / values it quantizes; the arithmetic of :mod:`normquant.quant.kv`, tested against
    compressed-tensors' functions) — or ``None`` and the reason where the schema cannot express the cache.

    Exports record these args as ``normquant.kv_cache_scheme`` but leave ``quantization_config.kv_cache_scheme``
    null: vLLM (0.33) refuses to load a checkpoint whose kv_cache_scheme is not 8-bit float with strategy tensor
    or attn_head (NotImplementedError), and compressed-tensors 0.20.1 applies none under transformers 5.24."""
    why = ("KIVI's per-channel key groups" if spec.method == "kivi" else
           "NSNQuant's vector quantization" if spec.method == "nsn" else
           f"a float window of the {spec.residual} most recent tokens" if spec.residual else
           "Hadamard-rotated keys (R3)" if spec.rotate_keys else "")
    if why:
        return None, why
    symmetric = spec.symmetric is not False
    args = {"num_bits": spec.bits, "type": "int", "symmetric": symmetric, "group_size": head_dim, "strategy": "group",
            "dynamic": True, "observer": None}
    if not symmetric:
        args["zp_dtype"] = "torch.int8"
    return args, ""


def weight_format(weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> str:
    """compressed-tensors format of a linear with these specs (see the module docstring)."""
    if weight_spec is None:
        return DENSE
    if weight_spec.bits > 4 and input_spec is not None:
        return INT_QUANTIZED
    return PACK_QUANTIZED


def signed_offset(spec: QuantSpec) -> int:
    """What to subtract from normquant codes (and zero points) to land on compressed-tensors' signed grid."""
    return 0 if spec.symmetric else 2 ** (spec.bits - 1)


def scale_shape(spec: QuantSpec, out_features: int, in_features: int) -> tuple[int, ...]:
    """compressed-tensors' shape of a weight scale (``initialize_qparams``)."""
    if spec.granularity == "tensor":
        return (1,)
    if spec.granularity == "group":
        return (out_features, in_features // spec.group_size)
    return (out_features, 1)  # channel / token


@dataclass
class ConfigGroup:
    """The modules (exact names) that share one ``(weight_spec, input_spec)``."""

    weight_spec: QuantSpec | None
    input_spec: QuantSpec | None
    modules: list[str] = field(default_factory=list)

    @property
    def format(self) -> str:
        return weight_format(self.weight_spec, self.input_spec)


def quantization_config(groups: list[ConfigGroup], ignore: list[str],
                        transform_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` of these groups (``group_0``, ``group_1``, ... in order) and online transforms
    (:func:`normquant.export.transforms.transform_config`); refuses (:class:`ExportError`) specs compressed-tensors
    cannot express. ``kv_cache_scheme`` stays null (:func:`kv_cache_args`)."""
    config_groups = {
        f"group_{i}": {
            "targets": g.modules,
            "weights": quantization_args(g.weight_spec, "weights") if g.weight_spec else None,
            "input_activations": quantization_args(g.input_spec, "input_activations") if g.input_spec else None,
            "output_activations": None,
            "format": g.format,
        }
        for i, g in enumerate(groups)
    }
    formats = {g.format for g in groups}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED_PRECISION if formats else DENSE,
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": transform_config or {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def quant_specs(groups: list[ConfigGroup]) -> dict[str, Any]:
    """normquant's exact specs per group (``clip_ratio`` and weight ``token`` granularity have no
    compressed-tensors field), for ``config.json["normquant"]["quant_specs"]``."""
    return {
        f"group_{i}": {
            "weights": g.weight_spec.model_dump() if g.weight_spec else None,
            "input_activations": g.input_spec.model_dump() if g.input_spec else None,
        }
        for i, g in enumerate(groups)
    }


def spec_from_dict(data: dict | None) -> QuantSpec | None:
    """Inverse of ``QuantSpec.model_dump`` (None stays None)."""
    return None if data is None else QuantSpec.model_validate(data)
