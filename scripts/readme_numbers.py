"""Every measured number in README.md, rendered from the record it comes from; records of uncommitted code refused.

    python scripts/readme_numbers.py --check       # README blocks vs their records (fast, no model runs)
    python scripts/readme_numbers.py --write       # re-render the blocks whose records are all clean
    python scripts/readme_numbers.py --run NAME    # re-run the commands behind block NAME (clean tree only), then
                                                   # re-render it

A block is the README text between ``<!-- numbers:NAME -->`` and ``<!-- /numbers:NAME -->`` (marker lines of their
own). Each block below names its records (``eval/...``), the exact command that writes each record, and renders its
text from them. ``--check`` reports, one line each: a record that is missing, has no commit, or was made with
uncommitted changes (a commit ending in ``-dirty``); a README line that differs from the rendering; a number the
README shows that no record holds (``unbacked``); and prints every block's commands. Exit 1 when anything is
reported. ``--write`` leaves a block with any such record as it is (and says so). ``--run`` refuses, one line and
exit 2, when ``git status --porcelain`` shows modified tracked files: the records must come from committed code.

Numbers outside the blocks have no render yet: the "Time" bullet (41.2 s / 21 min from a run's log, the 1 h 10 min
projection), the Data bullet's 304,986 tokens, the exactness figures the tests assert (rotation ≤ 8.1e-16, RepQuant
≤ 2.8e-17), the RepQuant exactness bullet (the ``exactness`` entry of ``eval/repquant_smollm2.json``, written by
its ``--exactness-only``) and the percentile-search bullet under the RepQuant table
(``eval/repquant_w6a6_pct_smollm2.json`` / ``eval/repquant_explore_smollm2.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = "../shared/data"
MARKER = re.compile(r"<!-- numbers:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /numbers:(?P=name) -->", re.S)


@dataclass(frozen=True)
class Block:
    name: str
    sources: tuple[str, ...]  # record paths relative to the checkout's root
    commands: tuple[str, ...]  # what (re)writes those records, run from the root
    render: Callable[[dict[str, Any]], str]  # records by path -> the block's text (ending in a newline)
    unbacked: tuple[str, ...] = ()  # numbers in the text that no record holds (each: "value: why")


# ---------------------------------------------------------------------------------------------- records
def load_record(path: Path) -> Any:
    """A JSON record, or the text of a Markdown one (``eval/readme_timing.md``)."""
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else text


def commits(record: Any) -> list[str]:
    """Every commit a record names: ``git_commit``/``commit`` values anywhere in JSON, ``commit <sha>`` in text."""
    if isinstance(record, str):
        return re.findall(r"\bcommit `?([0-9a-f]{7,40}(?:-dirty)?)", record)
    found = []
    if isinstance(record, dict):
        for k, v in record.items():
            found += [v] if k in ("git_commit", "commit") and isinstance(v, str) else commits(v)
    elif isinstance(record, list):
        for v in record:
            found += commits(v)
    return found


def record_problem(path: str, root: Path) -> str | None:
    """Why the record at ``path`` cannot back README numbers (None when it can)."""
    try:
        found = commits(load_record(root / path))
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    dirty = sorted({c for c in found if c.endswith("-dirty")})
    if dirty:
        return f"made with uncommitted changes (commit {', '.join(dirty)})"
    if not [c for c in found if c != "unknown"]:
        return "names no commit"
    return None


# ---------------------------------------------------------------------------------------------- formats
def _r(x: float) -> int:
    """Rounded half up (1854.5 -> 1855), as the tables show integers."""
    return math.floor(x + 0.5)


def _pct(ratio: float) -> str:
    """``+0.34%`` below 10%, ``+44.4%`` above."""
    v = 100 * (ratio - 1)
    return f"{v:+.2f}%" if abs(v) < 10 else f"{v:+.1f}%"


def _duration(seconds: int) -> str:
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60}m{seconds % 60:02d}s"


def _rows(record: dict, key: str = "recipe") -> dict[str, dict]:
    return {r[key]: r for r in record["rows"]}


# ---------------------------------------------------------------------------------------------- blocks
CORE, MIXED = "eval/core_smollm2.json", "eval/w8a8_mixed_smollm2.json"
W8A8_16 = "eval/w8a8_arithmetic/after_16windows.json"
W8A8_BEFORE, W8A8_4 = "eval/w8a8_arithmetic/before_4windows.json", "eval/w8a8_arithmetic/after_4windows.json"
W8A8_BEFORE_16 = "eval/w8a8_arithmetic/before_16windows.json"
TIMING, PARITY, FLOAT148 = "eval/readme_timing.md", "eval/parity_smollm2.json", "eval/float_148windows.json"
SENSITIVITY, BENCH = "eval/sensitivity_w8a8.json", "eval/bench_eval.json"
LC_W4, LC_W8 = "eval/llmcompressor/w4a16-g64.json", "eval/llmcompressor/w8a8.json"
W34, W3G64_RTN, W4_MSE = "eval/gptq_w34_smollm2.json", "eval/gptq_vs_rtn_smollm2.json", "eval/w4_mse_smollm2.json"
TWEAK, REPQUANT = "eval/norm_tweak_smollm2.json", "eval/repquant_smollm2.json"
MEMORY, MINILM, INSPECT = "eval/runner_memory.json", "eval/minilm_sqnr.json", "eval/inspect_smollm2/inspect.json"
REAL, KV, OFFLOAD = "eval/real_cpu.json", "eval/kv_smollm2.json", "eval/offload_cpu.json"
OUTLIERS = "eval/outliers_smollm2.json"
OUTLIER_SEEDS = "eval/outliers_rotation_seeds_w4a4_gptq.json"  # the rotated GPTQ W4A4 row over rotation seeds

_RUN = ("normquant run recipes/w8a8_rtn.yaml --no-baseline --windows {w} --output out/w8a8-{w}w && "
        "cp out/w8a8-{w}w/results.json {dst}")
# the former arithmetic: the commit before the serving stack's activation scale, run from its own worktree (a
# `python -c` imports the package of its working directory first, whatever PYTHONPATH says)
_BEFORE = ("git worktree add /tmp/nq-87a3d88 87a3d88 && d=$(cd {data} && pwd) && (cd /tmp/nq-87a3d88 && "
           "NORMQUANT_DATA_DIR=$d PYTHONPATH=. python -c 'import sys; from normquant.cli import main; sys.exit(main(sys.argv[1:]))' run "
           "recipes/w8a8_rtn.yaml --windows {w} --output out/w8a8-before-{w}w) && cp "
           "/tmp/nq-87a3d88/out/w8a8-before-{w}w/results.json {dst} && git worktree remove --force /tmp/nq-87a3d88")
COMMANDS = {
    TIMING: "bash scripts/time_readme.sh",
    CORE: f"python scripts/eval_recipes.py --data-dir {DATA} --windows 16 --out eval/core_smollm2 "
          "recipes/w8a16_rtn.yaml recipes/w4a16_g64_rtn.yaml recipes/w4a16_rtn.yaml recipes/w8a8_rtn.yaml",
    MIXED: f"python scripts/eval_recipes.py --data-dir {DATA} --windows 16 --float-from {CORE} --out "
           "eval/w8a8_mixed_smollm2 recipes/w8a8_mixed.yaml",
    W8A8_16: _RUN.format(w=16, dst=W8A8_16),
    W8A8_4: _RUN.format(w=4, dst=W8A8_4),
    W8A8_BEFORE: _BEFORE.format(w=4, dst=W8A8_BEFORE, data=DATA),
    W8A8_BEFORE_16: _BEFORE.format(w=16, dst=W8A8_BEFORE_16, data=DATA),
    PARITY: f"python scripts/parity_smollm2.py --data-dir {DATA} --windows 4 --out eval/parity_smollm2",
    FLOAT148: f"normquant eval --model smollm2-135m --json --quiet > {FLOAT148}",
    SENSITIVITY: f"normquant sensitivity recipes/w8a8_rtn.yaml --windows 4 --output {SENSITIVITY}",
    BENCH: f"python scripts/bench_eval.py --data-dir {DATA} --windows 1 --repeats 3 --out {BENCH}",
    LC_W4: f"python scripts/bench_llmcompressor.py --data-dir {DATA} --samples 16 --windows 16 --scheme w4a16-g64 "
           "  # llm-compressor in /tmp/lcvenv: see the script's docstring",
    LC_W8: f"python scripts/bench_llmcompressor.py --data-dir {DATA} --samples 16 --windows 16 --scheme w8a8 "
           "  # llm-compressor in /tmp/lcvenv: see the script's docstring",
    W34: f"python scripts/eval_recipes.py --data-dir {DATA} --windows 16 --calib-samples 16 --float-from {CORE} --out "
         "eval/gptq_w34_smollm2 recipes/w4a16_gptq.yaml recipes/w3a16_rtn.yaml recipes/w3a16_gptq.yaml "
         "recipes/w3a16_g64_gptq.yaml",
    W3G64_RTN: f"python scripts/eval_recipes.py --data-dir {DATA} --windows 16 --float-from {CORE} --out "
               "eval/gptq_vs_rtn_smollm2 recipes/w3a16_g64_rtn.yaml",
    W4_MSE: f"python scripts/eval_recipes.py --data-dir {DATA} --windows 16 --calib-samples 16 --float-from {CORE} "
            "--out eval/w4_mse_smollm2 recipes/w4a16_rtn_mse.yaml recipes/w4a16_gptq_mse.yaml",
    TWEAK: f"python scripts/eval_norm_tweak.py --data-dir {DATA} --windows 16 --settings w3 w2 w4 w4a8 "
           "--calib-samples 8 --calib-seqlen 1024 --lr0 1e-4 1e-3 --kappa 1 --out eval/norm_tweak_smollm2",
    REPQUANT: f"python scripts/eval_repquant.py --data-dir {DATA} --windows 16 --bits w6a6 w4a8 w8a8 --calib-samples 8 "
              "--calib-seqlen 1024 --calib-batch 1 --epochs 2 --lr 1e-2 --out eval/repquant_smollm2",
    MEMORY: f"python scripts/bench_runner_memory.py --layers 4 8 16 32 --out {MEMORY}",
    MINILM: f"python scripts/eval_minilm.py --data-dir {DATA} --out {MINILM}",
    INSPECT: f"normquant inspect smollm2-135m --samples 4 --seqlen 512 --data-dir {DATA} --output "
             "eval/inspect_smollm2 --force",
    REAL: f"python scripts/bench_real.py --data-dir {DATA} --windows 16 --out {REAL}",
    KV: f"python scripts/eval_kv.py --data-dir {DATA} --windows 16 --out eval/kv_smollm2",
    OFFLOAD: f"python scripts/bench_offload.py --out {OFFLOAD}",
    OUTLIERS: f"python scripts/bench_llmcompressor.py --table outliers --data-dir {DATA} --samples 16 --windows 16 "
              "--threads 2  # llm-compressor in /tmp/lcvenv: see eval/llmcompressor/README.md",
    OUTLIER_SEEDS: f"python scripts/probe_rotation_seeds.py --data-dir {DATA} --row w4a4-rotated-gptq --sides normquant "
                   f"--seeds 5 --windows 16 --out {OUTLIER_SEEDS}",
}


def _timing(r):
    rows = re.findall(r"^\| (\d+) \| `[^`]*` \| (\d+)m(\d\d)s \| (\d+) \|$", r[TIMING], re.M)
    t = {int(n): _duration(60 * int(m) + int(s)) for n, m, s, _ in rows}
    return f"""```bash
. .venv/bin/activate
export NORMQUANT_DATA_DIR=../shared/data
normquant run recipes/w4a16_g64_gptq.yaml --calib-samples 16 --calib-seqlen 512 --windows 4 --export out/w4-model  # {t[1]}
normquant eval --model out/w4-model --windows 4 --json                                # {t[2]}
normquant export recipes/w8a16_rtn.yaml --output exports/smollm2-w8 [--force]         # {t[3]}
normquant sensitivity recipes/w8a8_rtn.yaml --windows 2                               # {t[4]}
normquant inspect smollm2-135m --output out/inspect-smollm2 [--force]                 # {t[5]}
normquant report out/*/results.json [--format csv] [--output table.md]                # Markdown or CSV table
normquant report out/*/results.json --plot ppl_vs_bits.png                            # ppl vs bits per weight (PNG)
normquant --help
```
"""


def _core(r):
    core, base = _rows(r[CORE]), r[CORE]["float"]["ppl"]
    w8a8, mixed = r[W8A8_16]["quantized"]["ppl"], r[MIXED]["rows"][0]["ppl"]

    def ppl(name):
        return f"{core[name]['ppl']:.3f} | {_pct(core[name]['ppl'] / base)}"

    return f"""| recipe | weights | activations | ppl | vs float |
