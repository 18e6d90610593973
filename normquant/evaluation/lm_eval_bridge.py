"""EleutherAI lm-eval tasks on a model object (an optional dependency: ``pip install 'normquant[lmeval]'``).

The model is evaluated as it is in memory — a model normquant just quantized keeps its QuantLinear modules —
through lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)`` and ``simple_evaluate``. A task is an lm-eval
name (``hellaswag``) or the path of a local task YAML (``*.yaml``, its folder indexed with
``TaskManager(include_path=...)``). lm-eval's own ~15,000 task files are indexed only when a name is asked for,
which takes a while (a minute on a small CPU); local YAMLs alone are indexed in a fraction of a second.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normquant.quant.kv import kv_cache_of
from normquant.quant.prefix import prefix_of

INSTALL = "pip install 'normquant[lmeval]'"
TASK_FILE_SUFFIXES = (".yaml", ".yml")


class TaskEvalError(ValueError):
    """lm-eval is missing, a task it does not know, an option out of range: one line for the CLI."""


def _lm_eval():
    """The lm-eval pieces this bridge uses, or a TaskEvalError saying how to install them."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise TaskEvalError(f"lm-eval tasks need EleutherAI lm-eval, which is not installed ({e}): {INSTALL}") from None
    return lm_eval, HFLM, TaskManager


def parse_tasks(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; nothing left is an error."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise TaskEvalError("no task given: --tasks NAME[,NAME...] (lm-eval task names or task YAML paths)")
    return tasks


def is_task_file(spec: str) -> bool:
    """A task given as the path of a task YAML (anything else is an lm-eval task name)."""
    return Path(spec).suffix in TASK_FILE_SUFFIXES


def check_options(*, limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 1) -> None:
    """One line for an option out of range (checked before a model is loaded)."""
    if limit is not None and limit < 1:
        raise TaskEvalError(f"limit must be a positive number of documents per task (got {limit})")
    if num_fewshot is not None and num_fewshot < 0:
        raise TaskEvalError(f"num_fewshot must be 0 or more (got {num_fewshot})")
    if batch_size < 1:
        raise TaskEvalError(f"batch_size must be at least 1 (got {batch_size})")


def task_manager(tasks: Sequence[str]):
    """lm-eval's ``TaskManager`` indexing the folders of the task YAMLs in ``tasks``, and lm-eval's own tasks when
    ``tasks`` names any. A missing YAML or an unknown name is a TaskEvalError (so is lm-eval itself missing)."""
    _, _, TaskManager = _lm_eval()
    files = [Path(t) for t in tasks if is_task_file(t)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise TaskEvalError(f"task file {missing[0]} not found")
    names = [t for t in tasks if not is_task_file(t)]
    folders = sorted({str(f.resolve().parent) for f in files})
    manager = TaskManager(include_path=folders or None, include_defaults=bool(names))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise TaskEvalError(f"lm-eval has no task '{unknown[0]}' (`lm-eval ls tasks` lists them; a local task is "
                            f"a path ending in {' or '.join(TASK_FILE_SUFFIXES)})")
    return manager


@contextlib.contextmanager
def _model_as_it_is(model):
    """While ``HFLM`` wraps ``model``: its ``model.tie_weights()`` does nothing (on a tied model whose ``lm_head``
    normquant quantized, it would put the float embedding back in place of the quantized head), and its warnings
    that a model object was passed instead of a name (this bridge's purpose) are not printed."""
    logger = logging.getLogger("lm_eval.models.huggingface")
    level = logger.level
    model.tie_weights = lambda *args, **kwargs: None
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        del model.tie_weights
        logger.setLevel(level)


def evaluate_tasks(model, tokenizer, tasks: Sequence[str], *, limit: int | None = None,
                   num_fewshot: int | None = None, batch_size: int = 1, samples: bool = False,
                   manager=None) -> dict[str, Any]:
    """lm-eval's results dict (``simple_evaluate``) for ``tasks`` on ``model`` as it is, on the model's device.

    ``limit``: the first N documents of each task; ``num_fewshot``: examples in each prompt (default: the task's
    own, else 0); ``batch_size``: requests per forward pass; ``samples``: keep lm-eval's per-document outputs
    (``results["samples"]``); ``manager``: a :func:`task_manager` for ``tasks`` already built.
    """
    check_options(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)
    if prefix_of(model) is not None:
        raise TaskEvalError("this model was quantized with PrefixQuant's prefix step, which lm-eval cannot apply "
                            "(its positions must stay float): evaluate it with perplexity (normquant eval without --tasks)")
    if kv_cache_of(model) is not None:
        raise TaskEvalError(f"this model runs with a quantized KV cache ({kv_cache_of(model).short()}), which lm-eval's "
                            "forward passes would skip: evaluate it with perplexity (normquant eval without --tasks)")
    lm_eval, HFLM, _ = _lm_eval()
    if manager is None:
        manager = task_manager(tasks)
    with _model_as_it_is(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, log_samples=samples)


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task (or group) and metric of lm-eval's results: task, metric (``name`` or ``name,filter``
    when the filter is not ``none``), value, stderr (None where lm-eval gives none), n_shot, documents (used, of)
    and the protocol in words."""
    version = results.get("lm_eval_version", "?")
    rows = []
    for task, metrics in results["results"].items():
        n_shot = results.get("n-shot", {}).get(task)
        docs = results.get("n-samples", {}).get(task, {})
        used, total = docs.get("effective"), docs.get("original")
        if total is None:  # a group
            documents = "aggregated over its tasks"
        else:
            documents = f"first {used} of {total} documents" if used < total else f"all {total} documents"
        protocol = f"lm-eval {version} task {task}, {n_shot}-shot, {documents}"
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric if filt == "none" else key, "value": value,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None, "n_shot": n_shot,
                         "documents": used, "documents_total": total, "protocol": protocol})
    return rows


def tasks_record(model_name: str, results: dict[str, Any], *, limit: int | None, num_fewshot: int | None,
                 **extra) -> dict[str, Any]:
    """The JSON record of one lm-eval run, in the style of :func:`normquant.evaluation.records.perplexity_record`:
    what was measured with its protocol, the options asked for, ``extra`` (recipe hash, environment...)."""
    return {"model": model_name, "harness": f"lm-eval {results.get('lm_eval_version', '?')}", "limit": limit,
            "num_fewshot": num_fewshot, "results": result_rows(results), **extra}


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain table, one line per task and metric."""
    lines = [f"{'task':<32} {'metric':<14} {'value':>8} {'stderr':>8}  n-shot  documents", "-" * 84]
    for r in rows:
        stderr = f"{r['stderr']:.4f}" if r["stderr"] is not None else "-"
        docs = f"{r['documents']}/{r['documents_total']}" if r["documents_total"] is not None else "-"
        lines.append(f"{r['task']:<32} {r['metric']:<14} {r['value']:>8.4f} {stderr:>8}  {r['n_shot']!s:>6}  {docs}")
    return "\n".join(lines)
