"""Result records: every number goes out with its protocol and provenance."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch

from normquant import __version__
from normquant.io import atomic_write_text


def git_commit(tree: str | Path | None = None) -> str:
    """``<short sha>`` of the checkout holding ``tree`` (default: this package), ``-dirty`` when its code (not its
    ``eval/`` records) has uncommitted changes; ``unknown`` outside git."""
    here = Path(tree) if tree is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        # records under eval/ are outputs, not code: a run that rewrites one leaves the next run's commit clean
        code = ["--", ":/", ":(top,exclude)eval"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *code], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


#: CPU features that change which kernels run (and so the last bits of a result that quantization can amplify)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu() -> dict:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has (Linux ``/proc/cpuinfo``; else the platform's
    processor string and no flags)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or None, "flags": None}
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)  # the last CPU's lines
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    have = set(fields.get("flags", "").split())
    return {"model": fields.get("model name"), "flags": [f for f in CPU_FLAGS if f in have]}


def environment() -> dict:
    return {"normquant": __version__, "git_commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu": cpu(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def perplexity_record(model_name: str, dataset: str, split: str, result, **extra) -> dict:
    """One perplexity measurement with its protocol (dataset, split, seqlen, windows used / total)."""
    subset = result.windows < result.windows_total
    return {"model": model_name, "dataset": dataset, "split": split,
            "protocol": f"{dataset}/{split}, rows joined per GPTQ protocol, non-overlapping {result.seqlen}-token "
                        f"windows, {'first ' + str(result.windows) + ' of ' if subset else 'all '}"
                        f"{result.windows_total} windows",
            **result.to_dict(), **extra}


def reused_float_record(path: str | Path, windows: int, seqlen: int) -> dict:
    """The ``"float"`` record of an earlier result JSON, for a run that measures the same windows again.

    A record of other windows or another seqlen is refused (one line, exit); the copy says where it came from.
    """
    record = json.loads(Path(path).read_text())["float"]
    if (record["windows"], record["seqlen"]) != (windows, seqlen):
        raise SystemExit(f"{path} measured {record['windows']} windows of {record['seqlen']} tokens, not {windows} "
                         f"of {seqlen}: drop --float-from or point it at a matching result")
    return {**record, "reused_from": str(path)}


def write_json(path: str | Path, data: dict) -> Path:
    """Write JSON atomically (:func:`normquant.io.atomic_write_text`); parent directories are created."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
