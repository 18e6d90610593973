"""One target matcher for recipes and exports (normquant.quant.targets), and its agreement with compressed-tensors."""
import pytest
from torch import nn

from normquant.quant.targets import matches, matches_any


class MyLinear(nn.Linear):
    pass


class Conv1D(nn.Module):  # named like GPT-2's
    pass


LIN = nn.Linear(2, 2)

# (pattern, name, module, answer): where recipe.matches (re.search, suffix) and the export's _matches (re.match,
# exact) used to disagree, and the one answer now.
DISAGREED = [
    ("re:mlp", "model.layers.0.mlp.up_proj", LIN, False),  # was True in recipes: re.match is anchored at the start
    ("re:layers\\.1\\.mlp", "model.layers.1.mlp.down_proj", LIN, False),
    ("down_proj", "model.layers.0.mlp.down_proj", LIN, True),  # was False in exports: bare names match as suffix
    ("lm_head", "model.lm_head", LIN, True),
]


@pytest.mark.parametrize("pattern, name, module, answer", DISAGREED)
def test_one_answer_where_the_old_matchers_disagreed(pattern, name, module, answer):
    assert matches(pattern, name, module) is answer


@pytest.mark.parametrize("pattern, name, answer", [
    ("re:.*mlp", "model.layers.0.mlp.up_proj", True),
    ("re:.*layers\\.1\\.mlp", "model.layers.1.mlp.down_proj", True),
    ("re:.*layers\\.1\\.mlp", "model.layers.11.mlp.down_proj", False),
    ("re:model\\.layers\\.\\d+\\.self_attn", "model.layers.3.self_attn.q_proj", True),
    ("down_proj", "model.layers.0.mlp.down_proj", True),
    ("proj", "model.layers.0.mlp.down_proj", False),  # a suffix is whole dotted components
    ("mlp.down_proj", "model.layers.0.mlp.down_proj", True),
    ("lm_head", "lm_head", True),
    ("model.layers.0.mlp", "model.layers.0.mlp.down_proj", False),  # no prefix matching
])
def test_names_and_regexes(pattern, name, answer):
    assert matches(pattern, name, LIN) is answer


def test_class_names_follow_the_class_hierarchy():
    assert matches("Linear", "x", LIN) and matches("Linear", "x", MyLinear(2, 2)) and matches("MyLinear", "x", MyLinear(2, 2))
    assert matches("Conv1D", "h.0.attn.c_attn", Conv1D()) and not matches("Conv1D", "x", LIN)
    assert not matches("Linear", "x", None) and not matches("object", "x", LIN)
    assert matches_any(["lm_head", "Conv1D"], "h.0.mlp.c_fc", Conv1D()) and not matches_any([], "x", LIN)


def test_recipe_and_export_use_this_matcher():
    import normquant.export.checkpoint as checkpoint
    import normquant.recipe as recipe

    assert recipe.matches is matches and checkpoint.matches_any is matches_any
    scheme = recipe.Scheme(ignore=["lm_head", "re:.*layers\\.1\\.mlp"], weights={"bits": 4},
                           overrides=[{"pattern": "down_proj", "weights": {"bits": 8}}])
    assert scheme.specs_for("model.layers.1.mlp.up_proj", LIN) is None
    assert scheme.specs_for("model.layers.0.mlp.down_proj", LIN)[0].bits == 8
    assert scheme.specs_for("model.layers.0.mlp.up_proj", LIN)[0].bits == 4


# Pairs outside normquant's suffix extension (regexes, exact names, class names): compressed-tensors' answer.
CT_PAIRS = [
    ("re:mlp", "model.layers.0.mlp.up_proj"),
    ("re:.*mlp", "model.layers.0.mlp.up_proj"),
    ("re:model\\.layers\\.1\\.", "model.layers.1.mlp.up_proj"),
    ("re:model\\.layers\\.1\\.", "model.layers.11.mlp.up_proj"),
    ("re:.*(q|k|v)_proj$", "model.layers.0.self_attn.k_proj"),
    ("re:.*(q|k|v)_proj$", "model.layers.0.self_attn.o_proj"),
    ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj"),
    ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"),
    ("lm_head", "lm_head"),
    ("Linear", "model.layers.0.mlp.up_proj"),
    ("Embedding", "model.layers.0.mlp.up_proj"),
]


@pytest.mark.parametrize("pattern, name", CT_PAIRS)
@pytest.mark.parametrize("module", [LIN, MyLinear(2, 2)], ids=["Linear", "subclass"])
def test_agrees_with_compressed_tensors(pattern, name, module):
    match = pytest.importorskip("compressed_tensors.utils.match")
    assert matches(pattern, name, module) == match.is_match(name, module, pattern)


def test_suffix_extension_is_the_only_difference_from_compressed_tensors():
    match = pytest.importorskip("compressed_tensors.utils.match")
    name = "model.layers.0.mlp.down_proj"
    assert matches("down_proj", name, LIN) and not match.is_match(name, LIN, "down_proj")
