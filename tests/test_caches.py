"""Caches are verified and rebuilt when unreadable: the converted packaged model and self-generated data."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from normquant.data.selfgen import cache_path, generate_calibration
from normquant.models import loading
from normquant.models.loading import CACHE_STAMP, _stamp, verify_cache
from tests.bad_inputs import _tiny_tokenizer
from tests.tiny_models import tiny_model


@pytest.fixture
def converted(tmp_path):
    """A converted-model folder as materialize_packaged writes it (tiny llama, word-level tokenizer, stamp)."""
    d = tmp_path / "models" / "smollm2-135m"
    tiny_model("llama").save_pretrained(d)
    _tiny_tokenizer(128).save_pretrained(d)
    (d / CACHE_STAMP).write_text(__import__("json").dumps(_stamp(d)))
    return d


def test_intact_cache_is_trusted(converted):
    assert verify_cache(converted)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "config"])
def test_damaged_cache_is_refused(converted, damage, caplog):
    weights = converted / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip":  # same size, new mtime: hashed again
        data = bytearray(weights.read_bytes())
        data[-10] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        (converted / "tokenizer.json").unlink()
    else:
        (converted / "config.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="normquant"):
        assert not verify_cache(converted)
    assert "converting it again" in caplog.text


def test_unstamped_cache_is_checked_structurally_then_stamped(converted):
    (converted / CACHE_STAMP).unlink()
    assert verify_cache(converted) and (converted / CACHE_STAMP).is_file()
    (converted / CACHE_STAMP).unlink()
    weights = converted / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated: the safetensors header promises more
    assert not verify_cache(converted)


def test_unreadable_cache_is_converted_again(converted, monkeypatch, tmp_path):
    """materialize_packaged removes a damaged conversion and converts again (the GGUF read is stubbed)."""
    import transformers

    monkeypatch.setenv("NORMQUANT_CACHE", str(tmp_path))
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"stub")
    monkeypatch.setattr(loading, "_packaged_source", lambda name: (loading.PACKAGED[name], gguf))
    calls = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: calls.append(a) or tiny_model("llama"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _tiny_tokenizer(128))
    weights = converted / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    path = loading.materialize_packaged("smollm2-135m")
    assert path == converted and len(calls) == 1 and verify_cache(path)
    assert loading.materialize_packaged("smollm2-135m") == converted and len(calls) == 1  # reused now
    assert sorted(p.name for p in converted.parent.iterdir()) == ["smollm2-135m"]


@pytest.mark.parametrize("damage", ["truncate", "wrong-shape"])
def test_damaged_selfgen_cache_is_generated_again(tmp_path, damage, caplog):
    model, tok = tiny_model("llama"), _tiny_tokenizer(128)
    kw = dict(n=3, seqlen=8, seed=1, cache_dir=tmp_path, progress=False)
    ids = generate_calibration(model, tok, **kw)
    path = cache_path(model, tok, 3, 8, 1, cache_dir=tmp_path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "garbage":
        path.write_bytes(os.urandom(500))
    else:
        record = torch.load(path, weights_only=True)
        record["input_ids"] = record["input_ids"][:, :4]
        torch.save(record, path)
    with caplog.at_level(logging.WARNING, logger="normquant"):
        again = generate_calibration(model, tok, **kw)
    assert torch.equal(again, ids) and "generating it again" in caplog.text
    assert torch.equal(torch.load(path, weights_only=True)["input_ids"], ids)  # the cache was rewritten
