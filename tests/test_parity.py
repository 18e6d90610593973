"""Parity with the serving stack: normquant's numbers are what transformers + compressed-tensors compute.

1. The activation arithmetic against compressed-tensors' own functions (``compute_dynamic_scales_and_zp`` +
   ``fake_quantize``), bit for bit, for every strategy, width, symmetry and dtype, exact ties included.
2. Per export kind, a tiny llama quantized by the pipeline and exported: logits of ``load_quantized`` (what
   ``normquant eval`` runs on an export), of the in-memory quantized model (what ``normquant run`` measured),
   and of ``AutoModelForCausalLM.from_pretrained`` with compressed-tensors. Tolerance: **exact** (max |Δ| = 0.0;
   measured 0.0 for every kind, float32, eager attention on both sides).
3. Exports that cannot match say so in ``config.json["normquant"]["serving"]``.
"""
from __future__ import annotations

import json

import pytest
import torch

from normquant.export import export_model, load_quantized
from normquant.pipeline.run import quantize
from normquant.quant.primitives import fake_quantize_activation
from normquant.quant.spec import QuantSpec
from normquant.recipe import parse_recipe
from tests.tiny_models import model_output, tiny_inputs, tiny_model

ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
ct_utils = pytest.importorskip("compressed_tensors.quantization.utils")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402

torch.set_num_threads(1)


def _ct_args(spec: QuantSpec) -> QuantizationArgs:
    strategy = spec.granularity
    return QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=strategy,
                            group_size=spec.group_size, dynamic=spec.dynamic)


# ------------------------------------------------------------------------------------ 1. the arithmetic


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("granularity", ["token", "tensor", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dynamic_activations_bit_identical_to_compressed_tensors(dtype, granularity, symmetric):
    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 6, 8):
        spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, dynamic=True,
                         group_size=16 if granularity == "group" else None)
        for shape in ((2, 7, 64), (1, 5, 64)):
            x = (torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 4).to(dtype)
            x[0, 0, :16] = 0  # an all-zero group / row: eps scale
            if not symmetric:
                x[0, 1] = x[0, 1].abs() + 0.5  # an all-positive row: the range is stretched to hold 0
            scale, zero = ct_utils.compute_dynamic_scales_and_zp(x, _ct_args(spec), module=None)
            theirs = ct_forward.fake_quantize(x, scale, zero, _ct_args(spec))
            ours = fake_quantize_activation(x, spec)
            assert ours.dtype == theirs.dtype
            assert torch.equal(ours, theirs), (bits, shape)  # measured: identical


def test_token_strategy_on_a_2d_input_is_per_tensor_as_in_compressed_tensors():
    """compressed-tensors reduces a token strategy over dims >= 2, so a 2-D input gets one scale."""
    x = torch.randn(6, 32) * torch.arange(1, 7)[:, None]
    spec = QuantSpec(bits=8, granularity="token", dynamic=True)
    scale, zero = ct_utils.compute_dynamic_scales_and_zp(x, _ct_args(spec), module=None)
    assert scale.numel() == 1
    assert torch.equal(fake_quantize_activation(x, spec), ct_forward.fake_quantize(x, scale, zero, _ct_args(spec)))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_static_activations_bit_identical_including_ties(symmetric, bits):
    """Static per-tensor input: the checkpoint's input_scale / signed input_zero_point run through
    compressed-tensors give normquant's output, also for inputs that land exactly on .5 steps (x/s + z rounds
    half to even after z is added, so the op order matters for odd zero points)."""
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="tensor")
    scale = torch.tensor([[0.25]])
    for z_unsigned in ([0.0] if symmetric else [2 ** (bits - 1) + 3, 2 ** (bits - 1) - 2, 1.0]):
        zero = torch.tensor([[z_unsigned]])
        x = torch.arange(-40, 41, dtype=torch.float32)[None, None, :] / 8  # x/s = k/2: every other value a tie
        ours = fake_quantize_activation(x, spec, scale, zero)
        ct_zero = None if symmetric else (zero.reshape(1) - 2 ** (bits - 1)).to(torch.int8)
        theirs = ct_forward.fake_quantize(x, scale.reshape(1), ct_zero, _ct_args(spec))
        assert torch.equal(ours, theirs), z_unsigned


