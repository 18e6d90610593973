"""Resume (``--resume``): a quantization interrupted after block k and resumed gives a byte-identical export.

Tiny random 4-block models; the interruption is a ``KeyboardInterrupt`` raised right after block k's checkpoint
is written (what ``kill -9`` leaves behind: ``tests/bad_inputs.py`` kills a real process too).
"""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from normquant.export import export_model
from normquant.pipeline.resume import BlockCheckpoint, ResumeError
from normquant.pipeline.run import quantize
from normquant.recipe import parse_recipe
from tests.tiny_models import tiny_inputs, tiny_model

CALIB = {"samples": 4, "seqlen": 16, "batch_size": 2}
RECIPES = {
    "gptq-w4g16-a8static": {"scheme": {"weights": {"bits": 4, "granularity": "group", "group_size": 16},
                                       "input_activations": {"bits": 8, "granularity": "tensor"}},
                            "steps": [{"gptq": {"block_size": 16}}], "calibration": CALIB},
    # RepQuant replaces the RMSNorms (RMSNormWithBias), creates biases and keeps a per-norm report
    "repquant-w4a8": {"scheme": {"weights": {"bits": 4, "granularity": "channel"},
                                 "input_activations": {"bits": 8, "symmetric": False, "granularity": "tensor"}},
                      "steps": [{"repquant": {"learn_clipping": False, "range_floor": False}}], "calibration": CALIB},
    "rtn-a8static": {"scheme": {"weights": {"bits": 8}, "input_activations": {"bits": 8, "granularity": "tensor"}},
                     "steps": ["rtn"], "calibration": CALIB},
    "rtn-data-free": {"scheme": {"weights": {"bits": 4, "granularity": "group", "group_size": 16}}, "steps": ["rtn"]},
}


class Interrupt(BlockCheckpoint):
    """Stops the run (KeyboardInterrupt) once ``after`` blocks are checkpointed."""

    def __init__(self, directory, after: int):
        super().__init__(directory)
        self.after = after

    def save(self, ctx, steps):
        super().save(ctx, steps)
        if self.done == self.after:
            raise KeyboardInterrupt


def _files_sha(path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _export(model, path):
    return _files_sha(export_model(model, None, path))


@pytest.fixture(scope="module")
def base():
    model = tiny_model("llama", num_hidden_layers=3)
    return model, tiny_inputs(model, batch=4, seq=16)


def _state(model, _path=None) -> dict:
    """RepQuant's reparameterized norms cannot be exported (no loader could rebuild them): compare the state."""
    return {k: (t.dtype, t.shape, t.numpy().tobytes()) for k, t in model.state_dict().items()}


@pytest.mark.parametrize("name", ["gptq-w4g16-a8static", "repquant-w4a8", "rtn-data-free"])
def test_interrupted_then_resumed_export_is_byte_identical(tmp_path, base, name):
    model, ids = base
    recipe = parse_recipe(copy.deepcopy(RECIPES[name]))
    calib = ids if recipe.needs_data else None
    snapshot = _state if name.startswith("repquant") else _export
    reference = snapshot(quantize(copy.deepcopy(model), recipe, calib, progress=False), tmp_path / "ref")

    ckpt = tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt):
        quantize(copy.deepcopy(model), parse_recipe(copy.deepcopy(RECIPES[name])), calib, progress=False,
                 checkpoint=Interrupt(ckpt, after=2))
    assert json.loads((ckpt / "state.json").read_text())["done"] == 2

    resumed = BlockCheckpoint(ckpt)
    out = quantize(copy.deepcopy(model), parse_recipe(copy.deepcopy(RECIPES[name])), calib, progress=False,
                   checkpoint=resumed)
    assert resumed.done == 3  # blocks 0-1 restored, 2 quantized and saved
    assert snapshot(out, tmp_path / "resumed") == reference  # every file (every tensor), byte for byte


def test_resume_off_saves_nothing_and_checkpointing_changes_nothing(tmp_path, base):
    model, ids = base
    recipe = parse_recipe(copy.deepcopy(RECIPES["rtn-a8static"]))
    plain = quantize(copy.deepcopy(model), recipe, ids, progress=False)
    saved = quantize(copy.deepcopy(model), recipe, ids, progress=False, checkpoint=BlockCheckpoint(tmp_path / "c"))
    a, b = plain.state_dict(), saved.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [f"block-{k:05d}.pt" for k in range(3)] + ["state.json"]


def test_checkpoints_of_another_run_are_refused(tmp_path, base):
    model, ids = base
    recipe = parse_recipe(copy.deepcopy(RECIPES["rtn-a8static"]))
    with pytest.raises(KeyboardInterrupt):
        quantize(copy.deepcopy(model), recipe, ids, progress=False, checkpoint=Interrupt(tmp_path / "c", after=1))
    other = copy.deepcopy(RECIPES["rtn-a8static"])
    other["steps"] = [{"rtn": {"mse": True}}]
    with pytest.raises(ResumeError, match="belong to another run .*recipe_hash"):
        quantize(copy.deepcopy(model), parse_recipe(other), ids, progress=False,
                 checkpoint=BlockCheckpoint(tmp_path / "c"))
    with pytest.raises(ResumeError, match="calibration_sha256"):
        quantize(copy.deepcopy(model), recipe, ids.flip(0), progress=False, checkpoint=BlockCheckpoint(tmp_path / "c"))


def test_corrupt_checkpoint_resumes_from_that_block(tmp_path, base):
    model, ids = base
    spec = RECIPES["rtn-a8static"]
    reference = _export(quantize(copy.deepcopy(model), parse_recipe(copy.deepcopy(spec)), ids, progress=False),
                        tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        quantize(copy.deepcopy(model), parse_recipe(copy.deepcopy(spec)), ids, progress=False,
                 checkpoint=Interrupt(tmp_path / "c", after=2))
    block1 = tmp_path / "c" / "block-00001.pt"
    block1.write_bytes(block1.read_bytes()[:100])  # torn / corrupted
    resumed = BlockCheckpoint(tmp_path / "c")
    out = quantize(copy.deepcopy(model), parse_recipe(copy.deepcopy(spec)), ids, progress=False, checkpoint=resumed)
    assert _export(out, tmp_path / "resumed") == reference


def test_cli_resume_removes_checkpoints_after_success(tmp_path):
    from tests.bad_inputs import W8, run_cli

    model = tiny_model("llama", num_hidden_layers=3)
    model.save_pretrained(tmp_path / "m")
    from tests.bad_inputs import _tiny_tokenizer

    _tiny_tokenizer(128).save_pretrained(tmp_path / "m")
    (tmp_path / "r.yaml").write_text(W8)
    res = run_cli(["export", tmp_path / "r.yaml", "--model", tmp_path / "m", "--output", tmp_path / "out", "--resume",
                   "--quiet"])
    assert res.rc == 0, res.stderr
    assert (tmp_path / "out" / "normquant_manifest.json").is_file() and not (tmp_path / "out.resume").exists()