|---|---|---|---:|---:|
| float | fp32 | fp32 | {base:.3f} | — |
| `w8a16_rtn` | INT8 sym per-channel, RTN | float | {ppl('w8a16-rtn')} |
| `w8a8_rtn` | INT8 sym per-channel, RTN | INT8 dynamic per-token (all linears but `lm_head`) | {w8a8:.3f} | {_pct(w8a8 / base)} |
| `w4a16_g64_rtn` | INT4 sym group 64, RTN | float | {ppl('w4a16-g64-rtn')} |
| `w4a16_rtn` | INT4 sym per-channel, RTN | float | {ppl('w4a16-rtn')} |
| `w8a8_mixed` | INT8 sym per-channel, RTN | INT8 dynamic per-token, `down_proj` inputs float | {mixed:.3f} | {_pct(mixed / base)} |
"""


PARITY_LABELS = {  # README label -> the record's kind
    "W8A16 | `pack-quantized`": "W8A16 (int8 sym per-channel)",
    "W4A16 g64 | `pack-quantized`": "W4A16 g64 (int4 sym)",
    "W8A8 dynamic per-token | `int-quantized`": "W8A8 dynamic (per-token A8)",
    "W8A8 static (asym per-tensor A8, 8x512 calibration) | `int-quantized`": "W8A8 static (asym per-tensor A8)",
    "W8A8 mixed | `mixed-precision`": "W8A8 mixed (down_proj inputs float)",
    "W4A8 g64 dynamic | `pack-quantized`": "W4A8 g64 dynamic",
    "W3A16 g64 asym | `pack-quantized` (loaded with `dequantize=True`)": "W3A16 g64 asym",
}


def _parity(r):
    rows = _rows(r[PARITY], "kind")
    lines = [f"| {label} | {rows[k]['ppl_normquant']:.3f} | {rows[k]['ppl_transformers']:.3f} |"
             for label, k in PARITY_LABELS.items()]
    return ("| export kind | format | ppl normquant | ppl transformers + compressed-tensors |\n|---|---|---:|---:|\n"
            + "\n".join(lines) + "\n")


def _arithmetic(r):
    sources = (W8A8_BEFORE, W8A8_4, W8A8_BEFORE_16, W8A8_16)
    before, after, before16, w16 = (r[p]["quantized"]["ppl"] for p in sources)
    return f"""Before this, normquant's dynamic scale was `absmax/(2^(b-1)-1)`: `w8a8_rtn` scored {before:.3f} in normquant but
{after:.3f} when served (4 windows); on 16 windows {before16:.3f} before, now {w16:.3f} — the number a server
computes (`eval/w8a8_arithmetic/report.md`, written by `normquant report`). The other
dynamic-activation numbers below (GPTQ W8A8, W4A8 norm tweaking, the RepQuant dynamic reference) were measured
with the former arithmetic: expect changes of about +0.1%. Exports record whether a serving stack computes
the same model, and why not when it cannot (`config.json["normquant"]["serving"]`: asymmetric packed weights
need `dequantize=True` with compressed-tensors 0.20; float16/bfloat16 exports match to one ulp; tensors the
architecture lacks, e.g. RepQuant's created biases, are named).
"""


def _float148(r):
    f = r[FLOAT148]
    return f"""All {f['windows']} windows once (`eval/float_148windows.json`, `normquant eval --model smollm2-135m --json`): float ppl
**{f['ppl']:.3f}** ({f['tokens']:,} predicted tokens; `../shared/data/README.md` measured 21.61 independently).
"""


LLMC_W8A8 = 21.373  # the CEO's llm-compressor GPTQ W8A8 on the same 16 windows: an outside reference, not ours


def _sensitivity(r):
    base, w8a8, mixed = r[CORE]["float"]["ppl"], r[W8A8_16]["quantized"]["ppl"], r[MIXED]["rows"][0]["ppl"]
    rows = r[SENSITIVITY]["rows"]
    act = {x["module"]: x["delta_pct"] for x in rows if x["part"] == "input_activations"}
    worst_weight = max(x["delta_pct"] for x in rows if x["part"] == "weights")
    return f"""For reference, llm-compressor's GPTQ W8A8 on the same 16 windows: float {base:.3f}, W8A8 {LLMC_W8A8} ({100 * (LLMC_W8A8 / base - 1):+.1f}%), measured
by the CEO. Plain RTN W8A8 is {100 * (w8a8 / LLMC_W8A8 - 1):.2f}% behind it; `normquant sensitivity` (`eval/sensitivity_w8a8.json`, {r[SENSITIVITY]['windows']} windows)
ranks `down_proj`'s input activations as the worst offender ({act['down_proj']:+.2f}% alone, then v_proj inputs {act['v_proj']:+.2f}%, up_proj
inputs {act['up_proj']:+.2f}%; every weight kind ≤ {worst_weight:+.2f}%), and keeping just those inputs in float (`w8a8_mixed`) lands at
{_pct(mixed / base)}. SmolLM2-135M is small and sensitive at 4 bits.
"""


def _bench(r):
    b = r[BENCH]
    return f"""**Evaluator speed** (`scripts/bench_eval.py`, `eval/bench_eval.json`, best of {len(b['seconds']['plain'])} alternating runs on the first
window, CPU): normquant's evaluator takes {b['normquant_over_plain_time']:.2f}× the time of a bare transformers forward loop over the same
window; W8A8 fake-quant evaluation takes {b['w8a8_over_float_time']:.2f}× the float time ({b['environment']['threads']} threads; on this shared machine
only same-run ratios under steady load mean anything).
"""


def _llmcompressor(r):
    def side(d):
        return f"{d['ppl']:.3f} | {_r(d['quant_wall_s'])} s | {_r(d['peak_rss_quant_mib'])} MiB |"

    w4, w8 = r[LC_W4], r[LC_W8]
    c4, c8 = w4["comparison"], w8["comparison"]
    version = w4["versions"]["llmcompressor_venv"]["llmcompressor"]
    return f"""| scheme | side | ppl (16 windows) | quantization wall time | peak RSS |
