"""normquant: post-training quantization for Hugging Face LLMs, built around their normalization layers.

>>> import normquant as nq                                              # doctest: +SKIP
>>> model, tok = nq.load_model("smollm2-135m")
>>> recipe = nq.load_recipe("recipes/w8a8_rtn.yaml")
>>> nq.quantize(model, recipe)
>>> ids = nq.tokenize_eval(tok, "wikitext2", data_dir="../shared/data")
>>> nq.evaluate_perplexity(model, ids, seqlen=2048, windows=4).ppl
"""
__version__ = "0.1.0"

_API = {
    "quantize": "normquant.pipeline.run",
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
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'normquant' has no attribute '{name}'")


__all__ = list(_API)
