"""Command line: ``normquant run | eval | export | sensitivity | inspect``.

Every user error ends in one line ``normquant: error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  normquant run recipes/w8a8_rtn.yaml --data-dir ../shared/data --windows 16
  normquant run recipes/w4a16_g64_rtn.yaml --model smollm2-135m --output out/w4 --export out/w4/model
  normquant eval --model out/w4/model --data-dir ../shared/data --windows 16 --json
  normquant export recipes/w8a16_rtn.yaml --output exports/smollm2-w8
  normquant sensitivity recipes/w8a8_rtn.yaml --data-dir ../shared/data --windows 4
  normquant inspect smollm2-135m --data-dir ../shared/data --output eval/inspect_smollm2

models: a packaged short name (smollm2-135m, minilm-l6), a local folder, a .gguf file, a hub id (owner/name)
        or a normquant export. Data: --data-dir (or $NORMQUANT_DATA_DIR) for offline copies, else `datasets`.
"""


class UserError(Exception):
    pass


def _add_common(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    p.add_argument("--model", required=model_required, help="model name/path (overrides the recipe's)")
    p.add_argument("--windows", type=int, help="evaluate the first N windows only (labelled as a subset)")
    p.add_argument("--seqlen", type=int, help="evaluation window length (default 2048)")
    p.add_argument("--data-dir", help="folder with offline copies (wiki.test.raw, ptb.test.txt, c4 parquet)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (accelerate device_map)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normquant", description="Post-training quantization for HF LLMs.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="quantize, evaluate float and quantized, write results.json, export if asked",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe")
    _add_common(run)
    run.add_argument("--output", help="results folder (default out/<recipe name>)")
    run.add_argument("--export", metavar="DIR", help="also export the quantized checkpoint to DIR")
    run.add_argument("--force", action="store_true", help="overwrite an existing export directory")
    run.add_argument("--no-baseline", action="store_true", help="skip the float evaluation")
    ev = sub.add_parser("eval", help="perplexity of a model or an exported checkpoint")
    _add_common(ev, model_required=True)
    ev.add_argument("--dataset", default="wikitext2", choices=["wikitext2", "ptb", "c4"])
    ev.add_argument("--json", action="store_true", help="print the JSON record")
    ex = sub.add_parser("export", help="quantize and export a checkpoint (no evaluation)")
    ex.add_argument("recipe")
    _add_common(ex)
    ex.add_argument("--output", required=True, help="export directory")
    ex.add_argument("--force", action="store_true", help="overwrite an existing export directory")
    se = sub.add_parser("sensitivity", help="quantize one module kind at a time and rank the perplexity cost")
    se.add_argument("recipe", help="recipe whose weight/activation specs are tried one module kind at a time")
    _add_common(se)
    se.add_argument("--output", help="JSON report path (default out/sensitivity-<recipe>.json)")
    ins = sub.add_parser("inspect", help="per-channel activation ranges at every norm boundary: PNG + JSON")
    ins.add_argument("model", help="model name/path")
    ins.add_argument("--samples", type=int, default=8, help="calibration segments (default 8)")
    ins.add_argument("--seqlen", type=int, default=512, help="tokens per segment (default 512)")
    ins.add_argument("--threshold", type=float, default=6.0, help="outlier threshold on |x| (default 6)")
    ins.add_argument("--data-dir", help="folder with offline copies (c4 parquet)")
    ins.add_argument("--device", default="cpu")
    ins.add_argument("--output", default="out/inspect", help="folder for inspect.png and inspect.json")
    return parser


def _overrides(args) -> dict:
    ev = {k: v for k, v in {"windows": args.windows, "seqlen": args.seqlen}.items() if v is not None}
    top = {k: v for k, v in {"model": args.model, "device": args.device, "dtype": args.dtype}.items() if v}
    return {**top, **({"evaluation": ev} if ev else {})}


def _load(recipe):
    from normquant.models.loading import load_model

    return load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)


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
    model, tok = _load(recipe)
    ev = recipe.evaluation
    record = {"recipe": recipe.to_dict(), "recipe_file": str(args.recipe), "recipe_hash": recipe.hash(),
              "environment": environment()}
    base = None
    if ev.baseline and not args.no_baseline:
        res = _eval(model, tok, ev, args.data_dir, progress)
        record["float"] = perplexity_record(recipe.model, ev.dataset, ev.split, res)
        base = res.ppl
        print(f"float      ppl {res.ppl:.3f}  ({res.windows}/{res.windows_total} windows, {res.tokens_per_s:.0f} tok/s)")
    t0 = time.perf_counter()
    calib = _calibration(recipe, model, tok, args.data_dir)
    quantize(model, recipe, calib, device=model_device_str(model), progress=progress)
    record["quantize_seconds"] = time.perf_counter() - t0
    if calib is not None:
        c = recipe.calibration
        record["calibration"] = {"dataset": c.dataset, "split": c.split, "samples": c.samples, "seqlen": c.seqlen,
                                 "seed": c.seed}
    res = _eval(model, tok, ev, args.data_dir, progress)
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
    from normquant.evaluation.records import environment, perplexity_record
    from normquant.models.loading import load_model
    from normquant.recipe import Evaluation

    model, tok = load_model(args.model, dtype=args.dtype or "float32", device=args.device or "cpu")
    ev = Evaluation(dataset=args.dataset, seqlen=args.seqlen or 2048, windows=args.windows,
                    split="validation" if args.dataset == "c4" else "test")
    res = _eval(model, tok, ev, args.data_dir, not args.quiet)
    record = {**perplexity_record(args.model, ev.dataset, ev.split, res), "environment": environment()}
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"{args.model}: ppl {res.ppl:.3f}  [{record['protocol']}]  {res.tokens_per_s:.0f} tok/s")
    return 0


