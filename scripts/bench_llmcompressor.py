"""Benchmark (not a test): normquant GPTQ vs llm-compressor's GPTQModifier on SmolLM2-135M, same data, same scheme.

    python scripts/bench_llmcompressor.py --data-dir /work/shared/data --samples 32 --windows 16 --scheme w4a16-g64

llm-compressor lives in its own virtual environment so it cannot change the main environment's torch or
transformers (it pins transformers<=5.17; the venv takes torch 2.13.0+cpu from the local wheel in /opt/wheels):

    python -m venv /tmp/lcvenv
    /tmp/lcvenv/bin/pip install torch==2.13.0          # 2.13.0+cpu from /opt/wheels (no CUDA build)
    /tmp/lcvenv/bin/pip install --dry-run llmcompressor   # check: must not list torch
    /tmp/lcvenv/bin/pip install llmcompressor          # llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0
    # normquant is used from the source tree: the benchmark puts this checkout on PYTHONPATH for every side
    # (its runtime needs there, pyyaml/pydantic/safetensors/datasets/pyarrow/tqdm, come with llmcompressor).

One run:

1. one calibration set with normquant's sampler (C4 validation, ``seed``, ``samples`` x 2048), saved as ``.pt``
   in ``--work-dir``; the WikiText-2 test ids are tokenized once here and saved too, so both sides (and both
   transformers/tokenizers versions) see identical tensors;
2. float perplexity of the same windows (in both environments, cached in ``--work-dir``);
3. normquant (``quantize`` with the scheme's recipe, samples overridden) and llm-compressor (``oneshot`` with a
   ``GPTQModifier`` of the same scheme, ``pipeline="sequential"``), each in its own subprocess
   (``scripts/llmcompressor_side.py``), one after the other, never in parallel; each records the wall and CPU
   seconds of the quantization call only, ``ru_maxrss`` right after it, and its perplexity;
4. writes ``<out-dir>/<scheme>.json`` and prints a table.

Schemes (all symmetric unless noted, lm_head ignored, GPTQ block 128, dampening 0.01 as in the recipes):

=============  ===================================  ==================================================
``--scheme``   normquant recipe                     llm-compressor
=============  ===================================  ==================================================
w4a16-g64      recipes/w4a16_g64_gptq.yaml          explicit config_groups: int4 sym group 64 (the
                                                    W4A16 preset's group 128 does not divide 576)
w8a8           recipes/w8a8_gptq.yaml               preset ``W8A8`` (int8 sym channel + int8 dynamic token)
w4a16-ch       (built here) int4 sym per-channel    config_groups: int4 sym channel
w3a16-g64      recipes/w3a16_g64_gptq.yaml (asym)   config_groups: int3 asym group 64
=============  ===================================  ==================================================

Issue 10 table (``--table outliers``): one run over named rows (``OUTLIER_ROWS``), each a normquant recipe (a file
under recipes/ or a dict derived from one) and the llm-compressor modifiers derived from it by
:func:`lc_modifiers_for` (SmoothQuantModifier / SpinQuantModifier(R1, R2, R4, random-hadamard) followed by a
QuantizationModifier (RTN) or GPTQModifier), or None where llm-compressor has no equivalent (RepQuant, LLM.int8).
One calibration tensor and one evaluator for every row; the float row once; the JSON (``--out``, default
eval/outliers_smollm2.json) is rewritten after every side of every row; ``--rows``, ``--sides``, ``--resume``
(a side whose recipe is unchanged is kept, unless ``--redo``; rows not in ``--rows`` are carried over; every side
names the commit of the run that made it)::

    python scripts/bench_llmcompressor.py --table outliers --data-dir /work/shared/data --samples 16 --windows 16

See eval/llmcompressor/README.md ("Issue 10 table").

Act-order: ``--act-order recipe`` (default) follows the normquant recipe's ``act_order`` and gives
llm-compressor ``actorder="static"`` when it is on, ``None`` when it is off; ``on``/``off`` force both sides.
With act-order on, both implementations fit all group qparams once on the unmodified weight (normquant's
static groups; llm-compressor always does) and quantize columns by descending diag(H): the same algorithm.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SIDE = REPO / "scripts" / "llmcompressor_side.py"
# this checkout's normquant, here and in every side process (PYTHONPATH): an editable install of another checkout
# (a worktree run with the main checkout's venv) would otherwise supply the code while the record names this one
sys.path.insert(0, str(REPO))

SCHEMES = {
    "w4a16-g64": {"recipe": "recipes/w4a16_g64_gptq.yaml"},
    "w8a8": {"recipe": "recipes/w8a8_gptq.yaml", "preset": "W8A8"},
    "w3a16-g64": {"recipe": "recipes/w3a16_g64_gptq.yaml"},
    "w4a16-ch": {"recipe_dict": {
        "name": "w4a16-ch-gptq", "model": "smollm2-135m",
        "scheme": {"ignore": ["lm_head"], "weights": {"bits": 4, "symmetric": True, "granularity": "channel"}},
        "steps": [{"gptq": {"block_size": 128, "dampening": 0.01}}]}},
}

#: What compressed-tensors' W8A8 preset resolves to (quant_scheme.INT8_W8A8), checked against the side's record.
W8A8_PRESET = {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
               "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                     "dynamic": True}}

#: Files whose content decides the numbers; their hashes go into the record (the tree is shared and moves).
CODE_FILES = ("normquant/methods/gptq.py", "normquant/methods/rtn.py", "normquant/pipeline/run.py",
              "normquant/pipeline/runner.py", "normquant/quant/primitives.py", "normquant/quant/linear.py",
              "scripts/bench_llmcompressor.py", "scripts/llmcompressor_side.py")
#: More files that decide the numbers of the issue 10 table (--table outliers).
TABLE_CODE_FILES = ("normquant/methods/quarot.py", "normquant/methods/smoothquant.py", "normquant/methods/repquant.py",
                    "normquant/methods/norm_fusion.py", "normquant/quant/hadamard.py", "normquant/quant/llm_int8.py",
                    "normquant/quant/observers.py", "normquant/quant/search.py", "recipes/w8a8_smoothquant.yaml",
                    "recipes/w8a8_static_rotated.yaml", "recipes/w8a8_int8_decomp.yaml", "recipes/w4a8_rotated.yaml",
                    "recipes/w4a4_rotated_gptq.yaml", "recipes/w4a4_rotated_rtn.yaml",
                    "recipes/w4a8_norm_centric_stack.yaml")

DEFAULT_NOTE = ("N is below the GPTQ protocol's 128 x 2048 to fit a shared 2-core CPU: each side makes 2 sequential "
                "passes of N x 2048 tokens through the 30 blocks, ~6 s per sample per pass on an idle machine and "
                "~3x that under the load of other jobs.")


# ------------------------------------------------------------------------------------------------ helpers
def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def spec_to_ct(spec) -> dict | None:
    """normquant QuantSpec -> compressed-tensors QuantizationArgs dict (None for None)."""
    if spec is None:
        return None
    if spec.clip_ratio != 1.0:
        raise SystemExit(f"clip_ratio {spec.clip_ratio} has no llm-compressor GPTQ equivalent")
    d = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": spec.granularity,
         "dynamic": spec.dynamic}
    if spec.granularity == "group":
        d["group_size"] = spec.group_size
    return d


def build_recipe(scheme: str, samples: int, seqlen: int, seed: int, act_order_mode: str):
    """The normquant recipe (validated) for ``scheme`` with the benchmark's calibration, and its GPTQ step."""
    from normquant.recipe import load_recipe, parse_recipe

    entry = SCHEMES[scheme]
    calib = {"dataset": "c4", "split": "validation", "samples": samples, "seqlen": seqlen, "seed": seed}
    if "recipe" in entry:
        recipe = load_recipe(REPO / entry["recipe"])
        source = entry["recipe"]
    else:
        recipe = parse_recipe(copy.deepcopy(entry["recipe_dict"]), f"bench scheme {scheme}")
        source = f"built in scripts/bench_llmcompressor.py ({scheme})"
    data = recipe.to_dict()
    steps = data["steps"]
    if len(steps) != 1 or "gptq" not in steps[0]:
        raise SystemExit(f"{source}: expected exactly one gptq step, got {steps}")
    gptq = steps[0]["gptq"]
    if gptq.get("mse"):
        raise SystemExit(f"{source}: gptq mse clip search has no llm-compressor GPTQ equivalent; turn it off")
    if act_order_mode != "recipe":
        gptq["act_order"] = act_order_mode == "on"
    data["calibration"] = {**data["calibration"], **calib}
    data.pop("export", None)
    recipe = parse_recipe(data, source)  # validate the edited recipe
    return recipe, source


