"""Hadamard transforms, norm fusion and QuaRot rotation: orthogonality, the K·2^m factorization, the fallback,
and function preservation of fused / rotated float models."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from normquant.methods.norm_fusion import fuse_norms
from normquant.methods.quarot import rotate_model
from normquant.models.arch import block_attention, get_architecture, get_blocks
from normquant.models.fold import RMSNorm
from normquant.pipeline.run import quantize
from normquant.pipeline.step import StepError
from normquant.quant.hadamard import (
    K_ORDERS,
    OnlineHadamard,
    hadamard_k,
    hadamard_matrix,
    hadamard_plan,
    hadamard_transform,
    random_hadamard_matrix,
)
from normquant.quant.linear import QuantLinear
from normquant.recipe import parse_recipe
from tests.tiny_models import model_output, tiny_inputs, tiny_model


# ---------------------------------------------------------------------------------------------- Hadamard
@pytest.mark.parametrize("k", sorted(K_ORDERS))
def test_stored_k_matrices_are_hadamard(k):
    H = hadamard_k(k)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.t(), k * torch.eye(k, dtype=torch.float64))  # exact in integers


@pytest.mark.parametrize("n, k", [(576, 36), (1536, 12), (64, 1), (11008 // 172 * 12, 12), (5120, 40), (2560, 40), (20, 20)])
def test_transform_is_the_kronecker_product_and_orthogonal(n, k):
    """SmolLM2: hidden 576 = 36·16, intermediate 1536 = 12·128, head 64 = 2^6."""
    plan = hadamard_plan(n)
    assert (plan.k, plan.exact) == (k, True)
    T = hadamard_matrix(n)
    p = n // k
    assert (T - torch.kron(hadamard_k(k), hadamard_matrix(p) * p**0.5) / n**0.5).abs().max() < 1e-12
    assert (T @ T.t() - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12  # measured ≤ 2.3e-14


def test_offline_and_online_halves_cancel():
    """``(W Tᵀ)(T x) = W x`` with the same function applied to weight rows and to activations."""
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(8, 1536, generator=g, dtype=torch.float64), torch.randn(5, 1536, generator=g, dtype=torch.float64)
    y = hadamard_transform(x) @ hadamard_transform(W).t()
    assert (y - x @ W.t()).abs().max() < 1e-11  # measured 2e-13


def test_unsupported_size_falls_back_block_diagonal_with_a_warning(caplog):
    n = 148 * 8  # = 37·32; 148 = 4·37 is no stored K (Qwen2.5-7B's d_ff 18944 = 148·128 has the same factor)
    with caplog.at_level(logging.WARNING, logger="normquant.quant.hadamard"):
        plan = hadamard_plan(n)
    assert not plan.exact and plan.blocks == 37 and 2**plan.m == 32
    assert "block-diagonal" in caplog.text
    T = hadamard_matrix(n)
    assert (T @ T.t() - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.count_nonzero(T[:32, 32:]) == 0 and torch.count_nonzero(T[:32, :32]) == 32 * 32  # blocks of 32


def test_random_hadamard_is_orthogonal_and_seeded():
    Q = random_hadamard_matrix(576, seed=3)
    assert (Q @ Q.t() - torch.eye(576, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(Q, random_hadamard_matrix(576, seed=3)) and not torch.equal(Q, random_hadamard_matrix(576, seed=4))


def test_online_hadamard_runs_in_float32_for_half_inputs():
    x = torch.randn(4, 64).to(torch.bfloat16)
    y = OnlineHadamard(64)(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - hadamard_transform(x.float())).abs().max() < 0.02  # bf16 rounding of the result only


# ---------------------------------------------------------------------------------------------- fusion, rotation
def _float64_norms(model):
    """Replace HF RMSNorms (which compute in float32 even for float64 inputs) by normquant's RMSNorm with the
    same γ, so a float64 comparison measures the transform and not the norms' float32 rounding."""
    for name, m in list(model.named_modules()):
        if type(m).__name__.endswith("RMSNorm"):
            gemma = "Gemma" in type(m).__name__
            new = RMSNorm(m.weight.shape[0], eps=getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)),
                          offset=1.0 if gemma else 0.0).to(m.weight.dtype)
            new.weight.data.copy_(m.weight.data)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model


