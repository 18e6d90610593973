"""The GPU benchmark of real execution (issue 12): one command, JSON out, sized for under 8 minutes on one GPU.

    python scripts/bench_gpu.py --gguf .carry/smollm2.gguf --data-dir .carry/data --out $OUT/gpu.json

(a) SmolLM2 perplexity: float vs W8A8 (RTN, int8 weights per channel, dynamic per-token int8 activations) vs
    W4A16 (RTN, int4 g128), each through the fake path and through the real kernels (:func:`normquant.convert`:
    ``torch._int_mm`` int8 GEMMs, tinygemm int4), ``--windows`` WikiText-2 windows of 2048 tokens.
(b) Evaluation tokens/s over batch sizes: bfloat16 float vs real INT8 vs real INT4 (the same models in bfloat16).
(c) GPTQ W4 g128 on a Llama-2-7B-shaped random-weight model (hidden 4096, MLP 11008, 32 heads; ``--gptq-layers``
    of its 32 blocks): seconds per block and peak GPU memory, the blocks living on CPU and each moved to the GPU
    while processed (the runner's offload), under a cap of ``--gpu-cap-gib``
    (``torch.cuda.set_per_process_memory_fraction``); the whole model's time is per-block × 32.
(d) int8 ``torch._int_mm`` and int4 tinygemm vs bfloat16 GEMM at N = K = 4096 over M = 16 … 8192.

On a machine with no network, the SmolLM2 GGUF (98 MB) travels in two parts of < 64 MiB (``split -b 50M``, two
device calls carrying one part each, ``cat`` to reassemble), WikiText-2 as ``wiki.test.raw`` in ``--data-dir``;
without ``--gguf`` (a) and (b) use random weights of SmolLM2's shapes and (a)'s perplexities mean nothing (the
JSON says which). Packages the CUDA image lacks (pydantic and its deps, gguf) travel as wheels: see
/work/.library/device/README.md. ``--smoke`` runs every part at toy sizes on whatever device there is (CPU
here: the kernels' CPU twins), which is how the tests keep this script working without a GPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normquant.evaluation.perplexity import evaluate_perplexity  # noqa: E402
from normquant.evaluation.records import environment, write_json  # noqa: E402
from normquant.pipeline.run import quantize  # noqa: E402
from normquant.quant.real import convert  # noqa: E402
from normquant.recipe import parse_recipe  # noqa: E402

RECIPES = {
    "w8a8": {"weights": {"bits": 8, "granularity": "channel"},
             "input_activations": {"bits": 8, "granularity": "token", "dynamic": True}},
    "w4a16": {"weights": {"bits": 4, "granularity": "group", "group_size": 128}},
}


def recipe(name: str, **calib):
    steps = ["gptq"] if calib else ["rtn"]
    return parse_recipe({"scheme": {"ignore": ["lm_head"], **RECIPES[name]}, "steps": steps,
                         **({"calibration": calib} if calib else {})})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def smollm2(args, device: torch.device):
    """``(model, eval ids, source)``: SmolLM2 from its GGUF, or random weights of its shapes."""
    if args.smoke:
        model = llama(128, 256, 2, 4, 2, 256)
        return model.to(device), torch.randint(0, 256, (1, 4 * args.seqlen + 1)), "random (smoke)"
    if args.gguf:
        from normquant.data.text import tokenize_eval
        from normquant.models.loading import load_model

        model, tok = load_model(args.gguf)
        return model.to(device), tokenize_eval(tok, "wikitext2", "test", args.data_dir), f"gguf {Path(args.gguf).name}"
    model = llama(576, 1536, 30, 9, 3, 49152)
    return model.to(device), torch.randint(0, 49152, (1, args.windows * args.seqlen + 1)), "random weights, SmolLM2 shapes"


def part_ppl(args, device, base, ids) -> dict:
    out = {"float": evaluate_perplexity(base, ids, seqlen=args.seqlen, windows=args.windows, progress=False).ppl}
    models = {}
    for name in RECIPES:
        m = quantize(copy.deepcopy(base), recipe(name), progress=False)
        fake = evaluate_perplexity(m, ids, seqlen=args.seqlen, windows=args.windows, progress=False).ppl
        report = convert(m, backend="int_mm", int4=True)
        real = evaluate_perplexity(m, ids, seqlen=args.seqlen, windows=args.windows, progress=False).ppl
        out[name] = {"fake": fake, "real": real, "real_over_fake": real / fake,
                     "kinds": sorted(set(report["converted"].values())), "why_not": sorted(set(report["why_not_int8"].values()))}
        models[name] = m
        print(f"(a) {name}: fake {fake:.3f} real {real:.3f} ({out[name]['kinds']})", flush=True)
    return out, models


def part_speed(args, device, base, models, ids) -> dict:
    rows = []
    variants = {"bf16": copy.deepcopy(base).to(torch.bfloat16),
                **{f"{k}-real": m.to(torch.bfloat16) for k, m in models.items()}}
    for batch in args.batches:
        x = ids[:, : batch * args.speed_seqlen].reshape(batch, args.speed_seqlen).to(device)
        row = {"batch": batch, "seqlen": args.speed_seqlen}
        for name, m in variants.items():
            with torch.no_grad():
                s = timed(lambda: m(x), device, repeats=args.repeats)
            row[f"{name}_tokens_per_s"] = batch * args.speed_seqlen / s
        row.update({f"{k}_over_bf16": row[f"{k}_tokens_per_s"] / row["bf16_tokens_per_s"] for k in variants if k != "bf16"})
        rows.append(row)
        print(f"(b) batch {batch}: " + ", ".join(f"{k} {row[f'{k}_tokens_per_s']:.0f} tok/s" for k in variants), flush=True)
    return rows


def part_gptq(args, device) -> dict:
    dims = (128, 256, 4, 2, 256) if args.smoke else (4096, 11008, 32, 32, 32000)
    model = llama(dims[0], dims[1], args.gptq_layers, dims[2], dims[3], dims[4]).to(torch.bfloat16)
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    cap = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        cap = args.gpu_cap_gib * 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    calib = torch.randint(0, dims[4], (args.gptq_samples, args.gptq_seqlen))
    t0 = time.perf_counter()
    quantize(model, recipe("w4a16", samples=args.gptq_samples, seqlen=args.gptq_seqlen, batch_size=1), calib,
             device=device, progress=False)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    out = {"shape": {"hidden": dims[0], "intermediate": dims[1], "heads": dims[2], "layers_run": args.gptq_layers,
                     "layers_7b": 32}, "dtype": "bfloat16", "calibration": [args.gptq_samples, args.gptq_seqlen],
           "seconds": seconds, "seconds_per_block": seconds / args.gptq_layers,
           "projected_seconds_32_blocks": seconds / args.gptq_layers * 32, "block_bytes": block_bytes,
           "gpu_cap_bytes": cap, "peak_gpu_bytes": peak,
           "peak_over_block": None if peak is None else peak / block_bytes}
    print(f"(c) GPTQ {args.gptq_layers} blocks: {seconds:.1f} s, peak GPU {peak}", flush=True)
    return out


def part_gemm(args, device) -> list[dict]:
    from normquant.quant.real import int4_mm, int4_pack, int_mm_gemm

    n = k = 128 if args.smoke else 4096
    g = torch.Generator().manual_seed(0)
    w_codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    w_scale = torch.rand(n, generator=g).to(device)
    w_bf16 = torch.randn(n, k, generator=g).to(device, torch.bfloat16)
    packed = int4_pack(torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32), device)
    sz = torch.stack([torch.rand(n, k // 128, generator=g), torch.zeros(n, k // 128)], 2).transpose(0, 1).contiguous()
    sz = sz.to(device, torch.bfloat16)
    rows = []
    for m in args.gemm_m:
        xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(device)
        xb = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
        row = {"m": m, "n": n, "k": k,
               "bf16_ms": 1e3 * timed(lambda: xb @ w_bf16.t(), device, args.repeats),
               "int8_ms": 1e3 * timed(lambda: int_mm_gemm(xq, w_codes, w_scale), device, args.repeats),
               "int4_ms": 1e3 * timed(lambda: int4_mm(xb, packed, 128, sz), device, args.repeats)}
        row["int8_speedup"], row["int4_speedup"] = row["bf16_ms"] / row["int8_ms"], row["bf16_ms"] / row["int4_ms"]
        rows.append(row)
        print(f"(d) M={m}: bf16 {row['bf16_ms']:.3f} ms, int8 x{row['int8_speedup']:.2f}, int4 x{row['int4_speedup']:.2f}",
              flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="SmolLM2 GGUF (reassembled); without it, random weights of its shapes")
    ap.add_argument("--data-dir", help="folder with wiki.test.raw (with --gguf)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--speed-seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gptq-layers", type=int, default=4)
    ap.add_argument("--gptq-samples", type=int, default=32)
    ap.add_argument("--gptq-seqlen", type=int, default=2048)
    ap.add_argument("--gpu-cap-gib", type=float, default=16.0)
    ap.add_argument("--gemm-m", type=int, nargs="+", default=[16, 64, 256, 1024, 4096, 8192])
    ap.add_argument("--parts", nargs="+", default=["ppl", "speed", "gptq", "gemm"])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on any device (the test of this script)")
    ap.add_argument("--out", default="eval/gpu_real.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.windows, args.seqlen, args.batches, args.speed_seqlen, args.repeats = 2, 32, [1, 2], 16, 1
        args.gptq_layers, args.gptq_samples, args.gptq_seqlen, args.gemm_m = 2, 2, 16, [16, 32]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "smoke": args.smoke,
           "environment": environment(), "args": vars(args)}
    if {"ppl", "speed"} & set(args.parts):
        base, ids, source = smollm2(args, device)
        out["model"] = source
        out["ppl"], models = part_ppl(args, device, base, ids)
        if "speed" in args.parts:
            out["speed"] = part_speed(args, device, base, models, ids)
        del base, models
    if "gptq" in args.parts:
        out["gptq"] = part_gptq(args, device)
    if "gemm" in args.parts:
        out["gemm"] = part_gemm(args, device)
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
