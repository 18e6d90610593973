"""normquant's Python API: :func:`load`, :func:`quantize`, :func:`evaluate`, :func:`export`, :func:`convert`.

Everything the CLI does, on model objects you hold. Recipes may be a :class:`~normquant.recipe.Recipe`, a
YAML path or a dict; calibration data is built from the recipe's ``calibration`` section when you pass the
tokenizer (or pass your own token ids or texts). A quantized model is a Hugging Face model whose target
linears are fake-quant :class:`~normquant.quant.linear.QuantLinear` modules, computing what
transformers + compressed-tensors compute on its export; its ``save_pretrained`` writes that export.

>>> import normquant as nq
>>> model, tokenizer = nq.load("smollm2-135m")                                     # doctest: +SKIP
>>> nq.quantize(model, "recipes/w8a8_rtn.yaml", tokenizer=tokenizer)                # doctest: +SKIP
>>> nq.evaluate(model, tokenizer, windows=2, seqlen=512).ppl                       # doctest: +SKIP
29.091...
>>> nq.export(model, "out/smollm2-w8a8", tokenizer=tokenizer)                      # doctest: +SKIP
>>> model, tokenizer = nq.load("out/smollm2-w8a8")                                 # doctest: +SKIP

This module imports nothing heavy at import time: ``import normquant`` stays fast.
"""
from __future__ import annotations

import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from normquant.evaluation.perplexity import PerplexityResult
    from normquant.recipe import Recipe

RecipeLike = Union["Recipe", str, os.PathLike, Mapping]
"""A :class:`~normquant.recipe.Recipe`, the path of a recipe YAML, or the recipe as a dict."""
CalibrationLike = Union["torch.Tensor", Sequence[str], Mapping, None]
"""Token ids ``[N, L]``, a list of texts, overrides of the recipe's ``calibration`` section, or None."""

__all__ = ["load", "quantize", "evaluate", "export", "convert", "as_recipe"]


def as_recipe(recipe: RecipeLike) -> "Recipe":
    """A validated :class:`~normquant.recipe.Recipe` from a Recipe, a YAML path or a dict.

    >>> as_recipe({"scheme": {"weights": {"bits": 8}}, "steps": ["rtn"]}).scheme.weights.bits
    8
    """
    from normquant.recipe import Recipe, load_recipe, parse_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe), "<dict recipe>")
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    raise TypeError(f"recipe must be a Recipe, a YAML path or a dict, not {type(recipe).__name__}")


def load(name_or_path: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu",
         offload: bool = False) -> tuple["nn.Module", Any]:
    """Load ``(model, tokenizer)``: a packaged short name (``smollm2-135m``), a local HF folder, a ``.gguf``
    file, a hub id ``owner/name``, or a normquant export (its quantized linears come back as QuantLinear).

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; an unavailable device is a one-line ValueError.
    ``offload=True``: a model larger than memory — its blocks' float weights stay on disk until :func:`quantize`
    reads them one at a time and keeps each finished block packed (:mod:`normquant.models.streaming`, on CPU);
    it cannot run before it is quantized.

    >>> model, tokenizer = load("smollm2-135m")                                     # doctest: +SKIP
    """
    from normquant.devices import check_device
    from normquant.models.loading import load_model

    if offload:
        from normquant.models.streaming import load_streamed

        return load_streamed(str(name_or_path), dtype=dtype)

    model, tokenizer = load_model(str(name_or_path), dtype=dtype, device=check_device(device))
    if _has_quant_linears(model):
        _install_save_pretrained(model, tokenizer)
    return model, tokenizer


