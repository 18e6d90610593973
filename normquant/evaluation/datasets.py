"""Which split each evaluation set is measured on (one place for the CLI, the API and the reports).

>>> eval_split("wikitext2"), eval_split("ptb"), eval_split("c4")
('test', 'test', 'validation')
"""
from __future__ import annotations

#: evaluation set -> the split perplexity is reported on (C4's test split is not distributed)
EVAL_SPLITS = {"wikitext2": "test", "ptb": "test", "c4": "validation"}


def eval_split(dataset: str) -> str:
    """The split perplexity on ``dataset`` is measured on; ValueError for an unknown set."""
    try:
        return EVAL_SPLITS[dataset]
    except KeyError:
        raise ValueError(f"unknown evaluation set '{dataset}'; use one of {', '.join(EVAL_SPLITS)}") from None