# ------------------------------------------------------------------------------------ 2. whole exports


W8 = {"bits": 8, "symmetric": True, "granularity": "channel"}
A8_DYN = {"bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}
KINDS = {
    "w8a16": {"weights": W8},
    "w4a16-g16": {"weights": {"bits": 4, "granularity": "group", "group_size": 16}},
    "w8a8-dynamic": {"weights": W8, "input_activations": A8_DYN},
    "w8a8-static-asym": {"weights": W8, "input_activations": {"bits": 8, "symmetric": False, "granularity": "tensor"}},
    "w8a8-static-sym": {"weights": W8, "input_activations": {"bits": 8, "granularity": "tensor"}},
    "w4a8-g16-dynamic": {"weights": {"bits": 4, "granularity": "group", "group_size": 16},
                         "input_activations": A8_DYN},
    "w8a8-asym-dynamic": {"weights": {"bits": 8, "symmetric": False, "granularity": "channel"},
                          "input_activations": {"bits": 8, "symmetric": False, "granularity": "token",
                                                "dynamic": True}},
    "w3a16-g16-asym": {"weights": {"bits": 3, "symmetric": False, "granularity": "group", "group_size": 16}},
    "w4a16-tensor-asym": {"weights": {"bits": 4, "symmetric": False, "granularity": "tensor"}},
    "w8a8-mixed": {"weights": W8, "input_activations": A8_DYN,
                   "overrides": [{"pattern": "down_proj", "weights": W8, "input_activations": None}]},
}
#: kinds transformers loads only with CompressedTensorsConfig(dequantize=True) (asymmetric packed groups)
DEQUANTIZE = {"w3a16-g16-asym"}


def _quantized_export(kind: str, tmp_path, steps=("rtn",)):
    model = tiny_model("llama")
    ids = tiny_inputs(model)
    scheme = {"ignore": ["lm_head"], **KINDS[kind]}
    recipe = parse_recipe({"name": kind, "scheme": scheme, "steps": list(steps),
                           "calibration": {"samples": 4, "seqlen": 16, "batch_size": 2}})
    calib = tiny_inputs(model, batch=4, seed=1) if recipe.needs_data else None
    quantize(model, recipe, calib, progress=False)
    return model, ids, export_model(model, None, tmp_path / kind)


def _transformers_load(path, dequantize: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kw).eval()


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_logits_identical_in_normquant_and_transformers(tmp_path, kind):
    model, ids, path = _quantized_export(kind, tmp_path)
    measured = model_output(model, ids)  # what `normquant run` evaluated
    ours, _ = load_quantized(path)  # what `normquant eval --model <export>` evaluates
    ours.set_attn_implementation("eager")
    ours_logits = model_output(ours, ids)
    serving = json.loads((path / "config.json").read_text())["normquant"]["serving"]
    assert serving["parity"] == ("exact-with-dequantize" if kind in DEQUANTIZE else "exact"), serving
    theirs = _transformers_load(path, dequantize=kind in DEQUANTIZE)
    theirs_logits = model_output(theirs, ids)
    assert (ours_logits - measured).abs().max().item() == 0.0  # measured: 0.0
    assert (theirs_logits - ours_logits).abs().max().item() == 0.0  # measured: 0.0 for every kind


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "w8a8-mixed"])
def test_compressed_tensors_decompresses_the_weights_normquant_measured(tmp_path, kind):
    """compressed-tensors' own decompression (transformers with dequantize=True) gives every quantized weight
    exactly: the float weight normquant evaluated, s * (q - z), for every export kind (the mixed-precision kind's
    two formats are the w8a8-dynamic and w8a16 kinds; transformers 5.24 cannot dequantize the mix, next test)."""
    from normquant.quant.linear import QuantLinear

    model, _, path = _quantized_export(kind, tmp_path)
    theirs = _transformers_load(path, dequantize=True)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.weight_quantized:
            assert torch.equal(theirs.get_submodule(name).weight, module.weight), name  # measured: identical
            checked += 1
    assert checked == 7 * model.config.num_hidden_layers


