"""A CLI that respects time: calibration size from the command line, estimates, plain progress lines in logs,
its own logger, quiet mode, device checks, inspect's --force, and report tables."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normquant import progress
from normquant.cli import _overrides, build_parser, main, setup_logging
from normquant.recipe import load_recipe
from tests.test_export import tiny_tokenizer
from tests.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _cli(argv, tmp_path, env=None):
    """Run ``normquant`` in a subprocess with stderr redirected to a file (as in a log)."""
    err = tmp_path / "stderr.log"
    with open(err, "wb") as f:
        out = subprocess.run([sys.executable, "-c", "import sys; from normquant.cli import main; sys.exit(main())",
                              *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=f, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return out.returncode, out.stdout.decode(), err.read_bytes().decode()


@pytest.mark.parametrize("command", ["run", "export", "sensitivity"])
def test_calibration_size_from_the_command_line(command):
    argv = [command, "recipes/w8a8_static.yaml", "--calib-samples", "4", "--calib-seqlen", "256"]
    if command == "export":
        argv += ["--output", "x"]
    recipe = load_recipe(argv[1], _overrides(build_parser().parse_args(argv)))
    assert (recipe.calibration.samples, recipe.calibration.seqlen) == (4, 256)
    assert recipe.calibration.dataset == "c4" and recipe.calibration.seed == 0  # the rest stays the recipe's


def test_progress_lines_estimate_and_no_carriage_returns(caplog, monkeypatch):
    monkeypatch.setattr(progress, "ESTIMATE_AFTER_S", 0.0)
    monkeypatch.setattr(progress, "LINES_AFTER_S", 0.0)
    clock = iter(range(0, 1000, 3))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    progress.configure("lines")
    try:
        with caplog.at_level(logging.INFO, logger="normquant"):
            with progress.progress_bar(desc="blocks", unit="block") as bar:
                bar.total = 30  # known once the inputs are captured: timed from here
                for _ in range(30):
                    bar.update()
    finally:
        progress.configure(None)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "blocks: the first of 30 took 3.0 s; all 30: about 2 min"  # 30 blocks x 3.0 s
    assert messages[1] == "blocks 3/30 (10%), 9 s elapsed, ~1m21s left"
    assert messages[-1].startswith("blocks 30/30 (100%), 1m30s elapsed, ~0 s left")
    assert len(messages) <= 13  # about one line per 10%


def test_redirected_log_has_plain_lines_under_normquants_name(tiny_dir, data_dir, tmp_path):
    rc, out, err = _cli(["run", "recipes/w8a8_rtn.yaml", "--model", str(tiny_dir), "--windows", "2",
                         "--seqlen", "32", "--data-dir", str(data_dir), "--output", str(tmp_path / "res")], tmp_path)
    assert rc == 0, err
    assert "\r" not in err  # before this change: 38 tqdm \r updates in the same run (weights loading, blocks, windows)
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("normquant: ") for line in lines), lines  # a short run: no progress lines at all
    assert "w8a8-rtn" in out


def test_quiet_prints_results_only(tiny_dir, data_dir, tmp_path):
    rc, out, err = _cli(["eval", "--model", str(tiny_dir), "--windows", "1", "--seqlen", "32", "--data-dir",
                         str(data_dir), "--quiet"], tmp_path)
    assert rc == 0 and err == "", err
    assert "ppl" in out


def test_logging_never_configures_the_root_logger():
    root = logging.getLogger()
    before = list(root.handlers), root.level
    setup_logging(quiet=False)
    setup_logging(quiet=False)  # idempotent: one handler on the normquant logger
    try:
        assert (list(root.handlers), root.level) == before
        ours = [h for h in logging.getLogger("normquant").handlers if getattr(h, "_normquant_cli_handler", False)]
        assert len(ours) == 1
    finally:
        for h in logging.getLogger("normquant").handlers[:]:
            if getattr(h, "_normquant_cli_handler", False):
                logging.getLogger("normquant").removeHandler(h)
        progress.configure(None)


@pytest.mark.parametrize("device, message", [
    ("gpu", "unknown device 'gpu'; use cpu, cuda, cuda:N, mps or auto"),
    ("cuda", "CUDA is not available" if not torch.cuda.is_available() else "cuda:99"),
])
def test_bad_device_is_one_line(tiny_dir, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        device = "cuda:99"
    assert main(["eval", "--model", str(tiny_dir), "--device", device, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normquant: error: ") and "\n" not in err and message in err, err


def test_inspect_refuses_to_overwrite_without_force(tmp_path, capsys):
    (tmp_path / "inspect.json").write_text("{}")
    assert main(["inspect", "smollm2-135m", "--output", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "inspect.json exists; pass --force" in err and (tmp_path / "inspect.json").read_text() == "{}"


def _record(tmp_path, name, ppl, base):
    rec = {"recipe": {"name": name, "scheme": {"weights": {"bits": 4, "granularity": "group", "group_size": 64},
                                                "input_activations": None, "overrides": []}},
           "float": {"ppl": base},
           "quantized": {"ppl": ppl, "dataset": "wikitext2", "split": "test", "seqlen": 2048, "windows": 4,
                         "windows_total": 148},
           "quantize_seconds": 61.0, "environment": {"git_commit": "abc123"}}
    path = tmp_path / name / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rec))
    return str(path)


def test_report_markdown_and_csv(tmp_path, capsys):
    files = [_record(tmp_path, "w4-g64", 30.0, 24.0), _record(tmp_path, "w4-g64-gptq", 28.8, 24.0)]
    assert main(["report", *files]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| recipe | weights | input activations | protocol |")
    assert md[2] == "| w4-g64 | int4-sym-g64 | float | wikitext2/test 2048x4/148 | 24.000 | 30.000 | +25.00% | 61 | abc123 |"
    assert main(["report", *files, "--format", "csv", "--output", str(tmp_path / "t.csv")]) == 0
    csv_lines = (tmp_path / "t.csv").read_text().splitlines()
    assert csv_lines[0].startswith("recipe,weights,activations,protocol,float_ppl,ppl,delta_pct")
    assert csv_lines[2].startswith("w4-g64-gptq,int4-sym-g64,float,wikitext2/test 2048x4/148,24.0,28.8,")
    assert main(["report", files[0], "--output", str(tmp_path / "t.csv")]) == 2  # no silent overwrite
    assert main(["report", str(ROOT / "README.md")]) == 2
    assert "is not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("dataset, split", [("ptb", "test"), ("c4", "validation")])
def test_eval_on_ptb_and_c4(tiny_dir, data_dir, capsys, dataset, split):
    assert main(["eval", "--model", str(tiny_dir), "--dataset", dataset, "--windows", "1", "--seqlen", "32",
                 "--data-dir", str(data_dir), "--json", "--quiet"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert (rec["dataset"], rec["split"], rec["windows"]) == (dataset, split, 1) and rec["ppl"] > 1


def test_sensitivity_ranks_every_module_kind(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["sensitivity", "recipes/w8a8_rtn.yaml", "--model", str(tiny_dir), "--windows", "1", "--seqlen", "32",
                 "--data-dir", str(data_dir), "--output", str(out), "--quiet"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 14 and {r["module"] for r in rows} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"}