def llmcompressor_args(scheme: str, recipe, batch_size: int) -> dict:
    sch = recipe.scheme
    if sch.overrides:
        raise SystemExit("scheme overrides (mixed precision) are not translated to llm-compressor here")
    if sch.input_activations is not None and not (sch.input_activations.dynamic and
                                                  sch.input_activations.granularity == "token"):
        raise SystemExit("only dynamic per-token input activations are translated to llm-compressor here")
    gptq = recipe.steps[0]
    lc = {"ignore": list(sch.ignore), "block_size": gptq.block_size, "dampening_frac": gptq.dampening,
          "actorder": "static" if gptq.act_order else None, "batch_size": batch_size}
    group = {"targets": ["Linear"], "weights": spec_to_ct(sch.weights),
             "input_activations": spec_to_ct(sch.input_activations)}
    preset = SCHEMES[scheme].get("preset")
    if preset:
        expected = {k: {kk: vv for kk, vv in v.items()} for k, v in W8A8_PRESET.items()}
        mine = {k: group[k] for k in ("weights", "input_activations")}
        if mine != expected:
            raise SystemExit(f"normquant scheme {mine} differs from llm-compressor preset {preset} {expected}")
        lc["preset"] = preset
    else:
        lc["config_group"] = group
    lc["expected"] = {k: group[k] for k in ("weights", "input_activations")}
    return lc


def check_resolved(lc: dict, resolved: dict) -> list[str]:
    """Differences between the intended compressed-tensors args and what llm-compressor resolved."""
    diffs = []
    for kind, want in lc["expected"].items():
        got = resolved.get(kind)
        if want is None or got is None:
            if (want is None) != (got is None):
                diffs.append(f"{kind}: wanted {want}, resolved {got}")
            continue
        for k, v in want.items():
            if got.get(k) != v:
                diffs.append(f"{kind}.{k}: wanted {v}, resolved {got.get(k)}")
    want_actorder = lc["actorder"]
    got_actorder = (resolved.get("weights") or {}).get("actorder")
    if want_actorder != got_actorder:
        diffs.append(f"weights.actorder: wanted {want_actorder}, resolved {got_actorder}")
    return diffs


def run_side(side: str, python: str, job_path: Path, out: Path, log: Path) -> dict:
    env = dict(os.environ)
    threads = json.loads(job_path.read_text())["threads"]
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [python, str(SIDE), side, "--job", str(job_path), "--out", str(out)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"side '{side}' ({python}) failed with exit code {proc.returncode}; log {log}:\n{tail}")
    rec = json.loads(out.read_text())
    rec["process_wall_s"] = time.perf_counter() - t0
    rec["command"] = " ".join(cmd)
    return rec


def float_side(python: str, tag: str, job: dict, job_path: Path, work: Path) -> dict:
    """Float perplexity, cached per (python, eval ids, windows)."""
    key = hashlib.sha256(f"{python}|{job['threads']}|{job['model_dir']}|{job['eval_sha256']}|{job['windows']}|{job['seqlen']}".encode()).hexdigest()[:12]
    cached = work / f"float_{tag}_{key}.json"
    if cached.is_file():
        rec = json.loads(cached.read_text())
        rec["cached"] = True
        return rec
    rec = run_side("float", python, job_path, cached, work / f"float_{tag}.log")
    cached.write_text(json.dumps(rec, indent=2) + "\n")
    rec["cached"] = False
    return rec


# ------------------------------------------------------------------------------------------------ issue 10 table
# ``--table outliers``: one run, one calibration tensor, one evaluator, many rows. Each row pairs a normquant recipe
# (a file under recipes/ or a dict derived from one) with the llm-compressor modifiers that do the same thing, or
# with None where llm-compressor has no equivalent. The llm-compressor modifiers are *derived* from the normquant
# recipe by :func:`lc_modifiers_for`, so the two sides cannot drift apart; every place where llm-compressor cannot
# express the normquant recipe exactly is listed in the row's ``differences``.

def _step(steps: list, name: str) -> dict:
    """The first step called ``name`` of a recipe's step list (dict form), as a fresh dict."""
    for st in steps:
        key = st if isinstance(st, str) else next(iter(st))
        if key == name:
            return copy.deepcopy(st if isinstance(st, dict) else {name: {}})
    raise SystemExit(f"no '{name}' step in {steps}")


