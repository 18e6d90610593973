"""The tensors of every export kind against what vLLM's compressed-tensors loader creates for them (issue 12).

    python scripts/export_layout.py --out eval/export_layout.md

For each export kind of ``tests/test_parity.py`` (a tiny llama, hidden 32, q_proj ``[N, K] = [32, 32]``,
down_proj ``[32, 64]``), the q_proj and down_proj tensors normquant writes (name, dtype, shape) next to the
parameters vLLM 0.33.0 creates for the scheme the config routes to — read from its source, not run (no GPU):

* ``int-quantized`` W8A8 (``CompressedTensorsW8A8Int8``, ``compressed_tensors.py:513-548`` routing: 8-bit
  symmetric tensor/channel weights, input ``token`` + dynamic or ``tensor`` + static;
  ``schemes/compressed_tensors_w8a8_int8.py:59-103``): ``weight`` int8 ``[N, K]``, ``weight_scale`` float32
  ``[N, 1]`` (channel) or ``[1]`` (tensor), static inputs ``input_scale`` float32 ``[1]`` (a 0-d scalar loads
  too) and, asymmetric, ``input_zero_point`` int8 ``[1]``.
* ``pack-quantized`` weight-only (``CompressedTensorsWNA16``, routing ``compressed_tensors.py:698-709``: channel
  or group strategy; ``schemes/compressed_tensors_wNa16.py:168-243``): ``weight_packed`` int32
  ``[N, ceil(K b / 32)]``, ``weight_scale`` ``[N, G]`` (loaded into the model's dtype), ``weight_shape`` int64
  ``[2]``, asymmetric ``weight_zero_point`` int32 ``[ceil(N b / 32), G]`` (packed along N); G = K / group size,
  1 per channel.

A tensor row says ``ok`` when name, dtype (scales: any float, converted on load) and shape match; the kind row
says which vLLM scheme takes it, or why none does.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from normquant.evaluation.records import git_commit  # noqa: E402
from normquant.export.serving import vllm_scheme  # noqa: E402
from tests.test_parity import KINDS, _quantized_export  # noqa: E402  (the export kinds the parity tests run)

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def expected(scheme: str, group: dict, n: int, k: int) -> dict[str, tuple[tuple, tuple]]:
    """suffix -> (dtypes, shape) vLLM creates for a ``[n, k]`` linear of ``group``."""
    w, a = group["weights"], group["input_activations"]
    if scheme == "CompressedTensorsW8A8Int8":
        out = {"weight": ((torch.int8,), (n, k)),
               "weight_scale": (FLOATS, (n, 1) if w["strategy"] == "channel" else (1,))}
        if not a["dynamic"]:
            out["input_scale"] = (FLOATS, (1,))
            if not a["symmetric"]:
                out["input_zero_point"] = ((torch.int8,), (1,))
        return out
    b = w["num_bits"]
    g = 1 if w["strategy"] == "channel" else k // w["group_size"]
    out = {"weight_packed": ((torch.int32,), (n, math.ceil(k * b / 32))), "weight_scale": (FLOATS, (n, g)),
           "weight_shape": ((torch.int64,), (2,))}
    if not w["symmetric"]:
        out["weight_zero_point"] = ((torch.int32,), (math.ceil(n * b / 32), g))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="eval/export_layout.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    lines = ["# Export tensors vs vLLM's compressed-tensors loader (`scripts/export_layout.py`)", "",
             f"Commit `{git_commit()}`. vLLM 0.33.0 read from its source, not run (no GPU in this session); tiny llama "
             "exports of every parity kind. `ok`: name, dtype and shape as vLLM creates the parameter (scales of any float dtype load).", "",
             "| kind | module | format | vLLM scheme | tensor | dtype | shape | vLLM expects | |",
             "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            model, _, path = _quantized_export(kind, Path(tmp))
            qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
            with safe_open(str(path / "model.safetensors"), "pt") as f:
                for module in ("self_attn.q_proj", "mlp.down_proj"):
                    name = f"model.layers.0.{module}"
                    group = next(g for g in qconfig["config_groups"].values() if name in g["targets"])
                    n, k = model.get_submodule(name).weight.shape
                    scheme, why = vllm_scheme(group)
                    want = expected(scheme, group, n, k) if scheme else {}
                    for key in sorted(x for x in f.keys() if x.startswith(name + ".")):
                        t = f.get_tensor(key)
                        suffix = key[len(name) + 1:]
                        dtypes, shape = want.get(suffix, ((), None))
                        verdict = ("ok" if t.dtype in dtypes and tuple(t.shape) == shape else
                                   "not read" if scheme and suffix not in want else
                                   "—" if not scheme else "MISMATCH")
                        exp = f"{'/'.join(str(d).replace('torch.', '') for d in dtypes)} {list(shape)}" if shape else ""
                        lines.append(f"| {kind} | {module} | {group['format']} | {scheme or 'none: ' + why} | "
                                     f"{suffix} | {str(t.dtype).replace('torch.', '')} | {list(t.shape)} | {exp} | "
                                     f"{verdict} |")
                    missing = sorted(set(want) - {x[len(name) + 1:] for x in f.keys() if x.startswith(name + ".")})
                    for suffix in missing:
                        lines.append(f"| {kind} | {module} | {group['format']} | {scheme} | {suffix} | — | — | "
                                     f"{want[suffix][1]} | MISSING |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
