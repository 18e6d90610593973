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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from normquant.messages import one_line, show
from normquant.pipeline.step import Step, check_order, discover_steps
from normquant.quant.kv import KVCacheSpec
from normquant.quant.spec import QuantSpec
from normquant.quant.targets import matches


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says where and what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _parse_step(entry: Any) -> Step:
    """A step is written ``name`` or ``{name: {field: value}}``."""
    steps = discover_steps()
    if isinstance(entry, Step):
        return entry
    if isinstance(entry, str):
        name, fields = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, fields = next(iter(entry.items()))
        fields = {} if fields is None else fields
    else:
        raise ValueError(f"a step is a name or a one-key mapping {{name: {{...}}}}, got {show(entry)}")
    if not isinstance(name, str) or name not in steps:
        raise ValueError(f"unknown step {show(name)}{_hint(str(name), steps)}; available: {', '.join(sorted(steps))}")
    try:
        return steps[name].model_validate(fields)
    except ValidationError as e:
        msgs = []
        for err in e.errors()[:3]:
            key = ".".join(str(p) for p in err["loc"]) or "<options>"
            if err["type"] == "extra_forbidden":
                msgs.append(f"unknown key '{one_line(key, 80)}'{_hint(key, steps[name].model_fields)}")
            else:
                msgs.append(f"{key}: {err['msg']} (got {show(err.get('input'))})")
        raise ValueError(f"step '{name}': {'; '.join(msgs)}") from None


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
    """Which linears are quantized and how. Patterns (:mod:`normquant.quant.targets`, compressed-tensors' rules): a
    class name (``Linear``, GPT-2 ``Conv1D``), a module name or dotted name suffix (``lm_head``, ``down_proj``), or a
    regular expression prefixed ``re:``, matched from the start of the full name (``re.match``: ``re:.*mlp``)."""

    targets: list[str] = ["Linear", "Conv1D"]
    ignore: list[str] = ["lm_head"]
    weights: QuantSpec | None = None
    input_activations: QuantSpec | None = None
    overrides: list[Override] = []
    # keys/values stored quantized (normquant.quant.kv, .kv_cache); left out of dumps when absent, so the hash of a
    # recipe without it is unchanged
    kv_cache: KVCacheSpec | None = Field(None, exclude_if=lambda v: v is None)

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
        if v is None:
            v = []
        if not isinstance(v, (list, tuple)):
            example = f"[{v}]" if isinstance(v, str) else "[rtn] or [{gptq: {block_size: 128}}]"
            raise ValueError(f"steps is a list of steps: write steps: {one_line(example, 60)}")
        steps = [_parse_step(e) for e in v]
        check_order(steps)  # StepError is a ValueError: reported with the recipe's file and line
        return steps

    @model_validator(mode="after")
    def _weights_or_steps(self) -> "Recipe":
        s = self.scheme
        if s.weights is None and s.input_activations is None and not s.overrides and s.kv_cache is None:
            raise ValueError("scheme quantizes nothing: give scheme.weights, scheme.input_activations and/or "
                             "scheme.kv_cache")
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
#: a recipe file larger than this is refused before it is parsed (shipped recipes are ~1 KB)
MAX_RECIPE_BYTES = 1 << 20
#: values a recipe may hold once its aliases are expanded (shipped recipes: < 100); refuses "billion laughs"
MAX_RECIPE_NODES = 10_000
#: nesting depth of mappings and lists (shipped recipes: 4)
MAX_RECIPE_DEPTH = 32
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
#: plain scalars are resolved by YAML 1.1's rules except dates/times and "=", which stay text
_DROPPED_RESOLVERS = {"tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that cannot be blown up: no explicit tags (``!!int``, ``!!timestamp``, ``!python/...``),
    aliases expanded to at most :data:`MAX_RECIPE_NODES` values and never into themselves, nesting at most
    :data:`MAX_RECIPE_DEPTH` deep, mapping keys that are text and appear once. Refusals are YAML errors with a
    line and column."""

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED_RESOLVERS]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values it expands to (aliases counted in full)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} refers to a value that contains "
                                                  "it (a self-referencing anchor); write the value out",
                                                  event.start_mark)
            return node
        if event.tag is not None:
            tag = event.tag.replace("tag:yaml.org,2002:", "!!")
            raise yaml.composer.ComposerError(None, None, f"explicit YAML tag {one_line(tag, 60)} is not accepted in "
                                              "a recipe; write the plain value (bits: 8, not bits: !!int '8')",
                                              event.start_mark)
        self._depth += 1
        if self._depth > MAX_RECIPE_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"values nested more than {MAX_RECIPE_DEPTH} deep; a recipe "
                                              "is a few levels of mappings and lists", event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        size = 1 + sum(self._sizes[id(c)] for c in children)
        if size > MAX_RECIPE_NODES:
            raise yaml.composer.ComposerError(None, None, f"this value expands to more than {MAX_RECIPE_NODES:,} values "
                                              "(aliases of aliases?); a recipe is small: write it out",
                                              node.start_mark)
        self._sizes[id(node)] = size
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, Any] = {}
            for key, _ in node.value:
                if key.tag == _MERGE_TAG:
                    continue
                if isinstance(key, yaml.ScalarNode) and key.tag == _STR_TAG:
                    if key.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key '{one_line(key.value, 80)}' (first at line "
                            f"{seen[key.value].line + 1}); keep one", key.start_mark)
                    seen[key.value] = key.start_mark
            self.flatten_mapping(node)  # merge keys (<<: *base) first, so merged keys are checked too
            for key, _ in node.value:
                if not (isinstance(key, yaml.ScalarNode) and key.tag == _STR_TAG):
                    if isinstance(key, yaml.ScalarNode):
                        kind = key.tag.rsplit(":", 1)[-1]
                        what = f"key {show(key.value)} (which YAML reads as {'a' if kind != 'int' else 'an'} {kind})"
                    else:
                        what = f"a {key.id} as a key"
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{what} is not a name; recipe keys are words such as 'bits' or 'gptq'",
                        key.start_mark)
        return yaml.constructor.BaseConstructor.construct_mapping(self, node, deep=deep)


def _hint(key: str, valid) -> str:
    close = difflib.get_close_matches(key, [str(v) for v in valid], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _yaml_error(source: str, e: yaml.YAMLError) -> RecipeError:
    """``file:line:column: problem`` from a PyYAML error (its context, when it adds anything, in parentheses)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    extra = ""
    if context and cmark is not None and mark is not None and (cmark.line, cmark.column) != (mark.line, mark.column):
        extra = f" ({one_line(context, 80)} at line {cmark.line + 1}, column {cmark.column + 1})"
    return RecipeError(f"{where}: not valid YAML: {one_line(problem, 200)}{extra}")


def _read_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """The YAML document in ``text`` and the line of every key path; every failure is a :class:`RecipeError`."""
    loader = None
    try:
        loader = _RecipeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None, {}
        data = loader.construct_document(node)
    except yaml.reader.ReaderError as e:  # a control character: no mark, a position
        line = text[:e.position].count("\n") + 1
        raise RecipeError(f"{source}:{line}: not valid YAML: character {e.character:#x} is not allowed in YAML text"
                          ) from None
    except yaml.YAMLError as e:
        raise _yaml_error(source, e) from None
    except RecursionError:
        raise RecipeError(f"{source}: values nested too deeply") from None
    except (ValueError, TypeError, OverflowError, MemoryError) as e:  # e.g. an integer of 5,000 digits
        what = "an integer of more than 4,300 digits" if "digits" in str(e) else one_line(e, 160)
        raise RecipeError(f"{source}: a value cannot be read: {what}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, _line_index(node)


def _line_index(root) -> dict[tuple, int]:
    """Map of key path -> 1-based line, from the composed YAML nodes (an aliased node is walked once)."""
    lines: dict[tuple, int] = {}
    seen: set[int] = set()
    stack = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    lines.setdefault(path + (k.value,), k.start_mark.line + 1)
                    stack.append((v, path + (k.value,)))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines.setdefault(path + (i,), v.start_mark.line + 1)
                stack.append((v, path + (i,)))
    return lines


def _valid_keys(loc: tuple) -> list[str]:
    """Field names valid at the parent of ``loc`` (for the 'closest key' hint)."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            model = discover_steps().get(part) if isinstance(part, str) else None
            continue
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
        if model is None and getattr(ann, "__origin__", None) is list:
            inner = ann.__args__[0]
            model = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return list(model.model_fields) if model else []


_MAX_ERRORS = 3
_PYDANTIC_LOC = re.compile(r"^[a-z][a-z-]*\[.*\]$")  # pydantic's own location parts: function-after[...]


def _format_errors(err: ValidationError, source: str, lines: dict, from_cli: set | None = None) -> str:
    msgs = []
    errors = err.errors()
    for e in errors[:_MAX_ERRORS]:
        # pydantic's own location parts ("function-after[_check(), QuantSpec]") are not keys
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and _PYDANTIC_LOC.match(p)))
        where = ".".join(str(p) for p in loc) or "<top>"
        msg = e["msg"].removeprefix("Value error, ")
        if from_cli and any(loc[:i] in from_cli for i in range(1, len(loc) + 1)):
            msgs.append(f"{where} = {show(e.get('input'))} (set on the command line): {msg}")
            continue
        line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
        at = f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            msgs.append(f"{at}: unknown key '{one_line(where, 120)}'"
                        f"{_hint(str(loc[-1]), _valid_keys(loc)) if loc else ''}")
        elif "input" in e and not isinstance(e.get("input"), dict) and "(got " not in msg:
            msgs.append(f"{at}: {one_line(where, 120)}: {msg} (got {show(e.get('input'))})")
        else:
            msgs.append(f"{at}: {one_line(where, 120)}: {msg}")
    if len(errors) > _MAX_ERRORS:
        msgs.append(f"and {len(errors) - _MAX_ERRORS} more")
    return "; ".join(msgs)


def _calibration_reason(recipe: Recipe) -> str:
    steps = [s.name for s in recipe.steps if s.needs_data]
    return f"step '{steps[0]}'" if steps else "static input activations"


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Load and validate a recipe YAML; ``overrides`` are merged on top (``{"evaluation": {"windows": 16}}``).

    Every problem is a one-line :class:`RecipeError` naming the file, line (and column for YAML syntax) and what
    to change. The file is at most :data:`MAX_RECIPE_BYTES`; aliases, nesting, tags and duplicate keys are
    refused as described in :class:`_RecipeLoader`. A recipe that needs calibration data must say so with a
    ``calibration`` section (``calibration: {}`` takes the defaults), so a static recipe never silently
    calibrates on 128 x 2048 tokens of C4.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise RecipeError(f"recipe file not found: {path}")
        if not path.is_file():
            raise RecipeError(f"recipe {path} is not a file")
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size:,} bytes, larger than the {MAX_RECIPE_BYTES:,} a recipe may have")
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror or e}") from None
    return loads_recipe(raw, str(path), overrides)


def loads_recipe(text: str | bytes, source: str = "<recipe>", overrides: dict | None = None) -> Recipe:
    """:func:`load_recipe` for YAML already in memory (``source`` names it in messages)."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source}: larger than the {MAX_RECIPE_BYTES:,} bytes a recipe may have")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise RecipeError(f"{source}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); a recipe is a YAML text "
                          "file") from None
    data, lines = _read_yaml(text, source)
    if data is None:
        raise RecipeError(f"{source}: the recipe is empty; it needs at least a scheme section (see recipes/)")
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping (key: value lines), got a {type(data).__name__}")
    recipe = parse_recipe(data, source, lines, overrides)
    if recipe.needs_data and "calibration" not in data:
        raise RecipeError(f"{source}: this recipe needs calibration data ({_calibration_reason(recipe)}) but has no "
                          "calibration section; add one, e.g. calibration: {dataset: c4, samples: 128, seqlen: 2048} "
                          "(calibration: {} takes these defaults)")
    return recipe


def _merge_overrides(data: dict, overrides: dict, source: str, lines: dict) -> set[tuple]:
    """Merge ``overrides`` into ``data`` in place; return the key paths they set."""
    paths: set[tuple] = set()
    for section, values in overrides.items():
        if isinstance(values, dict):
            existing = data.get(section)
            if existing is not None and not isinstance(existing, dict):
                line = lines.get((section,))
                at = f"{source}:{line}" if line else source
                raise RecipeError(f"{at}: {section}: must be a mapping such as {section}: "
                                  f"{{{next(iter(values), 'key')}: ...}} to take --{next(iter(values), '')} from the "
                                  f"command line (got {show(existing)})")
            data[section] = {**(existing or {}), **values}
            paths.update((section, k) for k in values)
        else:
            data[section] = values
            paths.add((section,))
    return paths


def parse_recipe(data: dict, source: str = "<recipe>", lines: dict | None = None, overrides: dict | None = None) -> Recipe:
    """Validate a recipe given as a dict (``data`` is not modified); errors are one-line :class:`RecipeError`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping, got a {type(data).__name__}")
    data = dict(data)
    from_cli = _merge_overrides(data, overrides or {}, source, lines or {})
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, source, lines or {}, from_cli)) from None
    except RecursionError:
        raise RecipeError(f"{source}: values nested too deeply (a value that contains itself?)") from None
