"""LLM.int8() decomposition as an activation-quantizer mode."""
import pytest
import torch

from normquant.quant.linear import ActivationQuantizer
from normquant.quant.llm_int8 import outlier_columns
from normquant.quant.spec import QuantSpec
from normquant.recipe import RecipeError, parse_recipe

SPEC = QuantSpec(bits=8, granularity="token", dynamic=True, outlier_threshold=6.0)


def test_outlier_columns_stay_float_and_do_not_set_the_scales():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    x[1, 3, 7] = 40.0  # one outlier: its whole column (every token) stays float
    assert outlier_columns(x, 6.0).nonzero().flatten().tolist() == [7]
    y = ActivationQuantizer(SPEC)(x)
    assert torch.equal(y[..., 7], x[..., 7])
    plain = ActivationQuantizer(SPEC.model_copy(update={"outlier_threshold": None}))
    inliers = x.clone()
    inliers[..., 7] = 0
    rest = [c for c in range(16) if c != 7]
    assert torch.equal(y[..., rest], plain(inliers)[..., rest])  # per-token scales from the inlier columns only
    err_decomp = (y - x).abs().max().item()
    err_plain = (plain(x) - x).abs().max().item()
    assert err_decomp < err_plain / 5  # measured 0.0134 vs 0.157


def test_without_outliers_it_is_plain_per_token_int8():
    x = torch.randn(3, 8, 16)
    plain = ActivationQuantizer(SPEC.model_copy(update={"outlier_threshold": None}))
    assert torch.equal(ActivationQuantizer(SPEC)(x), plain(x))


def test_only_for_dynamic_per_token_and_not_exportable():
    with pytest.raises(RecipeError, match="outlier_threshold .* dynamic per-token"):
        parse_recipe({"scheme": {"weights": {"bits": 8}, "input_activations": {
            "bits": 8, "granularity": "tensor", "outlier_threshold": 6.0}}})
    from normquant.export.schema import ExportError, quantization_args

    with pytest.raises(ExportError, match="LLM.int8 decomposition"):
        quantization_args(SPEC, "input_activations")