def test_transformers_cannot_dequantize_a_mixed_precision_export(tmp_path):
    """transformers 5.24's dequantize=True conversion fails on a mixed int-quantized + pack-quantized export (its
    default route computes it exactly: the logits test above); when this starts to pass, include the kind above."""
    _, _, path = _quantized_export("w8a8-mixed", tmp_path)
    with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
        _transformers_load(path, dequantize=True)


def test_asymmetric_packed_group_weights_fail_in_the_default_transformers_route(tmp_path):
    """Why DEQUANTIZE exists (compressed-tensors 0.20.1); when this starts to pass, drop the note in serving.py."""
    _, _, path = _quantized_export("w3a16-g16-asym", tmp_path)
    with pytest.raises(Exception):
        _transformers_load(path, dequantize=False)


def test_dequantize_route_drops_activation_quantization(tmp_path):
    """A W8A8 export loaded with dequantize=True is a different (weight-only) model: the default route is the one."""
    model, ids, path = _quantized_export("w8a8-dynamic", tmp_path)
    diff = (model_output(_transformers_load(path, dequantize=True), ids) - model_output(model, ids)).abs().max()
    assert diff.item() > 1e-4  # measured: 2.4e-3


# ------------------------------------------------------------------------------------ 3. exports that say so


def test_export_with_created_biases_says_transformers_drops_them(tmp_path, caplog):
    model = tiny_model("llama")
    recipe = parse_recipe({"scheme": {"ignore": ["lm_head"], **KINDS["w8a16"]}, "steps": ["rtn"]})
    quantize(model, recipe, progress=False)
    q = model.model.layers[0].self_attn.q_proj
    q.bias = torch.nn.Parameter(torch.zeros(q.out_features))  # what RepQuant's option B does to a consumer
    with caplog.at_level("WARNING", logger="normquant"):
        path = export_model(model, None, tmp_path / "out")
    serving = json.loads((path / "config.json").read_text())["normquant"]["serving"]
    assert serving["parity"] == "none" and serving["load"] is None
    assert "model.layers.0.self_attn.q_proj.bias" in " ".join(serving["notes"])
    assert any("transformers drops" in r.getMessage() for r in caplog.records)


def test_export_with_dynamic_clip_ratio_says_compressed_tensors_ignores_it(tmp_path):
    model = tiny_model("llama")
    scheme = {"ignore": ["lm_head"], "weights": W8, "input_activations": {**A8_DYN, "clip_ratio": 0.9}}
    quantize(model, parse_recipe({"scheme": scheme, "steps": ["rtn"]}), progress=False)
    serving = json.loads((export_model(model, None, tmp_path / "o") / "config.json").read_text())["normquant"]["serving"]
    assert serving["parity"] == "none" and "clip_ratio" in serving["notes"][0]


def test_static_exports_say_what_vllm_does_differently(tmp_path):
    """vLLM (0.33.0's loader, read not run): one input scale per fused q/k/v and gate/up module — normquant's
    calibration gives the shards equal scales (they read the same input), and an export says when they are not —
    and a static asymmetric zero point recomputed by truncation."""
    model, _, path = _quantized_export("w8a8-static-asym", tmp_path)
    vllm = json.loads((path / "config.json").read_text())["normquant"]["serving"]["vllm"]
    assert len(vllm) == 1 and "truncation" in vllm[0]  # no fused-scale note: the shards' scales are equal
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.input_quant.scale, attn.k_proj.input_quant.scale)
    attn.k_proj.input_quant.scale = attn.k_proj.input_quant.scale * 2
    again = export_model(model, None, tmp_path / "edited")
    vllm = json.loads((again / "config.json").read_text())["normquant"]["serving"]["vllm"]
    assert any("model.layers.0.self_attn.qkv" in n and "last shard" in n for n in vllm), vllm


@pytest.mark.parametrize("kind, why", [("w8a8-asym-dynamic", "symmetric"), ("w4a16-tensor-asym", "not tensor"),
                                       ("w4a8-g16-dynamic", "quantized inputs")])