KINDS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fusion_and_rotation_preserve_logits(kind, dtype, tol):
    """Measured (relative Frobenius error of the logits, worst over the kinds): float64 8.1e-16, float32 2.4e-7."""
    model = tiny_model(kind, dtype=dtype)
    if dtype == torch.float64:
        _float64_norms(model)
    ids = tiny_inputs(model)
    ref = model_output(model, ids)
    arch = get_architecture(model)
    fused = copy.deepcopy(model)
    fuse_norms(fused, arch)
    rotate_model(model, arch, seed=1)
    for m in (fused, model):
        rel = ((model_output(m, ids) - ref).norm() / ref.norm()).item()
        assert rel <= tol, (kind, rel)
    down = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert down and all(isinstance(m.input_transform, OnlineHadamard) and not m.has_specs for m in down)


@pytest.mark.parametrize("kind", KINDS)
def test_online_hadamard_before_o_proj_preserves_logits(kind):
    """``online_o``: every attention output linear also carries an online Hadamard; float64 logits unchanged
    (measured worst 8.1e-16 relative, gpt2)."""
    model = _float64_norms(tiny_model(kind, dtype=torch.float64))
    ids = tiny_inputs(model)
    ref = model_output(model, ids)
    arch = get_architecture(model)
    rotate_model(model, arch, seed=1, online_o=True)
    rel = ((model_output(model, ids) - ref).norm() / ref.norm()).item()
    assert rel <= 1e-10, (kind, rel)
    outs = [model.get_submodule(a.o) for i in range(len(get_blocks(model, arch))) for a in block_attention(model, i, arch)]
    assert outs and all(isinstance(m, QuantLinear) and isinstance(m.input_transform, OnlineHadamard) for m in outs)


@pytest.mark.parametrize("kind, message", [
    ("bert", "post-LN model"), ("gemma2", "normalizes a residual branch"), ("mixtral", "fused MoE expert"),
    ("bloom", "outside the blocks"),
])
def test_unsupported_models_are_refused(kind, message):
    model = tiny_model(kind)
    with pytest.raises(StepError, match=message):
        rotate_model(model, get_architecture(model))


def test_fused_layernorm_becomes_rmsnorm_and_embeddings_untie():
    model = tiny_model("opt")
    arch = get_architecture(model)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    fuse_norms(model, arch)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * 2 + 1 and all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    E = model.get_input_embeddings().weight
    assert E.mean(dim=1).abs().max() < 1e-6  # zero-mean residual stream (measured 5.5e-10)


def test_rotated_model_quantizes_through_the_pipeline_with_online_r4():
    """``rotate`` then W4A4 dynamic: the R4 carriers get their specs; rotation lowers the W4A4 error."""
    errs = {}
    for steps in ([], ["rotate"]):
        model = tiny_model("llama")
        ids = tiny_inputs(model)
        ref = model_output(model, ids)
        recipe = parse_recipe({"scheme": {"weights": {"bits": 4}, "input_activations": {
            "bits": 4, "granularity": "token", "dynamic": True}}, "steps": steps + ["rtn"]})
        quantize(model, recipe, progress=False)
        downs = [m.mlp.down_proj for m in model.model.layers]
        assert all(isinstance(d, QuantLinear) and d.weight_quantized and d.input_quant is not None for d in downs)
        assert all((d.input_transform is not None) == bool(steps) for d in downs)
        errs[bool(steps)] = ((model_output(model, ids) - ref).norm() / ref.norm()).item()
    assert errs[True] < errs[False]  # measured 0.083 vs 0.100 on the random tiny llama


def test_rotation_step_order():
    with pytest.raises(Exception, match="step 'rotate' is model-wide"):
        parse_recipe({"scheme": {"weights": {"bits": 4}}, "steps": ["rtn", "rotate"]})


@pytest.mark.real
def test_smollm2_rotation_preserves_logits(smollm2, data_dir):
    """SmolLM2-135M (fp32): fused + R1/R2/R4-rotated logits on 256 WikiText-2 tokens (measured 1.4e-6 rel.)."""
    from normquant.data.text import tokenize_eval

    model = copy.deepcopy(smollm2[0])
    ids = tokenize_eval(smollm2[1], "wikitext2", "test", data_dir)[:, :256]
    ref = model_output(model, ids)
    rotate_model(model, get_architecture(model), seed=0)
    rel = ((model_output(model, ids) - ref).norm() / ref.norm()).item()
    assert rel <= 1e-4, rel
