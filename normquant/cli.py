"""Command line: ``normquant run | eval | export | sensitivity | inspect | report``.

Every user error ends in one line ``normquant: error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

EXAMPLES = """examples:
  normquant run recipes/w8a8_rtn.yaml --data-dir ../shared/data --windows 16
  normquant run recipes/w4a16_g64_rtn.yaml --model smollm2-135m --output out/w4 --export out/w4/model
  normquant eval --model out/w4/model --data-dir ../shared/data --windows 16 --json
  normquant export recipes/w8a16_rtn.yaml --output exports/smollm2-w8
  normquant sensitivity recipes/w8a8_rtn.yaml --data-dir ../shared/data --windows 4
  normquant inspect smollm2-135m --data-dir ../shared/data --output out/inspect-smollm2
  normquant report out/*/results.json --format md

models: a packaged short name (smollm2-135m, minilm-l6), a local folder, a .gguf file, a hub id (owner/name)
        or a normquant export. Data: --data-dir (or $NORMQUANT_DATA_DIR) for offline copies, else `datasets`.
"""


class UserError(Exception):
    pass


# ---------------------------------------------------------------------------------------------- logging
_HANDLER_MARK = "_normquant_cli_handler"


def setup_logging(quiet: bool = False) -> None:
    """normquant's messages under its own logger only (``normquant: <message>`` on stderr from a handler on the
    ``normquant`` logger; the root logger is never configured, so other libraries' records are not re-printed
    under normquant's name). Info lines (progress, estimates) unless ``quiet``.

    Other libraries: with ``quiet`` their warnings, info and progress bars are silenced (transformers,
    huggingface_hub, datasets, Python warnings, compressed-tensors' loguru); when stderr is not a terminal their
    progress bars are off anyway (no ``\\r`` updates in a log), and normquant's own become plain lines.
    """
    from normquant import progress

    logger = logging.getLogger("normquant")
    for h in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("normquant: %(message)s"))
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)  # propagates: a host app's root handlers see it
    progress.configure("off" if quiet else None)
    bars_off = quiet or progress.mode() != "bar"
    if bars_off:  # read when the libraries are imported...
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if quiet:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
        try:
            from loguru import logger as loguru_logger

            loguru_logger.disable("compressed_tensors")
        except ImportError:
            pass
    # ...and set directly on those already imported (normquant.main() called in-process)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if bars_off:
            hf_logging.disable_progress_bar()
        if quiet:
            hf_logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, logging as hub_logging

        if bars_off:
            disable_progress_bars()
        if quiet:
            hub_logging.set_verbosity_error()
    if bars_off and "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def _add_common(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    p.add_argument("--model", required=model_required, help="model name/path (overrides the recipe's)")
    p.add_argument("--windows", type=int, help="evaluate the first N windows only (labelled as a subset)")
    p.add_argument("--seqlen", type=int, help="evaluation window length (default 2048)")
    p.add_argument("--data-dir", help="folder with offline copies (wiki.test.raw, ptb.test.txt, c4 parquet)")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (accelerate device_map)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--quiet", action="store_true",
                   help="results only: no progress, estimates or info lines, and other libraries' output silenced")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-samples", type=int, metavar="N", help="calibration segments (overrides the recipe's)")
    p.add_argument("--calib-seqlen", type=int, metavar="L", help="tokens per calibration segment (overrides the recipe's)")


def _add_offload(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", action="store_true", help="models larger than memory: keep the float weights on "
                   "disk and read one block at a time; each finished block stays in memory packed at its bit width "
                   "(safetensors checkpoints of causal LMs; no float baseline)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normquant", description="Post-training quantization for HF LLMs.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="quantize, evaluate float and quantized, write results.json, export if asked",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe")
    _add_common(run)
    _add_calibration(run)
    run.add_argument("--output", help="results folder (default out/<recipe name>)")
    run.add_argument("--export", metavar="DIR", help="also export the quantized checkpoint to DIR")
    run.add_argument("--force", action="store_true", help="overwrite an existing export directory")
    run.add_argument("--resume", action="store_true", help="checkpoint every finished block under the results "
                     "folder (OUTPUT/resume) and continue an interrupted run of the same recipe there")
    run.add_argument("--no-baseline", action="store_true", help="skip the float evaluation")
    _add_offload(run)
    ev = sub.add_parser("eval", help="perplexity of a model or an exported checkpoint, or lm-eval tasks (--tasks)")
    _add_common(ev, model_required=True)
    ev.add_argument("--dataset", default="wikitext2", choices=["wikitext2", "ptb", "c4"])
    ev.add_argument("--json", action="store_true", help="print the JSON record")
    ev.add_argument("--real", action="store_true", help="run the quantized linears for real: int8 GEMMs (int8 "
                    "weights and activations), other quantized weights held packed (same numbers, less memory)")
    ev.add_argument("--tasks", metavar="TASK[,TASK...]", help="EleutherAI lm-eval tasks instead of perplexity: "
                    "task names or task YAML paths (needs pip install 'normquant[lmeval]')")
    ev.add_argument("--limit", type=int, metavar="N", help="with --tasks: the first N documents of each task")
    ev.add_argument("--num-fewshot", type=int, metavar="K", help="with --tasks: K examples in each prompt "
                    "(default: the task's own, else 0)")
    ev.add_argument("--batch-size", type=int, metavar="B", help="with --tasks: requests per forward "
                    "pass (default 1)")
    ex = sub.add_parser("export", help="quantize and export a checkpoint (no evaluation)")
    ex.add_argument("recipe")
    _add_common(ex)
    _add_calibration(ex)
    ex.add_argument("--output", required=True, help="export directory")
    ex.add_argument("--force", action="store_true", help="overwrite an existing export directory")
    ex.add_argument("--resume", action="store_true", help="checkpoint every finished block (in OUTPUT.resume) and "
                    "continue an interrupted export of the same recipe")
    _add_offload(ex)
    se = sub.add_parser("sensitivity", help="quantize one module kind at a time and rank the perplexity cost")
    se.add_argument("recipe", help="recipe whose weight/activation specs are tried one module kind at a time")
    _add_common(se)
    _add_calibration(se)
    se.add_argument("--output", help="JSON report path (default out/sensitivity-<recipe>.json)")
    ins = sub.add_parser("inspect", help="per-channel activation ranges at every norm boundary: PNG + JSON")
    ins.add_argument("model", help="model name/path")
    ins.add_argument("--samples", type=int, default=8, help="calibration segments (default 8)")
    ins.add_argument("--seqlen", type=int, default=512, help="tokens per segment (default 512)")
    ins.add_argument("--threshold", type=float, default=6.0, help="outlier threshold on |x| (default 6)")
    ins.add_argument("--data-dir", help="folder with offline copies (c4 parquet)")
    ins.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    ins.add_argument("--output", default="out/inspect", help="folder for inspect.png and inspect.json")
    ins.add_argument("--force", action="store_true", help="overwrite an existing inspect.json / inspect.png")
    ins.add_argument("--quiet", action="store_true", help="results only (as for the other commands)")
    rep = sub.add_parser("report", help="table of results.json records (Markdown or CSV), plot of ppl vs bits")
    rep.add_argument("results", nargs="+", help="results.json files of normquant run (e.g. out/*/results.json)")
    rep.add_argument("--format", choices=["md", "csv"], default="md", help="Markdown (default) or CSV")
    rep.add_argument("--output", help="write the table to this file (default: stdout)")
    rep.add_argument("--plot", metavar="PNG", help="also plot perplexity vs bits per weight to this PNG "
                                                   "(needs matplotlib: pip install 'normquant[plots]')")
    rep.add_argument("--force", action="store_true", help="overwrite an existing --output / --plot file")
    rep.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    return parser


