"""scripts/bench_gpu.py at toy sizes (--smoke) on the CPU: every part runs through the code the GPU run uses
(torch._int_mm and the int4 kernel have CPU twins), so the script still works when a GPU machine is lent."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
bench_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_gpu)


def test_every_part_runs_and_the_real_path_measures_the_fake_paths_perplexity(tmp_path):
    out = bench_gpu.main(["--smoke", "--out", str(tmp_path / "gpu.json")])
    assert (tmp_path / "gpu.json").exists() and out["smoke"] and out["model"] == "random (smoke)"
    for name, kind in (("w8a8", "int8-gemm"), ("w4a16", "int4-gemm")):
        p = out["ppl"][name]
        assert p["kinds"] == [kind] and not p["why_not"]
        # float32 on CPU: measured real/fake 1 - 1.7e-5 (w8a8: float32 rounding, a code flip at most), 1.0 (w4a16)
        assert abs(p["real_over_fake"] - 1) < 1e-3, p
    assert [r["batch"] for r in out["speed"]] == [1, 2] and all(r["w4a16-real_tokens_per_s"] > 0 for r in out["speed"])
    assert out["gptq"]["shape"]["layers_run"] == 2 and out["gptq"]["seconds_per_block"] > 0
    assert [r["m"] for r in out["gemm"]] == [16, 32] and all(r["int8_ms"] > 0 for r in out["gemm"])
