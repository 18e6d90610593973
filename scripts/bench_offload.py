"""Peak memory of quantizing a model larger than an imposed memory budget: in memory vs streamed (--offload).

A random-weight llama (``--hidden``, ``--intermediate``, ``--layers``, vocab 32000, untied head, float32) is
saved once as safetensors. Each measurement is a fresh child process that imports normquant, then quantizes it
(``--recipe``: ``rtn`` W4 g128, data-free; or ``gptq`` W4 g128 on ``--samples`` x ``--seqlen`` random calibration
tokens, whose Hessians and float64 Cholesky of the widest layer add their own working set) and exports it:

* ``memory``: ``AutoModelForCausalLM.from_pretrained`` + ``quantize`` (the whole float model resident);
* ``streamed``: ``normquant.load(..., offload=True)`` + ``quantize`` (one float block at a time, finished
  blocks packed).

Each runs twice: unconstrained (its peak is measured), then under the budget. **How the budget is imposed**
(``--cap``): ``cgroup`` (default where this user may create one: root on cgroup v1 or v2) puts the child in a
fresh memory cgroup limited to ``--budget-mib`` — everything the process holds counts, Python and torch
included, as on a machine with that much RAM (page cache is reclaimed first; past the limit the kernel's OOM
killer ends the process: ``returncode -9``); ``rlimit`` sets ``RLIMIT_AS`` (address space) in the child to its
size after the imports plus ``--budget-mib`` (an allocation past it fails with ``MemoryError`` /
``RuntimeError``; a mapped checkpoint counts in full). **Peak**: the child's peak resident set (``VmHWM``) and
its peak anonymous memory (``RssAnon`` sampled every 20 ms), each above its value after the imports.

    python scripts/bench_offload.py --out eval/offload_cpu.json
    python scripts/bench_offload.py --recipe gptq --budget-mib 3584 --runs memory-capped streamed streamed-capped \
        --out eval/offload_cpu_gptq.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, threading, time
import torch
import normquant
from normquant.pipeline.run import quantize
from normquant.recipe import parse_recipe
from transformers import AutoModelForCausalLM

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], status("RssAnon")); time.sleep(0.02)
folder, mode, budget, samples, seqlen, export, step = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7]
torch.manual_seed(0)
calib = torch.randint(0, 32000, (samples, seqlen)) if step == "gptq" else None
recipe = parse_recipe({"scheme": {"ignore": ["lm_head"], "weights": {"bits": 4, "granularity": "group", "group_size": 128}},
                       "steps": [step], "calibration": {"samples": samples, "seqlen": seqlen, "batch_size": 1}})
base_anon, base_rss, base_vm = status("RssAnon"), status("VmRSS"), status("VmSize")
if budget and os.environ.get("NQ_CAP") == "rlimit":
    resource.setrlimit(resource.RLIMIT_AS, (base_vm + budget, resource.RLIM_INFINITY))
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
out = {"mode": mode, "budget_bytes": budget or None, "rss_after_imports": base_rss, "rss_anon_after_imports": base_anon}
try:
    if mode == "memory":
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    else:
        model, _ = normquant.load(folder, offload=True)
    quantize(model, recipe, calib, progress=False)
    normquant.export(model, export)
    out["ok"] = True
except (MemoryError, RuntimeError) as e:
    out["ok"] = False
    out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
out["seconds"] = time.perf_counter() - t0
time.sleep(0.05)
out["peak_rss_anon_above_imports"] = max(peak[0], status("RssAnon")) - base_anon
out["peak_rss_above_imports"] = status("VmHWM") - base_rss
if out["ok"]:
    from normquant.quant.real import PackedLinear
    out["packed_bytes"] = sum(b.nbytes for m in model.modules() if isinstance(m, PackedLinear) for b in m.buffers())
print("RESULT " + json.dumps(out))
"""


def make_model(folder: Path, hidden: int, intermediate: int, layers: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512), vocab_size=32000,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():  # weights of a trained model's scale (the init's 0.02 std would do too)
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
        model.save_pretrained(folder)
        del model
    kv = cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
    block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden  # q, o; k, v; mlp; norms
    return {"hidden": hidden, "intermediate": intermediate, "layers": layers, "vocab": 32000,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "checkpoint_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            "float_block_bytes": 4 * block,
            "non_block_bytes": 4 * (2 * 32000 * hidden + hidden)}


