"""Evaluation/calibration text: the local files give the rows `datasets` gives; sampling is reproducible."""
import pytest
import torch

from normquant.data import text
from normquant.data.text import DataError, calibration_samples, load_rows


def test_local_wikitext_has_the_datasets_row_structure(data_dir):
    rows = load_rows("wikitext2", "test", data_dir)
    # datasets' wikitext-2-raw-v1 test split: 4358 rows; row 0 "", row 1 the title with its "\n", row 2 ""
    assert len(rows) == 4358
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert rows[3].startswith(" Robert Boulter is an English film , television and theatre actor")
    assert all(r == "" or (r.strip() and r.endswith("\n")) for r in rows)
    raw = (data_dir / "wiki.test.raw").read_text(encoding="utf-8")
    assert "".join(r or " \n" for r in rows) == raw  # nothing lost: blank lines were " \n"


def test_datasets_is_the_default_path(monkeypatch, data_dir):
    """Without --data-dir the rows come from `datasets.load_dataset` (hub id and config as in the papers)."""
    calls = []
    rows = load_rows("wikitext2", "test", data_dir)

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return {"text": rows}

    import datasets

    monkeypatch.delenv("NORMQUANT_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert text.load_text("wikitext2", "test") == text.load_text("wikitext2", "test", data_dir)
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]


def test_offline_failure_says_use_data_dir(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.delenv("NORMQUANT_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="pass --data-dir"):
        load_rows("ptb", "test")


def test_token_count_and_calibration_sampling(smollm2, data_dir):
    _, tok = smollm2
    ids = text.tokenize_eval(tok, "wikitext2", "test", data_dir)
    assert ids.shape == (1, 304986)  # 148 full windows of 2048 (measured with the SmolLM2 tokenizer)
    a = calibration_samples(tok, "c4", "validation", n=4, seqlen=64, seed=0, data_dir=data_dir)
    b = calibration_samples(tok, "c4", "validation", n=4, seqlen=64, seed=0, data_dir=data_dir)
    c = calibration_samples(tok, "c4", "validation", n=4, seqlen=64, seed=1, data_dir=data_dir)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_test_split_refused_for_calibration(smollm2, data_dir):
    with pytest.raises(DataError, match="refusing to calibrate on the test split"):
        calibration_samples(smollm2[1], "wikitext2", "test", n=2, seqlen=16, data_dir=data_dir)


def test_unknown_dataset_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'wiki'"):
        load_rows("wiki", "test", tmp_path)
    with pytest.raises(DataError, match="wiki.test.raw not found"):
        load_rows("wikitext2", "test", tmp_path)
