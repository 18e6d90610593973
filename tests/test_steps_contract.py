"""The step contract: two phases, registration from outside the package, order checks, data-free runs, the
per-block call arguments, and static activation recalibration after a step."""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from normquant.pipeline.run import quantize
from normquant.pipeline.runner import run_blocks
from normquant.pipeline.step import STEPS, Step, register_step
from normquant.quant.linear import QuantLinear
from normquant.recipe import RecipeError, load_recipe, parse_recipe
from tests.tiny_models import tiny_inputs, tiny_model

W8 = {"weights": {"bits": 8}}


# ---------------------------------------------------------------------------------------------- steps defined here
@register_step
class TraceStep(Step):
    """Records what the pipeline calls; data-free, model-wide and per-block."""

    name = "test_trace"
    calls: ClassVar[list] = []
    tag: str = "t"

    def apply_model(self, model, arch) -> None:
        TraceStep.calls.append(("model", self.tag, arch.name, any(isinstance(m, QuantLinear) for m in model.modules())))

    def apply_block(self, ctx) -> None:
        TraceStep.calls.append(("block", self.tag, ctx.index, ctx.has_data, sorted(ctx.quant_linears)[:1]))


@register_step
class BlockOnlyStep(Step):
    name = "test_block_only"

    def apply_block(self, ctx) -> None:
        pass


@pytest.fixture(autouse=True)
def _reset_trace():
    TraceStep.calls.clear()


def test_registered_from_a_test_file():
    from normquant.pipeline.step import discover_steps

    steps = discover_steps()
    assert steps["test_trace"] is TraceStep and {"rtn", "gptq", "repquant", "norm_tweak"} <= set(steps)


def test_data_free_recipe_runs_every_data_free_step_model_phase_first():
    model = tiny_model("llama")
    recipe = parse_recipe({"scheme": W8, "steps": [{"test_trace": {"tag": "a"}}, {"test_trace": {"tag": "b"}}, "rtn"]})
    assert not recipe.needs_data
    quantize(model, recipe, progress=False)
    # both model phases before any block, in recipe order, before any linear is wrapped
    assert TraceStep.calls[:2] == [("model", "a", "llama", False), ("model", "b", "llama", False)]
    assert TraceStep.calls[2:] == [("block", t, i, False, ["mlp.down_proj"]) for i in range(2) for t in ("a", "b")]
    assert all(m.weight_quantized for m in model.modules() if isinstance(m, QuantLinear))


def test_steps_see_data_when_the_recipe_has_it():
    model = tiny_model("llama")
    recipe = parse_recipe({"scheme": W8, "steps": ["test_trace", "gptq"],
                           "calibration": {"samples": 2, "seqlen": 16, "batch_size": 2}})
    quantize(model, recipe, tiny_inputs(model, batch=2, seq=16), progress=False)
    assert [c[3] for c in TraceStep.calls if c[0] == "block"] == [True, True]


@pytest.mark.parametrize("steps, message", [
    (["gptq", "repquant"], "step 'repquant' needs float weights but 'gptq' before it quantizes them: list 'repquant' first"),
    (["rtn", "gptq"], "steps 'rtn' and 'gptq' both quantize the weights: keep one"),
    (["gptq", "norm_tweak"], "step 'norm_tweak' needs float weights but 'gptq' before it quantizes them"),
    (["test_block_only", "test_trace"], "step 'test_trace' is model-wide and runs before every block step: "
                                        "list it before 'test_block_only'"),
])
def test_step_order_is_checked_at_load_with_file_and_line(tmp_path, steps, message):
    path = tmp_path / "r.yaml"
    path.write_text("scheme:\n  weights: {bits: 4}\nsteps: [" + ", ".join(steps) + "]\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}:3: steps: {message}")
    assert "\n" not in str(e.value)


