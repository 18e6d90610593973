"""A hub id with no network: one line at once, not a minute of huggingface_hub retries (45 stderr lines before,
eval/cli_noise.md); the cache is used when it holds the model."""
from __future__ import annotations

import socket

import pytest

from normquant.models import loading
from normquant.models.loading import ModelLoadError, load_model


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for k in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)


def test_unreachable_hub_and_uncached_id_is_one_line(monkeypatch, tmp_path):
    _no_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"^cannot load model 'some-org/not-a-model': the Hugging Face Hub is "
                                             r"unreachable \(no network\?\) and the model is not in the local cache"):
        load_model("some-org/not-a-model")


def test_offline_mode_and_proxies_skip_the_probe(monkeypatch):
    _no_network(monkeypatch)
    assert not loading._hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading._hub_reachable()  # transformers reads the cache itself
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert loading._hub_reachable()  # the proxy resolves the host
