"""``normquant report --plot``: perplexity vs bits per weight (PNG), and the bits-per-weight formula."""
from __future__ import annotations

import json
import struct
import sys

import pytest

from normquant.cli import main
from normquant.evaluation.report import bits_per_weight, weight_bits
from normquant.quant.spec import QuantSpec
from tests.tiny_models import tiny_model

G64 = QuantSpec(bits=4, granularity="group", group_size=64)


def test_weight_bits_by_hand():
    assert weight_bits(G64, 576, 576) == 4.25  # 4 + 16/64
    assert weight_bits(G64.model_copy(update={"symmetric": False}), 576, 576) == 4 + 20 / 64  # + 4-bit zero point
    assert weight_bits(QuantSpec(bits=8), 576, 1536) == 8 + 16 / 1536  # one scale per output row of 1536
    assert weight_bits(QuantSpec(bits=8, granularity="tensor"), 100, 100) == 8 + 16 / 10_000


def test_bits_per_weight_weights_layers_by_size():
    # 576x576 at 4.25 bits and a float32 576x1536 layer: (331776 * 4.25 + 884736 * 32) / 1216512
    assert bits_per_weight([(G64, 576, 576), (None, 576, 1536)], 32) == pytest.approx(29_721_600 / 1_216_512)
    assert bits_per_weight([], 16) == 16.0


# the tiny llama: hidden 32, intermediate 64, 4 heads of 8, 2 kv heads; per block q 32x32, k/v 16x32, o 32x32,
# gate/up 64x32, down 32x64 (9216 weights, 256 output rows); lm_head is ignored (not counted)
CASES = {
    "w4-g16": ({"weights": {"bits": 4, "granularity": "group", "group_size": 16}}, 30.0, 4 + 16 / 16),
    "w8-ch": ({"weights": {"bits": 8}}, 24.5, 8 + 16 * 256 / 9216),
    "w4-asym-g32-down-float": ({"weights": {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 32},
                                "overrides": [{"pattern": "down_proj", "weights": None}]},
                               26.0, (7168 * (4 + 20 / 32) + 2048 * 32) / 9216),
}


def _record(tmp_path, model_dir, name, scheme, ppl):
    rec = {"recipe": {"name": name, "model": str(model_dir), "dtype": "float32",
                      "scheme": {"input_activations": None, "overrides": [], **scheme}},
           "float": {"ppl": 24.0},
           "quantized": {"ppl": ppl, "dataset": "wikitext2", "split": "test", "seqlen": 256, "windows": 2,
                         "windows_total": 1100},
           "quantize_seconds": 1.0, "environment": {"git_commit": "abc123"}}
    path = tmp_path / name / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rec))
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    return d


def test_report_plot_png_and_bits(tmp_path, tiny_dir, capsys):
    files = [_record(tmp_path, tiny_dir, name, scheme, ppl) for name, (scheme, ppl, _) in CASES.items()]
    png = tmp_path / "ppl_vs_bits.png"
    assert main(["report", *files, "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("| recipe |") and len(out.splitlines()) == 5  # the table as before
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0
    bits = dict(item.rsplit(" ", 1) for item in err.split("bits per weight: ")[1].rstrip(")\n").split(", "))
    assert {k: float(v) for k, v in bits.items()} == {k: pytest.approx(b, abs=1e-4) for k, (_, _, b) in CASES.items()}
    assert main(["report", *files, "--plot", str(png)]) == 2  # no silent overwrite
    assert "pass --force" in capsys.readouterr().err


def test_report_plot_refuses_mixed_protocols_and_missing_matplotlib(tmp_path, tiny_dir, capsys, monkeypatch):
    files = [_record(tmp_path, tiny_dir, name, scheme, ppl) for name, (scheme, ppl, _) in CASES.items()]
    rec = json.loads(open(files[0]).read())
    rec["quantized"]["seqlen"] = 2048
    open(files[0], "w").write(json.dumps(rec))
    assert main(["report", *files, "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normquant: error: records of different models or protocols") and "\n" not in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["report", *files[1:], "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "normquant: error: --plot needs matplotlib: pip install 'normquant[plots]'"
    assert not (tmp_path / "p.png").exists()
