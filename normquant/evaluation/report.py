"""Results tables from ``normquant run`` records (``out/<recipe>/results.json``): Markdown or CSV, and a plot.

    normquant report out/*/results.json              # Markdown on stdout
    normquant report out/*/results.json --format csv --output results.csv
    normquant report out/*/results.json --plot ppl_vs_bits.png

One row per record: recipe, weights and input-activation specs, the protocol (dataset/split, seqlen, windows
used of total), float and quantized perplexity, the change, quantization seconds, and the commit the numbers came
from (``-dirty`` = uncommitted changes). Rows measured under different protocols are not comparable; the
protocol column says so.

>>> rows = [{"recipe": "w8a8-rtn", "weights": "int8-sym-ch", "activations": "int8-sym-tok-dyn",
...          "protocol": "wikitext2/test 2048x4/148", "float_ppl": 24.145, "ppl": 25.075, "delta_pct": 3.85,
...          "quantize_s": 12.0, "commit": "87a3d88"}]
>>> print(to_markdown(rows).splitlines()[2])
| w8a8-rtn | int8-sym-ch | int8-sym-tok-dyn | wikitext2/test 2048x4/148 | 24.145 | 25.075 | +3.85% | 12 | 87a3d88 |

The plot (PNG, matplotlib: ``pip install 'normquant[plots]'``) puts every record at (bits per weight, quantized
perplexity), labelled with its recipe, and the float model as a horizontal line; perplexity is on a log scale
when the largest is more than 3x the smallest. Records of different models or protocols are refused.

**Bits per weight** (:func:`weight_bits`, :func:`bits_per_weight`) is computed from the recipe's specs and the
model's layer shapes (its config built on the meta device: no weights are read), not from a file size. It is
the storage per weight of the linears the scheme quantizes — targets minus ``ignore``, overrides applied per
module as ``normquant run`` applies them — counting

* the codes: ``bits`` per weight;
* the scales: one per tensor, per output row (``channel``) or per group, at 16 bits (fp16/bf16, as serving
  kernels hold them; normquant's export *file* stores them in float32, 16 bits more per scale on disk);
* the zero points of asymmetric specs: one per scale, at the code width (packed like the codes).

A targeted linear whose weights an override keeps float counts at the model dtype's bits; embeddings, norms,
biases and linears outside the targets (``lm_head`` by default) are not counted; a float model is its dtype's bits.
INT4 g64 symmetric: ``4 + 16/64 = 4.25``; asymmetric: ``4 + (16 + 4)/64 = 4.3125``; INT8 per channel on rows of
576 inputs: ``8 + 16/576``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from normquant.io import atomic_write_bytes

SCALE_BITS = 16  # a weight scale as serving kernels hold it (fp16/bf16); see "Bits per weight" above

COLUMNS = [("recipe", "recipe"), ("weights", "weights"), ("activations", "input activations"),
           ("protocol", "protocol"), ("float_ppl", "float ppl"), ("ppl", "ppl"), ("delta_pct", "vs float"),
           ("quantize_s", "quantize s"), ("commit", "commit")]


class ReportError(ValueError):
    """A results file that cannot be read as a ``normquant run`` record."""


def _spec(d: dict | None, overrides: list) -> str:
    from normquant.quant.spec import QuantSpec

    text = "float" if d is None else QuantSpec.model_validate(d).short()
    return text + (" + overrides" if overrides else "")


def record_row(record: dict[str, Any], source: str = "") -> dict[str, Any]:
    """One table row from a ``results.json`` record (``ReportError`` when it is not one)."""
    try:
        recipe, quantized = record["recipe"], record["quantized"]
        scheme = recipe["scheme"]
        overrides = scheme.get("overrides") or []
        base = (record.get("float") or {}).get("ppl")
        ppl = quantized["ppl"]
        return {
            "recipe": recipe.get("name", "?"),
            "weights": _spec(scheme.get("weights"), [o for o in overrides if "weights" in o]),
            "activations": _spec(scheme.get("input_activations"), [o for o in overrides if "input_activations" in o]),
            "protocol": f"{quantized['dataset']}/{quantized['split']} {quantized['seqlen']}x"
                        f"{quantized['windows']}/{quantized['windows_total']}",
            "float_ppl": base, "ppl": ppl, "delta_pct": 100 * (ppl / base - 1) if base else None,
            "quantize_s": record.get("quantize_seconds"),
            "commit": (record.get("environment") or {}).get("git_commit", "?"),
            "source": source,
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ReportError(f"{source or 'record'} is not a normquant run result (missing {e})") from None


def load_records(paths: list[str | os.PathLike]) -> list[tuple[dict[str, Any], str]]:
    """``(record, source)`` of every results file, in the given order."""
    records = []
    for p in paths:
        try:
            records.append((json.loads(Path(p).read_text()), str(p)))
        except OSError as e:
            raise ReportError(f"cannot read {p}: {e.strerror or e}") from None
        except ValueError as e:
            raise ReportError(f"{p} is not JSON ({e})") from None
    return records


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "—"
    if key in ("float_ppl", "ppl"):
        return f"{v:.3f}"
    if key == "delta_pct":
        return f"{v:+.2f}%"
    if key == "quantize_s":
        return f"{v:.0f}"
    return str(v)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (numbers right-aligned)."""
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    align = "|" + "|".join("---:" if k in ("float_ppl", "ppl", "delta_pct", "quantize_s") else "---"
                           for k, _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, align, *body])