def _repquant_step(_steps: list) -> dict:
    """RepQuant with the norm-centric stack's settings (recipes/w4a8_norm_centric_stack.yaml)."""
    import yaml

    stack = yaml.safe_load((REPO / "recipes" / "w4a8_norm_centric_stack.yaml").read_text())
    return _step(stack["steps"], "repquant")


def shared_job(tok, args, work: Path, model_dir) -> dict:
    """Save the calibration tensor ``[N, seqlen]`` and the WikiText-2 ids ``[1, n_tokens]`` both sides load;
    return the job fields every side shares (paths, their hashes, the protocol)."""
    from normquant.data.text import calibration_samples, tokenize_eval

    calib = calibration_samples(tok, "c4", "validation", n=args.samples, seqlen=args.seqlen, seed=args.seed,
                                data_dir=args.data_dir)  # [N, seqlen]
    calib_path = work / f"calib_c4_validation_n{args.samples}_L{args.seqlen}_seed{args.seed}.pt"
    torch.save(calib, calib_path)
    eval_ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)  # [1, n_tokens]
    eval_path = work / "wikitext2_test_ids.pt"
    torch.save(eval_ids, eval_path)
    return {"model_dir": str(model_dir), "calib_path": str(calib_path), "eval_path": str(eval_path),
            "calib_sha256": sha256_tensor(calib), "eval_sha256": sha256_tensor(eval_ids), "seqlen": args.seqlen,
            "windows": args.windows, "threads": args.threads}


#: name -> (title, base recipe file, steps edit (None: keep the file's steps), llm-compressor: "derive" or a reason
#: why it has no equivalent). Order = the table's order.
OUTLIER_ROWS: dict[str, tuple[str, str, object, str]] = {
    "w8a8-static-naive": (
        "W8A8 static per-tensor, naive", "recipes/w8a8_smoothquant.yaml",
        lambda s: ["rtn"], "derive"),
    "w8a8-static-smoothquant": (
        "W8A8 static per-tensor, SmoothQuant a=0.8", "recipes/w8a8_smoothquant.yaml", None, "derive"),
    "w8a8-static-smoothquant-normpairs": (
        "W8A8 static per-tensor, SmoothQuant a=0.8, norm->linear pairs only (llm-compressor's mappings)",
        "recipes/w8a8_smoothquant.yaml",
        lambda s: [{"smoothquant": {**_step(s, "smoothquant")["smoothquant"], "linears": False}}, "rtn"], "derive"),
    "w8a8-static-rotated": (
        "W8A8 static per-tensor, rotation R1+R2+R4", "recipes/w8a8_static_rotated.yaml", None, "derive"),
    "w8a8-static-rotated-repquant": (
        "W8A8 static per-tensor, rotation + RepQuant", "recipes/w8a8_static_rotated.yaml",
        lambda s: [_step(s, "rotate"), _repquant_step(s), "rtn"],
        "RepQuant (per-channel norm-output quantizers reparameterized to per-tensor) has no llm-compressor modifier"),
    "w8a8-static-prefix-rotated": (
        "W8A8 static per-tensor, PrefixQuant prefix (BOS) + rotation R1+R2+R4",
        "recipes/w8a8_static_prefix_rotated.yaml", None,
        "PrefixQuant's float prefix (a KV cache with float activations) has no llm-compressor modifier"),
    "w8a8-llm-int8": (
        "W8A8 LLM.int8() decomposition (threshold 6)", "recipes/w8a8_int8_decomp.yaml", None,
        "LLM.int8()'s mixed-precision decomposition (outlier input columns kept in float per forward pass) has "
        "no compressed-tensors quantization scheme"),
    "w4a8-rtn": (
        "W4A8 dynamic per-token, RTN weights", "recipes/w4a8_rotated.yaml", lambda s: ["rtn"], "derive"),
    "w4a8-rotated-rtn": (
        "W4A8 dynamic per-token, rotation, RTN weights", "recipes/w4a8_rotated.yaml",
        lambda s: [_step(s, "rotate"), "rtn"], "derive"),
    "w4a8-gptq": (
        "W4A8 dynamic per-token, GPTQ weights", "recipes/w4a8_rotated.yaml", lambda s: [_step(s, "gptq")], "derive"),
    "w4a8-rotated-gptq": (
        "W4A8 dynamic per-token, rotation, GPTQ weights", "recipes/w4a8_rotated.yaml", None, "derive"),
    "w4a4-rtn": (
        "W4A4 dynamic per-token, RTN weights", "recipes/w4a4_rotated_gptq.yaml", lambda s: ["rtn"], "derive"),
    "w4a4-rotated-rtn": (
        "W4A4 dynamic per-token, rotation, RTN weights", "recipes/w4a4_rotated_gptq.yaml",
        lambda s: [_step(s, "rotate"), "rtn"], "derive"),
    "w4a4-rotated-rtn-mse": (
        "W4A4 dynamic per-token, rotation, RTN weights with the MSE clip search (both sides)",
        "recipes/w4a4_rotated_gptq.yaml",  # without the online o_proj Hadamard, which llm-compressor lacks
        lambda s: [{"rotate": {**_step(s, "rotate")["rotate"], "online_o": False}}, {"rtn": {"mse": True}}],
        "derive"),
    "w4a4-rotated-rtn-recipe": (
        "W4A4 dynamic per-token, rotation + online o_proj Hadamard, RTN weights on the full grid with the MSE clip "
        "search (recipes/w4a4_rotated_rtn.yaml)", "recipes/w4a4_rotated_rtn.yaml", None, "derive"),
    "w4a4-gptq": (
        "W4A4 dynamic per-token, GPTQ weights", "recipes/w4a4_rotated_gptq.yaml",
        lambda s: [_step(s, "gptq")], "derive"),
    "w4a4-rotated-gptq": (
        "W4A4 dynamic per-token, rotation, GPTQ weights", "recipes/w4a4_rotated_gptq.yaml", None, "derive"),
}

#: Differences that hold for every llm-compressor row (compressed-tensors' arithmetic vs normquant's).
COMMON_DIFFERENCES = [
    "symmetric weight grid: normquant s = absmax/(2^(b-1)-1) (int4 /7, int8 /127); compressed-tensors "
    "s = absmax/((2^b-1)/2) (int4 /7.5, int8 /127.5) with +absmax clipped to 2^(b-1)-1 (eval/llmcompressor/README.md)",
    "normquant calibrates in batches of 8 samples; llm-compressor oneshot batch_size=--lc-batch-size (default 1)",
]


