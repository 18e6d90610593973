"""Results tables from ``normquant run`` records (``out/<recipe>/results.json``): Markdown or CSV.

    normquant report out/*/results.json              # Markdown on stdout
    normquant report out/*/results.json --format csv --output results.csv

One row per record: recipe, weights and input-activation specs, the protocol (dataset/split, seqlen, windows
used of total), float and quantized perplexity, the change, quantization seconds, and the commit the numbers came
from (``-dirty`` = uncommitted changes). Rows measured under different protocols are not comparable; the
protocol column says so.

>>> rows = [{"recipe": "w8a8-rtn", "weights": "int8-sym-ch", "activations": "int8-sym-tok-dyn",
...          "protocol": "wikitext2/test 2048x4/148", "float_ppl": 24.145, "ppl": 25.075, "delta_pct": 3.85,
...          "quantize_s": 12.0, "commit": "87a3d88"}]
>>> print(to_markdown(rows).splitlines()[2])
| w8a8-rtn | int8-sym-ch | int8-sym-tok-dyn | wikitext2/test 2048x4/148 | 24.145 | 25.075 | +3.85% | 12 | 87a3d88 |
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

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


def load_rows(paths: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """Rows of every results file, in the given order."""
    rows = []
    for p in paths:
        try:
            record = json.loads(Path(p).read_text())
        except OSError as e:
            raise ReportError(f"cannot read {p}: {e.strerror or e}") from None
        except ValueError as e:
            raise ReportError(f"{p} is not JSON ({e})") from None
        rows.append(record_row(record, str(p)))
    return rows


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
