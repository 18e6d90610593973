"""Real integer execution on CPU (issue 12): SmolLM2 perplexity and speed, fake-quant vs real int8 GEMMs vs fp32,
and the int8-vs-fp32 GEMM ratio over M — ratios measured in one run.

    python scripts/bench_real.py --data-dir ../shared/data --windows 16 --out eval/real_cpu.json

* ``model``: ``recipes/w8a7_rtn.yaml`` (int8 weights, 7-bit dynamic per-token activations: what an AVX2 CPU sums
  exactly, :mod:`normquant.quant.real`) quantized once; perplexity of the first ``--windows`` WikiText-2 test
  windows through the fake path, through :func:`normquant.quant.real.convert`, and through the fake path with
  every embedding scaled by ``1 + 2^-20`` (the spread one float32 rounding causes: the yardstick for real vs
  fake); evaluation tokens/s of fp32, fake and real alternated over ``--repeats`` timed runs of the first
  ``--speed-windows`` windows (best of each).
* ``packed``: ``recipes/w4a16_g64_rtn.yaml`` converted: the weight bytes held (packed codes + float32 scales) vs
  float16, and perplexity fake vs packed on ``--packed-windows`` windows (identical by construction).
* ``gemm``: ``[M, K] x [K, N]`` at SmolLM2's MLP shapes (K=576, N=1536 and K=1536, N=576) for M in ``--m``: the
  oneDNN u8xs8 GEMM (codes and scales given) vs an fp32 matmul, best of ``--gemm-repeats``.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from normquant.data.text import tokenize_eval
from normquant.evaluation.perplexity import evaluate_perplexity
from normquant.evaluation.records import environment, perplexity_record, write_json
from normquant.models.loading import load_model
from normquant.pipeline.run import quantize
from normquant.quant.real import convert, exact_activation_bits, int8_gemm
from normquant.recipe import load_recipe


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm(ms: list[int], repeats: int) -> list[dict]:
    rows = []
    bits = exact_activation_bits()
    zero = 2 ** (bits - 1)
    for k, n in ((576, 1536), (1536, 576)):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        w_scale, w_zero = torch.rand(n) * 1e-2, torch.zeros(n, dtype=torch.long)
        wf = torch.randn(n, k)
        for m in ms:
            u = torch.randint(0, 2 * zero, (m, k), dtype=torch.uint8)
            xf = torch.randn(m, k)
            int8_gemm(u, zero, packed, w_scale, w_zero), xf @ wf.t()  # warm-up
            t_int = _best(lambda: int8_gemm(u, zero, packed, w_scale, w_zero), repeats)
            t_fp = _best(lambda: xf @ wf.t(), repeats)
            rows.append({"m": m, "k": k, "n": n, "int8_ms": 1e3 * t_int, "fp32_ms": 1e3 * t_fp,
                         "fp32_over_int8": t_fp / t_int})
            print(f"gemm {m}x{k}x{n}: int8 {1e3 * t_int:.2f} ms, fp32 {1e3 * t_fp:.2f} ms, "
                  f"x{t_fp / t_int:.2f}", flush=True)
    return rows


def packed(model, ids, recipe: str, windows: int) -> dict:
    """W4A16 (``recipe``): weight bytes resident after :func:`convert` (packed codes + qparams) vs the same weights
    in float16, and perplexity fake vs packed (the same float weights rebuilt per call: identical)."""
    from normquant.quant.linear import QuantLinear
    from normquant.quant.real import PackedLinear

    fake = quantize(copy.deepcopy(model), load_recipe(recipe), progress=False)
    fp16 = sum(m.weight.numel() * 2 for m in fake.modules() if isinstance(m, QuantLinear))
    ppl_fake = evaluate_perplexity(fake, ids, seqlen=2048, windows=windows, progress=False).ppl
    convert(fake)
    held = sum(b.nbytes for m in fake.modules() if isinstance(m, PackedLinear) for b in m.buffers())
    ppl_real = evaluate_perplexity(fake, ids, seqlen=2048, windows=windows, progress=False).ppl
    print(f"packed {recipe}: {held:,} bytes held vs {fp16:,} float16 ({held / fp16:.3f}x); ppl fake {ppl_fake:.4f}, "
          f"packed {ppl_real:.4f} ({windows} windows)", flush=True)
    return {"recipe": recipe, "bytes_held": held, "bytes_float16": fp16, "held_over_float16": held / fp16,
            "windows": windows, "ppl_fake": ppl_fake, "ppl_packed": ppl_real}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--speed-windows", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--m", type=int, nargs="+", default=[16, 64, 256, 1024, 2048, 8192])
    ap.add_argument("--gemm-repeats", type=int, default=5)
    ap.add_argument("--recipe", default="recipes/w8a7_rtn.yaml")
    ap.add_argument("--packed-recipe", default="recipes/w4a16_g64_rtn.yaml")
    ap.add_argument("--packed-windows", type=int, default=2)
    ap.add_argument("--out", default="eval/real_cpu.json")
    args = ap.parse_args()
    out = {"environment": environment(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "activation_bits_exact": exact_activation_bits(), "recipe": args.recipe}
    out["gemm"] = gemm(args.m, args.gemm_repeats)
    write_json(args.out, out)

    model, tok = load_model("smollm2-135m")
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)
    fake = quantize(copy.deepcopy(model), load_recipe(args.recipe), progress=False)
    real = copy.deepcopy(fake)
    report = convert(real)
    out["converted"], out["why_not_int8"] = report["converted"], report["why_not_int8"]
    res = {name: evaluate_perplexity(m, ids, seqlen=2048, windows=args.windows, progress=False)
           for name, m in (("fake", fake), ("real", real))}
    # the yardstick for real vs fake: how far the fake path itself moves when every input changes by one float32
    # rounding (the embeddings x (1 + 2^-20)); real and fake differ by such roundings, which flip activation codes
    # at rounding ties downstream
    nudged = copy.deepcopy(fake)
    with torch.no_grad():
        nudged.get_input_embeddings().weight.mul_(1 + 2**-20)
    res["fake_nudged"] = evaluate_perplexity(nudged, ids, seqlen=2048, windows=args.windows, progress=False)
    del nudged
    out["ppl"] = {name: perplexity_record("smollm2-135m", "wikitext2", "test", r) for name, r in res.items()}
    out["ppl_real_over_fake"] = res["real"].ppl / res["fake"].ppl
    out["ppl_fake_nudged_over_fake"] = res["fake_nudged"].ppl / res["fake"].ppl
    print(f"ppl fake {res['fake'].ppl:.4f}, real {res['real'].ppl:.4f}, fake with inputs x(1+2^-20) "
          f"{res['fake_nudged'].ppl:.4f} ({list(report['converted'].values()).count('int8-gemm')} int8 GEMMs)",
          flush=True)
    write_json(args.out, out)

    out["packed"] = packed(model, ids, args.packed_recipe, args.packed_windows)
    write_json(args.out, out)

    speed_ids = ids[:, : 2048 * args.speed_windows]
    seconds: dict[str, list[float]] = {"fp32": [], "fake": [], "real": []}
    for _ in range(args.repeats):  # alternated, so a change in the machine's load hits all three
        for name, m in (("fp32", model), ("fake", fake), ("real", real)):
            seconds[name].append(evaluate_perplexity(m, speed_ids, seqlen=2048, progress=False).seconds)
    best = {k: min(v) for k, v in seconds.items()}
    out["speed"] = {"windows": args.speed_windows, "seconds": seconds,
                    "tokens_per_s": {k: speed_ids.numel() / v for k, v in best.items()},
                    "real_over_fp32": best["fp32"] / best["real"], "real_over_fake": best["fake"] / best["real"]}
    tps = out["speed"]["tokens_per_s"]
    print(f"tokens/s: fp32 {tps['fp32']:.0f}, fake {tps['fake']:.0f}, real {tps['real']:.0f}: real "
          f"x{out['speed']['real_over_fp32']:.2f} of fp32", flush=True)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
