"""The repquant recipe step through the pipeline, and `normquant inspect` on tiny models."""
import copy

import pytest
import torch

from normquant.evaluation.inspect import inspect_activations, plot_report
from normquant.quant.linear import QuantLinear
from normquant.pipeline.run import quantize
from normquant.pipeline.step import StepError
from normquant.recipe import parse_recipe
from tests.tiny_models import model_output, tiny_inputs, tiny_model

CALIB = {"samples": 4, "seqlen": 16, "batch_size": 2}


def _recipe(mode, symmetric, weights=None, learn=True):
    scheme = {"input_activations": {"bits": 6, "symmetric": symmetric, "granularity": "tensor"}}
    if weights:
        scheme["weights"] = weights
    return parse_recipe({"scheme": scheme, "calibration": CALIB,
                         "steps": [{"repquant": {"mode": mode, "epochs": 2, "learn_clipping": learn}}]})


@pytest.mark.parametrize("kind, symmetric", [("llama", True), ("llama", False), ("opt", False), ("gpt2", False),
                                             ("gemma", True), ("qwen2", False)])
def test_reparameterized_pipeline_equals_per_channel_simulation(kind, symmetric):
    base = tiny_model(kind, dtype=torch.float64)
    ids = tiny_inputs(base, batch=4, seq=16)
    sim = quantize(copy.deepcopy(base), _recipe("per_channel", symmetric), ids, progress=False)
    rep = quantize(copy.deepcopy(base), _recipe("reparameterize", symmetric), ids, progress=False)
    q_proj = next(m for n, m in rep.named_modules() if isinstance(m, QuantLinear) and m.input_quant.spec)
    assert q_proj.input_quant.scale.numel() == 1  # per-tensor after reparameterization
    err = (model_output(sim, ids) - model_output(rep, ids)).abs().max().item()
    effect = (model_output(sim, ids) - model_output(base, ids)).abs().max().item()
    # measured err 0.0 (llama/opt/gpt2/qwen2, float64); gemma 7.9e-8 because HF's Gemma RMSNorm computes 1+w
    # in float32 even in a float64 model; effect of the quantizers themselves 1e-3..1e-2
    tol = 1e-6 if kind == "gemma" else 1e-9
    assert err < tol < effect


def test_weights_are_quantized_after_reparameterization():
    base = tiny_model("llama", dtype=torch.float64)
    ids = tiny_inputs(base, batch=4, seq=16)
    rep = quantize(copy.deepcopy(base), _recipe("reparameterize", True, {"bits": 8}), ids, progress=False)
    q = rep.model.layers[0].self_attn.q_proj
    w_orig = base.model.layers[0].self_attn.q_proj.weight
    # W' = W diag(r1) then RTN: codes reproduce exactly, and W' differs from W by the channel ratios
    codes = torch.round(q.weight / q.weight_scale) + q.weight_zero_point
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 127
    assert (q.weight - w_orig).abs().max() > 1e-3


def test_repquant_needs_static_consumer_inputs():
    base = tiny_model("llama")
    ids = tiny_inputs(base, batch=4, seq=16)
    r = parse_recipe({"scheme": {"input_activations": {"bits": 8, "granularity": "token", "dynamic": True}},
                      "steps": ["repquant"], "calibration": CALIB})
    with pytest.raises(StepError, match="repquant needs one static input_activations spec"):
        quantize(base, r, ids, progress=False)


def test_inspect_reports_outliers_and_plots(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():  # make channel 5 an outlier after every input_layernorm
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 40.0
    report = inspect_activations(model, tiny_inputs(model, batch=2, seq=16))
    s = report["summary"]["input_layernorm"]
    assert s["layers"] == 2 and s["layers_with_outliers"] == 2 and 5 in s["persistent_channels"]
    png = plot_report(report, tmp_path / "x.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
