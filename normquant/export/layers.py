"""One QuantLinear <-> its compressed-tensors checkpoint tensors.

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

Codes and zero points are on compressed-tensors' signed grid (:func:`~normquant.export.schema.signed_offset`).
The integers come from :meth:`QuantLinear.integer_weight <normquant.quant.linear.QuantLinear.integer_weight>`;
the weight is rebuilt with :func:`normquant.quant.primitives.dequantize`.
"""
from __future__ import annotations

import torch

from normquant.export.schema import (
    DENSE,
    INT_QUANTIZED,
    PACK_QUANTIZED,
    ExportError,
    scale_shape,
    signed_offset,
    weight_format,
)
from normquant.quant.linear import QuantLinear
from normquant.quant.packing import pack_to_int32, unpack_from_int32
from normquant.quant.primitives import QuantError, dequantize
from normquant.quant.spec import QuantSpec


def compress_linear(ql: QuantLinear, name: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one QuantLinear, keyed by local name (``weight_packed``, ``weight_scale``, ...).

    An online ``input_transform`` is not among them: it travels as a ``transform_config`` entry
    (:mod:`normquant.export.transforms`); its offline half is in the weight already."""
    wspec, aspec = ql.weight_spec, ql.input_quant.spec if ql.input_quant is not None else None
    fmt = weight_format(wspec, aspec)
    out: dict[str, torch.Tensor] = {}
    if fmt == DENSE:
        out["weight"] = ql.weight.detach()
    else:
        try:
            codes, scale, zero = ql.integer_weight()  # [out, in] on normquant's grid; [n, 1]
        except QuantError as e:
            raise ExportError(f"cannot export {name}: {e}") from None
        offset = signed_offset(wspec)
        codes = (codes.cpu() - offset).to(torch.int8)  # signed grid
        shape = scale_shape(wspec, ql.out_features, ql.in_features)
        out["weight_scale"] = scale.detach().float().reshape(shape)
        zero = (zero.detach().cpu() - offset).to(torch.int8).reshape(shape)
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
            zero = ql.input_quant.zero_point.detach() - signed_offset(aspec)
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
        offset = signed_offset(weight_spec)
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
            zero = tensors["input_zero_point"].float().reshape(1, 1) + signed_offset(input_spec)
        ql.input_quant.scale, ql.input_quant.zero_point = scale, zero
        ql.input_quant.observing = False
    return ql