def build_row_recipe(row: str, samples: int, seqlen: int, seed: int):
    """The normquant recipe (validated) of a table row, with the benchmark's calibration."""
    from normquant.recipe import load_recipe, parse_recipe

    title, base, edit, _ = OUTLIER_ROWS[row]
    data = load_recipe(REPO / base).to_dict()
    source = base
    if edit is not None:
        data["steps"] = edit(data["steps"])
        data["name"] = f"{data['name']}--{row}"
        source = f"derived from {base} in scripts/bench_llmcompressor.py (OUTLIER_ROWS['{row}']): steps " \
                 f"{json.dumps(data['steps'])}"
    data["calibration"] = {**data.get("calibration", {}), "dataset": "c4", "split": "validation",
                           "samples": samples, "seqlen": seqlen, "seed": seed}
    data.pop("export", None)
    return parse_recipe(data, source), source


def _ct_args(spec, role: str, mse: bool, diffs: list[str]) -> dict | None:
    """normquant QuantSpec -> compressed-tensors QuantizationArgs dict for ``role`` ("weights" / "input")."""
    from normquant.quant.search import MSE_GRID, MSE_MAXSHRINK, MSE_NORM

    if spec is None:
        return None
    d = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": spec.granularity,
         "dynamic": spec.dynamic}
    if spec.granularity == "group":
        d["group_size"] = spec.group_size
    if role == "weights":
        if spec.clip_ratio != 1.0:
            raise SystemExit(f"weight clip_ratio {spec.clip_ratio} has no compressed-tensors equivalent")
        if mse:  # normquant's §5.2 search: p = 1 - i/grid, i < maxshrink*grid, error sum |e|^norm, no early stop
            d["observer"] = "memoryless_mse"
            d["observer_kwargs"] = {"maxshrink": MSE_MAXSHRINK, "grid": float(MSE_GRID), "norm": MSE_NORM,
                                    "patience": int(MSE_MAXSHRINK * MSE_GRID)}
        else:
            d["observer"] = "memoryless_minmax"
        return d
    if not spec.dynamic:
        if spec.observer != "minmax":
            raise SystemExit(f"static activation observer '{spec.observer}' has no llm-compressor equivalent")
        # normquant: min/max over all calibration tokens. llm-compressor's default for static activations is
        # "minmax" = an exponential moving average of per-batch min/max (averaging_constant 0.01), not that.
        d["observer"] = "static_minmax"
    if spec.clip_ratio != 1.0:
        diffs.append(f"activation clip_ratio {spec.clip_ratio}: compressed-tensors QuantizationArgs has no clip "
                     "ratio, so llm-compressor's dynamic per-token activations use the full per-token range")
    return d


def lc_modifiers_for(recipe, lc_note: str) -> tuple[list[dict] | None, list[str], str | None]:
    """llm-compressor modifiers (``[{type, args}]``, applied in order) equivalent to a normquant recipe.

    Returns ``(modifiers, differences, None)`` or ``(None, [], reason)`` when there is no equivalent.
    """
    if lc_note != "derive":
        return None, [], lc_note
    sch = recipe.scheme
    if sch.overrides:
        raise SystemExit("scheme overrides (mixed precision) are not translated to llm-compressor here")
    if sch.input_activations is not None and sch.input_activations.outlier_threshold is not None:
        return None, [], "LLM.int8() decomposition has no compressed-tensors scheme"
    full = sch.weights is not None and sch.weights.full_range  # compressed-tensors' own symmetric grid
    diffs = [d for d in COMMON_DIFFERENCES if not (full and d.startswith("symmetric weight grid"))]
    mods: list[dict] = []
    weight_step = None
    for st in recipe.steps:
        p = st.model_dump()
        if st.name == "rotate":
            if not (p["r1"] and p["r2"] and p["r4"]):
                raise SystemExit(f"rotate {p}: only R1+R2+R4 is translated")
            mods.append({"type": "SpinQuantModifier",
                         "args": {"rotations": ["R1", "R2", "R4"], "transform_type": "random-hadamard"}})
            if p.get("online_o"):
                diffs.append("online Hadamard before o_proj (rotate.online_o, QuaRot's): normquant only, "
                             "SpinQuantModifier has no such rotation (its R2 is the offline per-head one)")
            diffs += [
                f"rotation matrices: normquant random Hadamard from seed {p['seed']}; llm-compressor's "
                "random-hadamard from its own unseeded torch.Generator (fixed default seed): different random "
                "signs, same construction (Hadamard K-matrix x Sylvester, random diagonal)",
                "llm-compressor's SpinQuantModifier mean-centres the embedding rows before R1 (QuaRot's LayerNorm "
                "step); on an RMSNorm model that changes the float function (normquant's norm fusion does not)",
                "online R4 before down_proj: normquant in fp32 (QuantLinear.input_transform), llm-compressor in "
                "fp64 (forward pre-hook of a HadamardTransform, get_high_precision())",
            ]
        elif st.name == "smoothquant":
            if p["search"] or not isinstance(p["alpha"], float):
                raise SystemExit(f"smoothquant {p}: only one fixed alpha is translated")
            mods.append({"type": "SmoothQuantModifier", "args": {"smoothing_strength": p["alpha"]}})
            diffs.append("SmoothQuant statistic: normquant s_j = max|X_j|^a / max|W_j|^(1-a); llm-compressor "
                         "s_j = (max X_j - min X_j)^a / (2 max|W_j|)^(1-a)")
            if p["linears"]:
                diffs.append("SmoothQuant mappings: normquant (linears: true) also smooths v_proj->o_proj and "
                             "up_proj->down_proj; llm-compressor's Llama mappings are input_layernorm->q/k/v and "
                             "post_attention_layernorm->gate/up only (row w8a8-static-smoothquant-normpairs "
                             "matches them)")
        elif st.name in ("rtn", "gptq"):
            weight_step = (st.name, p)
        else:
            return None, [], f"normquant step '{st.name}' has no llm-compressor equivalent"
    name, p = weight_step if weight_step else ("rtn", {"mse": False})
    static = sch.input_activations is not None and not sch.input_activations.dynamic
    if static or name == "gptq":
        diffs.append("calibration path: llm-compressor calibrates under DisableQuantization, so the inputs its "
                     + ("static activation observers" if static else "GPTQ Hessians") + " see come from earlier "
                     "layers run with float activations" + (" and float weights (RTN weights are fake-quantized "
                     "only in the forward after calibration)" if name == "rtn" else " and GPTQ-quantized weights")
                     + "; normquant propagates the quantized path (quantized weights, activation quantizers on)")
    group = {"targets": ["Linear"], "weights": _ct_args(sch.weights, "weights", p.get("mse", False), diffs),
             "input_activations": _ct_args(sch.input_activations, "input", False, diffs)}
    args = {"ignore": list(sch.ignore), "config_groups": {"group_0": group}}
    if name == "gptq":
        args.update(block_size=p["block_size"], dampening_frac=p["dampening"],
                    actorder="static" if p["act_order"] else None)
        mods.append({"type": "GPTQModifier", "args": args})
    else:
        mods.append({"type": "QuantizationModifier", "args": args})
    return mods, diffs, None