def _overrides(args) -> dict:
    ev = {k: v for k, v in {"windows": args.windows, "seqlen": args.seqlen}.items() if v is not None}
    top = {k: v for k, v in {"model": args.model, "device": args.device, "dtype": args.dtype}.items() if v}
    cal = {k: v for k, v in {"samples": getattr(args, "calib_samples", None),
                             "seqlen": getattr(args, "calib_seqlen", None)}.items() if v is not None}
    return {**top, **({"evaluation": ev} if ev else {}), **({"calibration": cal} if cal else {})}


def _load(recipe, offload: bool = False):
    """``(model, tokenizer, device)``: the device quantize() computes on."""
    from normquant.devices import check_device
    from normquant.models.loading import load_model

    device = check_device(recipe.device)
    if offload:
        from normquant.models.streaming import load_streamed

        if device == "auto":
            raise UserError("--offload and --device auto both decide where weights live; drop --device auto")
        model, tok = load_streamed(recipe.model, dtype=recipe.dtype)
        return model, tok, device
    model, tok = load_model(recipe.model, dtype=recipe.dtype, device=device)
    return model, tok, model_device_str(model)


def _eval(model, tok, ev, data_dir, progress):
    from normquant.data.text import tokenize_eval
    from normquant.evaluation.perplexity import evaluate_perplexity

    ids = tokenize_eval(tok, ev.dataset, ev.split, data_dir)
    return evaluate_perplexity(model, ids, seqlen=ev.seqlen, windows=ev.windows, batch_size=ev.batch_size,
                               progress=progress)