def test_exports_vllm_cannot_load_say_so(tmp_path, kind, why):
    _, _, path = _quantized_export(kind, tmp_path)
    vllm = json.loads((path / "config.json").read_text())["normquant"]["serving"]["vllm"]
    assert any("no vLLM scheme loads it" in n and why in n for n in vllm), vllm


def test_bfloat16_export_says_parity_is_approximate(tmp_path):
    """compressed-tensors holds float32 scales in the model's dtype: one bf16 ulp apart (measured 3.9e-3 logits)."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    quantize(model, parse_recipe({"scheme": {"ignore": ["lm_head"], **KINDS["w4a16-g16"]}, "steps": ["rtn"]}),
             progress=False)
    serving = json.loads((export_model(model, None, tmp_path / "b") / "config.json").read_text())["normquant"]["serving"]
    assert serving["parity"] == "approximate" and "bfloat16" in serving["notes"][0]


# ------------------------------------------------------------------------------------ 4. the KV cache


@pytest.mark.parametrize("dtype, scale_dtype", [(torch.float32, "float32"), (torch.float16, "float16")])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kv_cache_token_head_bit_identical_to_compressed_tensors_kv_scheme(dtype, scale_dtype, symmetric, bits):
    """The exported ``kv_cache_scheme`` (dynamic ``group`` strategy, ``group_size = head_dim``) run through
    compressed-tensors' own functions on ``[B, H, T, D]`` keys equals normquant's stored-and-read-back cache."""
    from normquant.export.schema import kv_cache_args
    from normquant.quant.kv import KVCacheSpec, kv_quantizers

    spec = KVCacheSpec(bits=bits, symmetric=symmetric, scale_dtype=scale_dtype)
    args = QuantizationArgs(**kv_cache_args(spec, 64)[0])
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(2, 3, 17, 64, generator=g) * torch.rand(2, 3, 17, 1, generator=g) * 4).to(dtype)
    x[0, 0, 0] = 0  # an all-zero token-head
    x[0, 1, 1] = x[0, 1, 1].abs() + 0.5  # all positive: the asymmetric range is stretched to hold 0
    scale, zero = ct_utils.compute_dynamic_scales_and_zp(x, args, module=None)
    theirs = ct_forward.fake_quantize(x, scale, zero, args)
    quantizer = kv_quantizers(spec)[0]
    ours = quantizer.dequantize(quantizer.quantize(x), 64, dtype)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)  # measured: identical


@pytest.mark.parametrize("kv", [{"bits": 8, "scale_dtype": "float32"}, {"bits": 4, "symmetric": False}])
def test_a_kv_cache_scheme_in_the_config_changes_nothing_in_transformers(tmp_path, kv):
    """Why exports leave quantization_config.kv_cache_scheme null: written there by hand (normquant.kv_cache_scheme,
    compressed-tensors' args of the cache), transformers 5.24 + compressed-tensors 0.20.1 compute the float-KV
    logits (no attention module is hooked); a stack that hooks them would compute normquant's cache exactly."""
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module

    from normquant.quant.kv import KVCacheSpec
    from normquant.quant.kv_cache import QuantizedKVCache

    model = tiny_model("llama")
    ids = tiny_inputs(model)
    recipe = parse_recipe({"scheme": {"ignore": ["lm_head"], **KINDS["w8a16"], "kv_cache": kv}, "steps": ["rtn"]})
    quantize(model, recipe, progress=False)
    path = export_model(model, None, tmp_path / "kv")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"] is None
    assert config["normquant"]["serving"]["parity"] == "none"
    config["quantization_config"]["kv_cache_scheme"] = config["normquant"]["kv_cache_scheme"]
    (path / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        float_kv = model(ids).logits
        quant_kv = model(ids, cache=QuantizedKVCache(model.config, KVCacheSpec(**kv)), use_cache=True).logits
        theirs = _transformers_load(path, dequantize=False)(ids).logits
    assert (quant_kv - float_kv).abs().max() > 1e-5  # the cache matters on this model
    if any(is_cached_attention_module(m) for m in model.modules()):
        assert torch.equal(theirs, quant_kv)  # scale_dtype float32; float16 scales differ by their rounding
    else:
        assert torch.equal(theirs, float_kv)  # measured: identical (compressed-tensors 0.20.1, transformers 5.24)
