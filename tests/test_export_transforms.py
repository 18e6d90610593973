"""Rotated exports: the online R4 Hadamard as a compressed-tensors ``transform_config`` entry plus its stored matrix.

1. What normquant writes is parsed by compressed-tensors' own pydantic model (``TransformConfig``).
2. OnlineHadamard computes compressed-tensors' ``HadamardTransform`` bit for bit (full K·2^m and fallback sizes).
3. A tiny llama rotated (``rotate: {seed: 0}``) and quantized, exported: logits of the in-memory model (what
   ``normquant run`` measured), of ``load_model`` on the export (what ``normquant eval --model <export>`` runs) and
   of ``AutoModelForCausalLM.from_pretrained`` + :func:`apply_transforms` (compressed-tensors'
   ``apply_transform_config`` with the stored matrix). Tolerance: **exact** (max |Δ| = 0.0; measured 0.0 for
   every case, float32, eager attention).
   ``from_pretrained`` alone ignores the transform (transformers 5.24): measured max |Δ| 0.06–0.10.
4. Transforms with no compressed-tensors form, and stored matrices that are not normquant's, are one-line errors.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from normquant.export import ExportError, export_model, load_quantized
from normquant.export.transforms import apply_transforms, install_transforms, read_transform_config, transform_config
from normquant.models.loading import load_model
from normquant.pipeline.run import quantize
from normquant.quant.hadamard import OnlineHadamard, hadamard_plan, hadamard_signs
from normquant.recipe import parse_recipe
from tests.tiny_models import model_output, tiny_inputs, tiny_model

ct_transform = pytest.importorskip("compressed_tensors.transform")

torch.set_num_threads(1)

W8 = {"bits": 8, "granularity": "channel"}
A8_DYN = {"bits": 8, "granularity": "token", "dynamic": True}
CASES = {  # name: (intermediate size, scheme)
    "w8a8-dynamic-K12": (96, {"weights": W8, "input_activations": A8_DYN}),  # 96 = 12·8: Paley K = 12
    "w4a8-g16-fallback": (176, {"weights": {"bits": 4, "granularity": "group", "group_size": 16},
                                "input_activations": A8_DYN}),  # 176 = 11·16: block-diagonal, blocks of 16
    "w8a8-static": (96, {"weights": W8, "input_activations": {"bits": 8, "granularity": "tensor"}}),
    "down-proj-float": (96, {"weights": W8, "input_activations": A8_DYN,
                             "overrides": [{"pattern": "down_proj", "weights": None, "input_activations": None}]}),
    "w8a8-dynamic-online-o": (96, {"weights": W8, "input_activations": A8_DYN}),  # + rotate online_o: 2 schemes
}


def _rotated_export(tmp_path, case: str):
    n_ff, scheme = CASES[case]
    model = tiny_model("llama", intermediate_size=n_ff)
    recipe = parse_recipe({"name": case, "scheme": {"ignore": ["lm_head"], **scheme},
                           "steps": [{"rotate": {"seed": 0, "online_o": case.endswith("online-o")}}, "rtn"],
                           "calibration": {"samples": 4, "seqlen": 16, "batch_size": 2}})
    calib = tiny_inputs(model, batch=4, seed=1) if recipe.needs_data else None
    quantize(model, recipe, calib, progress=False)
    return model, export_model(model, None, tmp_path / case)


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


# ------------------------------------------------------------------------------------ 1. the config
def test_transform_config_is_parsed_by_compressed_tensors(tmp_path):
    model, path = _rotated_export(tmp_path, "w8a8-dynamic-K12")
    raw = _config(path)["quantization_config"]["transform_config"]
    config = ct_transform.TransformConfig.model_validate(raw)  # extra="forbid" at every level
    (name, scheme), = config.config_groups.items()
    assert (name, scheme.type, scheme.head_dim, scheme.precision) == ("online_hadamard_96", "random-hadamard", 96,
                                                                        torch.float32)
    (args,) = scheme.apply
    assert args.location == "input" and not args.inverse and not scheme.randomize
    assert args.targets == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = f.get_tensor(f"model.layers.0.mlp.down_proj.{name}_input.weight")  # once, as a tied weight
        assert not any(k.startswith("model.layers.1.") and name in k for k in f.keys())
    assert stored.dtype == torch.float32 and torch.equal(stored.double(), hadamard_signs(hadamard_plan(96)))
    assert torch.equal(stored @ stored.t(), 96 * torch.eye(96))  # ±1, orthogonal up to √n


def test_float64_models_write_float64_precision(tmp_path):
    model = tiny_model("llama", dtype=torch.float64, intermediate_size=96)
    quantize(model, parse_recipe({"scheme": {"ignore": ["lm_head"], "weights": W8}, "steps": ["rotate", "rtn"]}),
             progress=False)
    config, tensors = transform_config(model)
    scheme = ct_transform.TransformConfig.model_validate(config).config_groups["online_hadamard_96"]
    assert scheme.precision == torch.float64 and next(iter(tensors.values())).dtype == torch.float64


# ------------------------------------------------------------------------------------ 2. the arithmetic
@pytest.mark.parametrize("n", [1536, 576, 64, 176])
def test_online_hadamard_is_compressed_tensors_hadamard_bit_for_bit(n):
    """SmolLM2's 1536 = 12·128 and 576 = 36·16, a power of two, and a fallback size (176 = 11·16)."""
    plan = hadamard_plan(n)
    scheme = {"type": "random-hadamard", "head_dim": plan.block,
              "apply": [{"targets": ["lin"], "location": "input"}]}
    holder = nn.Module()
    holder.lin = nn.Linear(n, 2)
    ct_transform.apply_transform_config(holder, ct_transform.TransformConfig.model_validate(
        {"config_groups": {"h": scheme}}))
    theirs = holder.lin.h_input
    theirs.weight.data.copy_(hadamard_signs(plan))
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n)) * 4
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(OnlineHadamard(n)(x.to(dtype)), theirs(x.to(dtype))), dtype  # measured: identical