def _calibration(recipe, model, tok, data_dir):
    from normquant.data import calibration_ids

    return calibration_ids(recipe.calibration, model, tok, data_dir) if recipe.needs_data else None


def _table(rows: list[tuple[str, float, float | None]]) -> str:
    lines = [f"{'model':<28} {'ppl':>10} {'vs float':>9}", "-" * 49]
    for name, ppl, base in rows:
        rel = f"{100 * (ppl / base - 1):+.2f}%" if base else ""
        lines.append(f"{name:<28} {ppl:>10.3f} {rel:>9}")
    return "\n".join(lines)


def cmd_run(args) -> int:
    from normquant.evaluation.records import environment, perplexity_record, write_json
    from normquant.pipeline.run import quantize
    from normquant.recipe import load_recipe

    recipe = load_recipe(args.recipe, _overrides(args))
    progress = not args.quiet
    out = Path(args.output or Path("out") / recipe.name)
    export_dir = args.export or (recipe.export.path if recipe.export.enabled else None)
    force = args.force or recipe.export.force
    if export_dir and Path(export_dir).exists() and not force:
        raise UserError(f"export directory {export_dir} exists; pass --force to overwrite")
    model, tok, device = _load(recipe, args.offload)
    ev = recipe.evaluation
    record = {"recipe": recipe.to_dict(), "recipe_file": str(args.recipe), "recipe_hash": recipe.hash(),
              "environment": environment()}
    base = None
    if ev.baseline and not args.no_baseline and args.offload:
        logging.getLogger("normquant").info("--offload: no float baseline (it would need the whole float model in memory)")
    elif ev.baseline and not args.no_baseline:
        res = _eval(model, tok, ev, args.data_dir, progress)
        record["float"] = perplexity_record(recipe.model, ev.dataset, ev.split, res)
        base = res.ppl
        print(f"float      ppl {res.ppl:.3f}  ({res.windows}/{res.windows_total} windows, {res.tokens_per_s:.0f} tok/s)")
    t0 = time.perf_counter()
    calib = _calibration(recipe, model, tok, args.data_dir)
    quantize(model, recipe, calib, device=device, progress=progress, checkpoint=_resume_checkpoint(args, recipe))
    record["quantize_seconds"] = time.perf_counter() - t0
    if calib is not None:
        c = recipe.calibration
        record["calibration"] = {"dataset": c.dataset, "split": c.split, "samples": c.samples, "seqlen": c.seqlen,
                                 "seed": c.seed}
    res = _eval(model, tok, ev, args.data_dir, progress)  # with the KV cache quantize() attached
    record["quantized"] = perplexity_record(recipe.model, ev.dataset, ev.split, res)
    print(f"quantized  ppl {res.ppl:.3f}  ({res.windows}/{res.windows_total} windows, {res.tokens_per_s:.0f} tok/s)")
    if export_dir:
        from normquant.export import export_model

        path = export_model(model, tok, export_dir, force=force,
                            extra_metadata={"recipe": recipe.name, "recipe_hash": recipe.hash(),
                                            "ppl": res.ppl, "windows": res.windows, "seqlen": res.seqlen})
        record["export"] = str(path)
        print(f"exported to {path}")
    write_json(out / "results.json", record)
    print()
    print(_table(([("float", base, None)] if base else []) + [(recipe.name, res.ppl, base)]))
    print(f"\nprotocol: {record['quantized']['protocol']}\nresults: {out / 'results.json'}")
    return 0


