"""One side of ``scripts/bench_llmcompressor.py``, run in its own process so its peak RSS is its own.

Not meant to be run by hand; the benchmark calls it as

    python scripts/llmcompressor_side.py normquant     --job JOB.json --out OUT.json   # main environment
    /tmp/lcvenv/bin/python scripts/llmcompressor_side.py llmcompressor --job JOB.json --out OUT.json   # the venv
    python scripts/llmcompressor_side.py float         --job JOB.json --out OUT.json   # either environment

``JOB.json`` (written by the benchmark) names the model folder, the calibration tensor ``[N, 2048]`` and the
evaluation tensor ``[1, n_tokens]`` (both ``.pt``, shared by the two sides so they see identical ids), the
normquant recipe (a dict) and the llm-compressor GPTQModifier arguments, or (issue 10 table, ``--table outliers``)
``{"modifiers": [{"type", "args"}, ...], "batch_size"}``, run by :func:`run_llmcompressor_modifiers`. Each side:

1. loads the float model (transformers ``from_pretrained``, fp32, CPU);
2. times only the quantization call (``normquant.pipeline.run.quantize`` / ``llmcompressor.oneshot``): wall and CPU seconds;
3. reads ``ru_maxrss`` right after that call (peak RSS of load + quantization, before evaluation allocates
   its 2048 x 49152 logits) and again at the end;
4. checks that the quantization is really in the forward path (llm-compressor: every target Linear is
   ``QuantizationStatus.FROZEN`` with quantization enabled and its weight on the integer grid of its
   ``weight_scale``; normquant: every target is a ``QuantLinear`` with a quantized weight), and records
   ``state_sha256``, a hash of the quantized model's state dict (two runs with one hash made the same model);
5. evaluates WikiText-2 perplexity with normquant's evaluator on the first ``windows`` windows.

Every side runs with the checkout on ``PYTHONPATH`` (the bench sets it): normquant is imported from the
checkout the record names, whatever an editable install points at; ``versions.normquant_from`` says where.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def state_sha256(model) -> str:
    """sha256[:16] over the model's state dict (names, dtypes, shapes, bytes) after quantization: two runs with
    the same hash quantized to the same model, so a perplexity difference between them is the evaluation's."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


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
        "with_input_transform": sum(m.input_transform is not None for m in qls.values()),  # online R4
        "input_specs": sorted({m.input_quant.spec.short() for m in qls.values() if m.input_quant is not None}),
        "weight_specs": sorted({m.weight_spec.short() for m in qls.values() if m.weight_spec is not None}),
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
    if "modifiers" in lc:
        return run_llmcompressor_modifiers(job, model, calib)
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


def _build_modifier(spec: dict):
    """``{"type": ..., "args": {...}}`` -> an llm-compressor modifier (config_groups validated as schemes)."""
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier, SpinQuantModifier

    classes = {"SmoothQuantModifier": SmoothQuantModifier, "SpinQuantModifier": SpinQuantModifier,
               "QuantizationModifier": QuantizationModifier, "GPTQModifier": GPTQModifier}
    args = dict(spec["args"])
    if "config_groups" in args:
        args["config_groups"] = {k: QuantizationScheme.model_validate(v) for k, v in args["config_groups"].items()}
    return classes[spec["type"]](**args)


def _modifier_record(mod) -> dict:
    """What a modifier resolved (after oneshot): its fields, SmoothQuant's mappings, SpinQuant's transforms."""
    rec = {"type": type(mod).__name__, "repr": repr(mod)[:2000]}
    if type(mod).__name__ == "SmoothQuantModifier":
        rec["smoothing_strength"] = mod.smoothing_strength
        rec["mappings"] = [[list(m[0]), m[1]] for m in (mod.mappings or [])]
    if type(mod).__name__ == "SpinQuantModifier":
        rec["rotations"] = list(mod.rotations)
        rec["transform_type"] = mod.transform_type
        rec["precision"] = str(mod.precision)
        if mod.transform_config is not None:
            rec["transform_config"] = json.loads(mod.transform_config.model_dump_json())
    return rec


def _seed_transforms(seed: int) -> None:
    """Seed compressed-tensors' random transforms (SpinQuant's random-hadamard): every ``TransformFactory`` draws
    its signs from its own ``torch.Generator()``, left at torch's fixed default seed unless a ``seed`` is passed,
    which SpinQuantModifier does not do. For the rotation-seed probe (``scripts/probe_rotation_seeds.py``) only."""
    from compressed_tensors.transform.factory.base import TransformFactory

    make = TransformFactory.from_scheme.__func__

    def seeded(cls, scheme, **kwargs):
        return make(cls, scheme, **{**kwargs, "seed": seed})

    TransformFactory.from_scheme = classmethod(seeded)