def to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV with raw numbers (no rounding), one header line."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([k for k, _ in COLUMNS] + ["source"])
    for r in rows:
        writer.writerow(["" if r.get(k) is None else r.get(k) for k, _ in COLUMNS] + [r.get("source", "")])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- bits per weight
def weight_bits(spec, out_features: int, in_features: int) -> float:
    """Bits per weight of one ``[out, in]`` weight matrix stored with ``spec`` (a QuantSpec): codes, 16-bit
    scales, zero points at the code width (asymmetric).

    >>> from normquant.quant.spec import QuantSpec
    >>> weight_bits(QuantSpec(bits=4, granularity="group", group_size=64), 576, 576)
    4.25
    """
    numel = out_features * in_features
    scales = 1 if spec.granularity == "tensor" else numel // spec.group_size if spec.granularity == "group" \
        else out_features  # channel (and token): one per output row
    per_scale = SCALE_BITS + (0 if spec.symmetric else spec.bits)
    return spec.bits + scales * per_scale / numel


def bits_per_weight(layers: list[tuple[Any, int, int]], dtype_bits: int) -> float:
    """Bits per weight over ``layers`` ``(weight spec or None = float, out, in)``, weighted by their sizes."""
    if not layers:
        return float(dtype_bits)
    numel = sum(o * i for _, o, i in layers)
    return sum((dtype_bits if s is None else weight_bits(s, o, i)) * o * i for s, o, i in layers) / numel


@lru_cache(maxsize=8)
def _linear_shapes(model: str) -> tuple[tuple[str, Any, int, int], ...]:
    """``(name, module, out, in)`` of every linear of ``model``, built from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from normquant.models.loading import PACKAGED, _auto_class, materialize_packaged
    from normquant.quant.linear import is_conv1d, is_linear

    path = materialize_packaged(model) if model in PACKAGED else Path(model).expanduser()
    gguf = path.name if path.suffix == ".gguf" else None
    src = str(path.parent if gguf else path) if path.exists() else model
    config = AutoConfig.from_pretrained(src, **({"gguf_file": gguf} if gguf else {}))
    with torch.device("meta"):
        net = (AutoModelForCausalLM if _auto_class(src, gguf) == "causal" else AutoModel).from_config(config)
    return tuple((name, m, *(m.weight.shape[::-1] if is_conv1d(m) else m.weight.shape))
                 for name, m in net.named_modules() if is_linear(m))


def record_bits(record: dict[str, Any], source: str = "") -> float:
    """Bits per weight of a ``results.json`` record's recipe on its model (see the module doc)."""
    import torch

    from normquant.messages import one_line
    from normquant.models.loading import resolve_dtype
    from normquant.quant.targets import matches_any
    from normquant.recipe import Scheme

    source = source or "record"
    try:
        recipe = record["recipe"]
        scheme, model = Scheme.model_validate(recipe["scheme"]), recipe["model"]
        dtype_bits = torch.finfo(resolve_dtype(recipe["dtype"])).bits
    except (KeyError, TypeError, ValueError) as e:
        raise ReportError(f"{source}: no scheme, model and dtype to count bits per weight from "
                          f"({type(e).__name__}: {one_line(e, 200)})") from None
    try:
        shapes = _linear_shapes(model)
    except Exception as e:  # the model's config: missing, offline hub id, unknown model_type
        raise ReportError(f"{source}: cannot read the layer shapes of model '{model}' for bits per weight "
                          f"({type(e).__name__}: {one_line(e, 200)})") from None
    targeted = [(name, m, o, i) for name, m, o, i in shapes
                if matches_any(scheme.targets, name, m) and not matches_any(scheme.ignore, name, m)]
    return bits_per_weight([((scheme.specs_for(name, m) or (None,))[0], o, i) for name, m, o, i in targeted],
                           dtype_bits)


# ---------------------------------------------------------------------------------------------- plot
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("--plot needs matplotlib: pip install 'normquant[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_bits(records: list[tuple[dict[str, Any], str]], path: str | os.PathLike) -> list[dict[str, Any]]:
    """Write the PNG of perplexity vs bits per weight (module doc); return the plotted rows, each with ``bits``."""
    plt = _pyplot()
    rows = [{**record_row(r, s), "bits": record_bits(r, s), "model": r["recipe"]["model"],
             "dtype": r["recipe"]["dtype"]} for r, s in records]
    kinds = sorted({(r["model"], r["protocol"]) for r in rows}, key=str)
    if len(kinds) > 1:
        seen = "; ".join(f"{m} {p}" for m, p in kinds)
        raise ReportError(f"records of different models or protocols cannot share one plot ({seen}): "
                          "plot one at a time")
    floats = sorted({(r["float_ppl"], r["dtype"]) for r in rows if r["float_ppl"]})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.scatter([r["bits"] for r in rows], [r["ppl"] for r in rows], color="C0", zorder=3)
    for r in rows:
        ax.annotate(f"{r['recipe']} ({r['bits']:.2f})", (r["bits"], r["ppl"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    for ppl, dtype in floats:
        ax.axhline(ppl, color="gray", ls="--", lw=1, label=f"{dtype} model: {ppl:.3f}")
    ys = [r["ppl"] for r in rows] + [p for p, _ in floats]
    if max(ys) > 3 * min(ys):
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + 16-bit scales + zero points, quantized linears)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{kinds[0][0]}: {kinds[0][1]}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.25)  # room for the labels
    if floats:
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return rows
