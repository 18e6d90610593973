"""KV-cache quantization on SmolLM2 (issue 11): perplexity at ≈8/4/2/1 stored bits per element, the bytes a cache
holds at 2048 tokens, greedy generation through the cache, and decode speed. Weights and activations stay float.

    python scripts/eval_kv.py --data-dir ../shared/data --windows 16 --out eval/kv_smollm2
    python scripts/eval_kv.py --data-dir ../shared/data --parts memory generate --out eval/kv_smollm2 --append

Parts (``--parts``, default all):

* ``table``: WikiText-2 test perplexity of the first ``--windows`` 2048-token windows through a fresh quantized
  cache per window (``evaluate_perplexity(kv_cache=...)``): attention reads the quantized keys and values at every
  position; each row states its exact stored bits per K/V element (codes + scales + zero points/minima + float
  tokens, :func:`normquant.quant.kv.kv_bits_per_element`, head_dim 64, and the same account for head_dim 128).
* ``memory``: one 2048-token window prefilled through each cache; ``nbytes`` of every tensor the cache then holds
  (float32: transformers' ``DynamicCache``; float16: the same tensors cast to float16 and held).
* ``stack``: the full stack (issue 11 with the rotation issue): each ``STACK`` recipe (rotation, GPTQ weights, A4 or
  A8 activations, an INT4 KV cache with R3) quantizes a fresh model with the recipe's own calibration (C4
  validation 16×2048, seed 0); the model is evaluated through its quantized cache and, for the KV cache's share,
  through a float cache.
* ``generate``: ``--prompts`` prompts (the first 32 tokens of evaluation windows 0, 1, ...) greedily extended by
  ``--new-tokens`` tokens through the float cache and through each quantized cache: how many continuations are
  identical, and where the others first differ. Yardsticks: a float cache rounded to float16 / bfloat16 (the
  dtypes serving engines hold a "float" cache in).
  With them, decode speed: new tokens / wall time of ``generate`` (median over prompts; CPU, the thread count
  recorded). No target: an honest figure.

Results are rewritten after every row (``--append`` keeps the parts not rerun).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from normquant.models.arch import cache_argument
from normquant.data.text import tokenize_eval
from normquant.evaluation.perplexity import evaluate_perplexity
from normquant.evaluation.records import environment, perplexity_record, write_json
from normquant.models.loading import load_model
from normquant.api import quantize
from normquant.quant.kv import KVCacheSpec, head_dim_of, kv_bits_per_element, kv_cache_of, set_kv_cache
from normquant.quant.kv_cache import QuantizedKVCache

#: row name -> scheme.kv_cache
ROWS = {
    "int8": {"bits": 8},
    "int8-r3": {"bits": 8, "rotate_keys": True},
    "int4": {"bits": 4},
    "int4-r3": {"bits": 4, "rotate_keys": True},
    "int4-r3-asym": {"bits": 4, "symmetric": False, "rotate_keys": True},
    "kivi4": {"method": "kivi", "bits": 4},
    "int2": {"bits": 2},
    "int2-r3": {"bits": 2, "rotate_keys": True},
    "kivi2": {"method": "kivi", "bits": 2},
    "kivi2-res128": {"method": "kivi", "bits": 2, "residual": 128},
    "nsn2": {"method": "nsn", "bits": 2},
    "nsn2-postrope": {"method": "nsn", "bits": 2, "pre_rope": False},
    "nsn1": {"method": "nsn", "bits": 1},
    "nsn1-postrope": {"method": "nsn", "bits": 1, "pre_rope": False},
    "nsn1-sink4-res128": {"method": "nsn", "bits": 1, "sink": 4, "residual": 128},
}
#: stack row -> recipe (weights, activations and kv_cache)
STACK = {"w4a4kv4-rotated-gptq": "recipes/w4a4kv4_rotated_gptq.yaml",
         "w4a8kv4-rotated-gptq": "recipes/w4a8kv4_rotated_gptq.yaml"}
MEMORY_ROWS = ["int8", "int4", "kivi2", "nsn2", "nsn1"]
#: generation yardsticks, not quantized: the float cache rounded to a serving dtype (what "float" KV is in serving)
ROUNDED = {"float16-cache": torch.float16, "bfloat16-cache": torch.bfloat16}
GENERATE_ROWS = ["int8", "int8-r3", "int4", "int4-r3-asym", "int2", "kivi2", "nsn2", *ROUNDED]


class RoundedLayer(DynamicLayer):
    """A float cache layer that holds its keys and values rounded to ``dtype`` (read back in the model's dtype)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.rounding = dtype

    def update(self, key_states, value_states, *args, **kwargs):
        k, v = (t.to(self.rounding).to(t.dtype) for t in (key_states, value_states))
        return super().update(k, v, *args, **kwargs)


def _cache(model, name: str):
    if name in ROUNDED:
        return Cache(layers=[RoundedLayer(ROUNDED[name]) for _ in range(model.config.num_hidden_layers)])
    return QuantizedKVCache.for_model(model, _spec(name))


def _spec(name: str) -> KVCacheSpec:
    return KVCacheSpec(**ROWS[name])


def _bits(spec: KVCacheSpec, head_dim: int, seqlen: int) -> dict:
    b = kv_bits_per_element(spec, head_dim, seqlen)
    return {"total": b.total, "codes": b.codes, "scales": b.scales, "zeros": b.zeros, "residual": b.residual}


def table(model, ids, rows: list[str], windows: int, out: dict, save) -> None:
    if "float" not in out["table"]:
        res = evaluate_perplexity(model, ids, seqlen=2048, windows=windows)
        out["table"]["float"] = {"ppl": res.ppl, "record": perplexity_record("smollm2-135m", "wikitext2", "test", res),
                                 "commit": out["environment"]["git_commit"]}
        print(f"float: {res.ppl:.3f}", flush=True)
        save()
    base = out["table"]["float"]["ppl"]
    for name in rows:
        spec = _spec(name)
        res = evaluate_perplexity(model, ids, seqlen=2048, windows=windows, kv_cache=spec)
        out["table"][name] = {"spec": spec.model_dump(), "short": spec.short(), "ppl": res.ppl,
                              "delta_pct": 100 * (res.ppl / base - 1),
                              "bits_per_element": {"head_dim_64": _bits(spec, head_dim_of(model.config), 2048),
                                                   "head_dim_128": _bits(spec, 128, 2048)},
                              "record": perplexity_record("smollm2-135m", "wikitext2", "test", res),
                              "commit": out["environment"]["git_commit"]}
        print(f"{name} ({spec.short()}): {res.ppl:.3f} ({out['table'][name]['delta_pct']:+.2f}%), "
              f"{res.kv_bits_per_element:.3f} bits/element, {res.seconds:.0f}s", flush=True)
        save()


def stack(tok, ids, rows: list[str], windows: int, data_dir, out: dict, save) -> None:
    out.setdefault("stack", {})
    for name in rows:
        model, _ = load_model("smollm2-135m")
        model.eval()
        t0 = time.perf_counter()
        quantize(model, STACK[name], tokenizer=tok, data_dir=data_dir)
        quantize_s = time.perf_counter() - t0
        spec = kv_cache_of(model)
        with_kv = evaluate_perplexity(model, ids, seqlen=2048, windows=windows)
        set_kv_cache(model, None)
        float_kv = evaluate_perplexity(model, ids, seqlen=2048, windows=windows)
        base = out["table"]["float"]["ppl"]
        out["stack"][name] = {
            "recipe": STACK[name], "recipe_text": Path(STACK[name]).read_text(), "kv_short": spec.short(),
            "ppl": with_kv.ppl, "ratio_to_float": with_kv.ppl / base, "ppl_float_kv": float_kv.ppl,
            "ratio_to_float_float_kv": float_kv.ppl / base,
            "bits_per_element": {"head_dim_64": _bits(spec, head_dim_of(model.config), 2048),
                                 "head_dim_128": _bits(spec, 128, 2048)},
            "quantize_seconds": quantize_s, "record": perplexity_record("smollm2-135m", "wikitext2", "test", with_kv),
            "record_float_kv": perplexity_record("smollm2-135m", "wikitext2", "test", float_kv),
            "commit": out["environment"]["git_commit"]}
        print(f"stack {name}: {with_kv.ppl:.3f} (×{with_kv.ppl / base:.3f} float) with {spec.short()}; "
              f"{float_kv.ppl:.3f} (×{float_kv.ppl / base:.3f}) with a float cache; quantize {quantize_s:.0f}s",
              flush=True)
        save()


@torch.no_grad()
def memory(model, ids, rows: list[str], out: dict, save) -> None:
    window = ids[:, :2048]
    key = cache_argument(model)
    cache = DynamicCache(config=model.config)
    model(window, **{key: cache}, use_cache=True)
    held = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    out["memory"] = {"tokens": window.shape[1], "float32": sum(t.nbytes for t in held),
                     "float16": sum(t.half().nbytes for t in held), "commit": out["environment"]["git_commit"]}
    for name in rows:
        spec = _spec(name)
        q = QuantizedKVCache.for_model(model, spec)
        model(window, **{key: q}, use_cache=True)
        elements = sum(t.numel() for t in held)  # keys and values: every element of the float cache
        out["memory"][name] = {"bytes": q.nbytes(), "bits_per_element_held": 8 * q.nbytes() / elements,
                               "bits_per_element_account": kv_bits_per_element(spec, head_dim_of(model.config),
                                                                               window.shape[1]).total}
        print(f"memory {name}: {q.nbytes():,} bytes ({out['memory'][name]['bits_per_element_held']:.3f} bits/element; "
              f"float32 {out['memory']['float32']:,}, float16 {out['memory']['float16']:,})", flush=True)
        save()


@torch.no_grad()
def generate(model, tok, ids, rows: list[str], prompts: int, new_tokens: int, out: dict, save) -> None:
    key = cache_argument(model)
    starts = [ids[:, i * 2048: i * 2048 + 32] for i in range(prompts)]
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": tok.eos_token_id}

    def run(cache_for):
        texts, seconds = [], []
        for p in starts:
            t0 = time.perf_counter()
            extra = {} if cache_for is None else {key: cache_for()}
            texts.append(model.generate(p, **kwargs, **extra)[0, p.shape[1]:])
            seconds.append(time.perf_counter() - t0)
        return texts, seconds

    ref, ref_s = run(None)
    old = out.get("generate") or {}
    same = all(old.get(k) == v for k, v in (("prompts", prompts), ("prompt_tokens", 32), ("new_tokens", new_tokens)))
    kept = {k: v for k, v in old.items() if same and isinstance(v, dict) and k not in rows and k != "float"}
    for v in kept.values():  # rows kept from an earlier run keep that run's commit
        v.setdefault("commit", old.get("commit"))
    out["generate"] = {"prompts": prompts, "prompt_tokens": 32, "new_tokens": new_tokens,
                       "commit": out["environment"]["git_commit"],
                       "float": {"tokens_per_s": new_tokens / statistics.median(ref_s),
                                 "first_continuation": tok.decode(ref[0])}, **kept}
    print(f"generate float: {out['generate']['float']['tokens_per_s']:.1f} tok/s", flush=True)
    for name in rows:
        got, secs = run(lambda: _cache(model, name))
        first_diff = [None if torch.equal(a, b) else int((a != b).nonzero()[0, 0]) for a, b in zip(got, ref)]
        margins = [None if d is None else _top2_margin(model, torch.cat([p[0], r[:d]])) for p, r, d in
                   zip(starts, ref, first_diff)]
        out["generate"][name] = {"identical": sum(d is None for d in first_diff), "first_difference": first_diff,
                                 "float_top2_margin_there": margins,
                                 "tokens_per_s": new_tokens / statistics.median(secs),
                                 "commit": out["environment"]["git_commit"]}
        print(f"generate {name}: {out['generate'][name]['identical']}/{prompts} identical, first differences "
              f"{first_diff}, {out['generate'][name]['tokens_per_s']:.1f} tok/s", flush=True)
        save()


def _top2_margin(model, ids: torch.Tensor) -> float:
    """Float model's gap between its two largest next-token logits after ``ids`` (a near-tie flips on tiny changes)."""
    top2 = model(ids[None]).logits[0, -1].float().topk(2).values
    return (top2[0] - top2[1]).item()


def markdown(out: dict) -> str:
    gen = out.get("generate") or {}
    parts = [out.get("memory"), gen, *(out.get("table") or {}).values(), *(out.get("stack") or {}).values(),
             *(v for k, v in gen.items() if isinstance(v, dict) and k != "float")]
    commits = sorted({p.get("commit", out["environment"]["git_commit"]) for p in parts if isinstance(p, dict)})
    lines = [f"SmolLM2-135M, float32 weights and activations, CPU {out['environment']['threads']} threads, commit "
             f"{', '.join(f'`{c}`' for c in commits) or out['environment']['git_commit']} (per part in the JSON)."]
    t = out.get("table") or {}
    if "float" in t:
        f = t["float"]
        lines += ["", f"**Perplexity** ({f['record']['protocol']}; a fresh quantized cache per window, read at every "
                  "position). Bits per element: stored bits per cached K/V element at 2048 tokens (codes + scales + "
                  "zero points/minima + float tokens at 16 bits, the serving dtype; the float32 run held them at 32 bits: see "
                  "each row's record), head_dim 64 (SmolLM2) and 128.", "",
                  "| KV cache | bits/elem (d=64) | bits/elem (d=128) | ppl | vs float |", "|---|---:|---:|---:|---:|",
                  f"| float (float32) | 32 | 32 | {f['ppl']:.3f} | — |"]
        for name, r in sorted(t.items(), key=lambda kv: -kv[1].get("bits_per_element", {}).get("head_dim_64", {})
                              .get("total", 99)):
            if name != "float":
                b = r["bits_per_element"]
                lines.append(f"| {name} `{r['short']}` | {b['head_dim_64']['total']:.3f} | "
                             f"{b['head_dim_128']['total']:.3f} | {r['ppl']:.3f} | {r['delta_pct']:+.2f}% |")
    st = out.get("stack")
    if st:
        lines += ["", "**Full stack** (rotation R1+R2+R4, GPTQ INT4 per-channel weights, dynamic per-token activations, "
                  "asymmetric INT4 per-token-head KV with R3; calibration C4 validation 16×2048 seed 0): the same quantized model "
                  "through its quantized cache and through a float cache.", "",
                  "| stack | KV bits/elem (d=64) | ppl | × float | ppl, float KV | × float |", "|---|---:|---:|---:|---:|---:|"]
        for name, r in st.items():
            lines.append(f"| {name} `{r['kv_short']}` | {r['bits_per_element']['head_dim_64']['total']:.3f} | "
                         f"{r['ppl']:.3f} | {r['ratio_to_float']:.3f} | {r['ppl_float_kv']:.3f} | "
                         f"{r['ratio_to_float_float_kv']:.3f} |")
    m = out.get("memory")
    if m:
        lines += ["", f"**Cache memory held** after prefilling one {m['tokens']}-token window (every layer, keys and "
                  "values; `nbytes` of the tensors held):", "", "| cache | bytes | bits/element held | account |",
                  "|---|---:|---:|---:|", f"| float32 | {m['float32']:,} | 32 | 32 |",
                  f"| float16 | {m['float16']:,} | 16 | 16 |"]
        for name, r in m.items():
            if isinstance(r, dict):
                lines.append(f"| {name} | {r['bytes']:,} | {r['bits_per_element_held']:.3f} | "
                             f"{r['bits_per_element_account']:.3f} |")
    g = out.get("generate")
    if g:
        lines += ["", f"**Greedy generation** through the cache: {g['prompts']} prompts ({g['prompt_tokens']} tokens "
                  f"of WikiText-2 test), {g['new_tokens']} new tokens; decode speed = new tokens / median wall time of "
                  "`generate`; at a first difference, the float model's margin between its top-2 logits there.", "",
                  "| cache | identical to float | first difference at (float top-2 margin) | tokens/s |",
                  "|---|---:|---|---:|", f"| float | — | — | {g['float']['tokens_per_s']:.1f} |"]
        for name, r in g.items():
            if isinstance(r, dict) and name != "float":
                diffs = ", ".join("—" if d is None else f"{d} ({m:.3f})" for d, m in
                                  zip(r["first_difference"], r["float_top2_margin_there"]))
                lines.append(f"| {name} | {r['identical']}/{g['prompts']} | {diffs} | {r['tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--parts", nargs="+", default=["table", "stack", "memory", "generate"],
                    choices=["table", "stack", "memory", "generate"])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="table rows")
    ap.add_argument("--stack", nargs="+", default=list(STACK), choices=list(STACK), help="stack rows")
    ap.add_argument("--generate-rows", nargs="+", default=GENERATE_ROWS, choices=GENERATE_ROWS,
                    help="generation rows (with --append, the others are kept)")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="eval/kv_smollm2", help="output path without extension")
    ap.add_argument("--append", action="store_true", help="keep the parts and rows of --out not rerun")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    model.eval()
    ids = tokenize_eval(tok, "wikitext2", "test", args.data_dir)
    out = {"model": "smollm2-135m", "environment": environment(), "windows": args.windows, "table": {}}
    if args.append and Path(f"{args.out}.json").exists():
        old = json.loads(Path(f"{args.out}.json").read_text())
        for part in [old.get("memory"), old.get("generate"), *old.get("table", {}).values(),
                     *old.get("stack", {}).values()]:
            if isinstance(part, dict):  # parts kept from an earlier run keep that run's commit
                part.setdefault("commit", old["environment"]["git_commit"])
        same = old.get("windows") == args.windows
        out = {**old, "environment": environment(), "table": old.get("table", {}) if same else {},
               "stack": old.get("stack", {}) if same else {}}

    def save():
        write_json(f"{args.out}.json", out)
        Path(f"{args.out}.md").write_text(markdown(out))

    if "table" in args.parts:
        table(model, ids, args.rows, args.windows, out, save)
    if "stack" in args.parts:
        if "float" not in out["table"]:
            table(model, ids, [], args.windows, out, save)
        stack(tok, ids, args.stack, args.windows, args.data_dir, out, save)
    if "memory" in args.parts:
        memory(model, ids, MEMORY_ROWS, out, save)
    if "generate" in args.parts:
        generate(model, tok, ids, args.generate_rows, args.prompts, args.new_tokens, out, save)
    save()


if __name__ == "__main__":
    main()
