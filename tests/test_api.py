"""The Python API: stable names, recipes as objects/paths/dicts, calibration built or given, save_pretrained."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch

import normquant
import normquant as nq
from normquant.quant.linear import QuantLinear
from tests.test_export import tiny_tokenizer
from tests.tiny_models import model_output, tiny_inputs, tiny_model

W8A8 = {"scheme": {"ignore": ["lm_head"], "weights": {"bits": 8},
                   "input_activations": {"bits": 8, "granularity": "token", "dynamic": True}}, "steps": ["rtn"]}
STATIC = {"scheme": {"ignore": ["lm_head"], "weights": {"bits": 8}, "input_activations": {"bits": 8, "granularity": "tensor"}},
          "steps": ["rtn"], "calibration": {"samples": 2, "seqlen": 16, "batch_size": 2}}


# ------------------------------------------------------------------------------------------------ names


def test_api_names_are_the_functions_before_and_after_importing_every_submodule():
    """`from normquant import quantize` is the function; `normquant.export` is one callable object throughout."""
    code = """
import inspect, sys
import normquant
from normquant import quantize, evaluate, load, convert
from normquant import export as export_first
assert all(inspect.isfunction(f) for f in (quantize, evaluate, load, convert)), (quantize, evaluate, load, convert)
import pkgutil, importlib
for info in pkgutil.walk_packages(normquant.__path__, "normquant."):
    importlib.import_module(info.name)
import normquant.export.checkpoint as ckpt          # `import a.b.c as x` still resolves through the package
from normquant import quantize as q2, export as export_after
assert q2 is quantize and normquant.quantize is quantize and normquant.evaluate is evaluate and normquant.load is load
assert normquant.convert is convert
assert export_first is export_after is normquant.export is sys.modules["normquant.export"] and callable(export_after)
assert ckpt.export_model is normquant.export.export_model
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_import_normquant_is_cheap():
    out = subprocess.run([sys.executable, "-c", "import sys, normquant; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr  # torch loads on first use only


@pytest.mark.parametrize("name", ["load", "quantize", "evaluate", "export", "as_recipe"])
def test_api_functions_are_typed_and_documented_with_an_example(name):
    from normquant import api

    fn = getattr(api, name)
    sig = inspect.signature(fn)
    assert sig.return_annotation is not inspect.Signature.empty
    assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), name
    assert ">>>" in fn.__doc__


# ------------------------------------------------------------------------------------------------ quantize


def _logits_of(model, ids):
    return model_output(model, ids)


@pytest.mark.parametrize("form", ["dict", "recipe", "yaml"])
def test_quantize_accepts_a_recipe_a_dict_or_a_yaml_path(tmp_path, form):
    import yaml

    from normquant.recipe import parse_recipe

    recipe = {"dict": W8A8, "recipe": parse_recipe(W8A8)}.get(form)
    if form == "yaml":
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(W8A8))
    model = tiny_model("llama")
    assert nq.quantize(model, recipe) is model
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14


def test_quantize_builds_calibration_from_the_tokenizer(tmp_path, data_dir):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    nq.quantize(model, STATIC, tokenizer=tok, data_dir=data_dir)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(q.input_quant.scale is not None for q in qls)


def test_quantize_calibration_forms_give_what_they_say():
    ids = tiny_inputs(tiny_model("llama"), batch=4, seq=16, seed=3)
    tok = tiny_tokenizer()
    texts = [" ".join(f"t{int(i)}" for i in row) for row in ids]
    a, b = tiny_model("llama"), tiny_model("llama")
    nq.quantize(a, STATIC, ids)  # token ids [N, L]
    nq.quantize(b, STATIC, texts, tokenizer=tok)  # texts: joined, tokenized, cut into segments of seqlen
    sa = [m.input_quant.scale for m in a.modules() if isinstance(m, QuantLinear)]
    sb = [m.input_quant.scale for m in b.modules() if isinstance(m, QuantLinear)]
    assert len(sa) == 14 and all(s.shape == t.shape for s, t in zip(sa, sb))


def test_quantize_without_calibration_or_tokenizer_is_one_line():
    with pytest.raises(ValueError, match="pass tokenizer= .* or calibration=") as e:
        nq.quantize(tiny_model("llama"), STATIC)
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="recipe must be"):
        nq.quantize(tiny_model("llama"), 42)


def test_evaluate_on_given_ids():
    model = tiny_model("llama")
    ids = tiny_inputs(model, batch=1, seq=64)
    res = nq.evaluate(model, input_ids=ids, seqlen=16)
    assert res.windows == 4 and res.ppl > 1
    with pytest.raises(ValueError, match="tokenizer"):
        nq.evaluate(model)


# ------------------------------------------------------------------------------------------------ saving


def test_save_pretrained_writes_the_quantized_checkpoint(tmp_path):
    model = tiny_model("llama")
    ids = tiny_inputs(model)
    nq.quantize(model, W8A8)
    before = _logits_of(model, ids)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["normquant"]["serving"]["parity"] == "exact"
    again, _ = nq.load(tmp_path / "q")
    again.set_attn_implementation("eager")
    assert torch.equal(_logits_of(again, ids), before)
    again.save_pretrained(tmp_path / "q")  # an earlier export is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a normquant export"):
        model.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not support push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_export_package_is_callable_like_the_api_function(tmp_path):
    model = nq.quantize(tiny_model("llama"), W8A8)
    path = normquant.export(model, tmp_path / "e", metadata={"who": "test"})
    assert json.loads((path / "config.json").read_text())["normquant"]["metadata"] == {"who": "test"}
    assert nq.api.export(model, tmp_path / "e", force=True) == path


def test_load_refuses_an_unavailable_device_in_one_line():
    from normquant.devices import DeviceError, check_device

    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            nq.load("smollm2-135m", device="cuda")
    assert check_device(None) == "cpu" and check_device("CPU") == "cpu"


def test_docstring_examples_run():
    """The runnable examples (those not marked +SKIP, which need SmolLM2: the walkthrough test runs those)."""
    import doctest

    import normquant.api
    import normquant.devices
    import normquant.evaluation.datasets
    import normquant.evaluation.report
    import normquant.progress
    import normquant.quant.primitives

    for module in (normquant.api, normquant.devices, normquant.evaluation.datasets, normquant.evaluation.report,
                   normquant.progress, normquant.quant.primitives):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        assert result.attempted > 0 or module is normquant.api, module.__name__