# ------------------------------------------------------------------------------------ 3. whole exports
@pytest.mark.parametrize("case", list(CASES))
def test_rotated_export_logits_identical_in_normquant_and_transformers(tmp_path, case):
    from transformers import AutoModelForCausalLM

    model, path = _rotated_export(tmp_path, case)
    ids = tiny_inputs(model)
    measured = model_output(model, ids)  # what `normquant run` evaluated
    ours, _ = load_model(str(path))  # what `normquant eval --model <export>` evaluates
    ours.set_attn_implementation("eager")
    assert all(isinstance(layer.mlp.down_proj.input_transform, OnlineHadamard) for layer in ours.model.layers)
    assert all(isinstance(getattr(layer.self_attn.o_proj, "input_transform", None), OnlineHadamard) ==
               case.endswith("online-o") for layer in ours.model.layers)
    assert (model_output(ours, ids) - measured).abs().max().item() == 0.0  # measured: 0.0

    serving = _config(path)["normquant"]["serving"]
    assert serving["parity"] == "exact-with-transforms" and serving["load"].endswith("apply_transforms(model, path)")
    theirs = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    without = (model_output(theirs, ids) - measured).abs().max().item()
    assert without > 1e-3  # measured 0.06-0.10; failing means transformers applies transform_config: update serving.py
    apply_transforms(theirs, path)
    assert (model_output(theirs, ids) - measured).abs().max().item() == 0.0  # measured: 0.0 for every case


# ------------------------------------------------------------------------------------ 4. refusals
def test_an_online_transform_compressed_tensors_cannot_express_is_refused_in_one_line(tmp_path):
    model = tiny_model("llama")
    quantize(model, parse_recipe({"scheme": {"ignore": ["lm_head"], "weights": W8}, "steps": ["rtn"]}), progress=False)
    model.model.layers[1].mlp.down_proj.input_transform = nn.Tanh()
    with pytest.raises(ExportError) as err:
        export_model(model, None, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and "model.layers.1.mlp.down_proj" in msg and "Tanh" in msg and "transform_config" in msg
    assert not (tmp_path / "out").exists()


def test_a_stored_matrix_that_is_not_normquants_is_refused(tmp_path):
    _, path = _rotated_export(tmp_path, "w8a8-dynamic-K12")
    reloaded, _ = load_quantized(path)
    targets = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    other = hadamard_signs(hadamard_plan(96)).float()
    other[:, [0, 1]] = other[:, [1, 0]]  # a Hadamard matrix still, but not the one the weights were folded with
    key = "model.layers.0.mlp.down_proj.online_hadamard_96_input.weight"
    with pytest.raises(ExportError, match="not the Hadamard matrix normquant builds") as err:
        install_transforms(reloaded, {"online_hadamard_96": (targets, 96)}, {key: other}, "model.safetensors")
    assert "\n" not in str(err.value)


def test_a_transform_config_normquant_did_not_write_is_refused(tmp_path):
    _, path = _rotated_export(tmp_path, "w8a8-dynamic-K12")
    config = _config(path)
    scheme = config["quantization_config"]["transform_config"]["config_groups"]["online_hadamard_96"]
    scheme["apply"][0]["inverse"] = True
    with pytest.raises(ExportError, match="not a transform normquant writes"):
        read_transform_config(config["quantization_config"], "config.json")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="not a transform normquant writes"):
        load_quantized(path)


def test_a_fused_layernorm_model_is_refused_before_anything_is_written(tmp_path):
    """OPT after norm fusion has bias-free RMSNorms and an lm_head bias: no loader could rebuild it."""
    model = tiny_model("opt")
    recipe = parse_recipe({"name": "opt", "scheme": {"ignore": ["lm_head"], **CASES["w8a8-dynamic-K12"][1]},
                           "steps": [{"rotate": {"seed": 0}}, "rtn"]})
    quantize(model, recipe, None, progress=False)
    with pytest.raises(ExportError, match=r"no longer has OPTForCausalLM's structure .*lm_head\.bias"):
        export_model(model, None, tmp_path / "opt")
    assert not (tmp_path / "opt").exists()
