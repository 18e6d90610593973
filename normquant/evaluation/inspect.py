"""``normquant inspect``: per-channel activation ranges at every norm boundary, outlier channels and their persistence.

One float forward pass over a few calibration segments with observers on every mapped norm's output (and
the final norm). The report says, per norm, the per-channel min/max, which channels exceed the outlier
threshold (|x| > 6, LLM.int8()), and, per channel, in how many layers it is an outlier — the picture a user
looks at before choosing per-tensor static, per-channel/RepQuant, SmoothQuant or rotation.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import torch

from normquant.quant.observers import make_observer, observe_modules
from normquant.models.arch import block_mappings, get_architecture, get_blocks, resolve_path


def norm_paths(model) -> list[str]:
    """Every mapped norm of every block, in order, then the final norm."""
    arch = get_architecture(model)
    paths = [m.norm for i in range(len(get_blocks(model, arch))) for m in block_mappings(model, i, arch)]
    if arch.final_norm:
        paths.append(resolve_path(model, arch.final_norm))
    return list(dict.fromkeys(paths))


def _kind_and_layer(path: str) -> tuple[str, int | None]:
    """``model.layers.3.input_layernorm`` -> (``input_layernorm``, 3); the final norm has no layer."""
    m = re.search(r"\.(\d+)\.(.+)$", path)
    return (m.group(2), int(m.group(1))) if m else (path.rsplit(".", 1)[-1], None)


@torch.no_grad()
def inspect_activations(model, calib_ids: torch.Tensor, *, threshold: float = 6.0, batch_size: int = 4) -> dict:
    """Report of per-channel ranges at the norm outputs for ``calib_ids`` ``[N, L]``."""
    paths = norm_paths(model)
    observers = {p: [make_observer("minmax"), make_observer("outliers", threshold=threshold)] for p in paths}
    device = next(model.parameters()).device
    with observe_modules(model, observers, where="output"):
        for i in range(0, calib_ids.shape[0], batch_size):
            model(input_ids=calib_ids[i:i + batch_size].to(device), use_cache=False)
    norms = []
    persistence: dict[str, Counter] = defaultdict(Counter)
    n_layers: Counter = Counter()
    for p in paths:
        mm = observers[p][0].compute()
        lo, hi = mm["min"].float(), mm["max"].float()
        absmax = torch.maximum(lo.abs(), hi.abs())
        outlier = (absmax > threshold).nonzero().flatten().tolist()
        kind, layer = _kind_and_layer(p)
        if layer is not None:
            n_layers[kind] += 1
            persistence[kind].update(outlier)
        norms.append({"name": p, "kind": kind, "layer": layer, "min": [round(v, 4) for v in lo.tolist()],
                      "max": [round(v, 4) for v in hi.tolist()],
                      "absmax_max": absmax.max().item(), "absmax_median": absmax.median().item(),
                      "outlier_channels": outlier})
    persistent = {kind: [{"channel": c, "layers": k, "fraction": k / n_layers[kind]}
                         for c, k in counts.most_common() if k / n_layers[kind] >= 0.25]
                  for kind, counts in persistence.items()}
    return {"samples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]), "threshold": threshold,
            "norms": norms, "persistent_outliers": persistent,
            "summary": {kind: {"layers": n_layers[kind], "layers_with_outliers": sum(
                1 for n in norms if n["kind"] == kind and n["outlier_channels"]),
                "persistent_channels": [d["channel"] for d in persistent[kind]]} for kind in n_layers}}


def plot_report(report: dict, path: str | Path, title: str = "") -> Path:
    """PNG: per norm kind, a layers × channels heatmap of log10 max|x|, outlier channels marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(n["kind"] for n in report["norms"] if n["layer"] is not None))
    fig, axes = plt.subplots(len(kinds) + 1, 1, figsize=(12, 3.2 * (len(kinds) + 1)), squeeze=False)
    for ax, kind in zip(axes[:-1, 0], kinds):
        rows = sorted((n for n in report["norms"] if n["kind"] == kind), key=lambda n: n["layer"])
        amax = torch.tensor([[max(abs(a), abs(b)) for a, b in zip(n["min"], n["max"])] for n in rows])  # [layers, C]
        im = ax.imshow(amax.clamp(min=1e-3).log10(), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_title(f"{kind}: log10 max|x| per channel (outliers |x| > {report['threshold']:g}: "
                     f"{sum(len(n['outlier_channels']) > 0 for n in rows)}/{len(rows)} layers)")
        ax.set_ylabel("layer")
        ax.set_xlabel("channel")
        fig.colorbar(im, ax=ax, fraction=0.02)
        for d in report["persistent_outliers"].get(kind, [])[:8]:
            ax.annotate(str(d["channel"]), (d["channel"], -0.5), color="cyan", fontsize=7, ha="center",
                        va="bottom", annotation_clip=False)
    ax = axes[-1, 0]
    for kind in kinds:
        rows = sorted((n for n in report["norms"] if n["kind"] == kind), key=lambda n: n["layer"])
        ax.plot([n["layer"] for n in rows], [n["absmax_max"] for n in rows], marker="o", label=f"{kind} max")
        ax.plot([n["layer"] for n in rows], [n["absmax_median"] for n in rows], ls="--", label=f"{kind} median")
    ax.axhline(report["threshold"], color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max|x| over channels")
    ax.legend(fontsize=8)
    fig.suptitle(title or f"norm-output ranges ({report['samples']}×{report['seqlen']} calibration tokens)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