def _expected_args(mods: list[dict]) -> dict:
    return mods[-1]["args"]["config_groups"]["group_0"]


def check_resolved_group(want: dict, resolved: dict) -> list[str]:
    diffs = []
    for kind in ("weights", "input_activations"):
        w, g = want.get(kind), resolved.get(kind)
        if (w is None) != (g is None):
            diffs.append(f"{kind}: wanted {w}, resolved {g}")
            continue
        for k, v in (w or {}).items():
            if g.get(k) != v:
                diffs.append(f"{kind}.{k}: wanted {v}, resolved {g.get(k)}")
    return diffs


def _side_summary(rec: dict, float_ppl: float) -> dict:
    keep = ("ppl", "quant_wall_s", "quant_cpu_s", "eval_wall_s", "process_wall_s", "peak_rss_quant_mib",
            "peak_rss_end_mib", "check", "loadavg_at_start", "loadavg_after_quant", "state_sha256", "command")
    out = {k: rec.get(k) for k in keep}
    if "float_with_prefix" in rec:  # PrefixQuant rows: the float model reading the same prefix
        out["float_with_prefix_ppl"] = rec["float_with_prefix"]["ppl"]
        out["ratio_to_float_with_prefix"] = rec["ppl"] / rec["float_with_prefix"]["ppl"]
    out["ratio_to_float"] = rec["ppl"] / float_ppl
    if abs(rec["ppl"] - float_ppl) < 1e-6:
        out["warning"] = "perplexity equals the float perplexity: the quantization is probably not applied"
    return out


def same_normquant_recipe(old: dict | None, recipe) -> bool:
    """Whether a recorded normquant recipe is ``recipe``: the recorded dump is parsed again under today's schema, so
    a change of serialization alone (a default written out then, left out now) does not count as a new recipe."""
    from normquant.recipe import RecipeError, parse_recipe

    if not old:
        return False
    if old.get("hash") == recipe.hash():
        return True
    try:
        return parse_recipe(copy.deepcopy(old["recipe"]), source="recorded recipe").hash() == recipe.hash()
    except (RecipeError, KeyError):
        return False