def quantize(model: "nn.Module", recipe: RecipeLike, calibration: CalibrationLike = None, *, tokenizer: Any = None,
             data_dir: str | os.PathLike | None = None, progress: bool = False) -> "nn.Module":
    """Quantize ``model`` in place following ``recipe`` and return it.

    The recipe's ``model``, ``device`` and ``evaluation`` fields are ignored: the model is the one you pass, where
    it is. Calibration, when the recipe needs it (a step that reads data, or static input activations):

    * ``calibration=None`` with ``tokenizer``: built from the recipe's ``calibration`` section (C4 validation,
      ``samples`` x ``seqlen`` tokens, seeded; ``selfgen`` generates it with the model);
    * a dict, e.g. ``{"samples": 16, "seqlen": 512}``: overrides of that section, then built the same way;
    * token ids ``[N, L]`` (a LongTensor): used as they are;
    * a list of texts: joined with ``"\\n\\n"``, tokenized, cut into up to ``samples`` segments of ``seqlen``.

    Afterwards ``model.save_pretrained(path)`` writes the compressed-tensors export (as :func:`export`).

    >>> import normquant as nq
    >>> model, tok = nq.load("smollm2-135m")                                         # doctest: +SKIP
    >>> nq.quantize(model, "recipes/w8a8_static.yaml", tokenizer=tok,
    ...             calibration={"samples": 8, "seqlen": 512})                       # doctest: +SKIP
    """
    from normquant.pipeline.run import quantize as run_quantize

    recipe = as_recipe(recipe)
    calib = None
    if recipe.needs_data:
        recipe, calib = _calibration(model, recipe, calibration, tokenizer, data_dir)
    device = str(next(model.parameters()).device)
    run_quantize(model, recipe, calib, device=device, progress=progress)
    _install_save_pretrained(model, tokenizer)
    return model


