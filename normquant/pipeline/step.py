"""The step contract: what a recipe step declares, the registry, and the order check.

A step is a pydantic model (its fields are its YAML keys) with up to two phases:

* ``apply_model(model, arch)`` runs once, in recipe order, before block 0's inputs are captured: fusions,
  rotations, anything that edits the whole model (embeddings, every norm, ``lm_head``);
* ``apply_block(ctx)`` runs per block, in recipe order, on a :class:`~normquant.pipeline.runner.BlockContext`
  whose target linears are already :class:`~normquant.quant.linear.QuantLinear` (activation quantizers off).

It declares what it needs, so a recipe's order is checked when it loads:

``needs_data``           needs calibration inputs (``ctx.inputs``); data-free recipes skip the capture
``needs_float_weights``  must see the block's weights before any step quantizes them (RepQuant, norm tweaking)
``quantizes_weights``    leaves the block's weights quantized (RTN, GPTQ, norm tweaking)

and, for pairs the flags cannot express, ``conflict_with(earlier)`` (this step cannot follow that one, e.g.
SmoothQuant's linear -> linear folds after a rotation that leaves online transforms on those linears' inputs,
``online_input_transforms()``).

Steps register themselves with :func:`register_step`. The built-in ones live in ``normquant.methods`` (every
module there is imported on first lookup); other packages add theirs through the ``normquant.steps`` entry-point
group, or by calling :func:`register_step` before the recipe is parsed. No central list is edited.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)


class StepError(ValueError):
    """A step that cannot run on this model or recipe; the message says what to change."""


class Step(BaseModel):
    """One recipe step. Override ``apply_model`` and/or ``apply_block``; declare the class flags."""

    model_config = ConfigDict(extra="forbid")

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False
    needs_float_weights: ClassVar[bool] = False
    quantizes_weights: ClassVar[bool] = False

    def apply_model(self, model, arch) -> None:
        """Model-wide phase (once, before any block); default: nothing."""

    def apply_block(self, ctx) -> None:
        """Per-block phase; default: nothing."""

    def online_input_transforms(self) -> bool:
        """Whether this step leaves online transforms on linear inputs (``QuantLinear.input_transform``)."""
        return False

    def conflict_with(self, earlier: "Step") -> str | None:
        """Why this step cannot run after ``earlier`` (one line, saying what to change), or None."""
        return None

    @classmethod
    def model_wide(cls) -> bool:
        return cls.apply_model is not Step.apply_model

    @classmethod
    def per_block(cls) -> bool:
        return cls.apply_block is not Step.apply_block


STEPS: dict[str, type[Step]] = {}
ENTRY_POINT_GROUP = "normquant.steps"
_discovered = False


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make ``cls`` available to recipes under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"step class {cls.__name__} needs a class attribute `name` (its recipe key)")
    old = STEPS.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"step name '{name}' is taken by {old.__module__}.{old.__qualname__}")
    STEPS[name] = cls
    return cls


def discover_steps() -> dict[str, type[Step]]:
    """Import the built-in methods and the ``normquant.steps`` entry points once; return the registry."""
    global _discovered
    if not _discovered:
        _discovered = True
        methods = importlib.import_module("normquant.methods")
        for info in pkgutil.iter_modules(methods.__path__, "normquant.methods."):
            importlib.import_module(info.name)
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                register_step(ep.load())
            except Exception as e:  # a broken plugin must not take the built-in steps down
                log.warning("step plugin %s could not be loaded: %s", ep.value, e)
    return STEPS


def check_order(steps: list[Step]) -> None:
    """Raise :class:`StepError` naming both steps when the order cannot work.

    * a model-wide step runs before every per-block step, so it must be listed before them;
    * a step that needs float weights cannot follow one that quantizes them;
    * two steps cannot both quantize the weights;
    * a step's own ``conflict_with`` an earlier one.
    """
    for j, later in enumerate(steps):
        for earlier in steps[:j]:
            if later.model_wide() and not earlier.model_wide():
                raise StepError(f"step '{later.name}' is model-wide and runs before every block step: "
                                f"list it before '{earlier.name}'")
            if earlier.quantizes_weights and later.needs_float_weights:
                raise StepError(f"step '{later.name}' needs float weights but '{earlier.name}' before it quantizes "
                                f"them: list '{later.name}' first" + (
                                    " (it quantizes the weights itself: drop the other weight step)"
                                    if later.quantizes_weights else ""))
            if earlier.quantizes_weights and later.quantizes_weights:
                raise StepError(f"steps '{earlier.name}' and '{later.name}' both quantize the weights: keep one")
            conflict = later.conflict_with(earlier)
            if conflict:
                raise StepError(conflict)
