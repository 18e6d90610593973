"""normquant: post-training quantization for Hugging Face LLMs, built around their normalization layers.

The Python API (:mod:`normquant.api`)::

    import normquant as nq

    model, tokenizer = nq.load("smollm2-135m")
    nq.quantize(model, "recipes/w8a8_rtn.yaml", tokenizer=tokenizer)     # a Recipe, a YAML path or a dict
    print(nq.evaluate(model, tokenizer, windows=2).ppl)                  # WikiText-2 test, first 2 windows
    nq.export(model, "out/smollm2-w8a8", tokenizer=tokenizer)            # compressed-tensors checkpoint
    model, tokenizer = nq.load("out/smollm2-w8a8")                       # ...or transformers' from_pretrained

``quantize``, ``evaluate`` and ``load`` are functions defined in :mod:`normquant.api` (no submodule shares
their names). ``normquant.export`` is the export *package* and is callable as the API's ``export(model, path,
...)``, so the name means the same thing whichever submodules were imported before. Importing ``normquant`` is
cheap; torch and transformers load on first use. Lower-level names (``load_recipe``, ``Recipe``, ``QuantSpec``,
``load_model``, ``tokenize_eval``, ``calibration_samples``, ``evaluate_perplexity``, ``export_model``,
``load_quantized``) resolve lazily from their modules.
"""
__version__ = "0.1.0"

from normquant.api import as_recipe, convert, evaluate, load, quantize  # noqa: E402  (heavy imports deferred)

_LAZY = {
    "load_recipe": "normquant.recipe",
    "Recipe": "normquant.recipe",
    "QuantSpec": "normquant.quant.spec",
    "load_model": "normquant.models.loading",
    "tokenize_eval": "normquant.data.text",
    "calibration_samples": "normquant.data.text",
    "evaluate_perplexity": "normquant.evaluation.perplexity",
    "export_model": "normquant.export",
    "load_quantized": "normquant.export",
}


def __getattr__(name):  # lazy: `import normquant` stays cheap
    import importlib

    if name == "export":  # the package, callable as the API's export(); importing it sets the attribute for good
        return importlib.import_module("normquant.export")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'normquant' has no attribute '{name}'")


__all__ = ["load", "quantize", "evaluate", "export", "convert", "as_recipe", *_LAZY]
