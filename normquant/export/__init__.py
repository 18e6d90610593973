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


import sys as _sys  # noqa: E402
import types as _types  # noqa: E402


class _ExportPackage(_types.ModuleType):
    """``normquant.export`` is this package and, called, the Python API's ``export(model, path, *, tokenizer=None,
    force=False, metadata=None)`` (:func:`normquant.api.export`): one name, one object, whatever was imported
    first."""

    def __call__(self, model, path, *, tokenizer=None, force: bool = False, metadata: dict | None = None):
        return export_model(model, tokenizer, path, force=force, extra_metadata=metadata)


_sys.modules[__name__].__class__ = _ExportPackage
