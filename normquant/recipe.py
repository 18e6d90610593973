"""Recipes: the quantization scheme, ordered steps, calibration, evaluation and export, from YAML.

Validation is strict: an unknown key names the file, its line, the key and the closest valid key; a bad
value says what is allowed.

.. code-block:: yaml

    name: w8a8-rtn
    model: smollm2-135m
    scheme:
      ignore: [lm_head]
      weights: {bits: 8, granularity: channel}
      input_activations: {bits: 8, granularity: token, dynamic: true}
    steps: [rtn]
    evaluation: {dataset: wikitext2, seqlen: 2048, windows: 16}
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from normquant.quant.spec import QuantSpec


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says where and what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- steps
class Step(_Strict):
    """One recipe step. Fields are its YAML keys; ``apply_block`` runs it on one block (see BlockContext)."""

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False  # needs calibration inputs (runs inside the sequential block runner)

    def apply_block(self, ctx) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


STEPS: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    STEPS[cls.name] = cls
    return cls


def _parse_step(entry: Any) -> Step:
    """A step is written ``name`` or ``{name: {field: value}}``."""
    _load_steps()
    if isinstance(entry, Step):
        return entry
    if isinstance(entry, str):
        name, fields = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, fields = next(iter(entry.items()))
        fields = fields or {}
    else:
        raise ValueError(f"a step is a name or a one-key mapping {{name: {{...}}}}, got {entry!r}")
    if name not in STEPS:
        raise ValueError(f"unknown step '{name}'{_hint(name, STEPS)}; available: {', '.join(sorted(STEPS))}")
    try:
        return STEPS[name].model_validate(fields)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                msgs.append(f"unknown key '{key}'{_hint(key, STEPS[name].model_fields)}")
            else:
                msgs.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        raise ValueError(f"step '{name}': {'; '.join(msgs)}") from None


def _load_steps() -> None:
    import normquant.steps  # noqa: F401  (registers the built-in steps)


# ---------------------------------------------------------------------------------------------- scheme
def _weights_minmax(spec: QuantSpec | None) -> QuantSpec | None:
    if spec is not None and spec.observer != "minmax":
        raise ValueError(f"weights take no observer (got '{spec.observer}'); for a searched weight range use "
                         "the steps rtn: {mse: true} or gptq: {mse: true}")
    return spec


class Override(_Strict):
    """Mixed precision by pattern: modules matching ``pattern`` get these specs (``null`` keeps them float)."""

    pattern: str
    weights: QuantSpec | None = None
    input_activations: QuantSpec | None = None

    _check_weights = field_validator("weights")(_weights_minmax)


class Scheme(_Strict):
    """Which linears are quantized and how. Patterns: a class name (``Linear``, GPT-2 ``Conv1D``), a module name or name suffix
    (``lm_head``, ``down_proj``), or a regular expression prefixed ``re:`` (searched in the full name)."""

    targets: list[str] = ["Linear", "Conv1D"]
    ignore: list[str] = ["lm_head"]
    weights: QuantSpec | None = None
    input_activations: QuantSpec | None = None
    overrides: list[Override] = []

    _check_weights = field_validator("weights")(_weights_minmax)

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes_compile(cls, v: list[str]) -> list[str]:
        for p in v:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"bad regular expression '{p}': {e}") from None
        return v

    def specs_for(self, name: str, module) -> tuple[QuantSpec | None, QuantSpec | None] | None:
        """The (weight, input) specs of module ``name``, or None if it is not quantized."""
        if any(matches(p, name, module) for p in self.ignore) or not any(matches(p, name, module) for p in self.targets):
            return None
        specs = (self.weights, self.input_activations)
        for o in self.overrides:
            if matches(o.pattern, name, module):
                specs = (o.weights, o.input_activations)
        return None if specs == (None, None) else specs


def matches(pattern: str, name: str, module) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or type(module).__name__ == pattern


# ---------------------------------------------------------------------------------------------- sections
class Calibration(_Strict):
    """Calibration data: random segments of a text set, or ``selfgen`` (generated by the model itself)."""

    dataset: Literal["c4", "wikitext2", "ptb", "selfgen"] = "c4"
    split: str = "validation"
    samples: int = Field(128, gt=0)
    seqlen: int = Field(2048, gt=1)
    seed: int = 0
    batch_size: int = Field(8, gt=0)

    @field_validator("split")
    @classmethod
    def _no_test(cls, v: str) -> str:
        if v == "test":
            raise ValueError("calibrating on a test split is refused; use validation/train data (default: c4 validation)")
        return v


class Evaluation(_Strict):
    dataset: Literal["wikitext2", "ptb", "c4"] = "wikitext2"
    split: str = "test"
    seqlen: int = Field(2048, gt=1)
    windows: int | None = Field(None, gt=0)
    batch_size: int = Field(1, gt=0)
    baseline: bool = True  # also evaluate the float model


class Export(_Strict):
    enabled: bool = False
    path: str | None = None
    force: bool = False


class Recipe(_Strict):
    name: str = "recipe"
    description: str = ""
    model: str = "smollm2-135m"
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    device: str = "cpu"
    scheme: Scheme
    steps: list[Any] = []
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    export: Export = Export()

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, v):
        return [_parse_step(e) for e in (v or [])]

    @model_validator(mode="after")
    def _weights_or_steps(self) -> "Recipe":
        if self.scheme.weights is None and self.scheme.input_activations is None and not self.scheme.overrides:
            raise ValueError("scheme quantizes nothing: give scheme.weights and/or scheme.input_activations")
        return self

    @property
    def needs_data(self) -> bool:
        static = [s for s in [self.scheme.input_activations] + [o.input_activations for o in self.scheme.overrides]
                  if s is not None and not s.dynamic]
        return bool(static) or any(s.needs_data for s in self.steps)

    def to_dict(self) -> dict:
        d = self.model_dump(mode="json", exclude={"steps"})
        d["steps"] = [{s.name: s.model_dump(mode="json")} for s in self.steps]
        return d

    def hash(self) -> str:
        """Hash of the quantization-relevant content (scheme, steps, calibration)."""
        d = self.to_dict()
        key = {k: d[k] for k in ("scheme", "steps", "calibration")}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- loading
def _hint(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _line_index(text: str) -> dict[tuple, int]:
    """Map of key path -> 1-based line in the YAML text."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _valid_keys(loc: tuple) -> list[str]:
    """Field names valid at the parent of ``loc`` (for the 'closest key' hint)."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            _load_steps()
            model = STEPS.get(part)
            continue
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
        if model is None and getattr(ann, "__origin__", None) is list:
            inner = ann.__args__[0]
            model = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return list(model.model_fields) if model else []


def _format_errors(err: ValidationError, source: str, lines: dict) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("function-after[_check(), QuantSpec]",)))
        where = ".".join(str(p) for p in loc) or "<top>"
        line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
        at = f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            msgs.append(f"{at}: unknown key '{where}'{_hint(key, _valid_keys(loc))}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            msgs.append(f"{at}: {where}: {msg} (got {e.get('input')!r})" if "input" in e and not isinstance(
                e.get("input"), dict) else f"{at}: {where}: {msg}")
    return "; ".join(msgs)


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Load and validate a recipe YAML; ``overrides`` are merged on top (``{"evaluation": {"windows": 16}}``)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    return parse_recipe(data, str(path), _line_index(text), overrides)


def parse_recipe(data: dict, source: str = "<recipe>", lines: dict | None = None, overrides: dict | None = None) -> Recipe:
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            data[section] = {**(data.get(section) or {}), **values}
        else:
            data[section] = values
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, source, lines or {})) from None
