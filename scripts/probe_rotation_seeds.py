"""Issue 10 probe: how much of a rotated row's perplexity is the rotation's random signs, on each side?

Runs one row of the issue 10 table (``scripts/bench_llmcompressor.py`` ``OUTLIER_ROWS``) for rotation seeds
0..N-1 on normquant (``rotate: {seed: S}``) and on llm-compressor (compressed-tensors' transform factories seeded
with S; its unseeded default is torch's fixed ``torch.Generator()`` seed, recorded as seed ``"default"``), with the
table's calibration tensor and normquant's evaluator on the first ``--windows`` WikiText-2 windows. One JSON
record; each side runs in its own process (``scripts/llmcompressor_side.py``), one after the other.

    python scripts/probe_rotation_seeds.py --data-dir ../shared/data --row w4a4-rotated-rtn-mse --seeds 5 \\
        --windows 4 --out eval/outliers_rotation_seeds_sides.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import bench_llmcompressor as bench  # noqa: E402
from normquant.evaluation.records import environment, write_json  # noqa: E402


def _summary(values: dict) -> dict:
    v = [x for k, x in values.items() if k != "default"]
    return {"min": min(v), "median": statistics.median(v), "max": max(v)} if v else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir")
    ap.add_argument("--row", default="w4a4-rotated-rtn-mse", choices=list(bench.OUTLIER_ROWS))
    ap.add_argument("--sides", default="normquant,llmcompressor")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--venv-python", default="/tmp/lcvenv/bin/python")
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "normquant" / "bench_llmcompressor"))
    ap.add_argument("--out", default="eval/outliers_rotation_seeds_sides.json")
    args = ap.parse_args()
    args.seed = 0  # the calibration sample seed (bench.shared_job reads it), not the rotation's
    sides = [s for s in args.sides.split(",") if s]
    if set(sides) - {"normquant", "llmcompressor"}:
        raise SystemExit(f"--sides takes normquant,llmcompressor (got {args.sides})")

    from transformers import AutoTokenizer

    from normquant.models.loading import materialize_packaged

    recipe, source = bench.build_row_recipe(args.row, args.samples, args.seqlen, 0)
    mods, diffs, reason = bench.lc_modifiers_for(recipe, bench.OUTLIER_ROWS[args.row][3])
    rotate = next((s for s in recipe.steps if s.name == "rotate"), None)
    if rotate is None:
        raise SystemExit(f"row '{args.row}' has no rotation: pick a rotated row")
    if mods is None and "llmcompressor" in sides:
        raise SystemExit(f"row '{args.row}' has no llm-compressor recipe ({reason}): pass --sides normquant")
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = materialize_packaged("smollm2-135m")
    base_job = bench.shared_job(AutoTokenizer.from_pretrained(model_dir), args, work, model_dir)

    out = {"probe": "rotation seeds on both sides (scripts/probe_rotation_seeds.py)", "row": args.row,
           "title": bench.OUTLIER_ROWS[args.row][0], "normquant_recipe_source": source,
           "normquant_recipe": recipe.to_dict(), "llmcompressor_modifiers": mods, "llmcompressor_differences": diffs,
           "windows": args.windows, "calib_sha256": base_job["calib_sha256"], "eval_sha256": base_job["eval_sha256"],
           "threads": args.threads, "environment": environment(), "float": None, "seeds": {s: {} for s in sides},
           "state_sha256": {s: {} for s in sides}}
    float_job = work / "job_seeds_float.json"
    float_job.write_text(json.dumps({**base_job, "normquant_recipe": None, "llmcompressor": None}))
    out["float"] = bench.float_side(sys.executable, "main", base_job, float_job, work)["ppl"]
    print(f"float {out['float']:.3f}", flush=True)
    for side in sides:
        for seed in (["default"] if side == "llmcompressor" else []) + list(range(args.seeds)):
            if side == "normquant":
                steps = [{"rotate": {**rotate.model_dump(), "seed": seed}} if s.name == "rotate"
                         else {s.name: s.model_dump()} for s in recipe.steps]
                job = {**base_job, "normquant_recipe": {**recipe.to_dict(), "steps": steps}, "llmcompressor": None}
                python = sys.executable
            else:
                lc = {"modifiers": mods, "batch_size": 1, "transform_seed": None if seed == "default" else seed}
                job = {**base_job, "normquant_recipe": None, "llmcompressor": lc}
                python = args.venv_python
            path = work / f"job_seeds_{side}_{seed}.json"
            path.write_text(json.dumps(job, indent=2))
            rec = bench.run_side(side, python, path, work / f"seeds_{side}_{seed}.json",
                                 work / f"seeds_{side}_{seed}.log")
            out["seeds"][side][seed] = rec["ppl"]
            out["state_sha256"][side][seed] = rec.get("state_sha256")
            out[f"{side}_summary"] = _summary(out["seeds"][side])
            print(f"{side} seed {seed}: {rec['ppl']:.3f}", flush=True)
            write_json(args.out, out)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the sides set their own threads (the job's "threads")
    main()
