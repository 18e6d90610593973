"""Export quantized models as compressed-tensors checkpoints, and load them back.

* :mod:`normquant.export.schema`: QuantSpec <-> compressed-tensors ``quantization_config`` (args, formats, grid);
* :mod:`normquant.export.layers`: one QuantLinear <-> its checkpoint tensors;
* :mod:`normquant.export.checkpoint`: the whole model <-> an export directory (written atomically).

``pack_to_int32`` / ``unpack_from_int32`` live in :mod:`normquant.quant.packing`; they are re-exported here.
"""
from normquant.export.checkpoint import export_model, is_normquant_export, load_quantized
from normquant.export.schema import ExportError
from normquant.quant.packing import pack_to_int32, unpack_from_int32

__all__ = ["ExportError", "export_model", "is_normquant_export", "load_quantized", "pack_to_int32", "unpack_from_int32"]
