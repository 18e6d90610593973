"""QuantSpec: a frozen, validated description of one uniform quantizer.

Granularity is data (``tensor | channel | group | token``); a group size is only present for ``group``.

>>> QuantSpec(bits=4, granularity="group", group_size=64)
QuantSpec(bits=4, symmetric=True, granularity='group', group_size=64, dynamic=False, clip_ratio=1.0)
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

Granularity = Literal["tensor", "channel", "group", "token"]


class QuantSpec(BaseModel):
    """One quantizer.

    * ``bits``: integer width, 2..8.
    * ``symmetric``: signed grid ``[-2^(b-1), 2^(b-1)-1]`` with zero point 0; otherwise an unsigned grid
      ``[0, 2^b-1]`` with an integer zero point.
    * ``granularity``: one scale for the whole ``tensor``; per ``channel`` (weights: per output row;
      activations: per hidden channel); per ``group`` of ``group_size`` consecutive input elements; per
      ``token`` (one scale per row of the last dimension, activations).
    * ``dynamic``: activation scales computed on the fly for every forward pass (otherwise calibrated once).
    * ``clip_ratio``: the range is shrunk by this factor before the scale is computed (QuaRot uses 0.9).
    * ``outlier_threshold`` (dynamic per-token activations): LLM.int8()'s decomposition — input columns with
      any ``|x| ≥`` this value in a forward pass stay float (:mod:`normquant.quant.llm_int8`; 6.0 in the paper).
    * ``full_range`` (symmetric, not dynamic): use all ``2^b`` codes, ``s = absmax / ((2^b - 1) / 2)`` with the
      code of ``+absmax`` clamped to ``2^(b-1) - 1`` — the GPTQ reference quantizer's symmetric grid (METHODS §6.2:
      scale ``(max - min)/(2^b - 1)``, zero ``2^(b-1)``) and compressed-tensors'. The default restricted grid
      ``s = absmax / (2^(b-1) - 1)`` leaves ``-2^(b-1)`` unused (15 of 16 codes at 4 bits). Dynamic activations
      always compute compressed-tensors' scales (:func:`normquant.quant.primitives.serving_qparams_view`).
    * ``observer`` (static activations): how calibration picks the range — ``minmax`` (the full observed
      range) or ``percentile`` (the RepQ-ViT search, METHODS §5.2: of the clips at the 0.999 / 0.9999 /
      0.99999 quantiles, the one with the lowest fake-quant MSE on the calibration values).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(ge=2, le=8, strict=True)
    symmetric: StrictBool = True
    granularity: Granularity = "channel"
    group_size: int | None = Field(default=None, gt=0, strict=True)
    dynamic: StrictBool = False
    clip_ratio: float = Field(default=1.0, gt=0.0, le=1.0)
    # left out of dumps when false, so that recipes written before the field existed keep their hash
    full_range: StrictBool = Field(False, exclude_if=lambda v: not v)
    observer: Literal["minmax", "percentile"] = "minmax"
    outlier_threshold: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        if self.outlier_threshold is not None and not (self.dynamic and self.granularity == "token"):
            raise ValueError("outlier_threshold (LLM.int8 decomposition) is for dynamic per-token input activations: "
                             "set dynamic: true and granularity: token")
        if self.full_range and (not self.symmetric or self.dynamic):
            raise ValueError("full_range is for symmetric static quantizers (weights, static activations): dynamic "
                             "activations already use compressed-tensors' full grid; remove full_range or set "
                             "symmetric: true")
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs group_size (e.g. group_size: 64)")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only allowed with granularity 'group' (got granularity '{self.granularity}')")
        if self.observer != "minmax" and (self.dynamic or self.granularity not in ("tensor", "channel")):
            raise ValueError(f"observer '{self.observer}' is for static tensor/channel activation quantizers; "
                             "dynamic and token/group quantizers compute their range from each input")
        return self

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def short(self) -> str:
        g = {"group": f"g{self.group_size}", "channel": "ch", "tensor": "t", "token": "tok"}[self.granularity]
        out = f"{self.outlier_threshold:g}" if self.outlier_threshold is not None else None
        sym = ("symfull" if self.full_range else "sym") if self.symmetric else "asym"
        return (f"int{self.bits}-{sym}-{g}{'-dyn' if self.dynamic else ''}"
                + (f"-outliers{out}" if out else ""))
