"""Benchmark: working memory of the sequential block runner against depth (random-weight llama configs).

    python scripts/bench_runner_memory.py --layers 4 8 16 32 --out eval/runner_memory.json

Each depth runs in its own subprocess: build a random llama (hidden 576, MLP 1536, 9/3 heads: SmolLM2's block
shape) with N calibration samples, then `quantize` with a GPTQ W4 recipe (Hessians + outputs per block). A
sampler thread reads the process RSS every 2 ms; the result is the peak RSS *during* quantize minus the RSS
just before it, i.e. what the runner allocates on top of the model: captured activations, one block's
Hessians and temporaries. On a GPU the same quantity is what the accelerator must hold (the model itself
stays on CPU); it must stay roughly flat as depth grows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(layers: int, samples: int, seqlen: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from normquant.pipeline.run import quantize
    from normquant.recipe import parse_recipe

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=4096, max_position_embeddings=seqlen)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (samples, seqlen))
    recipe = parse_recipe({"scheme": {"weights": {"bits": 4, "granularity": "group", "group_size": 64}},
                           "steps": [{"gptq": {}}], "calibration": {"samples": samples, "seqlen": seqlen,
                                                                     "batch_size": 4}})
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    before = rss_bytes()
    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    quantize(model, recipe, ids, progress=False)
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    return {"layers": layers, "model_bytes": params, "rss_before_mb": before / 2**20,
            "peak_during_quantize_mb": peak[0] / 2**20, "working_mb": (peak[0] - before) / 2**20,
            "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default="eval/runner_memory.json")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.samples, args.seqlen)))
        return
    rows = []
    for n in args.layers:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--samples", str(args.samples),
                              "--seqlen", str(args.seqlen)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    from normquant.evaluation.records import environment, write_json

    act_mb = args.samples * args.seqlen * 576 * 4 / 2**20
    write_json(args.out, {"what": "peak RSS during quantize() minus RSS before it (GPTQ W4 g64, random llama "
                                  "hidden 576 / MLP 1536)", "samples": args.samples, "seqlen": args.seqlen,
                          "one_activation_set_mb": act_mb, "rows": rows,
                          "working_mb_ratio_deepest_over_shallowest": rows[-1]["working_mb"] / rows[0]["working_mb"],
                          "environment": environment()})


if __name__ == "__main__":
    main()
