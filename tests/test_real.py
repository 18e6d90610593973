"""Real integer execution (normquant.quant.real): the int8 GEMM computes the fake path's integers."""
from __future__ import annotations

import math

import pytest
import torch

from normquant.pipeline.run import quantize
from normquant.quant.linear import QuantLinear
from normquant.quant.primitives import QuantError
from normquant.quant.real import Int8Linear, convert, exact_activation_bits
from normquant.recipe import parse_recipe
from tests.tiny_models import tiny_inputs, tiny_model

pytestmark = pytest.mark.skipif(exact_activation_bits() is None, reason="no oneDNN int8 GEMM in this build")

W8 = {"bits": 8, "granularity": "channel"}


def _quantized(inputs: dict, bits_ok: bool = True, steps=("rtn",)):
    model = tiny_model("llama")
    recipe = parse_recipe({"scheme": {"ignore": ["lm_head"], "weights": W8, "input_activations": inputs},
                           "steps": list(steps), "calibration": {"samples": 4, "seqlen": 16, "batch_size": 2}})
    quantize(model, recipe, tiny_inputs(model, batch=4, seed=1) if recipe.needs_data else None, progress=False)
    return model


def _fake_and_real(model, **convert_kwargs):
    """Logits of ``model`` on the tiny inputs before and after :func:`convert` (in place), and its report."""
    ids = tiny_inputs(model)
    with torch.no_grad():
        fake = model(ids).logits
        report = convert(model, **convert_kwargs)
        real = model(ids).logits
    return fake, real, report


def test_the_probe_finds_the_exact_width():
    """7 on AVX2 without VNNI (this project's CPUs), 8 with VNNI/AMX: the worst-case product sums exactly."""
    assert exact_activation_bits() in (7, 8)


@pytest.mark.parametrize("inputs", [{"bits": 7, "granularity": "token", "dynamic": True},
                                    {"bits": 6, "granularity": "token", "dynamic": True, "clip_ratio": 0.9},
                                    {"bits": 7, "granularity": "tensor"}], ids=["a7-token", "a6-clip", "a7-static"])
def test_real_logits_equal_the_fake_path_to_float32_rounding(inputs):
    model = _quantized(inputs)
    fake, real, report = _fake_and_real(model)
    n_linear = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert n_linear == len(report["converted"]) == 7 * model.config.num_hidden_layers and not report["why_not_int8"]
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    # Each layer agrees to float32 rounding (next test); through the model, such a rounding difference can move
    # a later layer's x/s across a .5 and flip one activation code by one step, which the logits then carry:
    # measured max |Δ| 1.0e-4 (a7-token: a flip), 8.9e-8 (a6-clip, a7-static: none) on logits of absmax 0.47
    diff = (real - fake).abs().max().item()
    print(f"real vs fake logits max |Δ| {diff:.3g} (logits absmax {fake.abs().max().item():.3g})")
    assert diff < 1e-3 * fake.abs().max().item()


@pytest.mark.parametrize("bits, static", [(7, False), (5, False), (7, True)])
def test_one_layer_equals_its_quantlinear_to_float32_rounding(bits, static):
    """Same input, same codes: y differs only by where the float32 scales are applied (fake: inside the sum)."""
    from normquant.quant.spec import QuantSpec

    g = torch.Generator().manual_seed(bits)
    lin = torch.nn.Linear(64, 32)
    ql = QuantLinear.wrap(lin, QuantSpec(bits=8, granularity="channel"),
                          QuantSpec(bits=bits, granularity="tensor" if static else "token", dynamic=not static))
    ql.quantize_weight()
    x = torch.randn(2, 5, 64, generator=g) * 3
    if static:
        ql.input_quant.observing = True
        ql(x)
        ql.input_quant.observing = False
        ql.input_quant.freeze()
    with torch.no_grad():
        fake, real = ql(x), Int8Linear.from_quant(ql)(x)
    # measured ≤ 1.2e-6 on outputs of absmax ~10: float32 rounding of a 64-term sum
    assert (real - fake).abs().max() <= 1e-6 * fake.abs().max() * 64 ** 0.5


def test_eight_bit_activations_get_packed_weights_where_the_cpu_would_saturate():
    model = _quantized({"bits": 8, "granularity": "token", "dynamic": True})
    report = convert(model)
    if exact_activation_bits() == 8:
        assert set(report["converted"].values()) == {"int8-gemm"}
    else:
        assert set(report["converted"].values()) == {"packed-weights"}
        assert all("saturating int16" in why for why in report["why_not_int8"].values())