def test_step_order_error_is_one_cli_line(tmp_path, capsys):
    from normquant.cli import main

    path = tmp_path / "r.yaml"
    path.write_text("scheme:\n  weights: {bits: 4}\nsteps: [gptq, repquant]\n")
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("normquant: error:") and "'repquant'" in err[0] and "'gptq'" in err[0]


def test_a_step_name_cannot_be_taken_twice():
    class Other(Step):
        name = "rtn"

    with pytest.raises(ValueError, match="step name 'rtn' is taken by normquant.methods.rtn.RTN"):
        register_step(Other)
    assert STEPS["rtn"].__module__ == "normquant.methods.rtn"


@pytest.mark.real
def test_step_from_a_test_file_runs_through_normquant_run(tmp_path, data_dir, smollm2, capsys):
    from normquant.cli import main

    path = tmp_path / "trace.yaml"
    path.write_text("name: trace\nmodel: smollm2-135m\nscheme:\n  weights: {bits: 8}\n"
                    "steps: [{test_trace: {tag: cli}}, rtn]\n")
    rc = main(["run", str(path), "--data-dir", str(data_dir), "--windows", "1", "--seqlen", "128", "--no-baseline",
               "--quiet", "--output", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    assert TraceStep.calls[0] == ("model", "cli", "llama", False)
    assert [c[2] for c in TraceStep.calls[1:]] == list(range(30))  # SmolLM2-135M has 30 blocks
    assert (tmp_path / "out" / "results.json").is_file()


# ---------------------------------------------------------------------------------------------- per-block arguments
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
SLIDING = {
    "gemma2": dict(sliding_window=4, num_hidden_layers=3, layer_types=LAYER_TYPES),
    "gemma3_text": dict(sliding_window=4, num_hidden_layers=3, layer_types=LAYER_TYPES),  # also local rotary base
    "mistral": dict(sliding_window=4, num_hidden_layers=3),
}


@pytest.mark.parametrize("kind", sorted(SLIDING))
def test_runner_inputs_equal_hidden_states_with_sliding_window_layers(kind):
    """Every block is fed its own mask and rotary embeddings: block inputs equal the model's hidden states.

    Windows of 4 tokens on 16-token samples, so a full-attention layer fed the sliding-window mask (block 0's,
    as the runner did before) differs by far more than the tolerance: with block 0's arguments reused, block 2's
    input was off by 0.44 (gemma2) and 0.46 (gemma3) relative (measured on the previous runner; mistral, whose
    layers all share one window, was right either way)."""
    model = tiny_model(kind, dtype=torch.float64, **SLIDING[kind])
    ids = tiny_inputs(model, batch=3, seq=16)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    seen = 0
    for ctx in run_blocks(model, ids, batch_size=2):
        want = hidden[ctx.index]
        rel = ((ctx.inputs - want).norm() / want.norm()).item()
        assert rel <= 1e-6, (kind, ctx.index, rel)  # measured 0.0
        seen += 1
        ctx.advance()
    assert seen == 3


# ---------------------------------------------------------------------------------------------- recalibration
def test_norm_tweak_static_ranges_are_recalibrated_after_tuning():
    """Joint W/A norm tweaking: the static input range of block 0's q_proj is the min-max of the *tweaked*
    input_layernorm's output (block 0's inputs are the embeddings, whatever the quantization)."""
    model = tiny_model("llama")
    ids = tiny_inputs(model, batch=4, seq=16)
    gamma_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    recipe = parse_recipe({"scheme": {"weights": {"bits": 3, "symmetric": False},
                                      "input_activations": {"bits": 8, "symmetric": False, "granularity": "tensor"}},
                           "steps": [{"norm_tweak": {"weights": "rtn", "lr": 5e-2, "epochs": 3}}],
                           "calibration": {"samples": 4, "seqlen": 16, "batch_size": 2}})
    quantize(model, recipe, ids, progress=False)
    layer = model.model.layers[0]
    assert (layer.input_layernorm.weight - gamma_before).abs().max() > 1e-3  # the tweak moved γ
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids))
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    assert layer.self_attn.q_proj.input_quant.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