def model_device_str(model) -> str:
    return str(next(model.parameters()).device)


def cmd_eval(args) -> int:
    from normquant.devices import check_device
    from normquant.evaluation.datasets import eval_split
    from normquant.evaluation.records import environment, perplexity_record
    from normquant.models.loading import load_model
    from normquant.recipe import Evaluation

    ev = Evaluation(dataset=args.dataset, seqlen=args.seqlen or 2048, windows=args.windows,
                    split=eval_split(args.dataset))
    tasks = _checked_tasks(args)
    model, tok = load_model(args.model, dtype=args.dtype or "float32", device=check_device(args.device))
    section = _normquant_section(args.model)
    serving = section.get("serving")
    if serving and serving.get("parity") != "exact":
        for note in serving.get("notes", []):
            logging.getLogger("normquant").warning("this export in transformers + compressed-tensors: %s", note)
    real = _convert(model) if args.real else None
    if tasks:
        return _eval_tasks(args, model, tok, *tasks, section)
    res = _eval(model, tok, ev, args.data_dir, not args.quiet)
    record = {**perplexity_record(args.model, ev.dataset, ev.split, res), "environment": environment()}
    if real is not None:
        record["real"] = real
    if serving:
        record["serving"] = serving
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"{args.model}: ppl {res.ppl:.3f}  [{record['protocol']}]  {res.tokens_per_s:.0f} tok/s")
    return 0


def _convert(model) -> dict:
    """``--real``: integer GEMMs where they run here (normquant.quant.real), one line on what stayed fake."""
    from normquant.quant.primitives import QuantError
    from normquant.quant.real import convert

    try:
        report = convert(model)
    except QuantError as e:
        raise UserError(str(e)) from None
    if not report["converted"]:
        raise UserError("--real: the model has no quantized weights (evaluate an export or a quantized model)")
    kinds = list(report["converted"].values())
    reasons = sorted(set(report["why_not_int8"].values()))
    int4 = f", {kinds.count('int4-gemm')} run int4 GEMMs" if "int4-gemm" in kinds else ""
    print(f"--real: {kinds.count('int8-gemm')} linears run as int8 GEMMs{int4}, {kinds.count('packed-weights')} hold "
          "packed integer weights" + (f" (not int8 GEMMs: {'; '.join(reasons)})" if reasons else ""),
          file=sys.stderr)
    return {"int8_gemm": kinds.count("int8-gemm"), "int4_gemm": kinds.count("int4-gemm"),
            "packed_weights": kinds.count("packed-weights"), "why_not_int8": report["why_not_int8"],
            "activation_bits_exact": report["activation_bits"], "backend": report["backend"]}