|---|---|---:|---:|---:|
| W4A16 group 64, act-order (static groups) | normquant | {side(w4['normquant'])}
| | llm-compressor {version} `GPTQModifier` | {side(w4['llmcompressor'])}
| | ratio | {c4['ppl_ratio_normquant_over_llmcompressor']:.3f} (target ≤ 1.005) | {c4['time_ratio_normquant_over_llmcompressor']:.2f} (target ≤ 0.7) | {c4['peak_rss_ratio_normquant_over_llmcompressor']:.2f} |
| W8A8 (per-channel weights, dynamic per-token inputs) | normquant | {side(w8['normquant'])}
| | llm-compressor | {side(w8['llmcompressor'])}
| | ratio | {c8['ppl_ratio_normquant_over_llmcompressor']:.3f} | {c8['time_ratio_normquant_over_llmcompressor']:.2f} | {c8['peak_rss_ratio_normquant_over_llmcompressor']:.2f} |

normquant's GPTQ W8A8 ({w8['normquant']['ppl']:.3f}, `recipes/w8a8_gptq.yaml` with 16 calibration samples) is below the CEO's
llm-compressor reference of {LLMC_W8A8} on the same windows.
"""


def _gptq_vs_rtn(r):
    core, w34, mse = _rows(r[CORE]), _rows(r[W34]), _rows(r[W4_MSE])
    g64, rtn4 = r[LC_W4], core["w4a16-rtn"]["ppl"]
    gptq_mse = mse["w4a16-gptq-mse"]["ppl"]
    return f"""| weights | RTN | GPTQ |
