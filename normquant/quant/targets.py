"""Which modules a pattern names: the one matcher of recipes (``targets``, ``ignore``, override ``pattern``)
and of compressed-tensors checkpoints (config group ``targets``, ``ignore``).

A pattern is one of (compressed-tensors 0.20, ``utils/match.py``: ``match_name`` and ``_match_class``)

* ``re:<regex>``: ``re.match`` on the full module name, i.e. anchored at the start of the name (not at its
  end): ``re:.*mlp`` names every module inside an MLP, ``re:mlp`` none of ``model.layers.0.mlp.up_proj``;
* a module name: the exact name (``model.layers.0.mlp.down_proj``);
* a class name: the module's class or one of its base classes (``Linear``, GPT-2's ``Conv1D``);

plus one normquant extension, so that recipes can name a module in every block: a bare name also matches as a
dotted suffix of the full name (``down_proj`` matches ``model.layers.0.mlp.down_proj``, ``lm_head`` matches
``lm_head``). compressed-tensors would read such a pattern as an exact name; normquant's exports write exact
names only, so their meaning is the same for both.

>>> from torch import nn
>>> matches("down_proj", "model.layers.0.mlp.down_proj", nn.Linear(2, 2))
True
>>> matches("re:mlp", "model.layers.0.mlp.up_proj"), matches("re:.*mlp", "model.layers.0.mlp.up_proj")
(False, True)
>>> matches("Linear", "anything", nn.Linear(2, 2)), matches("proj", "model.layers.0.mlp.down_proj")
(True, False)
"""
from __future__ import annotations

import re

from torch import nn

REGEX_PREFIX = "re:"


def matches(pattern: str, name: str, module: nn.Module | None = None) -> bool:
    """True when ``pattern`` names the module ``name`` (``module``, if given, for class names); see the module doc."""
    if pattern.startswith(REGEX_PREFIX):
        return re.match(pattern[len(REGEX_PREFIX):], name) is not None
    if name == pattern or name.endswith("." + pattern):
        return True
    # a QuantLinear answers to the class names of the module it wrapped (``source_type``) as well
    types = (type(module), getattr(module, "source_type", type(module))) if module is not None else ()
    return any(cls.__name__ == pattern for t in types for cls in t.__mro__ if issubclass(cls, nn.Module))


def matches_any(patterns, name: str, module: nn.Module | None = None) -> bool:
    """True when one of ``patterns`` names the module (:func:`matches`)."""
    return any(matches(p, name, module) for p in patterns)
