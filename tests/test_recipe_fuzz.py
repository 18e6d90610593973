"""Fuzz of the recipe loader (hypothesis): whatever the YAML, ``loads_recipe`` returns a Recipe or raises a one-line
:class:`RecipeError` — never a ``TypeError``, ``RecursionError``, ``MemoryError``... and never a multi-megabyte
message.

Three generators: mutated shipped recipes (YAML-significant snippets inserted, lines dropped, swapped and
re-indented: aliases, tags, merge keys, flow/block mixes, odd scalars); structured recipes (random trees over the
schema's own keys, so validation is reached deep down) dumped as block or flow YAML; and valid recipes with one
subtree replaced by a random value — each with random command-line overrides. The suite runs a bounded number
of examples (< 20 s); ``scripts/eval_recipe_fuzz.py`` runs the same properties for 20,000+ cases and records
the counts in ``eval/recipe_fuzz.json``.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normquant.messages import MAX_MESSAGE
from normquant.recipe import RecipeError, loads_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
BASE_TEXTS = [p.read_text() for p in RECIPES] + [
    "scheme:\n  weights: {bits: 8}\nsteps: [rtn]\n",
    "scheme:\n  weights: &b {bits: 4, granularity: group, group_size: 64}\n  overrides:\n"
    "    - {pattern: down_proj, weights: *b}\n",
    "scheme:\n  weights: {<<: {bits: 8}, granularity: channel}\n",
]
SNIPPETS = ["&a ", "*a", "&b [*b]", "*b", "!!int ", "!!str ", "!!timestamp ", "!!binary ", "!!python/name:os.system ",
            "!local ", "<<: *a\n", "<<: [*a, *b]\n", "? ", "- ", ": ", ":", "{", "}", "[", "]", ",", "\n", "\t", "  ",
            "    ", "null", "~", "yes", "no", "on", "1e309", ".nan", "-.inf", "0x1F", "0o17", "0b101", "1_000",
            "1:30:00", "2024-01-01", "9" * 40, "'", '"', "\\", "|\n", ">-\n", "#", "%YAML 1.1\n", "---\n", "...\n",
            "@", "`", "\x00", "\ufeff", "é", "\U0001d518", "\r", "\x85", "=", "-1", "0", "2.5", "steps: rtn\n",
            "steps: [{null: 1}]\n", "bits: ", "gptq", "rtn", "scheme:", "weights:", "calibration:", "evaluation:",
            "{bits: 8}", "[rtn, gptq]"]
KEYS = ["name", "description", "model", "dtype", "device", "scheme", "targets", "ignore", "weights",
        "input_activations", "overrides", "pattern", "bits", "symmetric", "granularity", "group_size", "dynamic",
        "clip_ratio", "observer", "steps", "rtn", "gptq", "repquant", "norm_tweak", "smoothquant", "rotate",
        "fuse_norms", "mse", "block_size", "dampening", "act_order", "mode", "epochs", "lr", "calibration",
        "dataset", "split", "samples", "seqlen", "seed", "batch_size", "evaluation", "windows", "baseline", "export",
        "enabled", "path", "force"]
WORDS = ["tensor", "channel", "group", "token", "minmax", "percentile", "c4", "wikitext2", "ptb", "selfgen",
         "validation", "test", "float32", "float16", "bfloat16", "cpu", "cuda", "auto", "Linear", "lm_head",
         "re:.*mlp", "re:(", "rtn", "gptq", "repquant", "norm_tweak", "reparameterize", "per_channel"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(), st.sampled_from([0, 1, 2, 3, 4, 8, 9, 16, 64]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(WORDS), st.text(max_size=20),
    st.sampled_from(KEYS))
keys = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=12))
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(keys, inner, max_size=5)), max_leaves=25)
overrides = st.fixed_dictionaries({}, optional={
    "evaluation": st.fixed_dictionaries({}, optional={"windows": st.one_of(st.integers(), st.none()),
                                                      "seqlen": st.one_of(st.integers(), st.none())}),
    "model": st.one_of(st.sampled_from(["smollm2-135m", "x/y", ""]), st.text(max_size=10)),
    "device": st.sampled_from(["cpu", "cuda", "auto", "tpu"]),
    "dtype": st.sampled_from(["float32", "bfloat16", "float8", ""]),
})


@st.composite
def mutated_texts(draw) -> str:
    text = draw(st.sampled_from(BASE_TEXTS))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["insert", "insert", "delete", "replace", "dup_line", "drop_line", "swap", "indent"]))
        lines = text.split("\n")
        if op == "insert":
            i = draw(st.integers(0, len(text)))
            text = text[:i] + draw(st.one_of(st.sampled_from(SNIPPETS), st.text(max_size=4))) + text[i:]
        elif op == "delete" and text:
            i = draw(st.integers(0, len(text) - 1))
            text = text[:i] + text[i + draw(st.integers(1, 12)):]
        elif op == "replace" and text:
            i = draw(st.integers(0, len(text) - 1))
            text = text[:i] + draw(st.sampled_from(SNIPPETS)) + text[i + 1:]
        elif op == "dup_line":
            i = draw(st.integers(0, len(lines) - 1))
            text = "\n".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])
        elif op == "drop_line":
            i = draw(st.integers(0, len(lines) - 1))
            text = "\n".join(lines[:i] + lines[i + 1:])
        elif op == "swap" and len(lines) > 1:
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif op == "indent":
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = draw(st.sampled_from(["", " ", "  ", "    ", "\t"])) + lines[i].lstrip()
            text = "\n".join(lines)
    return text


def _dump(data, flow: bool) -> str:
    try:
        return yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True, sort_keys=False)
    except yaml.YAMLError:
        return repr(data)


@st.composite
def structured_texts(draw) -> str:
    data = draw(st.dictionaries(keys, trees, max_size=8))
    return _dump(data, draw(st.booleans()))


@st.composite
def perturbed_texts(draw) -> str:
    """A valid recipe with one subtree replaced: validation is reached below the top level."""
    data = yaml.safe_load(draw(st.sampled_from(BASE_TEXTS[:len(RECIPES)])))
    node, path = data, []
    for _ in range(draw(st.integers(0, 4))):
        if isinstance(node, dict) and node:
            k = draw(st.sampled_from(sorted(node, key=str)))
        elif isinstance(node, list) and node:
            k = draw(st.integers(0, len(node) - 1))
        else:
            break
        path.append((node, k))
        node = node[k]
    value = draw(trees)
    if path:
        parent, k = path[-1]
        parent[k] = value
    elif isinstance(data, dict):
        data[draw(keys)] = value
    return _dump(data, draw(st.booleans()))


#: outcome counts of the calls made so far (the long run reads them)
COUNTS: Counter = Counter()
FAILURES: list = []


def check(text: str, over: dict, raise_on_failure: bool = True) -> None:
    """The property: a Recipe or a one-line, bounded RecipeError; nothing else."""
    try:
        recipe = loads_recipe(text, "fuzz.yaml", over or None)
        recipe.hash()
        recipe.to_dict()
        _ = recipe.needs_data
    except RecipeError as e:
        msg = str(e)
        ok = "\n" not in msg and len(msg) <= MAX_MESSAGE * 3
        COUNTS["RecipeError" if ok else "bad message"] += 1
        if not ok:
            FAILURES.append({"kind": "bad message", "text": text[:2000], "message": msg[:500]})
            if raise_on_failure:
                raise AssertionError(f"message not one bounded line ({len(msg)} characters): {msg[:300]}")
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        COUNTS[type(e).__name__] += 1
        FAILURES.append({"kind": type(e).__name__, "text": text[:2000], "message": str(e)[:500]})
        if raise_on_failure:
            raise
        return
    COUNTS["accepted"] += 1


FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@FUZZ
@given(mutated_texts(), overrides)
def test_mutated_recipes(text, over):
    check(text, over)


@FUZZ
@given(structured_texts(), overrides)
def test_structured_recipes(text, over):
    check(text, over)


@FUZZ
@given(perturbed_texts(), overrides)
def test_perturbed_recipes(text, over):
    check(text, over)


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes(data):
    check(data, {})


def test_the_generators_reach_acceptance_and_refusal():
    """Sanity: the fuzz is not all syntax errors — some recipes load, most are refused."""
    COUNTS.clear()
    for text in BASE_TEXTS:
        check(text, {})
    assert COUNTS["accepted"] == len(BASE_TEXTS) and math.isfinite(len(FAILURES))