|---|---:|---:|
| INT4 sym per-channel | {rtn4:.3f} | {w34['w4a16-gptq']['ppl']:.3f} |
| INT4 sym group 64 | {core['w4a16-g64-rtn']['ppl']:.3f} | {g64['normquant']['ppl']:.3f} (llm-compressor: {g64['llmcompressor']['ppl']:.3f}) |
| INT3 asym per-channel | {w34['w3a16-rtn']['ppl']:.3f} | {w34['w3a16-gptq']['ppl']:.3f} |
| INT3 asym group 64 | {r[W3G64_RTN]['rows'][0]['ppl']:.3f} | {w34['w3a16-g64-gptq']['ppl']:.3f} |

GPTQ wins by a wide margin at 3 bits, barely at 4 bits per-channel, and not at 4 bits with groups of 64 — where
llm-compressor's GPTQ is worse still. The packaged weights were GGUF Q4_1 (4-bit blocks of 32) before
dequantization, so RTN at 4 bits loses little on this particular model. With the §5.2 clip search (`mse: true`) on both
sides, INT4 per-channel: RTN {mse['w4a16-rtn-mse']['ppl']:.3f} (worse than min-max: it minimizes the weights' Σ|e|^2.4, not the layer
output), **GPTQ {gptq_mse:.3f}** — {100 * (1 - gptq_mse / rtn4):.0f}% below plain RTN's {rtn4:.3f} (`eval/w4_mse_smollm2.md`, `recipes/w4a16_gptq_mse.yaml`).
"""


TWEAK_LABELS = {"w4": "W4A16 g64 (sym)", "w3": "W3A16 g64 (asym)", "w2": "W2A16 g64 (asym)",
                "w4a8": "W4A8 (g64 sym, dynamic per-token A8)"}


def _tweak(r):
    s = r[TWEAK]["settings"]

    def change(k):
        return 100 * (s[k]["gptq+tweak"]["ppl"] / s[k]["gptq"]["ppl"] - 1)

    def heldout(k):
        return " / ".join(f"{x['heldout_ppl']:.2f}" for x in s[k]["selection"])

    def minus(k):  # the prose writes a true minus sign
        return f"{change(k):.1f}%".replace("-", "−")

    rows = [f"| {label} | {s[k]['gptq']['ppl']:.3f} | {s[k]['gptq+tweak']['ppl']:.3f} | {change(k):+.1f}% | "
            f"{s[k]['gptq+tweak']['lr0']} | {heldout(k)} |" for k, label in TWEAK_LABELS.items()]
    rtn_g64, c4_gptq_g64 = _rows(r[CORE])["w4a16-g64-rtn"]["ppl"], r[LC_W4]["normquant"]["ppl"]
    return ("| setting | GPTQ | GPTQ + tweak | change | selected lr0 | held-out C4 ppl: GPTQ / lr0=1e-4 / lr0=1e-3 |\n"
            "|---|---:|---:|---:|---|---|\n" + "\n".join(rows) + f"""