def _calibration(model, recipe, calibration, tokenizer, data_dir):
    import torch

    from normquant.recipe import parse_recipe

    if isinstance(calibration, Mapping):
        recipe = parse_recipe(recipe.to_dict(), "<recipe>", overrides={"calibration": dict(calibration)})
        calibration = None
    cal = recipe.calibration
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.is_floating_point():
            raise ValueError(f"calibration token ids must be an integer tensor [N, L], got {calibration.dtype} "
                             f"{tuple(calibration.shape)}")
        return recipe, calibration
    if tokenizer is None:
        raise ValueError("this recipe needs calibration data: pass tokenizer= (normquant builds "
                         f"{cal.samples}x{cal.seqlen} tokens of {cal.dataset}) or calibration= (token ids [N, L] or "
                         "a list of texts)")
    if calibration is None:
        from normquant.data import calibration_ids

        return recipe, calibration_ids(cal, model, tokenizer, data_dir)
    if isinstance(calibration, str) or not isinstance(calibration, Sequence):
        raise TypeError(f"calibration must be token ids, a list of texts or a dict, not {type(calibration).__name__}")
    ids = tokenizer("\n\n".join(calibration), return_tensors="pt").input_ids.reshape(-1)
    n = min(cal.samples, ids.numel() // cal.seqlen)
    if n == 0:
        raise ValueError(f"the calibration texts hold {ids.numel()} tokens, fewer than one segment of "
                         f"{cal.seqlen}; pass more text or calibration={{'seqlen': ...}} smaller")
    return recipe, ids[: n * cal.seqlen].reshape(n, cal.seqlen)


def evaluate(model: "nn.Module", tokenizer: Any = None, *, dataset: str = "wikitext2", split: str | None = None,
             seqlen: int = 2048, windows: int | None = None, batch_size: int = 1,
             data_dir: str | os.PathLike | None = None, input_ids: "torch.Tensor | None" = None,
             progress: bool = False) -> "PerplexityResult":
    """Perplexity under normquant's one protocol (the text tokenized once, non-overlapping ``seqlen`` windows,
    ``windows`` = the first N only): ``wikitext2`` / ``ptb`` test or ``c4`` validation, or your ``input_ids``
    ``[1, n]``. Returns a :class:`~normquant.evaluation.perplexity.PerplexityResult` (``.ppl``, ``.windows``...).

    >>> evaluate(model, tokenizer, windows=4, data_dir="../shared/data").ppl        # doctest: +SKIP
    """
    from normquant.evaluation.datasets import eval_split
    from normquant.evaluation.perplexity import evaluate_perplexity

    if input_ids is None:
        if tokenizer is None:
            raise ValueError("evaluate needs tokenizer= (to tokenize the evaluation text) or input_ids=")
        from normquant.data.text import tokenize_eval

        input_ids = tokenize_eval(tokenizer, dataset, split or eval_split(dataset), data_dir)
    return evaluate_perplexity(model, input_ids, seqlen=seqlen, windows=windows, batch_size=batch_size,
                               progress=progress)


def export(model: "nn.Module", path: str | os.PathLike, *, tokenizer: Any = None, force: bool = False,
           metadata: dict | None = None) -> Path:
    """Write a quantized model as a compressed-tensors checkpoint directory (atomically) and return its path.

    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` (with compressed-tensors installed) and
    :func:`load` both read it and compute the same logits; ``config.json["normquant"]["serving"]`` says so, or
    why not. An existing ``path`` is refused unless ``force``. ``normquant.export`` (the package) is callable
    with these arguments too.

    >>> export(model, "out/smollm2-w8a8", tokenizer=tokenizer)                      # doctest: +SKIP
    PosixPath('out/smollm2-w8a8')
    """
    from normquant.export import export_model

    return export_model(model, tokenizer, path, force=force, extra_metadata=metadata)


def convert(model: "nn.Module", *, backend: str | None = None, int4: bool | None = None) -> dict:
    """Run the quantized linears of ``model`` for real (in place, :func:`normquant.quant.real.convert`): int8 GEMMs
    where this machine sums them exactly (oneDNN on CPU, ``torch._int_mm`` on CUDA), int4 GEMMs for W4A16 on CUDA
    (tinygemm, bfloat16), packed integer weights for every other quantized weight. Returns ``{"converted": {name:
    kind}, "kept": {name: why}, "why_not_int8": {name: why}, "activation_bits": b, "backend": ...}``. Perplexity
    through the converted model equals the fake path's up to float32 rounding (bfloat16 for int4 on CUDA).
    Convert after exporting: an export reads the fake-quant modules.

    >>> convert(model)["kept"]                                                         # doctest: +SKIP
    {}
    """
    from normquant.quant.real import convert as convert_model

    return convert_model(model, backend=backend, int4=int4)


# ------------------------------------------------------------------------------------------ save_pretrained


def _has_quant_linears(model) -> bool:
    from normquant.quant.linear import QuantLinear

    return any(isinstance(m, QuantLinear) for m in model.modules())


def _install_save_pretrained(model, tokenizer) -> None:
    """Make ``model.save_pretrained`` write the quantized export instead of a float checkpoint."""
    model.save_pretrained = types.MethodType(_save_quantized, model)


def _save_quantized(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                    safe_serialization: bool = True, **kwargs) -> None:
    """``save_pretrained`` of a normquant-quantized model: the compressed-tensors export (``normquant.export``).

    The directory may be new, empty, or an earlier normquant export (replaced); anything else is refused, as are
    options other than ``is_main_process`` / ``safe_serialization=True`` (one-line ValueError). The tokenizer is
    not saved (as with transformers): ``tokenizer.save_pretrained(path)``, or ``normquant.export(model, path,
    tokenizer=tokenizer)``.
    """
    from normquant.export import export_model, is_normquant_export

    unsupported = sorted(k for k, v in kwargs.items() if v not in (None, False))
    if unsupported or not safe_serialization:
        what = ", ".join(unsupported) if unsupported else "safe_serialization=False"
        raise ValueError(f"save_pretrained of a normquant-quantized model writes a compressed-tensors export and "
                         f"does not support {what}; call normquant.export(model, path) and push the folder yourself")
    if not is_main_process:
        return
    path = Path(save_directory)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    replace = path.is_dir() and (not any(path.iterdir()) or is_normquant_export(path))
    if path.is_dir() and not replace:
        raise FileExistsError(f"{path} exists and is not a normquant export; save to a new or empty directory")
    export_model(self, None, path, force=replace)