def _normquant_section(model: str) -> dict:
    """``config.json["normquant"]`` of an export (serving, metadata with the recipe hash); {} for anything else."""
    try:
        section = json.loads((Path(model) / "config.json").read_text())["normquant"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return section if isinstance(section, dict) else {}


def _checked_tasks(args) -> tuple[list[str], object] | None:
    """``--tasks`` checked before the model loads (lm-eval installed, options in range, task files found, names
    known): the tasks and lm-eval's TaskManager for them; None without ``--tasks``."""
    from normquant.evaluation.lm_eval_bridge import TaskEvalError, check_options, parse_tasks, task_manager

    if args.tasks is None:
        given = [flag for flag, value in (("--limit", args.limit), ("--num-fewshot", args.num_fewshot),
                                          ("--batch-size", args.batch_size)) if value is not None]
        if given:
            raise UserError(f"{given[0]} goes with --tasks (lm-eval tasks); perplexity takes --windows / --seqlen")
        return None
    try:
        tasks = parse_tasks(args.tasks)
        check_options(limit=args.limit, num_fewshot=args.num_fewshot, batch_size=_task_batch_size(args))
        return tasks, task_manager(tasks)
    except TaskEvalError as e:
        raise UserError(str(e)) from None


def _task_batch_size(args) -> int:
    return 1 if args.batch_size is None else args.batch_size


def _eval_tasks(args, model, tok, tasks, manager, section: dict) -> int:
    from normquant.evaluation.lm_eval_bridge import evaluate_tasks, table, tasks_record
    from normquant.evaluation.records import environment

    if args.quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    results = evaluate_tasks(model, tok, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                             batch_size=_task_batch_size(args), manager=manager)
    recipe_hash = (section.get("metadata") or {}).get("recipe_hash")
    record = tasks_record(args.model, results, limit=args.limit, num_fewshot=args.num_fewshot,
                          **({"recipe_hash": recipe_hash} if recipe_hash else {}), environment=environment())
    if section.get("serving"):
        record["serving"] = section["serving"]
    print(json.dumps(record, indent=2) if args.json else table(record["results"]))
    return 0


def cmd_export(args) -> int:
    from normquant.export import export_model
    from normquant.pipeline.run import quantize
    from normquant.recipe import load_recipe

    recipe = load_recipe(args.recipe, _overrides(args))
    if Path(args.output).exists() and not args.force:
        raise UserError(f"export directory {args.output} exists; pass --force to overwrite")
    model, tok, device = _load(recipe, args.offload)
    quantize(model, recipe, _calibration(recipe, model, tok, args.data_dir), device=device,
             checkpoint=_resume_checkpoint(args, recipe),
             progress=not args.quiet)
    path = export_model(model, tok, args.output, force=args.force,
                        extra_metadata={"recipe": recipe.name, "recipe_hash": recipe.hash()})
    print(f"exported to {path}")
    return 0


def cmd_sensitivity(args) -> int:
    from normquant.evaluation.sensitivity import sensitivity_report
    from normquant.evaluation.records import write_json
    from normquant.recipe import load_recipe

    from normquant.devices import check_device

    recipe = load_recipe(args.recipe, _overrides(args))
    check_device(recipe.device)
    report = sensitivity_report(recipe, data_dir=args.data_dir, progress=not args.quiet)
    out = Path(args.output or Path("out") / f"sensitivity-{recipe.name}.json")
    write_json(out, report)
    print(report["table"])
    print(f"\nreport: {out}")
    return 0


def cmd_inspect(args) -> int:
    from normquant.data.text import calibration_samples
    from normquant.evaluation.inspect import inspect_activations, plot_report
    from normquant.evaluation.records import environment, write_json
    from normquant.devices import check_device
    from normquant.models.loading import load_model

    out = Path(args.output)
    existing = [p for p in (out / "inspect.json", out / "inspect.png") if p.exists()]
    if existing and not args.force:
        raise UserError(f"{existing[0]} exists; pass --force to overwrite it, or choose another --output")
    model, tok = load_model(args.model, device=check_device(args.device))
    calib = calibration_samples(tok, "c4", "validation", n=args.samples, seqlen=args.seqlen, seed=0,
                                data_dir=args.data_dir)
    report = {"model": args.model, "calibration": "c4/validation seed 0",
              **inspect_activations(model, calib, threshold=args.threshold), "environment": environment()}
    write_json(out / "inspect.json", report)
    png = plot_report(report, out / "inspect.png", title=f"{args.model}: norm-output ranges")
    for kind, s in report["summary"].items():
        print(f"{kind}: outliers (|x| > {args.threshold:g}) in {s['layers_with_outliers']}/{s['layers']} layers; "
              f"persistent channels (>= 25% of layers): {s['persistent_channels'][:10]}")
    print(f"plot: {png}\nreport: {out / 'inspect.json'}")
    return 0


def cmd_report(args) -> int:
    from normquant.evaluation.report import (ReportError, load_records, plot_ppl_vs_bits, record_row, to_csv,
                                             to_markdown)
    from normquant.io import atomic_write_text

    existing = [p for p in (args.output, args.plot) if p and Path(p).exists()]
    if existing and not args.force:
        raise UserError(f"{existing[0]} exists; pass --force to overwrite it")
    try:
        records = load_records(args.results)
        rows = [record_row(r, s) for r, s in records]
        plotted = plot_ppl_vs_bits(records, args.plot) if args.plot else []
    except ReportError as e:
        raise UserError(str(e)) from None
    if plotted:
        logging.getLogger("normquant").info("plot: %s (bits per weight: %s)", args.plot,
                                            ", ".join(f"{r['recipe']} {r['bits']:.4f}" for r in plotted))
    text = to_csv(rows) if args.format == "csv" else to_markdown(rows) + "\n"
    if args.output:
        atomic_write_text(args.output, text)
        print(f"{len(rows)} rows: {args.output}")
    else:
        sys.stdout.write(text)
    return 0


COMMANDS = {"run": cmd_run, "eval": cmd_eval, "export": cmd_export, "sensitivity": cmd_sensitivity,
            "inspect": cmd_inspect, "report": cmd_report}


# ---------------------------------------------------------------------------------------------- error boundary
def _preflight(args) -> None:
    """Before any model is loaded or quantized (run, export): the recipe parses and every destination can be
    written — not a file, writable, not an existing export without --force, room for at least the export's
    smallest possible size. A run must not die on its destination after an hour of quantizing. inspect and
    sensitivity: their output folder can be written."""
    from normquant.io import check_destination

    if args.command == "inspect":
        check_destination(Path(args.output), exist_ok=True, what="output folder")
        return
    if args.command not in ("run", "export", "sensitivity"):
        return
    from normquant.models.loading import min_export_bytes
    from normquant.recipe import load_recipe

    recipe = load_recipe(args.recipe, _overrides(args))
    if args.command == "sensitivity":
        report = Path(args.output or Path("out") / f"sensitivity-{recipe.name}.json")
        if report.is_dir():
            raise UserError(f"report path {report} is a folder; --output takes a .json file path")
        check_destination(report.parent, exist_ok=True, what="report folder")
        return
    if args.command == "export":
        export_dir, force = args.output, args.force
    else:
        export_dir = args.export or (recipe.export.path if recipe.export.enabled else None)
        force = args.force or recipe.export.force
        check_destination(Path(args.output or Path("out") / recipe.name), exist_ok=True, what="results folder")
    if export_dir:
        check_destination(export_dir, force=force, need_bytes=min_export_bytes(recipe))


def _resume_dir(args, recipe) -> Path:
    if args.command == "export":
        return Path(f"{Path(args.output)}.resume")
    return Path(args.output or Path("out") / recipe.name) / "resume"


def _resume_checkpoint(args, recipe):
    """The per-block checkpoints of ``--resume`` (None without it); :func:`main` removes them after success."""
    if not getattr(args, "resume", False):
        return None
    from normquant.pipeline.resume import BlockCheckpoint

    args.checkpoint = BlockCheckpoint(_resume_dir(args, recipe))
    return args.checkpoint


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (``kill``, a scheduler's timeout) unwinds like Ctrl-C, so temporaries are removed on the way out."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    """The one error boundary: a failure the user can fix ends in one line ``normquant: error: <what to fix>``
    (exit 2); Ctrl-C / SIGTERM in ``normquant: interrupted ...`` (exit 130) with no partial export left; anything
    else is a bug: one ``normquant: internal error`` line (exit 1), the traceback with ``--debug`` (anywhere on
    the command line) or ``NORMQUANT_DEBUG=1``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("NORMQUANT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="print the traceback of any error (also NORMQUANT_DEBUG=1)")
    args = parser.parse_args(argv)
    args.debug = debug
    setup_logging(quiet=getattr(args, "quiet", False))
    from normquant.errors import user_message
    from normquant.messages import one_line

    try:
        with _sigterm_interrupts():
            _preflight(args)
            rc = COMMANDS[args.command](args)
            if rc == 0 and getattr(args, "checkpoint", None) is not None:
                args.checkpoint.remove()  # everything that used the quantized model succeeded
            return rc
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        resume = " (--resume continues from the last finished block)" if getattr(args, "resume", False) else ""
        print(f"normquant: interrupted; no partial export or results file was left behind{resume}", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        message = one_line(e) if isinstance(e, UserError) else user_message(e)
        if message is None:
            print(f"normquant: internal error: {type(e).__name__}: {one_line(e, 300)} -- a bug in normquant; rerun "
                  "with --debug for the traceback and report it", file=sys.stderr)
            return 1
        print(f"normquant: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