Tweaking helps at every width measured ({minus('w4')} W4, {minus('w3')} W3, {minus('w4a8')} W4A8; W2 is broken either way). The paper's
lr0 = 1e-5 barely moves γ with 8 Adam steps per block, so the grid starts at 1e-4; each grid point is a full
GPTQ + tweak pass, hence only two. Note the GPTQ column: with self-generated calibration data GPTQ W4 g64 reaches
{s['w4']['gptq']['ppl']:.3f}, below RTN ({rtn_g64:.3f}) — with C4 calibration it did not ({c4_gptq_g64:.3f}).
""")


REPQUANT_ROWS = [
    ("naive static per-tensor (min-max)", "naive-static", "{}"),
    ("per-channel static, simulation (percentile bounds, weights quantized on the original W)", "per-channel-sim", "{}"),
    ("**RepQuant**: percentile init + range floor + learned dual clipping, reparameterized to per-tensor", "repquant",
     "**{}**"),
    ("RepQuant without the learning (percentile init + range floor)", "repquant-floor", "{}"),
    ("RepQuant, percentile init only (no floor, no learning)", "repquant-pct", "{}"),
    ("dynamic per-token (reference, not static)", "dynamic-token", "{}"),
]


def _repquant(r):
    ppl = {(x["bits"], x["row"]): x["ppl"] for x in r[REPQUANT]["rows"]}

    def cell(bits, row, fmt):
        return fmt.format(f"{ppl[bits, row]:.3f}") if (bits, row) in ppl else "—"

    lines = [f"| {label} | " + " | ".join(cell(b, row, fmt) for b in ("w8a8", "w6a6", "w4a8")) + " |"
             for label, row, fmt in REPQUANT_ROWS]
    measured_at = sorted({x["commit"] for x in r[REPQUANT]["rows"]})
    table = ("| row | W8A8 | W6A6 | W4A8 |\n|---|---:|---:|---:|\n" + "\n".join(lines) + "\n\n"
             f"Measured at commit {', '.join(f'`{c}`' for c in measured_at)}.\n\n")

    def p(bits, row):
        return f"{ppl[bits, row]:.1f}"

    def vs(bits, a, b):
        return _pct(ppl[bits, a] / ppl[bits, b])

    bullets = [f"RepQuant vs naive per-tensor static: {vs('w6a6', 'repquant', 'naive-static')} at W6A6, "
               f"{vs('w4a8', 'repquant', 'naive-static')} at W4A8, {vs('w8a8', 'repquant', 'naive-static')} at W8A8 "
               "(at 8 bits per-tensor A8 already suits the norm outputs and o_proj/down_proj carry the loss).",
               f"Learned dual clipping vs its initialization (percentile + floor): {p('w6a6', 'repquant')} vs "
               f"{p('w6a6', 'repquant-floor')} (W6A6), {p('w4a8', 'repquant')} vs {p('w4a8', 'repquant-floor')} "
               f"(W4A8), {p('w8a8', 'repquant')} vs {p('w8a8', 'repquant-floor')} (W8A8); percentile init alone (no "
               f"floor): {p('w6a6', 'repquant-pct')} (W6A6), {p('w4a8', 'repquant-pct')} (W4A8), against naive "
               f"{p('w6a6', 'naive-static')} and {p('w4a8', 'naive-static')}."]
    sim = [(b, ppl[b, "repquant"], ppl[b, "per-channel-sim"]) for b in ("w4a8", "w6a6", "w8a8")]
    better = [f"{b.upper()} ({x:.1f} vs {y:.1f})" for b, x, y in sim if x < y]
    parts = [f"RepQuant beats it at {', '.join(better)}: its bounds are chosen against the weight error, the "
             "simulation's are not"] if better else []
    for b, x, y in sim:
        if x >= y:
            gap = (ppl[b, "naive-static"] - x) / (ppl[b, "naive-static"] - y)
            parts.append(f"at {b.upper()} it does not ({x:.1f} vs {y:.1f}): the weights still pay for the column "
                         "scaling (per-channel activation quantization with unscaled weights is what a per-channel "
                         f"kernel would buy), and RepQuant covers {100 * gap:.0f}% of the way from naive to it")
    bullets.append("Against the per-channel simulation with original weights: " + "; ".join(parts) + ".")
    return table + "".join(textwrap.fill(f"- {t}", width=116, subsequent_indent="  ") + "\n" for t in bullets)


def _memory(r):
    m = r[MEMORY]
    mib = [(x["layers"], _r(x["working_mb"]), _r(x["model_bytes"] / 2**20)) for x in m["rows"]]
    working = ", ".join(f"{n} layers {w} MiB" for n, w, _ in mib)
    return f"""**Calibration memory against depth** (`scripts/bench_runner_memory.py`, `eval/runner_memory.json`): peak RSS during
`quantize` (GPTQ W4 g64, random llama with SmolLM2's block shape, {m['samples']}×{m['seqlen']} calibration tokens) minus RSS before it:
{working} while the model grows {' → '.join(str(s) for *_, s in mib[:-1])} →
{mib[-1][2]} MiB: the runner's working memory (activations, one block's Hessians) stays flat with depth.
"""


def _minilm(r):
    s = {(x["bits"], x["row"]): x["sqnr_db"] for x in r[MINILM]["rows"]}
    a6 = " / ".join(f"{s['A6', k]:.1f}" for k in ("naive-static", "repquant-per-channel", "dynamic-token"))
    return f"""**MiniLM** (real post-LN LayerNorm weights, `scripts/eval_minilm.py`, `eval/minilm_sqnr.json`): SQNR of the final
