"""One side of ``scripts/bench_llmcompressor.py``, run in its own process so its peak RSS is its own.

Not meant to be run by hand; the benchmark calls it as

    python scripts/llmcompressor_side.py normquant     --job JOB.json --out OUT.json   # main environment
    /tmp/lcvenv/bin/python scripts/llmcompressor_side.py llmcompressor --job JOB.json --out OUT.json   # the venv
    python scripts/llmcompressor_side.py float         --job JOB.json --out OUT.json   # either environment

``JOB.json`` (written by the benchmark) names the model folder, the calibration tensor ``[N, 2048]`` and the
evaluation tensor ``[1, n_tokens]`` (both ``.pt``, shared by the two sides so they see identical ids), the
normquant recipe (a dict) and the llm-compressor GPTQModifier arguments. Each side:

1. loads the float model (transformers ``from_pretrained``, fp32, CPU);
2. times only the quantization call (``normquant.pipeline.run.quantize`` / ``llmcompressor.oneshot``): wall and CPU seconds;
3. reads ``ru_maxrss`` right after that call (peak RSS of load + quantization, before evaluation allocates
   its 2048 x 49152 logits) and again at the end;
4. checks that the quantization is really in the forward path (llm-compressor: every target Linear is
   ``QuantizationStatus.FROZEN`` with quantization enabled and its weight on the integer grid of its
   ``weight_scale``; normquant: every target is a ``QuantLinear`` with a quantized weight);
5. evaluates WikiText-2 perplexity with normquant's evaluator on the first ``windows`` windows.

The llm-compressor side needs ``/work/main`` on ``PYTHONPATH`` (for normquant's evaluator).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_float(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------------- sides
def run_normquant(job: dict, model, calib: torch.Tensor) -> tuple[float, float, dict]:
    from normquant.quant.linear import QuantLinear
    from normquant.pipeline.run import quantize
    from normquant.recipe import parse_recipe

    recipe = parse_recipe(job["normquant_recipe"], "bench job")
    t0, c0 = time.perf_counter(), cpu_seconds()
    quantize(model, recipe, calib, progress=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    plain = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    check = {
        "quant_linears": len(qls),
        "weights_quantized": sum(m.weight_quantized for m in qls.values()),
        "with_input_quant": sum(m.input_quant is not None for m in qls.values()),
        "unquantized_linears_left": plain,
        "recipe_hash": recipe.hash(),
    }
    if check["weights_quantized"] != len(qls) or plain or not qls:
        raise RuntimeError(f"normquant side: quantization not applied as expected: {check}")
    return wall, cpu, check


def _ct_grid_error(module) -> float:
    """max |W/s - round(W/s)| of a compressed-tensors module's weight under its own qparams (0 on the grid)."""
    from compressed_tensors.quantization import QuantizationStrategy

    args = module.quantization_scheme.weights
    W = module.weight.detach().float()
    s = module.weight_scale.detach().float()
    z = getattr(module, "weight_zero_point", None)
    z = torch.zeros_like(s) if z is None or args.symmetric else z.detach().float()
    if args.strategy == QuantizationStrategy.GROUP:
        g = args.group_size
        Wv = W.reshape(W.shape[0], -1, g)  # [out, in] -> [out, in/g, g]
        x = Wv / s.unsqueeze(-1) + z.unsqueeze(-1)
    elif args.strategy == QuantizationStrategy.CHANNEL:
        x = W / s + z  # s: [out, 1]
    else:
        x = W / s.reshape(-1)[0] + z.reshape(-1)[0]
    return (x - torch.round(x)).abs().max().item()


def run_llmcompressor(job: dict, model, calib: torch.Tensor) -> tuple[float, float, dict]:
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoTokenizer

    lc = job["llmcompressor"]
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    kwargs = dict(targets="Linear", ignore=lc["ignore"], block_size=lc["block_size"],
                  dampening_frac=lc["dampening_frac"], actorder=lc["actorder"])
    if lc.get("preset"):
        kwargs["scheme"] = lc["preset"]
    else:
        kwargs["config_groups"] = {"group_0": QuantizationScheme.model_validate(lc["config_group"])}
    modifier = GPTQModifier(**kwargs)

    t0, c0 = time.perf_counter(), cpu_seconds()
    model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=modifier, pipeline="sequential",
                    num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                    batch_size=lc["batch_size"], shuffle_calibration_samples=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0

    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in lc["ignore"]}
    statuses = {str(getattr(m, "quantization_status", None)) for m in targets.values()}
    frozen = [n for n, m in targets.items() if getattr(m, "quantization_status", None) == QuantizationStatus.FROZEN
              and getattr(m, "quantization_enabled", True)]
    grid = max(_ct_grid_error(m) for m in targets.values())
    first = next(iter(targets.values()))
    check = {
        "target_linears": len(targets),
        "frozen_and_enabled": len(frozen),
        "statuses": sorted(statuses),
        "max_off_grid": grid,  # weights written back by GPTQ lie on s * (q - z)
        "forward": "compressed_tensors set_forward_quantized (fake-quant QDQ of weight and, if any, input)",
        "resolved_scheme": json.loads(first.quantization_scheme.model_dump_json()),
        "lm_head_quantized": hasattr(model.lm_head, "quantization_scheme"),
    }
    if len(frozen) != len(targets) or not targets or grid > 1e-2 or check["lm_head_quantized"]:
        raise RuntimeError(f"llm-compressor side: quantization not applied as expected: {check}")
    return wall, cpu, check


# --------------------------------------------------------------------------------------------------- main
def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "executable": sys.executable}
    for pkg in ("torch", "transformers", "llmcompressor", "compressed-tensors", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=["normquant", "llmcompressor", "float"])
    ap.add_argument("--job", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    job = json.loads(Path(args.job).read_text())
    torch.set_num_threads(job["threads"])

    from normquant.evaluation.perplexity import evaluate_perplexity

    rec: dict = {"side": args.side, "versions": versions(), "threads": torch.get_num_threads(),
                 "loadavg_at_start": os.getloadavg()}
    model = load_float(job["model_dir"])
    rec["peak_rss_after_load_mib"] = maxrss_mib()
    if args.side != "float":
        calib = torch.load(job["calib_path"])
        run = run_normquant if args.side == "normquant" else run_llmcompressor
        wall, cpu, check = run(job, model, calib)
        rec.update(quant_wall_s=wall, quant_cpu_s=cpu, peak_rss_quant_mib=maxrss_mib(), check=check,
                   loadavg_after_quant=os.getloadavg())
    eval_ids = torch.load(job["eval_path"])
    res = evaluate_perplexity(model, eval_ids, seqlen=job["seqlen"], windows=job["windows"], progress=False)
    rec.update(ppl=res.ppl, eval=res.to_dict(), peak_rss_end_mib=maxrss_mib())
    Path(args.out).write_text(json.dumps(rec, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