CAPS = {"cgroup": "the child runs in a fresh memory cgroup limited to budget_mib (all its memory, page cache "
                  "reclaimable; past it the OOM killer ends it)",
        "rlimit": "RLIMIT_AS of the child = its address space after imports + budget_mib"}


def memory_cgroup_possible() -> bool:
    group = memory_cgroup(2**40)
    if group is None:
        return False
    group.rmdir()
    return True


def memory_cgroup(budget: int) -> Path | None:
    """A fresh memory cgroup limited to ``budget`` bytes (cgroup v2 or v1), or None where none can be made."""
    for root, limit in ((Path("/sys/fs/cgroup"), "memory.max"), (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):
        if not (root / limit).exists() and not (root / "cgroup.procs").exists():
            continue
        group = root / f"normquant-bench-{os.getpid()}"
        try:
            group.mkdir(exist_ok=True)
            (group / limit).write_text(str(budget))
            return group
        except OSError:
            try:
                group.rmdir()
            except OSError:
                pass
    return None


def child(folder: Path, mode: str, budget: int, samples: int, seqlen: int, threads: int, cap: str, step: str) -> dict:
    group = memory_cgroup(budget) if budget and cap == "cgroup" else None
    if budget and cap == "cgroup" and group is None:
        raise SystemExit("--cap cgroup: cannot create a memory cgroup here (needs root); use --cap rlimit")
    enter = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NORMQUANT_COMPILE": "0", "NQ_CAP": cap}
            p = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode, str(budget), str(samples), str(seqlen),
                                str(Path(tmp) / "export"), step], capture_output=True, text=True, env=env, preexec_fn=enter)
    finally:
        if group is not None:
            group.rmdir()
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:  # killed (the cgroup's OOM killer: -9), or an error outside the measured part
        return {"mode": mode, "budget_bytes": budget or None, "cap": cap if budget else None, "ok": False,
                "returncode": p.returncode, "error": "killed (SIGKILL: out of memory)" if p.returncode == -9 else
                (p.stderr.strip().splitlines() or ["(no output)"])[-1][:200]}
    return {**json.loads(line[len("RESULT "):]), "cap": cap if budget else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--budget-mib", type=int, default=2048, help="the memory cap (cgroup), or the address space "
                    "allowed above the child's after its imports (rlimit)")
    ap.add_argument("--cap", choices=["cgroup", "rlimit"], help="how the budget is imposed (default: cgroup where "
                    "one can be created, else rlimit)")
    ap.add_argument("--recipe", choices=["rtn", "gptq"], default="rtn")
    ap.add_argument("--runs", nargs="+", default=["memory", "memory-capped", "streamed", "streamed-capped"],
                    help="which of the four runs (a run known to exceed the cap can be left out)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "normquant_offload_llama"))
    ap.add_argument("--out", default="eval/offload_cpu.json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from normquant.evaluation.records import environment, write_json

    cap = args.cap or ("cgroup" if memory_cgroup_possible() else "rlimit")
    folder = Path(args.model_dir)
    model = make_model(folder, args.hidden, args.intermediate, args.layers)
    budget = args.budget_mib * 2**20
    runs = []
    env = environment()  # the code the children run: this checkout, now
    for run in args.runs:
        mode, b = run.split("-")[0], budget if run.endswith("-capped") else 0
        t0 = time.perf_counter()
        r = child(folder, mode, b, args.samples, args.seqlen, args.threads, cap, args.recipe)
        runs.append(r)
        print(f"{mode:9s} budget {b / 2**20:6.0f} MiB: ok={r['ok']} peak anon +"
              f"{r.get('peak_rss_anon_above_imports', 0) / 2**20:.0f} MiB, RSS +"
              f"{r.get('peak_rss_above_imports', 0) / 2**20:.0f} MiB ({time.perf_counter() - t0:.0f} s) "
              f"{r.get('error', '')}", flush=True)
    out = {"model": model, "recipe": f"{args.recipe.upper()} W4 g128 (lm_head float), export", "calibration":
           {"samples": args.samples, "seqlen": args.seqlen, "tokens": "random ids, seed 0"} if args.recipe == "gptq"
           else None,
           "budget": {"cap": cap, "budget_mib": args.budget_mib, "how": CAPS[cap]}, "threads": args.threads, "runs": runs,
           "environment": env}
    write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