hidden states, weights float, every linear input quantized: A8 naive static per-tensor {s['A8', 'naive-static']:.1f} dB, RepQuant
per-channel quantizers at the LayerNorm consumers {s['A8', 'repquant-per-channel']:.1f} dB, dynamic per-token {s['A8', 'dynamic-token']:.1f} dB; A6: {a6} dB.
(BERT is post-LN, so its LayerNorm cannot absorb the channel scales; the row is RepQuant's per-channel quantizer.)
"""


def _inspect(r):
    d = r[INSPECT]
    inp, post = d["summary"]["input_layernorm"], d["summary"]["post_attention_layernorm"]
    post_max = max(n["absmax_max"] for n in d["norms"] if n["kind"] == "post_attention_layernorm")
    words = {1: "one", 2: "two", 3: "three"}
    return f"""Per-channel ranges of every norm output (layers × channels), the outlier channels (|x| > {d['threshold']:g}) and how they
persist across layers, as a PNG and a JSON. SmolLM2-135M on {d['samples']}×{d['seqlen']} C4 tokens: `input_layernorm` outputs exceed {d['threshold']:g}
in {inp['layers_with_outliers']} of {inp['layers']} layers, channel {inp['persistent_channels'][0]} in most of them; `post_attention_layernorm` only in the last {words.get(post['layers_with_outliers'], post['layers_with_outliers'])} layers (up to
~{round(post_max, -1):.0f}). Per-tensor static INT8 has to stretch its one scale over those channels; per-channel (RepQuant) does not.
"""


def _real(r):
    x = r[REAL]
    ppl, speed, packed, base = x["ppl"], x["speed"]["tokens_per_s"], x["packed"], r[CORE]["float"]["ppl"]
    ratios = [g["fp32_over_int8"] for g in x["gemm"]]
    ms = [g["m"] for g in x["gemm"]]
    return f"""  this CPU (`eval/real_cpu.json`, `python scripts/bench_real.py --data-dir ../shared/data --windows 16`, {x['environment']['threads']} threads,
  machine otherwise idle): `w8a7_rtn` evaluates at {_r(speed['real'])} tokens/s real vs {_r(speed['fp32'])} fp32 ({speed['real'] / speed['fp32']:.2f}×; fake-quant {_r(speed['fake'])}),
  perplexity real {ppl['real']['ppl']:.3f} vs fake {ppl['fake']['ppl']:.3f} on {ppl['real']['windows']} windows ({_pct(x['ppl_real_over_fake'])}, inside the {_pct(x['ppl_fake_nudged_over_fake'])} that one float32 rounding of
  the inputs moves the fake path itself: 7-bit activations are that sensitive; float is {base:.3f}, so A7 costs
  {_pct(ppl['fake']['ppl'] / base)}); int8 GEMM {min(ratios):.1f}–{max(ratios):.1f}× fp32 over M = {min(ms)}…{max(ms)}; `w4a16_g64_rtn` weights held in {packed['held_over_float16']:.3f}× their float16
  bytes, perplexity {'identical' if packed['ppl_packed'] == packed['ppl_fake'] else 'different'}.
"""


def _kv(r):
    m, g = r[KV]["memory"], r[KV]["generate"]
    mb = {k: (v if isinstance(v, (int, float)) else v["bytes"]) / 1e6 for k, v in m.items() if k not in ("tokens", "commit")}
    bpe = {k: v["bits_per_element_held"] for k, v in m.items() if isinstance(v, dict)}
    exact = all(v["bits_per_element_held"] == v["bits_per_element_account"] for v in m.values() if isinstance(v, dict))
    margin = max((x for k in ("int8", "int8-r3") if k in g for x in g[k]["float_top2_margin_there"] if x is not None),
                 default=0.0)
    quantized = [k for k in g if isinstance(g[k], dict) and k != "float" and not k.endswith("-cache")]
    speeds = [g[k]["tokens_per_s"] for k in quantized]
    n = g["prompts"]
    yardsticks = [k for k in g if k.endswith("-cache")]
    matches = ", ".join(f"{g[k]['identical']}/{n} {k}" for k in quantized)
    if yardsticks:
        matches += "; not quantized, a float cache rounded to " + ", ".join(
            f"{k.removesuffix('-cache')} {g[k]['identical']}/{n}" for k in yardsticks)
    return f"""  Measured on SmolLM2 (`eval/kv_smollm2.md`, `scripts/eval_kv.py`, {r[KV]['environment']['threads']} threads): a
  {m['tokens']}-token cache holds {mb['float32']:.1f} MB in float32, {mb['float16']:.1f} MB in float16, {mb['int8']:.1f} MB int8 ({bpe['int8']:.2f} bits/element), {mb['int4']:.1f} MB int4,
  {mb['kivi2']:.1f} MB KIVI-2, {mb['nsn2']:.1f} MB NSN-2 ({bpe['nsn2']:.2f}), {mb['nsn1']:.1f} MB NSN-1 ({bpe['nsn1']:.2f}) — bytes held {'equal' if exact else 'differ from'} the exact account.
{_kv_generate(g, matches, margin, speeds)}
{_kv_table(r[KV])}
{_kv_stack(r[KV])}
"""


def _kv_generate(g, matches, margin, speeds) -> str:
    text = (f"Greedy generation ({g['prompts']} prompts, {g['new_tokens']} new tokens; the int8 caches diverge where the "
            f"float top-2 logit margin is ≤ {margin:.3f}) identical to float: {matches}; decode "
            f"{min(speeds):.0f}–{max(speeds):.0f} tokens/s through a quantized cache vs {g['float']['tokens_per_s']:.1f} float "
            "(every step dequantizes the whole cache).")
    return "\n".join(textwrap.wrap(text, width=116, initial_indent="  ", subsequent_indent="  "))


def _kv_stack(x) -> str:
    st, t = x.get("stack") or {}, x.get("table") or {}
    if not st:
        return "  The full stack (W4A4KV4, W4A8KV4 with rotation) is next."
    cells = "; ".join(f"{k} {v['ppl']:.3f} (×{v['ratio_to_float']:.3f} float; {v['ppl_float_kv']:.3f} with a float KV "
                      f"cache)" for k, v in st.items())
    text = (f"Full stack (rotation R1+R2+R4, GPTQ INT4 weights, dynamic per-token activations, asymmetric INT4 KV per "
            f"token-head with R3, {x['windows']} windows, float {t['float']['ppl']:.3f}): {cells}.")
    return "\n".join(textwrap.wrap(text, width=116, initial_indent="  ", subsequent_indent="  "))


def _kv_table(x) -> str:
    t = x.get("table") or {}
    rows = sorted(((k, v) for k, v in t.items() if k != "float"), key=lambda kv: -kv[1]["bits_per_element"]["head_dim_64"]["total"])
    if not rows:
        return "  The 16-window perplexity table is next."
    cells = "; ".join(f"{k} {v['ppl']:.3f} ({_pct(v['ppl'] / t['float']['ppl'])}, "
                      f"{v['bits_per_element']['head_dim_64']['total']:.2f} b/e)" for k, v in rows)
    text = (f"Perplexity through the cache ({x['windows']} windows, float {t['float']['ppl']:.3f}; bits per element "
            f"at head_dim 64 with float tokens at 16 bits, `eval/kv_smollm2.md` also gives 128): {cells}.")
    return "\n".join(textwrap.wrap(text, width=116, initial_indent="  ", subsequent_indent="  "))


def _offload(r):
    x = r[OFFLOAD]
    m, runs = x["model"], {(u["mode"], u["budget_bytes"] is not None): u for u in x["runs"]}
    gib = 2 ** 30

    def peak(mode):
        return runs[mode, False]["peak_rss_above_imports"] / gib

    def outcome(mode):
        u = runs[mode, True]
        return "finishes" if u["ok"] else ("is killed (out of memory)" if u.get("returncode") == -9 else
                                          f"fails ({u['error'].split(':')[0]})")

    cap = x["budget"]["budget_mib"] / 1024
    how = (f"a {cap:.1f} GiB memory cgroup (everything the process holds counts, as on a machine with that much RAM)"
           if x["budget"]["cap"] == "cgroup" else f"RLIMIT_AS of {cap:.1f} GiB above the imports")
    return f"""**Models larger than memory** (`scripts/bench_offload.py`, `eval/offload_cpu.json`, {x['threads']} thread): a random-weight llama
({m['layers']} blocks, hidden {m['hidden']}, MLP {m['intermediate']}, vocab {m['vocab']}, untied head), {m['checkpoint_bytes'] / gib:.2f} GiB in float32, {x['recipe']}. Peak
resident memory above the imports: in memory {peak('memory'):.2f} GiB ({runs['memory', False]['peak_rss_anon_above_imports'] / gib:.2f} anonymous, the rest the mapped checkpoint), streamed (`--offload`)
{peak('streamed'):.2f} GiB — the embeddings and head are {m['non_block_bytes'] / gib:.2f} GiB, the packed blocks {runs['streamed', False]['packed_bytes'] / gib:.2f} GiB, one float block {m['float_block_bytes'] / gib:.2f} GiB. Under
{how} the in-memory run {outcome('memory')}; the streamed one {outcome('streamed')}.
"""


def outlier_rows(table: dict) -> list[str]:
    """The issue 10 table's rows in display order: the benchmark's row order (``display_order``, written by
    ``bench_llmcompressor.py --table``), else the order the run recorded them."""
    return list(table.get("display_order") or table["rows_order"])


def _outliers(r):
    t = r[OUTLIERS]
    f = t["float"]["ppl"]

    def cell(d) -> str:
        return f"{d['ppl']:.3f} | ×{d['ppl'] / f:.3f}" if isinstance(d, dict) and "ppl" in d else "— | —"

    lines = [f"| row (first 16 windows, float {f:.3f}) | normquant | ×float | llm-compressor | ×float | ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for key in outlier_rows(t):
        e = t["rows"].get(key)
        if e is None:  # a run stopped before this row
            continue
        ratio = e.get("ppl_ratio_normquant_over_llmcompressor")
        lc = cell(e.get("llmcompressor")) if e.get("llmcompressor_recipe") else "n/a | "
        lines.append(f"| {e['title']} | {cell(e.get('normquant'))} | {lc} | {f'{ratio:.3f}' if ratio else ''} |")
    seeds = r[OUTLIER_SEEDS]
    nq = seeds["seeds"]["normquant"]
    med = statistics.median(nq.values())
    lines += ["", f"The rotated GPTQ W4A4 row over the rotation's random signs (`rotate: {{seed: S}}`, S = "
                  f"{min(map(int, nq))}–{max(map(int, nq))}; the table is seed 0; same data, {seeds['windows']} windows): "
                  + ", ".join(f"{v:.3f}" for v in nq.values())
                  + f"; median {med:.3f} = ×{med / seeds['float']:.3f} float, range ×{min(nq.values()) / seeds['float']:.3f}"
                  f"–×{max(nq.values()) / seeds['float']:.3f}."]
    return "\n".join(lines) + "\n"


def _block(name, sources, render, unbacked=()):
    return Block(name, sources, tuple(dict.fromkeys(COMMANDS[s] for s in sources)), render, unbacked)


BLOCKS = [
    _block("timing", (TIMING,), _timing),
    _block("core", (CORE, W8A8_16, MIXED), _core),
    _block("parity", (PARITY,), _parity),
    _block("arithmetic", (W8A8_BEFORE, W8A8_4, W8A8_BEFORE_16, W8A8_16), _arithmetic),
    _block("float148", (FLOAT148,), _float148),
    _block("sensitivity", (CORE, W8A8_16, MIXED, SENSITIVITY), _sensitivity),
    _block("bench-eval", (BENCH,), _bench),
    _block("llmcompressor", (LC_W4, LC_W8), _llmcompressor),
    _block("outliers", (OUTLIERS, OUTLIER_SEEDS), _outliers),
    _block("gptq-vs-rtn", (CORE, W34, LC_W4, W3G64_RTN, W4_MSE), _gptq_vs_rtn),
    _block("norm-tweak", (TWEAK, CORE, LC_W4), _tweak),
    _block("repquant", (REPQUANT,), _repquant),
    _block("runner-memory", (MEMORY,), _memory),
    _block("minilm", (MINILM,), _minilm),
    _block("inspect", (INSPECT,), _inspect),
    _block("real", (REAL, CORE), _real),
    _block("kv", (KV,), _kv),
    _block("offload", (OFFLOAD,), _offload),
]


# ---------------------------------------------------------------------------------------------- check / write / run
def readme_blocks(text: str) -> dict[str, str]:
    """The text of every marked block, by name."""
    return {m["name"]: m["body"] for m in MARKER.finditer(text)}


def _differences(name: str, shown: str, rendered: str, limit: int = 3) -> list[str]:
    a, b = shown.splitlines(), rendered.splitlines()
    diff = [i for i in range(max(len(a), len(b))) if (a[i:i + 1] or [None]) != (b[i:i + 1] or [None])]
    out = [f"{name}: line {i + 1} of the block differs: README {a[i] if i < len(a) else '(none)'!r} — records give "
           f"{b[i] if i < len(b) else '(none)'!r}" for i in diff[:limit]]
    return out + ([f"{name}: ... {len(diff) - limit} more differing lines"] if len(diff) > limit else [])


def check_block(block: Block, shown: str | None, root: Path) -> list[str]:
    """One line per problem of ``block`` (README text ``shown``, None when the markers are missing)."""
    bad = {s: p for s in block.sources if (p := record_problem(s, root))}
    problems = [f"{block.name}: {s}: {p}" for s, p in bad.items()]
    problems += [f"{block.name}: unbacked number {u}" for u in block.unbacked]
    if shown is None:
        return problems + [f"{block.name}: no <!-- numbers:{block.name} --> block in the README"]
    if any(p == "missing" or p.startswith("unreadable") for p in bad.values()):
        return problems
    try:
        return problems + _differences(block.name, shown, render(block, root))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        return problems + [f"{block.name}: the records do not hold what the block shows ({type(e).__name__}: {e})"]


def check(text: str, blocks: list[Block], root: Path) -> tuple[list[str], list[str]]:
    """``(problems, clean)`` for the README ``text``: one line per problem (:func:`check_block`, and README blocks
    no entry renders); one line per block that matches records of committed code."""
    shown, problems, clean = readme_blocks(text), [], []
    for b in blocks:
        found = check_block(b, shown.get(b.name), root)
        problems += found
        clean += [] if found else [f"{b.name}: matches clean records ({', '.join(b.sources)})"]
    names = {b.name for b in blocks}
    problems += [f"{n}: a README block no entry of this script renders" for n in shown if n not in names]
    return problems, clean


def render(block: Block, root: Path) -> str:
    return block.render({s: load_record(root / s) for s in block.sources})


def write(text: str, blocks: list[Block], root: Path) -> tuple[str, list[str]]:
    """The README with every block whose records are all clean re-rendered; lines for the blocks left as they were."""
    skipped = []
    for b in blocks:
        bad = [f"{s} {p}" for s in b.sources if (p := record_problem(s, root))]
        if bad:
            skipped.append(f"{b.name}: left as it is: {'; '.join(bad)}")
            continue
        new = render(b, root)
        text = MARKER.sub(lambda m: f"<!-- numbers:{b.name} -->\n{new}<!-- /numbers:{b.name} -->"
                          if m["name"] == b.name else m[0], text)  # (an empty body too)
    return text, skipped


def tracked_changes(root: Path) -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    return out.splitlines()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compare the README's blocks with their records")
    mode.add_argument("--write", action="store_true", help="re-render the blocks whose records are clean")
    mode.add_argument("--run", metavar="NAME", help="re-run the commands behind block NAME (clean tree only)")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args(argv)
    readme = Path(args.readme)
    if args.check:
        problems, notes = check(readme.read_text(), BLOCKS, ROOT)
        print("\n".join(notes + problems))
        for b in BLOCKS:
            print(f"{b.name}: regenerate with\n" + "\n".join(f"    {c}" for c in b.commands))
        print(f"{len(notes)} of {len(BLOCKS)} blocks backed by clean records; {len(problems)} problems")
        return 1 if problems else 0
    if args.write:
        text, skipped = write(readme.read_text(), BLOCKS, ROOT)
        readme.write_text(text)
        print("\n".join(skipped) or "every block re-rendered")
        return 1 if skipped else 0
    block = next((b for b in BLOCKS if b.name == args.run), None)
    if block is None:
        print(f"readme_numbers: no block '{args.run}' (blocks: {', '.join(b.name for b in BLOCKS)})", file=sys.stderr)
        return 2
    changed = tracked_changes(ROOT)
    if changed:
        print(f"readme_numbers: refusing to run: {len(changed)} tracked files modified ({changed[0].strip()}, ...); "
              "commit first, so that the records name a clean commit", file=sys.stderr)
        return 2
    for cmd in block.commands:
        print(f"$ {cmd}", flush=True)
        subprocess.run(["bash", "-c", cmd], cwd=ROOT, check=True)
    text, skipped = write(readme.read_text(), [block], ROOT)
    readme.write_text(text)
    print("\n".join(skipped) or f"{block.name}: re-rendered")
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
