"""Evaluation and calibration text: WikiText-2, PTB, C4, through ``datasets`` or local files.

By default the sets load through Hugging Face ``datasets``. With ``data_dir`` (or ``$NORMQUANT_DATA_DIR``) they
load from local files laid out like the offline copies (``wiki.test.raw``, ``ptb.test.txt``,
``c4_validation_2k.parquet``). Both paths give the same rows, hence the same text and token count.

>>> rows = load_rows("wikitext2", "test", data_dir="../shared/data")  # doctest: +SKIP
>>> len(rows), rows[1]                                                 # doctest: +SKIP
(4358, ' = Robert Boulter = \\n')
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)


class DataError(ValueError):
    pass


def _wikitext_rows_from_lines(lines: list[str]) -> list[str]:
    # datasets' wikitext builder: one row per line, trailing "\n" kept; whitespace-only lines become "".
    return [line if line.strip() else "" for line in lines]


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return f.readlines()


@dataclass(frozen=True)
class TextSource:
    hub: Callable[[str], list[str]]  # split -> rows, through `datasets`
    local: dict[str, str]  # split -> file name in data_dir
    read_local: Callable[[Path], list[str]]
    join: str  # how rows are joined into one evaluation text (the GPTQ protocol)


def _hub_wikitext(split: str) -> list[str]:
    from datasets import load_dataset

    return load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"]


def _hub_ptb(split: str) -> list[str]:
    from datasets import load_dataset

    return load_dataset("ptb-text-only/ptb_text_only", "penn_treebank", split=split)["sentence"]


def _hub_c4(split: str) -> list[str]:
    from datasets import load_dataset

    shard = {"validation": "en/c4-validation.00000-of-00008.json.gz", "train": "en/c4-train.00000-of-01024.json.gz"}
    return load_dataset("allenai/c4", data_files={split: shard[split]}, split=split)["text"]


def _read_parquet_text(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


SOURCES: dict[str, TextSource] = {
    "wikitext2": TextSource(_hub_wikitext, {"test": "wiki.test.raw"},
                            lambda p: _wikitext_rows_from_lines(_read_lines(p)), "\n\n"),
    # ptb_text_only rows are the lines of Mikolov's file without the trailing newline
    "ptb": TextSource(_hub_ptb, {"test": "ptb.test.txt"}, lambda p: [l.rstrip("\n") for l in _read_lines(p)], " "),
    "c4": TextSource(_hub_c4, {"validation": "c4_validation_2k.parquet"}, _read_parquet_text, "\n\n"),
}


def default_data_dir() -> str | None:
    return os.environ.get("NORMQUANT_DATA_DIR") or None


def load_rows(name: str, split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Rows of dataset ``name`` / ``split``: from ``data_dir`` if given (or ``$NORMQUANT_DATA_DIR``), else ``datasets``."""
    if name not in SOURCES:
        raise DataError(f"unknown dataset '{name}'; available: {', '.join(SOURCES)}")
    src = SOURCES[name]
    data_dir = data_dir or default_data_dir()
    if data_dir is None:
        try:
            return src.hub(split)
        except Exception as e:  # network, missing split, ...
            raise DataError(f"could not load {name}/{split} through datasets ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); pass --data-dir with local copies") from None
    if split not in src.local:
        raise DataError(f"no local file for {name}/{split}; local splits: {', '.join(src.local)}")
    path = Path(data_dir) / src.local[split]
    if not path.is_file():
        raise DataError(f"{path} not found; --data-dir must hold {src.local[split]}")
    try:
        return src.read_local(path)
    except MemoryError:
        raise
    except Exception as e:  # not UTF-8, a truncated parquet file, no "text" column...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise DataError(f"{path} cannot be read ({type(e).__name__}: {first}); replace it with a good copy") from None


def load_text(name: str, split: str = "test", data_dir=None) -> str:
    rows = load_rows(name, split, data_dir)
    return SOURCES[name].join.join(rows)


def tokenize_eval(tokenizer, name: str, split: str = "test", data_dir=None) -> torch.Tensor:
    """The whole evaluation text tokenized once: ``[1, n_tokens]`` (GPTQ protocol)."""
    text = load_text(name, split, data_dir)
    return tokenizer(text, return_tensors="pt").input_ids


def calibration_samples(tokenizer, name: str = "c4", split: str = "validation", *, n: int = 128, seqlen: int = 2048,
                        seed: int = 0, data_dir=None) -> torch.Tensor:
    """``n`` random segments of ``seqlen`` tokens, ``[n, seqlen]``, reproducible from ``seed``.

    Documents are shuffled with ``seed``, joined with ``"\\n\\n"`` until the stream holds enough tokens, and
    ``n`` start offsets are drawn uniformly. A test split is refused: never calibrate on evaluation data.
    """
    if split == "test":
        raise DataError(f"refusing to calibrate on the test split of {name}; use a train/validation split or c4")
    if n < 1 or seqlen < 2:
        raise DataError(f"calibration needs at least 1 sample of at least 2 tokens, got {n} x {seqlen}")
    rows = [r for r in load_rows(name, split, data_dir) if r.strip()]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    need = max(n * seqlen, seqlen * 2)
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(rows[i] + "\n\n").input_ids)
        if len(ids) >= need:
            break
    if len(ids) <= seqlen:
        raise DataError(f"{name}/{split} holds only {len(ids)} tokens, fewer than seqlen {seqlen}")
    stream = torch.tensor(ids)
    starts = torch.randint(0, len(ids) - seqlen, (n,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])  # [n, seqlen]


def heldout_ids(tokenizer, name: str = "c4", split: str = "validation", *, tokens: int, calib_samples: int = 128,
                calib_seqlen: int = 2048, calib_seed: int = 0, data_dir=None) -> torch.Tensor:
    """Held-out text ``[1, n >= tokens]`` from the calibration source, disjoint from the calibration segments.

    :func:`normquant.data.text.calibration_samples` shuffles the rows with ``calib_seed`` and reads a *prefix*
    of that order; this takes rows from the *end* of the same order (joined with ``"\\n\\n"``) and checks that
    none of them is in the prefix the calibration read. Use it to score lr choices: never the test split.
    """
    if split == "test":
        raise DataError("the held-out slice for lr selection must not come from a test split")
    rows = [r for r in load_rows(name, split, data_dir) if r.strip()]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(calib_seed)).tolist()
    need, used, count = max(calib_samples * calib_seqlen, calib_seqlen * 2), 0, 0
    for i in order:  # the prefix calibration_samples reads (same tokenization)
        count += len(tokenizer(rows[i] + "\n\n").input_ids)
        used += 1
        if count >= need:
            break
    ids: list[int] = []
    taken = 0
    for i in reversed(order[used:]):
        ids.extend(tokenizer(rows[i] + "\n\n").input_ids)
        taken += 1
        if len(ids) >= tokens:
            break
    if len(ids) < tokens:
        raise DataError(f"{name}/{split}: only {len(ids)} tokens remain outside the {used} calibration rows, "
                        f"{tokens} asked for")
    log.info("held-out slice: %d rows (%d tokens) of %s/%s, disjoint from the %d calibration rows",
             taken, len(ids), name, split, used)
    return torch.tensor(ids).unsqueeze(0)  # [1, n]
