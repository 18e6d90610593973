"""Benchmark (not a test): normquant GPTQ vs llm-compressor's GPTQModifier on SmolLM2-135M, same data, same scheme.

    python scripts/bench_llmcompressor.py --data-dir /work/shared/data --samples 32 --windows 16 --scheme w4a16-g64

llm-compressor lives in its own virtual environment so it cannot change the main environment's torch or
transformers (it pins transformers<=5.17; the venv takes torch 2.13.0+cpu from the local wheel in /opt/wheels):

    python -m venv /tmp/lcvenv
    /tmp/lcvenv/bin/pip install torch==2.13.0          # 2.13.0+cpu from /opt/wheels (no CUDA build)
    /tmp/lcvenv/bin/pip install --dry-run llmcompressor   # check: must not list torch
    /tmp/lcvenv/bin/pip install llmcompressor          # llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0
    # normquant is used from the source tree: the benchmark puts /work/main on PYTHONPATH for the venv side
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

DEFAULT_NOTE = ("N is below the GPTQ protocol's 128 x 2048 to fit a shared 2-core CPU: each side makes 2 sequential "
                "passes of N x 2048 tokens through the 30 blocks, ~6 s per sample per pass on an idle machine and "
                "~3x that under the load of other jobs.")


# ------------------------------------------------------------------------------------------------ helpers
def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def head_commit(repo: Path = REPO) -> str:
    """HEAD's commit read from .git directly (no git process); 'unknown' when not a checkout."""
    git = repo / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


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


def run_side(side: str, python: str, job_path: Path, out: Path, log: Path, extra_pythonpath: bool) -> dict:
    env = dict(os.environ)
    threads = json.loads(job_path.read_text())["threads"]
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if extra_pythonpath:
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


def float_side(python: str, tag: str, job: dict, job_path: Path, work: Path, extra_pythonpath: bool) -> dict:
    """Float perplexity, cached per (python, eval ids, windows)."""
    key = hashlib.sha256(f"{python}|{job['threads']}|{job['model_dir']}|{job['eval_sha256']}|{job['windows']}|{job['seqlen']}".encode()).hexdigest()[:12]
    cached = work / f"float_{tag}_{key}.json"
    if cached.is_file():
        rec = json.loads(cached.read_text())
        rec["cached"] = True
        return rec
    rec = run_side("float", python, job_path, cached, work / f"float_{tag}.log", extra_pythonpath)
    cached.write_text(json.dumps(rec, indent=2) + "\n")
    rec["cached"] = False
    return rec


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
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from normquant.data.text import calibration_samples, tokenize_eval
    from normquant.models.loading import materialize_packaged

    code_sha = {p: sha256_file(REPO / p) for p in CODE_FILES}  # the code this run uses, read before it runs
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else materialize_packaged("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(model_dir)

    recipe, recipe_source = build_recipe(args.scheme, args.samples, args.seqlen, args.seed, args.act_order)
    lc = llmcompressor_args(args.scheme, recipe, args.lc_batch_size)

    calib = calibration_samples(tok, "c4", "validation", n=args.samples, seqlen=args.seqlen, seed=args.seed,
                                data_dir=args.data_dir)  # [N, seqlen]
    calib_path = work / f"calib_c4_validation_n{args.samples}_L{args.seqlen}_seed{args.seed}.pt"
    torch.save(calib, calib_path)
    eval_ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)  # [1, n_tokens]
    eval_path = work / "wikitext2_test_ids.pt"
    torch.save(eval_ids, eval_path)

    job = {"model_dir": str(model_dir), "calib_path": str(calib_path), "eval_path": str(eval_path),
           "calib_sha256": sha256_tensor(calib), "eval_sha256": sha256_tensor(eval_ids), "seqlen": args.seqlen,
           "windows": args.windows, "threads": args.threads, "normquant_recipe": recipe.to_dict(), "llmcompressor": lc}
    job_path = work / f"job_{args.scheme}.json"
    job_path.write_text(json.dumps(job, indent=2) + "\n")

    print(f"[bench] scheme {args.scheme}: N={args.samples} x {args.seqlen}, windows={args.windows}; "
          f"work dir {work}", flush=True)
    float_main = float_side(sys.executable, "main", job, job_path, work, extra_pythonpath=False)
    print(f"[bench] float ppl (main env) {float_main['ppl']:.4f}", flush=True)
    float_venv = float_side(args.venv_python, "venv", job, job_path, work, extra_pythonpath=True)
    print(f"[bench] float ppl (llm-compressor venv) {float_venv['ppl']:.4f}", flush=True)

    sides = {"normquant": (sys.executable, False), "llmcompressor": (args.venv_python, True)}
    order = ["normquant", "llmcompressor"] if args.order == "normquant-first" else ["llmcompressor", "normquant"]
    results, load_before = {}, {}
    for side in order:
        load_before[side] = os.getloadavg()
        print(f"[bench] {side}: quantizing (loadavg {load_before[side][0]:.2f}) ...", flush=True)
        python, pp = sides[side]
        results[side] = run_side(side, python, job_path, work / f"{side}_{args.scheme}.json",
                                 work / f"{side}_{args.scheme}.log", pp)
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
        "git_commit": head_commit(),
        "git_note": "HEAD read from .git; the working tree may hold uncommitted edits (shared tree)",
        "code_sha256": code_sha,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    from normquant.evaluation.records import write_json

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