def test_asymmetric_activations_get_packed_weights_with_the_reason():
    model = _quantized({"bits": 7, "granularity": "token", "dynamic": True, "symmetric": False})
    report = convert(model)
    assert set(report["converted"].values()) == {"packed-weights"}
    assert all("needs symmetric" in why for why in report["why_not_int8"].values())


@pytest.mark.parametrize("weights", [{"bits": 4, "granularity": "group", "group_size": 16},
                                     {"bits": 3, "symmetric": False, "granularity": "group", "group_size": 16},
                                     {"bits": 8, "granularity": "channel"}], ids=["w4g16", "w3g16-asym", "w8"])
def test_packed_weights_compute_the_fake_path_bit_for_bit_in_less_memory(weights):
    from normquant.quant.real import PackedLinear

    model = tiny_model("llama")
    recipe = parse_recipe({"scheme": {"ignore": ["lm_head"], "weights": weights}, "steps": ["rtn"]})
    quantize(model, recipe, progress=False)
    fp16_bytes = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, QuantLinear))
    fake, real, report = _fake_and_real(model)
    assert set(report["converted"].values()) == {"packed-weights"}
    assert torch.equal(real, fake)  # measured: identical (the same float weight, rebuilt from the codes)
    held = sum(b.nbytes for m in model.modules() if isinstance(m, PackedLinear) for b in m.buffers())
    bits, asym = weights["bits"], not weights.get("symmetric", True)
    want = 0  # int32 words of dense codes, one float32 scale (+ int16 zero point) per qparam row
    for m in model.modules():
        if isinstance(m, PackedLinear):
            n, k = m.shape
            rows = n if weights["granularity"] == "channel" else n * k // weights["group_size"]
            want += n * math.ceil(k * bits / 32) * 4 + rows * (4 + 2 * asym)
    print(f"{weights}: held {held} bytes = {held / fp16_bytes:.3f} x float16")
    assert held == want  # tiny llama (K = 32, 64): w4g16 0.375x float16, w8 per channel 0.556x


def test_a_prefixquant_model_is_refused_in_one_line():
    from normquant.quant.prefix import set_prefix

    model = _quantized({"bits": 7, "granularity": "token", "dynamic": True})
    set_prefix(model, [1, 2])
    with pytest.raises(QuantError, match="PrefixQuant prefix"):
        convert(model)


def test_the_compiled_activation_quantizer_gives_the_eager_codes(monkeypatch):
    """torch.compile fuses quantize_rows (the speed of --real); its codes and scales must be the eager ones."""
    from normquant.quant import real
    from normquant.quant.spec import QuantSpec

    monkeypatch.setenv("NORMQUANT_COMPILE", "1")
    monkeypatch.setattr(real, "_COMPILED", {})
    fn = real.row_quantizer()
    g = torch.Generator().manual_seed(0)
    for spec in (QuantSpec(bits=7, granularity="token", dynamic=True),
                 QuantSpec(bits=6, granularity="token", dynamic=True, clip_ratio=0.9)):
        for shape in ((64, 96), (33, 200)):
            xv = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 5
            xv[0] = 0  # an all-zero row: eps scale
            codes, scale = fn(xv, spec)
            if real._COMPILED.get("failed"):
                pytest.skip("torch.compile does not work here (no C++ compiler?): --real runs eagerly")
            want_codes, want_scale = real.quantize_rows(xv, spec)
            assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)  # measured: identical


# ---------------------------------------------------------------------------------------- the CUDA kernels' math
# torch._int_mm and the int4 kernel have CPU twins with the same inputs: the code that drives them on CUDA runs
# here (only the packing call and the dtype differ on CUDA: bfloat16 for int4).

@pytest.mark.parametrize("inputs", [{"bits": 8, "granularity": "token", "dynamic": True},
                                    {"bits": 8, "granularity": "tensor"}], ids=["a8-token", "a8-static"])
def test_int_mm_backend_runs_8_bit_activations_and_matches_the_fake_path(inputs):
    model = _quantized(inputs)
    fake, real, report = _fake_and_real(model, backend="int_mm")
    assert set(report["converted"].values()) == {"int8-gemm"} and report["activation_bits"] == 8
    assert all(m.backend == "int_mm" for m in model.modules() if isinstance(m, Int8Linear))
    diff = (real - fake).abs().max().item()
    # measured 1.5e-7 (a8-token) and 1.2e-7 (a8-static) on logits of absmax 0.47: float32 rounding, no code flip
    print(f"int_mm vs fake logits max |Δ| {diff:.3g} (absmax {fake.abs().max().item():.3g})")
    assert diff < 1e-3 * fake.abs().max().item()