def run_table(args) -> None:
    from transformers import AutoTokenizer

    from normquant.evaluation.records import git_commit, write_json
    from normquant.models.loading import materialize_packaged

    rows = list(OUTLIER_ROWS) if not args.rows else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in OUTLIER_ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(OUTLIER_ROWS)}")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or set(sides) - {"normquant", "llmcompressor"}:
        raise SystemExit(f"--sides takes normquant,llmcompressor (got {args.sides})")
    if args.order == "llmcompressor-first":
        sides = sorted(sides, reverse=True)  # llmcompressor before normquant

    code_sha = {p: sha256_file(REPO / p) for p in CODE_FILES + TABLE_CODE_FILES if (REPO / p).is_file()}
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else materialize_packaged("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(model_dir)

    # every row's recipes first: a translation error stops the run before any compute
    plans = {}
    for row in rows:
        recipe, source = build_row_recipe(row, args.samples, args.seqlen, args.seed)
        mods, diffs, reason = lc_modifiers_for(recipe, OUTLIER_ROWS[row][3])
        plans[row] = {"recipe": recipe, "source": source, "lc_modifiers": mods, "lc_differences": diffs,
                      "lc_none_reason": reason}

    base_job = shared_job(tok, args, work, model_dir)
    protocol_key = {k: base_job[k] for k in ("calib_sha256", "eval_sha256", "seqlen", "windows", "threads")}
    protocol_key["samples"] = args.samples

    out_path = Path(args.out)
    previous, previous_commit = {}, None
    if args.resume and out_path.is_file():
        old = json.loads(out_path.read_text())
        if old.get("protocol_key") == protocol_key:
            previous, previous_commit = old.get("rows", {}), old.get("git_commit")
            print(f"[table] resuming: {len(previous)} row(s) in {out_path} share this protocol", flush=True)
        else:
            print(f"[table] --resume: {out_path} has another protocol; starting afresh", flush=True)

    float_job_path = work / "job_table_float.json"
    float_job_path.write_text(json.dumps({**base_job, "normquant_recipe": None, "llmcompressor": None}, indent=2))
    print(f"[table] rows {rows}; sides {sides}; N={args.samples} x {args.seqlen}, windows={args.windows}; "
          f"work dir {work}", flush=True)

    doc = {
        "benchmark": "issue 10 outlier table: normquant vs llm-compressor, one calibration tensor, one evaluator "
                     "(scripts/bench_llmcompressor.py --table outliers)",
        "status": "running",
        "command": shlex.join(["python"] + sys.argv),
        "model": str(args.model_dir) if args.model_dir else
                 "smollm2-135m (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32)",
        "protocol": {
            "calibration": f"c4/validation via normquant.data.text.calibration_samples, N={args.samples} x "
                           f"{args.seqlen} tokens, seed {args.seed}; one tensor saved to .pt and fed to every row "
                           f"and both sides (sha256[:16] {base_job['calib_sha256']})",
            "evaluation": f"wikitext2/test tokenized once (sha256[:16] {base_job['eval_sha256']}), first "
                          f"{args.windows} non-overlapping {args.seqlen}-token windows, fp32, CPU, normquant "
                          "evaluate_perplexity in both processes (llm-compressor: on the model object oneshot "
                          "returns, with its compressed-tensors fake-quant forward and online R4 hooks)",
            "timing": "wall and CPU seconds of the quantization call only (normquant.pipeline.run.quantize / "
                      "llmcompressor.oneshot); eval_wall_s and process_wall_s (interpreter start to exit) are "
                      "recorded too; sides run one after the other in separate processes, never in parallel",
            "llmcompressor_pipeline": "oneshot(pipeline='independent') (its default): each modifier gets its own "
                                      "calibration pass (SpinQuant: data-free; SmoothQuant, static "
                                      "QuantizationModifier, GPTQ: sequential per decoder layer), so SmoothQuant "
                                      "is applied before the activation observers / Hessians see the inputs",
            "machine": f"{os.cpu_count()} CPU cores shared with other jobs; torch threads per side {args.threads}",
            "lc_batch_size": args.lc_batch_size,
        },
        "protocol_key": protocol_key,
        "float": None,
        "rows_order": rows,
        "display_order": list(OUTLIER_ROWS),  # the table's row order (README, eval/outliers_smollm2.md)
        "rows": {},
        "git_commit": git_commit(REPO),  # "-dirty" when the code had uncommitted changes
        "code_sha256": code_sha,
        "date_start": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }

    def save():
        doc["date_last_write"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        write_json(out_path, doc)

    # rows of the previous document that this run does not list are carried over as they are (before the first
    # write, so that no write drops them), with the commit of the run that made them: a table filled over runs
    for row, old_entry in previous.items():
        if row not in rows:
            entry = copy.deepcopy(old_entry)
            for side in ("normquant", "llmcompressor"):
                if isinstance(entry.get(side), dict):
                    entry[side].setdefault("git_commit", previous_commit)
            doc["rows"][row] = {**entry, "carried": True}
            doc["rows_order"] = [*doc["rows_order"], row]

    float_main = float_side(sys.executable, "main", base_job, float_job_path, work)
    print(f"[table] float ppl (main env) {float_main['ppl']:.4f}", flush=True)
    float_rec = {"ppl": float_main["ppl"], "eval": float_main["eval"], "versions_main": float_main["versions"],
                 "eval_wall_s": float_main.get("eval_wall_s"), "cached_main": float_main.get("cached")}
    if "llmcompressor" in sides:
        float_venv = float_side(args.venv_python, "venv", base_job, float_job_path, work)
        print(f"[table] float ppl (llm-compressor venv) {float_venv['ppl']:.4f}", flush=True)
        float_rec.update(ppl_venv=float_venv["ppl"], versions_venv=float_venv["versions"],
                         cached_venv=float_venv.get("cached"))
    doc["float"] = float_rec
    fppl = float_main["ppl"]
    save()

    failed = []
    lc_done: dict[str, str] = {  # llm-compressor recipe (JSON) -> the row that ran it (carried rows too)
        json.dumps(e["llmcompressor_recipe"], sort_keys=True): row for row, e in doc["rows"].items()
        if e.get("llmcompressor_recipe") and "ppl" in (e.get("llmcompressor") or {})}

    def keep_previous(row: str, side: str, entry: dict, old: dict, recipe) -> bool:
        """Copy the previous run's result of ``side`` into ``entry`` when its recipe is unchanged; a kept side names
        the commit of the run that made it (the document's commit is this run's)."""
        same = (same_normquant_recipe(old.get("normquant_recipe"), recipe) if side == "normquant" else
                old.get("llmcompressor_recipe") == entry["llmcompressor_recipe"])
        if not (same and isinstance(old.get(side), dict) and "ppl" in old[side]):
            return False
        entry[side] = {"git_commit": previous_commit, **old[side]}
        if side == "llmcompressor":
            entry["llmcompressor_resolved_scheme"] = old.get("llmcompressor_resolved_scheme")
            entry["llmcompressor_resolved_mismatches"] = old.get("llmcompressor_resolved_mismatches")
            lc_done.setdefault(json.dumps(entry["llmcompressor_recipe"], sort_keys=True), row)
        return True

    for row in rows:
        plan = plans[row]
        recipe = plan["recipe"]
        entry = {
            "title": OUTLIER_ROWS[row][0],
            "normquant_recipe": {"source": plan["source"], "recipe": recipe.to_dict(), "hash": recipe.hash()},
            "llmcompressor_recipe": ({"modifiers": plan["lc_modifiers"], "oneshot": {
                "pipeline": "independent", "batch_size": args.lc_batch_size, "shuffle_calibration_samples": False}}
                if plan["lc_modifiers"] is not None else None),
            "llmcompressor_none_reason": plan["lc_none_reason"],
            "llmcompressor_differences": plan["lc_differences"],
        }
        doc["rows"][row] = entry
        old = previous.get(row, {})
        job = {**base_job, "row": row, "normquant_recipe": recipe.to_dict(),
               "llmcompressor": {"modifiers": plan["lc_modifiers"], "batch_size": args.lc_batch_size}
               if plan["lc_modifiers"] is not None else None}
        job_path = work / f"job_table_{row}.json"
        job_path.write_text(json.dumps(job, indent=2) + "\n")
        for side in {"normquant", "llmcompressor"} - set(sides):  # a side not run now keeps its result
            keep_previous(row, side, entry, old, recipe)
        for side in sides:
            if side == "llmcompressor" and plan["lc_modifiers"] is None:
                entry["llmcompressor"] = None
                continue
            if not args.redo and keep_previous(row, side, entry, old, recipe):
                entry[side]["resumed"] = True
                print(f"[table] {row} / {side}: kept from the previous run (ppl {old[side]['ppl']:.4f})", flush=True)
                continue
            lc_key = json.dumps(entry["llmcompressor_recipe"], sort_keys=True)
            if side == "llmcompressor" and lc_key in lc_done and "ppl" in doc["rows"][lc_done[lc_key]].get(side, {}):
                src = lc_done[lc_key]  # the same modifiers on the same data: the same model, not run twice
                entry[side] = {**doc["rows"][src][side], "same_recipe_as_row": src}
                for k in ("llmcompressor_resolved_scheme", "llmcompressor_resolved_mismatches"):
                    entry[k] = doc["rows"][src].get(k)
                print(f"[table] {row} / {side}: same llm-compressor recipe as {src}, result reused", flush=True)
                continue
            python = sys.executable if side == "normquant" else args.venv_python
            load = os.getloadavg()
            print(f"[table] {row} / {side}: running (loadavg {load[0]:.2f}) ...", flush=True)
            try:
                rec = run_side(side, python, job_path, work / f"table_{side}_{row}.json",
                               work / f"table_{side}_{row}.log")
            except SystemExit as e:
                entry[side] = {"error": str(e)[-4000:], "log": str(work / f"table_{side}_{row}.log")}
                failed.append(f"{row}/{side}")
                print(f"[table] {row} / {side}: FAILED, see {work / f'table_{side}_{row}.log'}", flush=True)
                save()
                continue
            entry[side] = {**_side_summary(rec, fppl), "loadavg_before": load, "versions": rec.get("versions"),
                           "git_commit": doc["git_commit"]}
            if side == "llmcompressor":
                lc_done[lc_key] = row
                resolved = rec["check"].get("resolved_scheme", {})
                entry["llmcompressor_resolved_scheme"] = resolved
                entry["llmcompressor_resolved_mismatches"] = check_resolved_group(
                    _expected_args(plan["lc_modifiers"]), resolved)
                if entry["llmcompressor_resolved_mismatches"]:
                    print(f"[table] WARNING {row}: llm-compressor resolved {entry['llmcompressor_resolved_mismatches']}",
                          flush=True)
            print(f"[table] {row} / {side}: ppl {rec['ppl']:.4f} (x{rec['ppl'] / fppl:.3f} float), quantization "
                  f"{rec['quant_wall_s']:.1f} s wall / {rec['quant_cpu_s']:.1f} s CPU, process "
                  f"{rec['process_wall_s']:.1f} s", flush=True)
            save()
        nq, lc = entry.get("normquant"), entry.get("llmcompressor")
        if isinstance(nq, dict) and isinstance(lc, dict) and "ppl" in nq and "ppl" in lc:
            entry["ppl_ratio_normquant_over_llmcompressor"] = nq["ppl"] / lc["ppl"]
        save()

    doc["status"] = "complete" if not failed else f"complete with failures: {failed}"
    doc["date_end"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save()

    print(f"\nissue 10 table, N={args.samples} x {args.seqlen}, wikitext2 first {args.windows} windows, "
          f"float {fppl:.4f}")
    print(f"{'row':36s} {'normquant':>11s} {'x float':>8s} {'quant s':>8s} {'llm-comp':>11s} {'x float':>8s} "
          f"{'quant s':>8s}")
    for row in rows:
        e = doc["rows"][row]
        cells = []
        for side in ("normquant", "llmcompressor"):
            r = e.get(side)
            if isinstance(r, dict) and "ppl" in r:
                cells += [f"{r['ppl']:11.4f}", f"{r['ratio_to_float']:8.3f}", f"{r['quant_wall_s']:8.1f}"]
            else:
                label = "n/a" if r is None and side == "llmcompressor" and e["llmcompressor_recipe"] is None else \
                        ("FAILED" if isinstance(r, dict) else "-")
                cells += [f"{label:>11s}", f"{'':8s}", f"{'':8s}"]
        print(f"{row:36s} " + " ".join(cells))
    print(f"wrote {out_path}")
    if failed:
        raise SystemExit(f"failed: {failed}")


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description="normquant GPTQ vs llm-compressor GPTQModifier on SmolLM2-135M")
    ap.add_argument("--data-dir", help="offline data folder (wiki.test.raw, c4_validation_2k.parquet)")
    ap.add_argument("--samples", type=int, default=32, help="calibration samples N (x seqlen tokens)")
    ap.add_argument("--windows", type=int, default=16, help="first W WikiText-2 test windows")
    ap.add_argument("--scheme", choices=sorted(SCHEMES), default="w4a16-g64")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--act-order", choices=["recipe", "on", "off"], default="recipe")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenMP threads per side (default 1: on a shared, contended CPU, 2-thread OpenMP "
                         "barriers stall the per-column GPTQ loop by up to 60x; see eval/llmcompressor/README.md)")
    ap.add_argument("--lc-batch-size", type=int, default=1, help="oneshot batch_size (llm-compressor's default 1)")
    ap.add_argument("--venv-python", default="/tmp/lcvenv/bin/python", help="python of the llm-compressor venv")
    ap.add_argument("--order", choices=["normquant-first", "llmcompressor-first"], default="normquant-first")
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "normquant" / "bench_llmcompressor"))
    ap.add_argument("--out-dir", default=str(REPO / "eval" / "llmcompressor"))
    ap.add_argument("--note", default=DEFAULT_NOTE, help="why this N (recorded in the JSON)")
    ap.add_argument("--tag", help="suffix of the result file: <out-dir>/<scheme>-<tag>.json (variants of one scheme)")
    ap.add_argument("--model-dir", help="HF folder to use instead of the packaged smollm2-135m (smoke tests)")
    tb = ap.add_argument_group("issue 10 table (--table outliers; --scheme, --act-order, --tag, --note are ignored)")
    tb.add_argument("--table", choices=["outliers"],
                    help="run the issue 10 side-by-side table (rows: OUTLIER_ROWS) instead of one GPTQ scheme")
    tb.add_argument("--rows", help=f"comma-separated subset of rows to run, in this order; with --resume the "
                                   f"previous document's other rows are carried over (default all: "
                                   f"{','.join(OUTLIER_ROWS)})")
    tb.add_argument("--sides", default="normquant,llmcompressor", help="normquant,llmcompressor or one of them")
    tb.add_argument("--out", default=str(REPO / "eval" / "outliers_smollm2.json"),
                    help="the table's JSON, rewritten after every side of every row")
    tb.add_argument("--resume", action="store_true",
                    help="keep the rows/sides of an existing --out whose protocol (calibration and eval tensors, "
                         "windows, seqlen, threads) and recipe are the same; run the rest")
    tb.add_argument("--redo", action="store_true",
                    help="with --resume: run the --rows' --sides again even where their recipe is unchanged (on "
                         "another machine, say); the other rows are still carried over")
    args = ap.parse_args()
    if args.redo and not args.resume:
        ap.error("--redo goes with --resume (without it every listed row runs anyway and the others are dropped)")
    if args.table:
        run_table(args)
        return

    from transformers import AutoTokenizer

    from normquant.models.loading import materialize_packaged

    code_sha = {p: sha256_file(REPO / p) for p in CODE_FILES}  # the code this run uses, read before it runs
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else materialize_packaged("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(model_dir)

    recipe, recipe_source = build_recipe(args.scheme, args.samples, args.seqlen, args.seed, args.act_order)
    lc = llmcompressor_args(args.scheme, recipe, args.lc_batch_size)

    job = {**shared_job(tok, args, work, model_dir), "normquant_recipe": recipe.to_dict(), "llmcompressor": lc}
    job_path = work / f"job_{args.scheme}.json"
    job_path.write_text(json.dumps(job, indent=2) + "\n")

    print(f"[bench] scheme {args.scheme}: N={args.samples} x {args.seqlen}, windows={args.windows}; "
          f"work dir {work}", flush=True)
    float_main = float_side(sys.executable, "main", job, job_path, work)
    print(f"[bench] float ppl (main env) {float_main['ppl']:.4f}", flush=True)
    float_venv = float_side(args.venv_python, "venv", job, job_path, work)
    print(f"[bench] float ppl (llm-compressor venv) {float_venv['ppl']:.4f}", flush=True)

    sides = {"normquant": sys.executable, "llmcompressor": args.venv_python}
    order = ["normquant", "llmcompressor"] if args.order == "normquant-first" else ["llmcompressor", "normquant"]
    results, load_before = {}, {}
    for side in order:
        load_before[side] = os.getloadavg()
        print(f"[bench] {side}: quantizing (loadavg {load_before[side][0]:.2f}) ...", flush=True)
        results[side] = run_side(side, sides[side], job_path, work / f"{side}_{args.scheme}.json",
                                 work / f"{side}_{args.scheme}.log")
        r = results[side]
        print(f"[bench] {side}: ppl {r['ppl']:.4f}, quantization {r['quant_wall_s']:.1f} s wall / "
              f"{r['quant_cpu_s']:.1f} s CPU, peak RSS {r['peak_rss_quant_mib']:.0f} MiB", flush=True)

    nq, lcr = results["normquant"], results["llmcompressor"]
    resolved_diffs = check_resolved(lc, lcr["check"]["resolved_scheme"])
    if resolved_diffs:
        print(f"[bench] WARNING: llm-compressor resolved a different scheme: {resolved_diffs}", flush=True)
    for side, r in results.items():
        if abs(r["ppl"] - float_main["ppl"]) < 1e-6:
            raise SystemExit(f"{side} perplexity equals the float perplexity: its quantization is not applied")

    ppl_ratio = nq["ppl"] / lcr["ppl"]
    time_ratio = nq["quant_wall_s"] / lcr["quant_wall_s"]
    from normquant.evaluation.records import git_commit, write_json

    out = {
        "benchmark": "normquant GPTQ vs llm-compressor GPTQModifier (scripts/bench_llmcompressor.py)",
        "scheme": args.scheme,
        "tag": args.tag,
        "command": shlex.join(["python"] + sys.argv),
        "model": str(args.model_dir) if args.model_dir else
                 "smollm2-135m (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32)",
        "protocol": {
            "calibration": f"c4/validation via normquant.data.text.calibration_samples, N={args.samples} x "
                           f"{args.seqlen} tokens, seed {args.seed}; one tensor saved to .pt and fed to both sides "
                           f"(sha256[:16] {job['calib_sha256']})",
            "samples_N": args.samples,
            "why_this_N": args.note,
            "evaluation": f"wikitext2/test, rows joined with \\n\\n, tokenized once (sha256[:16] "
                          f"{job['eval_sha256']}), first {args.windows} of {nq['eval']['windows_total']} "
                          f"non-overlapping {args.seqlen}-token windows, fp32, CPU, normquant evaluate_perplexity "
                          "for both sides",
            "windows": args.windows,
            "timing": "wall (and CPU) seconds of the quantization call only (normquant.pipeline.run.quantize / "
                      "llmcompressor.oneshot), model loading and evaluation excluded; sides run one after the "
                      "other in separate processes, " + args.order,
            "memory": "peak RSS (ru_maxrss) of the side's process read right after the quantization call: it "
                      "covers interpreter + imports + float model load + quantization, not evaluation",
            "machine": f"{os.cpu_count()} CPU cores shared with other jobs; torch threads per side "
                       f"{nq['threads']}/{lcr['threads']}",
        },
        "normquant_recipe": {"source": recipe_source, "recipe": recipe.to_dict(), "hash": recipe.hash()},
        "llmcompressor_modifier": {k: v for k, v in lc.items() if k != "expected"},
        "llmcompressor_resolved_scheme": lcr["check"]["resolved_scheme"],
        "llmcompressor_resolved_scheme_mismatches": resolved_diffs,
        "float": {"ppl_main_env": float_main["ppl"], "ppl_venv": float_venv["ppl"],
                  "eval_main_env": float_main["eval"], "eval_venv": float_venv["eval"]},
        "normquant": {k: nq.get(k) for k in ("ppl", "quant_wall_s", "quant_cpu_s", "peak_rss_quant_mib",
                                             "peak_rss_after_load_mib", "peak_rss_end_mib", "check", "eval",
                                             "loadavg_at_start", "loadavg_after_quant", "versions", "command")},
        "llmcompressor": {k: lcr.get(k) for k in ("ppl", "quant_wall_s", "quant_cpu_s", "peak_rss_quant_mib",
                                                  "peak_rss_after_load_mib", "peak_rss_end_mib", "check", "eval",
                                                  "loadavg_at_start", "loadavg_after_quant", "versions",
                                                  "command")},
        "loadavg_before_side": load_before,
        "comparison": {
            "ppl_ratio_normquant_over_llmcompressor": ppl_ratio,
            "time_ratio_normquant_over_llmcompressor": time_ratio,
            "cpu_time_ratio_normquant_over_llmcompressor": nq["quant_cpu_s"] / lcr["quant_cpu_s"],
            "peak_rss_ratio_normquant_over_llmcompressor": nq["peak_rss_quant_mib"] / lcr["peak_rss_quant_mib"],
            "target_ppl": "normquant ppl <= llm-compressor ppl x 1.005",
            "target_ppl_met": ppl_ratio <= 1.005,
            "target_time": "normquant quantization wall time <= 0.7 x llm-compressor's",
            "target_time_met": time_ratio <= 0.7,
        },
        "versions": {"main_env": nq["versions"], "llmcompressor_venv": lcr["versions"]},
        "git_commit": git_commit(REPO),  # "-dirty" when the code had uncommitted changes
        "code_sha256": code_sha,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    name = f"{args.scheme}-{args.tag}" if args.tag else args.scheme
    path = write_json(Path(args.out_dir) / f"{name}.json", out)

    rows = [("float", float_main["ppl"], None, None, None),
            ("normquant", nq["ppl"], nq["quant_wall_s"], nq["quant_cpu_s"], nq["peak_rss_quant_mib"]),
            ("llm-compressor", lcr["ppl"], lcr["quant_wall_s"], lcr["quant_cpu_s"], lcr["peak_rss_quant_mib"])]
    print(f"\n{args.scheme}, N={args.samples} x {args.seqlen}, wikitext2 first {args.windows} windows")
    print(f"{'':16s} {'ppl':>9s} {'quant wall s':>13s} {'quant CPU s':>12s} {'peak RSS MiB':>13s}")
    for name, p, w, c, m in rows:
        f = lambda v, width, prec: f"{v:{width}.{prec}f}" if v is not None else f"{'-':>{width}s}"
        print(f"{name:16s} {p:9.4f} {f(w, 13, 1)} {f(c, 12, 1)} {f(m, 13, 0)}")
    print(f"normquant/llm-compressor: ppl x{ppl_ratio:.4f} (target <= 1.005: "
          f"{'met' if ppl_ratio <= 1.005 else 'NOT met'}), wall time x{time_ratio:.3f} (target <= 0.7: "
          f"{'met' if time_ratio <= 0.7 else 'NOT met'})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
