"""Recipe validation: every shipped recipe loads; bad keys and values give one clear line."""
from pathlib import Path

import pytest

from normquant.recipe import RecipeError, load_recipe

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.scheme.weights is not None or r.scheme.input_activations is not None
    assert len(r.hash()) == 16


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, message", [
    ("scheme:\n  weights: {bits: 8}\n  weigths: {bits: 4}\n",
     r"r\.yaml:3: unknown key 'scheme\.weigths' \(did you mean 'weights'\?\)"),
    ("scheme:\n  weights: {bits: 0}\n", r"r\.yaml:2: scheme\.weights\.bits: Input should be greater than or equal to 2"),
    ("scheme:\n  weights: {bits: 3.5}\n", r"scheme\.weights\.bits: Input should be a valid integer.*3\.5"),
    ("scheme:\n  weights: {bits: 4, granularity: row}\n", r"granularity: Input should be 'tensor', 'channel', 'group'"),
    ("scheme:\n  weights: {bits: 4}\nsteps: [gtpq]\n", r"unknown step 'gtpq'"),
    ("scheme:\n  weights: {bits: 4}\ncalibration: {split: test}\n", r"calibrating on a test split is refused"),
    ("scheme:\n  weights: {bits: 4}\nevalution: {windows: 4}\n", r"r\.yaml:3: unknown key 'evalution' \(did you mean 'evaluation'\?\)"),
    ("scheme: {}\n", r"scheme quantizes nothing"),
    ("scheme: [\n", r"not valid YAML"),
])
def test_bad_recipes_name_file_key_and_fix(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message) as e:
        load_recipe(_write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_merge_into_sections(tmp_path):
    r = load_recipe(_write(tmp_path, "scheme:\n  weights: {bits: 8}\nevaluation: {seqlen: 512}\n"),
                    {"evaluation": {"windows": 3}, "model": "x/y"})
    assert (r.evaluation.seqlen, r.evaluation.windows, r.model) == (512, 3, "x/y")