def test_int_mm_gemm_is_the_integer_product_and_its_shape_rule_is_stated():
    from normquant.quant.real import int_mm_gemm, why_not_int8
    from normquant.quant.spec import QuantSpec

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (5, 64), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(24, generator=g)
    assert torch.equal(int_mm_gemm(q, w, scale), (q.int() @ w.int().t()).float() * scale)
    odd = QuantLinear.wrap(torch.nn.Linear(60, 32), QuantSpec(bits=8, granularity="channel"),
                           QuantSpec(bits=8, granularity="token", dynamic=True))
    odd.quantize_weight()
    assert "multiples of 8" in why_not_int8(odd, 8, "int_mm") and not why_not_int8(odd, 8, "onednn").startswith("shape")


@pytest.mark.parametrize("weights", [{"bits": 4, "granularity": "group", "group_size": 32},
                                     {"bits": 4, "granularity": "group", "group_size": 32, "symmetric": False},
                                     {"bits": 4, "granularity": "channel"}], ids=["g32", "g32-asym", "channel"])
def test_int4_kernel_computes_the_fake_path_to_float32_rounding(weights):
    from normquant.quant.real import Int4Linear

    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    recipe = parse_recipe({"scheme": {"ignore": ["lm_head"], "weights": weights}, "steps": ["rtn"]})
    quantize(model, recipe, progress=False)
    fake, real, report = _fake_and_real(model, int4=True)
    assert set(report["converted"].values()) == {"int4-gemm"}
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 14
    diff = (real - fake).abs().max().item()
    # measured 4.2e-7 (g32), 4.2e-7 (g32-asym), 3.0e-7 (channel) on logits of absmax 0.87-1.05: float32 rounding
    # of (u - 8) s + z_t against s (q - z)
    print(f"int4 kernel vs fake logits max |Δ| {diff:.3g} (absmax {fake.abs().max().item():.3g})")
    assert diff < 1e-5 * fake.abs().max().item()


def test_int4_kernel_refusals_name_the_reason():
    from normquant.quant.real import Int4Linear
    from normquant.quant.spec import QuantSpec

    def layer(k, n, spec, act=None):
        ql = QuantLinear.wrap(torch.nn.Linear(k, n), spec, act)
        ql.quantize_weight()
        return ql

    assert "group size 16" in Int4Linear.why_not(layer(64, 32, QuantSpec(bits=4, granularity="group", group_size=16)))
    assert "not a 4-bit" in Int4Linear.why_not(layer(64, 32, QuantSpec(bits=8, granularity="channel")))
    assert "float activations" in Int4Linear.why_not(layer(128, 32, QuantSpec(bits=4, granularity="channel"),
                                                           QuantSpec(bits=8, granularity="token", dynamic=True)))
    assert "shape [32, 96]" in Int4Linear.why_not(layer(96, 32, QuantSpec(bits=4, granularity="channel")))


@pytest.mark.parametrize("backend, bits", [("onednn", 7), ("int_mm", 8)])
def test_static_asymmetric_activations_run_with_the_zero_point_correction(backend, bits):
    """Σ (q - z) q_w: oneDNN subtracts the activation zero point itself; int_mm subtracts z · Σ_k q_w precomputed."""
    model = _quantized({"bits": bits, "granularity": "tensor", "symmetric": False})
    zeros = [int(m.input_quant.zero_point.item()) for m in model.modules() if isinstance(m, QuantLinear)]
    assert any(z != 2 ** (bits - 1) for z in zeros)  # real zero points, not the symmetric midpoint
    fake, real, report = _fake_and_real(model, backend=backend)
    assert set(report["converted"].values()) == {"int8-gemm"}
    diff = (real - fake).abs().max().item()
    # measured 8.9e-8 (onednn, A7; int_mm, A8) on logits of absmax 0.47: float32 rounding, no code flip
    print(f"static asymmetric {backend} vs fake logits max |Δ| {diff:.3g} (absmax {fake.abs().max().item():.3g})")
    assert diff < 1e-3 * fake.abs().max().item()
