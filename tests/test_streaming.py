"""Streamed quantization (--offload): blocks read from disk one at a time, packed once done — the same model,
bit for bit, as quantizing the whole model in memory, with never more than one float block resident."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from normquant.export import export_model
from normquant.models.loading import ModelLoadError
from normquant.models.streaming import is_streamed, load_streamed
from normquant.pipeline import runner
from normquant.pipeline.run import quantize
from normquant.quant.real import PackedLinear
from normquant.recipe import RecipeError, parse_recipe
from tests.tiny_models import tiny_inputs, tiny_model

W4G16 = {"bits": 4, "granularity": "group", "group_size": 16}
RECIPES = {
    "rtn-w4g16-a8-token": {"weights": W4G16, "input_activations": {"bits": 8, "granularity": "token", "dynamic": True}},
    "gptq-w4g16": {"weights": W4G16},
    "rtn-w8-a8-static": {"weights": {"bits": 8}, "input_activations": {"bits": 8, "granularity": "tensor"}},
}


def _recipe(name: str):
    steps = ["gptq"] if name.startswith("gptq") else ["rtn"]
    return parse_recipe({"scheme": {"ignore": ["lm_head"], **RECIPES[name]}, "steps": steps,
                         "calibration": {"samples": 4, "seqlen": 16, "batch_size": 2}})


def _saved(tmp_path, kind="llama", config=None, **save_kwargs):
    d = tmp_path / kind
    tiny_model(kind, num_hidden_layers=3, **(config or {})).save_pretrained(d, **save_kwargs)
    return d


def _both(d, recipe):
    """The model quantized in memory (loaded as transformers loads it) and the streamed one."""
    calib = tiny_inputs(tiny_model("llama"), batch=4, seed=1) if recipe.needs_data else None
    whole = AutoModelForCausalLM.from_pretrained(d).eval()
    quantize(whole, recipe, calib, progress=False)
    streamed, _ = load_streamed(str(d))
    assert is_streamed(streamed) and all(p.is_meta for p in streamed.model.layers.parameters())
    quantize(streamed, recipe, calib, progress=False)
    return whole, streamed


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_streamed_quantization_is_the_in_memory_model_bit_for_bit(tmp_path, name):
    whole, streamed = _both(_saved(tmp_path), _recipe(name))
    ids = tiny_inputs(whole)
    with torch.no_grad():
        assert torch.equal(whole(ids).logits, streamed(ids).logits)  # measured max |diff| 0.0 for all three
    assert all(isinstance(m, PackedLinear) for n, m in streamed.named_modules() if n.endswith("proj"))
    export_model(whole, None, tmp_path / "a")
    export_model(streamed, None, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((tmp_path / x / "config.json").read_text()) for x in "ab")
    assert ca["quantization_config"] == cb["quantization_config"]


def test_a_sharded_checkpoint_and_another_architecture_with_a_tied_head_stream_too(tmp_path):
    d = _saved(tmp_path, "qwen2", {"tie_word_embeddings": True}, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) > 2
    recipe = _recipe("gptq-w4g16")
    calib = tiny_inputs(tiny_model("qwen2"), batch=4, seed=1)
    whole = AutoModelForCausalLM.from_pretrained(d).eval()
    quantize(whole, recipe, calib, progress=False)
    streamed, _ = load_streamed(str(d))
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # tied again after loading
    quantize(streamed, recipe, calib, progress=False)
    ids = tiny_inputs(whole)
    with torch.no_grad():
        assert torch.equal(whole(ids).logits, streamed(ids).logits)


def test_at_most_one_float_block_is_resident(tmp_path, monkeypatch):
    seen = []
    read = runner.materialize_block

    def spy(model, block, name):
        read(model, block, name)
        float_blocks = sum(any(type(m) is torch.nn.Linear or (hasattr(m, "weight") and type(m).__name__ == "QuantLinear")
                               for m in b.modules()) and not any(p.is_meta for p in b.parameters())
                           for b in model.model.layers)
        seen.append(float_blocks)

    monkeypatch.setattr(runner, "materialize_block", spy)
    streamed, _ = load_streamed(str(_saved(tmp_path)))
    quantize(streamed, _recipe("gptq-w4g16"), tiny_inputs(tiny_model("llama"), batch=4, seed=1), progress=False)
    assert seen == [1, 1, 1]  # the block just read; the ones before it are packed, the ones after still on disk


def test_streamed_model_refuses_what_needs_its_blocks(tmp_path, data_dir):
    from normquant.evaluation.perplexity import evaluate_perplexity
    from normquant.pipeline.resume import BlockCheckpoint

    streamed, _ = load_streamed(str(_saved(tmp_path)))
    with pytest.raises(ModelLoadError, match="quantize it first"):
        evaluate_perplexity(streamed, torch.zeros(1, 64, dtype=torch.long), seqlen=32)
    with pytest.raises(RecipeError, match="--resume does not work with --offload"):
        quantize(streamed, _recipe("gptq-w4g16"), tiny_inputs(tiny_model("llama"), batch=4, seed=1), progress=False,
                 checkpoint=BlockCheckpoint(tmp_path / "resume"))


def test_checkpoints_it_cannot_stream_are_one_line(tmp_path):
    d = tmp_path / "bin"  # a PyTorch-pickle checkpoint
    model = tiny_model("llama")
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="reads safetensors checkpoints only"):
        load_streamed(str(d))
    renamed = _saved(tmp_path)
    tensors = load_file(renamed / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k.replace("model.layers.1.", "model.h.1."): v for k, v in tensors.items()},
              str(renamed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="no tensor model.layers.1"):
        load_streamed(str(renamed))
    with pytest.raises(ModelLoadError, match="not a single file"):
        load_streamed(str(renamed / "model.safetensors"))
    whole = AutoModelForCausalLM.from_pretrained(_saved(tmp_path, "qwen2")).eval()
    quantize(whole, _recipe("rtn-w4g16-a8-token"), progress=False)
    export_model(whole, None, tmp_path / "export")
    with pytest.raises(ModelLoadError, match="already quantized"):
        load_streamed(str(tmp_path / "export"))



def test_cli_run_with_offload_measures_and_exports_what_the_in_memory_run_does(tmp_path, smollm2, data_dir, capsys):
    from normquant.cli import main

    _, tok = smollm2
    d = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(tok), max_position_embeddings=128, num_hidden_layers=3, hidden_size=64,
               intermediate_size=128).save_pretrained(d)
    tok.save_pretrained(d)
    ppl = {}
    for flags in ([], ["--offload"]):
        tag = "offload" if flags else "memory"
        assert main(["run", "recipes/w4a16_g64_gptq.yaml", "--model", str(d), "--windows", "1", "--seqlen", "64",
                     "--calib-samples", "4", "--calib-seqlen", "64", "--data-dir", str(data_dir), "--no-baseline",
                     "--output", str(tmp_path / f"r-{tag}"), "--export", str(tmp_path / tag), "--quiet", *flags]) == 0
        ppl[tag] = json.loads((tmp_path / f"r-{tag}" / "results.json").read_text())["quantized"]["ppl"]
    assert ppl["offload"] == ppl["memory"]
    a, b = (load_file(tmp_path / x / "model.safetensors") for x in ("memory", "offload"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["run", "recipes/w4a16_g64_gptq.yaml", "--model", str(d), "--offload", "--device", "auto",
                 "--data-dir", str(data_dir), "--quiet"]) == 2
    assert "drop --device auto" in capsys.readouterr().err


def test_a_device_map_model_is_processed_where_accelerate_put_its_blocks(tmp_path):
    """The multi-device path (``--device auto``: accelerate's device_map, blocks left on their devices), run with a
    one-device map here — no machine of this project has two GPUs; the result is the plain in-memory one."""
    d = _saved(tmp_path)
    recipe = _recipe("gptq-w4g16")
    calib = tiny_inputs(tiny_model("llama"), batch=4, seed=1)
    whole = AutoModelForCausalLM.from_pretrained(d).eval()
    quantize(whole, recipe, calib, progress=False)
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(3)}, "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}  # transformers dispatches only maps of 2+ devices
    mapped = dispatch_model(AutoModelForCausalLM.from_pretrained(d).eval(), device_map)
    assert mapped.hf_device_map
    quantize(mapped, recipe, calib, progress=False)
    ids = tiny_inputs(whole)
    with torch.no_grad():
        assert torch.equal(whole(ids).logits, mapped(ids).logits)
