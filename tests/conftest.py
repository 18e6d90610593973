import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(os.environ.get("NORMQUANT_DATA_DIR", SHARED_DATA))
    if not (d / "wiki.test.raw").is_file():
        pytest.skip(f"offline data not found in {d} (set NORMQUANT_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M (float32) and its tokenizer, converted once to the cache."""
    from normquant.models.loading import load_model

    try:
        return load_model("smollm2-135m")
    except Exception as e:  # not installed
        pytest.skip(str(e))


@pytest.fixture(autouse=True)
def _cache_env(tmp_path_factory, monkeypatch):
    # the packaged-model cache is shared across tests (and runs) unless a test overrides it
    if "NORMQUANT_CACHE" not in os.environ:
        monkeypatch.setenv("NORMQUANT_CACHE", str(Path.home() / ".cache" / "normquant"))
    # Int8Linear's compiled activation quantizer costs ~15-40 s of compilation per process: tests run it eagerly
    # (the same codes; tests/test_real.py compiles it once to check that)
    monkeypatch.setenv("NORMQUANT_COMPILE", "0")
