"""Export quantized models as compressed-tensors checkpoints, and load them back."""
from normquant.export.compressed_tensors import (
    ExportError,
    export_model,
    is_normquant_export,
    load_quantized,
    pack_to_int32,
    unpack_from_int32,
)

__all__ = ["ExportError", "export_model", "is_normquant_export", "load_quantized", "pack_to_int32", "unpack_from_int32"]