def cmd_export(args) -> int:
    from normquant.export import export_model
    from normquant.pipeline.run import quantize
    from normquant.recipe import load_recipe

    recipe = load_recipe(args.recipe, _overrides(args))
    if Path(args.output).exists() and not args.force:
        raise UserError(f"export directory {args.output} exists; pass --force to overwrite")
    model, tok = _load(recipe)
    quantize(model, recipe, _calibration(recipe, model, tok, args.data_dir), device=model_device_str(model),
             progress=not args.quiet)
    path = export_model(model, tok, args.output, force=args.force,
                        extra_metadata={"recipe": recipe.name, "recipe_hash": recipe.hash()})
    print(f"exported to {path}")
    return 0


def cmd_sensitivity(args) -> int:
    from normquant.evaluation.sensitivity import sensitivity_report
    from normquant.evaluation.records import write_json
    from normquant.recipe import load_recipe

    recipe = load_recipe(args.recipe, _overrides(args))
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
    from normquant.models.loading import load_model

    model, tok = load_model(args.model, device=args.device)
    calib = calibration_samples(tok, "c4", "validation", n=args.samples, seqlen=args.seqlen, seed=0,
                                data_dir=args.data_dir)
    report = {"model": args.model, "calibration": "c4/validation seed 0",
              **inspect_activations(model, calib, threshold=args.threshold), "environment": environment()}
    out = Path(args.output)
    write_json(out / "inspect.json", report)
    png = plot_report(report, out / "inspect.png", title=f"{args.model}: norm-output ranges")
    for kind, s in report["summary"].items():
        print(f"{kind}: outliers (|x| > {args.threshold:g}) in {s['layers_with_outliers']}/{s['layers']} layers; "
              f"persistent channels (>= 25% of layers): {s['persistent_channels'][:10]}")
    print(f"plot: {png}\nreport: {out / 'inspect.json'}")
    return 0


COMMANDS = {"run": cmd_run, "eval": cmd_eval, "export": cmd_export, "sensitivity": cmd_sensitivity,
            "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="normquant: %(message)s")
    from normquant.errors import USER_ERRORS

    try:
        return COMMANDS[args.command](args)
    except (UserError, *USER_ERRORS) as e:
        print(f"normquant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
