"""PrefixQuant's prefixed tokens (normquant.methods.prefixquant, normquant.quant.prefix).

1. Inside ``float_prefix(P)`` an activation quantizer passes the first P positions unchanged, quantizes the rest
   exactly as it would alone, and its static range never sees the prefix.
2. Evaluating a prefixed model equals the deployment it stands for: the prefix's KV cache computed once with
   float activations, then the window read with every activation quantized (tiny llama in float64, logits
   max |Δ| ≤ 1e-10, measured 1.1e-16 and 1.7e-16; in float32 a 4-bit dynamic row measured 6.4e-3: the two computations
   multiply matrices of different shapes, and a last-bit difference can flip a 4-bit rounding tie; the dynamic row
   uses clip ratio 0.99 so that no token's absmax sits on compressed-tensors' -7.5 tie: measured 0.0 with it,
   0.011 without on an AVX-512/AMX CPU).
3. The export records the prefix, says the serving stack computes another model, and ``load_quantized``
   brings it back (same perplexity); bad ids are one-line errors (an edited export fails its manifest).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from normquant.evaluation.perplexity import evaluate_perplexity
from normquant.export import ExportError, export_model, load_quantized
from normquant.pipeline.run import quantize
from normquant.pipeline.step import StepError
from normquant.quant.linear import ActivationQuantizer, QuantLinear
from normquant.quant.prefix import float_prefix, prefix_of
from normquant.quant.spec import QuantSpec
from normquant.recipe import parse_recipe
from tests.tiny_models import tiny_inputs, tiny_model

torch.set_num_threads(1)

STATIC = {"bits": 8, "granularity": "tensor", "symmetric": False}
DYNAMIC = {"bits": 4, "granularity": "token", "dynamic": True}
# compressed-tensors' dynamic grid (s = absmax / 7.5) puts every token's negative absmax exactly on the -7.5 tie:
# the last bit of s decides -7 or -8, so two computations that differ in the last bit (matmuls of other shapes)
# differ by a quantization step there (measured on an AVX-512/AMX CPU, float64: 0.011 in the logits). A clip ratio
# below 1 moves the absmax off the tie (-7.5 / 0.99 rounds to -8 either way) for the exactness test.
DYNAMIC_OFF_TIE = {**DYNAMIC, "clip_ratio": 0.99}


def _recipe(inputs: dict, prefix: dict | None = None):
    return parse_recipe({"name": "p", "scheme": {"ignore": ["lm_head"], "weights": {"bits": 8},
                                                 "input_activations": inputs},
                         "steps": [{"prefix": prefix or {"tokens": [3, 7]}}, "rtn"],
                         "calibration": {"samples": 4, "seqlen": 16, "batch_size": 2}})


def _quantized(inputs: dict, prefix: dict | None = None, dtype=torch.float32):
    model = tiny_model("llama", dtype=dtype)
    recipe = _recipe(inputs, prefix)
    quantize(model, recipe, tiny_inputs(model, batch=4, seed=1) if recipe.needs_data else None, progress=False)
    return model


# ------------------------------------------------------------------------------------ 1. the quantizer
def test_prefix_positions_stay_float_and_the_rest_is_quantized_alone():
    q = ActivationQuantizer(QuantSpec(**DYNAMIC))
    x = torch.randn(2, 9, 16)
    with float_prefix(3):
        y = q(x)
    assert torch.equal(y[:, :3], x[:, :3]) and torch.equal(y[:, 3:], q(x[:, 3:]))
    assert not torch.equal(y[:, 3:], x[:, 3:])  # really quantized (4 bits)


def test_static_range_does_not_see_the_prefix():
    x = torch.randn(2, 9, 16)
    x[:, 0] *= 100  # the sink token's massive activation
    q = ActivationQuantizer(QuantSpec(**STATIC))
    q.observing = True
    with float_prefix(1):
        q(x)
    q.freeze()
    ref = ActivationQuantizer(QuantSpec(**STATIC))
    ref.observing = True
    ref(x[:, 1:])
    ref.freeze()
    assert torch.equal(q.scale, ref.scale) and torch.equal(q.zero_point, ref.zero_point)


# ------------------------------------------------------------------------------------ 2. what it stands for
@pytest.mark.parametrize("inputs", [STATIC, DYNAMIC_OFF_TIE], ids=["static", "dynamic"])
def test_evaluation_equals_a_float_prefix_cache(inputs):
    model = _quantized(inputs, dtype=torch.float64)  # float64: matmul-shape rounding cannot flip a rounding tie
    prefix = prefix_of(model)
    assert prefix.tolist() == [3, 7]
    window = tiny_inputs(model, batch=1, seq=24, seed=5)  # [1, 24]
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        for ql in qls:  # the prefix's KV cache, computed once with float activations
            ql.input_quant.enabled = False
        cache = model(input_ids=prefix[None], use_cache=True).past_key_values
        for ql in qls:
            ql.input_quant.enabled = True
        deployed = model(input_ids=window, cache=cache, use_cache=True).logits  # [1, 24, V]
        with float_prefix(2):
            prefixed = model(input_ids=torch.cat([prefix[None], window], 1)).logits[:, 2:]
    diff = (deployed - prefixed).abs().max().item()
    assert diff <= 1e-10, diff
    res = evaluate_perplexity(model, window, seqlen=24, progress=False)
    nll = torch.nn.functional.cross_entropy(deployed[0, :-1], window[0, 1:]).item()
    assert res.prefix_tokens == 2 and res.tokens == 23
    assert math.isclose(res.ppl, math.exp(nll), rel_tol=1e-5), (res.ppl, math.exp(nll))


def test_default_prefix_is_bos_and_bad_ids_are_one_line():
    model = tiny_model("llama", bos_token_id=5)
    quantize(model, parse_recipe({"name": "p", "scheme": {"weights": {"bits": 8}, "input_activations": DYNAMIC},
                                  "steps": [{"prefix": {}}, "rtn"]}), progress=False)
    assert prefix_of(model).tolist() == [5]
    vocab = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(StepError, match=rf"prefix.tokens: prefix token ids must lie in \[0, {vocab}\)"):
        quantize(tiny_model("llama"), _recipe(DYNAMIC, {"tokens": [vocab]}), progress=False)


# ------------------------------------------------------------------------------------ 3. export
def test_export_keeps_the_prefix(tmp_path):
    model = _quantized(STATIC)
    path = export_model(model, None, tmp_path / "p")
    section = json.loads((path / "config.json").read_text())["normquant"]
    assert section["prefix_ids"] == [3, 7] and section["serving"]["parity"] == "none"
    assert any("PrefixQuant" in n for n in section["serving"]["notes"])
    loaded, _ = load_quantized(path)
    assert prefix_of(loaded).tolist() == [3, 7]
    ids = tiny_inputs(model, batch=1, seq=40, seed=9)
    a = evaluate_perplexity(model, ids, seqlen=20, progress=False).ppl
    b = evaluate_perplexity(loaded, ids, seqlen=20, progress=False).ppl
    assert a == b, (a, b)


def test_edited_prefix_ids_are_refused(tmp_path):
    path = export_model(_quantized(DYNAMIC), None, tmp_path / "p")
    config = json.loads((path / "config.json").read_text())
    config["normquant"]["prefix_ids"] = ["x"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="normquant section was changed after export"):  # the manifest
        load_quantized(path)


def test_lm_eval_refuses_a_prefixed_model():
    from normquant.evaluation.lm_eval_bridge import TaskEvalError, evaluate_tasks

    with pytest.raises(TaskEvalError, match="PrefixQuant's prefix step, which lm-eval cannot apply"):
        evaluate_tasks(_quantized(DYNAMIC), None, ["x.yaml"])


def test_window_plus_prefix_must_fit_the_positions():
    from normquant.data.text import DataError

    model = _quantized(DYNAMIC)
    n = model.config.max_position_embeddings
    ids = tiny_inputs(model, batch=1, seq=n, seed=2)
    with pytest.raises(DataError, match=rf"seqlen {n} \+ 2 prefix tokens exceeds .* use --seqlen {n - 2} or less"):
        evaluate_perplexity(model, ids, seqlen=n, progress=False)