def run_llmcompressor_modifiers(job: dict, model, calib: torch.Tensor) -> tuple[float, float, dict]:
    """The issue 10 table's llm-compressor side: ``oneshot`` with a list of modifiers (``pipeline="independent"``,
    oneshot's default: every modifier gets its own calibration pass, so SmoothQuant is applied before the
    quantization observers and GPTQ Hessians see the inputs; SpinQuant is data-free)."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.transform.factory.base import TransformBase
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    lc = job["llmcompressor"]
    if lc.get("transform_seed") is not None:
        _seed_transforms(lc["transform_seed"])
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    modifiers = [_build_modifier(m) for m in lc["modifiers"]]
    ignore = lc["modifiers"][-1]["args"].get("ignore", [])

    t0, c0 = time.perf_counter(), cpu_seconds()
    model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=modifiers, pipeline="independent",
                    num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                    batch_size=lc["batch_size"], shuffle_calibration_samples=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0

    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in ignore}
    statuses = {str(getattr(m, "quantization_status", None)) for m in targets.values()}
    frozen = [n for n, m in targets.items() if getattr(m, "quantization_status", None) == QuantizationStatus.FROZEN
              and getattr(m, "quantization_enabled", True)]
    grid = max(_ct_grid_error(m) for m in targets.values())
    schemes = {m.quantization_scheme.model_dump_json() for m in targets.values() if hasattr(m, "quantization_scheme")}
    first = next(iter(targets.values()))
    static_inputs = [n for n, m in targets.items() if hasattr(m, "input_scale")]
    # online transforms (SpinQuant R4): HadamardTransform submodules applied as forward pre-hooks on the input
    online = {n: [c for c in m.children() if isinstance(c, TransformBase)
              and getattr(c.args.location, "value", c.args.location) == "input"]
              for n, m in targets.items()}
    online = {n: ts for n, ts in online.items() if ts}
    # the fake-quant forward is on: quantization_enabled True vs False changes the output of a target
    probe_name, probe = next(iter(targets.items()))
    xp = torch.randn(2, 8, probe.in_features)
    with torch.no_grad():
        yq = probe(xp)
        probe.quantization_enabled = False
        yf = probe(xp)
        probe.quantization_enabled = True
    qdq_active = {"module": probe_name, "max_abs_diff_quant_on_vs_off": (yq - yf).abs().max().item()}
    is_gptq = any(m["type"] == "GPTQModifier" for m in lc["modifiers"])
    r4_active = None
    if online:  # the hook is in the forward path: module(x) (hooks run) differs from module.forward(x) (no hooks)
        name = next(iter(online))
        mod = targets[name]
        x = torch.randn(2, 8, mod.in_features)
        with torch.no_grad():
            r4_active = {"module": name, "max_abs_diff_with_vs_without_hooks":
                         (mod(x) - mod.forward(x)).abs().max().item()}
    check = {
        "target_linears": len(targets),
        "frozen_and_enabled": len(frozen),
        "statuses": sorted(statuses),
        "max_off_grid": grid,  # GPTQ writes weights back on s*(q-z); RTN (QuantizationModifier) weights stay
        # float and are fake-quantized in every forward, so they are off-grid by design
        "qdq_active": qdq_active,
        "forward": "compressed_tensors set_forward_quantized (fake-quant QDQ of weight and input)",
        "resolved_scheme": json.loads(first.quantization_scheme.model_dump_json()),
        "distinct_schemes": len(schemes),
        "static_input_scales": len(static_inputs),
        "input_scale_range": ([min(float(targets[n].input_scale.min()) for n in static_inputs),
                               max(float(targets[n].input_scale.max()) for n in static_inputs)]
                              if static_inputs else None),
        "online_input_transforms": {"modules": len(online), "names_sample": sorted(online)[:3],
                                    "precision": str(next(iter(online.values()))[0].weight.dtype) if online else None,
                                    "active": r4_active},
        "embeddings_tied": model.get_input_embeddings().weight is model.lm_head.weight,
        "lm_head_quantized": hasattr(model.lm_head, "quantization_scheme"),
        "modifiers_resolved": [_modifier_record(m) for m in modifiers],
    }
    spin = any(m["type"] == "SpinQuantModifier" and "R4" in m["args"].get("rotations", []) for m in lc["modifiers"])
    ok = (len(frozen) == len(targets) and targets and (grid < 1e-2 or not is_gptq) and not check["lm_head_quantized"]
          and qdq_active["max_abs_diff_quant_on_vs_off"] > 0
          and len(schemes) == 1 and (not spin or (len(online) == sum(n.endswith("down_proj") for n in targets)
                                                  and r4_active["max_abs_diff_with_vs_without_hooks"] > 0)))
    if not ok:
        raise RuntimeError(f"llm-compressor side: quantization not applied as expected: {check}")
    return wall, cpu, check


# --------------------------------------------------------------------------------------------------- main
def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import normquant
    from normquant.evaluation.records import cpu

    out = {"python": sys.version.split()[0], "executable": sys.executable, "normquant_from": normquant.__path__[0],
           "cpu": cpu()}
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
                   loadavg_after_quant=os.getloadavg(), state_sha256=state_sha256(model))
    eval_ids = torch.load(job["eval_path"])
    t0 = time.perf_counter()
    res = evaluate_perplexity(model, eval_ids, seqlen=job["seqlen"], windows=job["windows"], progress=False)
    rec.update(ppl=res.ppl, eval=res.to_dict(), eval_wall_s=time.perf_counter() - t0, peak_rss_end_mib=maxrss_mib())
    if res.prefix_tokens:  # PrefixQuant row: the float model reading the same prefix, for a like-for-like ratio
        from normquant.quant.prefix import prefix_of, set_prefix

        prefix = prefix_of(model).tolist()
        del model
        reference = load_float(job["model_dir"])
        set_prefix(reference, prefix)
        rec["float_with_prefix"] = evaluate_perplexity(reference, eval_ids, seqlen=job["seqlen"],
                                                       windows=job["windows"], progress=False).to_dict()
    Path(args.out).write_text(json.dumps(rec, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
