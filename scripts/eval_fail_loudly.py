"""Fail loudly, never corrupt: the bad-input catalogue and the long recipe-loader fuzz, with totals in eval/.

    python scripts/eval_fail_loudly.py catalogue            # -> eval/bad_inputs.json  (every case, ~3 min on 2 cores)
    python scripts/eval_fail_loudly.py fuzz --cases 21000   # -> eval/recipe_fuzz.json (~10 min on 2 cores)
    python scripts/eval_fail_loudly.py resume               # -> eval/resume_smollm2.json (~6 min on 2 cores)

The catalogue is ``tests/bad_inputs.py`` (also run by ``tests/test_bad_inputs.py``, minus the slow subprocess
variants); the fuzz properties are ``tests/test_recipe_fuzz.py``'s, run here for many more examples with
failures recorded instead of raised.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def catalogue(out: Path) -> dict:
    from tests.bad_inputs import CASES, build_workspace, run_case, summarize

    root = Path(tempfile.mkdtemp(prefix="normquant-bad-inputs-"))
    t0 = time.time()
    ws = build_workspace(root / "workspace")
    results, rows = {}, []
    for c in CASES:
        t = time.time()
        outcome, detail = run_case(ws, c, root / c.id)
        results[c.id] = (outcome, detail)
        rows.append({"id": c.id, "category": c.category, "outcome": outcome, "seconds": round(time.time() - t, 2),
                     "message": detail.replace(str(root), "<tmp>")[:400], **({"note": c.note} if c.note else {})})
        print(f"{outcome:14s} {c.category:12s} {c.id}", flush=True)
    record = {"what": "bad-input catalogue (tests/bad_inputs.py) against the normquant CLI",
              "command": "python scripts/eval_fail_loudly.py catalogue",
              "pass_rule": "exit 2 with one line 'normquant: error: ...' containing what to fix (reload: naming the "
                           "file/tensor), no traceback; interruptions: exit 130 and one line, nothing partial left; "
                           "kill -9 then rerun: complete result, 0 temporaries left",
              "summary": summarize(results), "seconds": round(time.time() - t0, 1),
              "platform": platform.platform(), "cases": rows}
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def fuzz(out: Path, cases: int, seed: int) -> dict:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import hypothesis
    from tests import test_recipe_fuzz as F

    per = {}
    t0 = time.time()
    gens = {"mutated": F.mutated_texts(), "structured": F.structured_texts(), "perturbed": F.perturbed_texts(),
            "bytes": st.binary(max_size=400)}
    share = {"mutated": 0.4, "structured": 0.25, "perturbed": 0.3, "bytes": 0.05}
    for name, strategy in gens.items():
        before = sum(F.COUNTS.values())
        n = max(1, int(cases * share[name]))

        @settings(max_examples=n, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(strategy, F.overrides if name != "bytes" else st.just({}))
        def prop(text, over):
            F.check(text, over, raise_on_failure=False)

        prop = hypothesis.seed(seed)(prop)
        prop()
        per[name] = sum(F.COUNTS.values()) - before
        print(f"{name}: {per[name]} cases, {dict(F.COUNTS)}", flush=True)
    total = sum(F.COUNTS.values())
    non_recipe = {k: v for k, v in F.COUNTS.items() if k not in ("accepted", "RecipeError")}
    record = {"what": "hypothesis fuzz of the recipe loader (normquant.recipe.loads_recipe) with CLI overrides",
              "command": f"python scripts/eval_fail_loudly.py fuzz --cases {cases} --seed {seed}",
              "cases": total, "per_generator": per, "outcomes": dict(F.COUNTS),
              "non_recipe_error_exceptions": sum(non_recipe.values()), "failures": F.FAILURES[:20],
              "seconds": round(time.time() - t0, 1), "hypothesis": hypothesis.__version__,
              "property": "loads_recipe returns a Recipe (hash/to_dict work) or raises RecipeError whose message is "
                          "one line of at most 1800 characters"}
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def resume(out: Path, recipe: str, kill_at: int, samples: int, seqlen: int) -> dict:
    """SmolLM2: an uninterrupted export, a --resume export killed (SIGKILL) while quantizing block ``kill_at``,
    the same command rerun; the two exports compared file by file."""
    import hashlib
    import os
    import signal
    import subprocess

    from tests.bad_inputs import _WRAP_BLOCK, _wait_for, leftovers, run_subprocess

    root = Path(tempfile.mkdtemp(prefix="normquant-resume-"))
    base = ["export", str(REPO / recipe), "--model", "smollm2-135m", "--calib-samples", str(samples),
            "--calib-seqlen", str(seqlen), "--quiet"]

    def sha(d: Path) -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}

    def timed(argv: list[str]) -> float:
        t = time.time()
        proc = subprocess.run([sys.executable, "-m", "normquant.cli", *argv], cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        return round(time.time() - t, 1)

    t_ref = timed(base + ["--output", str(root / "reference")])
    argv = base + ["--output", str(root / "resumed"), "--resume"]
    flag = root / "flag"
    t = time.time()
    proc = run_subprocess(_WRAP_BLOCK.format(flag=str(flag), index=kill_at, argv=argv), root)
    _wait_for(flag, proc, timeout=3600)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t_killed = round(time.time() - t, 1)
    state = json.loads((root / "resumed.resume" / "state.json").read_text())
    t_resumed = timed(argv)
    a, b = sha(root / "reference"), sha(root / "resumed")
    record = {"what": "SmolLM2-135M export killed with SIGKILL mid-quantization, then resumed with --resume",
              "command": f"python scripts/eval_fail_loudly.py resume --recipe {recipe} --kill-at {kill_at} "
                         f"--samples {samples} --seqlen {seqlen}",
              "recipe": recipe, "calibration": f"c4 validation, {samples} x {seqlen} tokens",
              "blocks": 30, "killed_while_quantizing_block": kill_at, "checkpointed_blocks_at_kill": state["done"],
              "seconds": {"uninterrupted": t_ref, "until_kill": t_killed, "resumed_run": t_resumed},
              "files_compared": sorted(a), "byte_identical": a == b,
              "differing_files": sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)),
              "leftovers_after_resume": leftovers(root) + [p.name for p in root.iterdir() if p.name.endswith(".resume")]}
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("catalogue")
    c.add_argument("--out", default=str(REPO / "eval" / "bad_inputs.json"))
    f = sub.add_parser("fuzz")
    f.add_argument("--cases", type=int, default=21000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", default=str(REPO / "eval" / "recipe_fuzz.json"))
    r = sub.add_parser("resume")
    r.add_argument("--recipe", default="recipes/w4a16_g64_gptq.yaml")
    r.add_argument("--kill-at", type=int, default=15)
    r.add_argument("--samples", type=int, default=8)
    r.add_argument("--seqlen", type=int, default=512)
    r.add_argument("--out", default=str(REPO / "eval" / "resume_smollm2.json"))
    args = ap.parse_args()
    if args.what == "resume":
        rec = resume(Path(args.out), args.recipe, args.kill_at, args.samples, args.seqlen)
        print(json.dumps(rec, indent=1))
        return 0 if rec["byte_identical"] and not rec["leftovers_after_resume"] else 1
    if args.what == "catalogue":
        rec = catalogue(Path(args.out))
        print(json.dumps(rec["summary"], indent=1))
        s = rec["summary"]
        return 0 if s["ok"] == s["cases"] else 1
    rec = fuzz(Path(args.out), args.cases, args.seed)
    print(json.dumps({k: rec[k] for k in ("cases", "outcomes", "non_recipe_error_exceptions", "seconds")}, indent=1))
    return 0 if rec["non_recipe_error_exceptions"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
