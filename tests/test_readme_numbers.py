"""scripts/readme_numbers.py: README number blocks against their records; dirty records refused (fast, no model)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "scripts" / "readme_numbers.py")
rn = importlib.util.module_from_spec(_spec)
sys.modules["readme_numbers"] = rn
_spec.loader.exec_module(rn)

DEMO = rn.Block("demo", ("eval/r.json",), ("python make_r.py",), lambda r: f"ppl **{r['eval/r.json']['ppl']:.3f}**\n")


def _root(tmp_path, commit="0123456789ab", ppl=12.3456):
    (tmp_path / "eval").mkdir(exist_ok=True)
    (tmp_path / "eval" / "r.json").write_text(json.dumps({"ppl": ppl, "environment": {"git_commit": commit}}))
    return tmp_path


def _readme(shown):
    return f"# x\n\nprose\n<!-- numbers:demo -->\nppl **{shown}**\n<!-- /numbers:demo -->\nmore prose\n"


def test_clean_matching_record_passes(tmp_path):
    problems, clean = rn.check(_readme("12.346"), [DEMO], _root(tmp_path))
    assert problems == [] and clean == ["demo: matches clean records (eval/r.json)"]


def test_dirty_record_is_refused_and_not_written(tmp_path):
    root = _root(tmp_path, commit="0123456789ab-dirty")
    problems, clean = rn.check(_readme("12.346"), [DEMO], root)
    assert problems == ["demo: eval/r.json: made with uncommitted changes (commit 0123456789ab-dirty)"] and not clean
    text, skipped = rn.write(_readme("99.000"), [DEMO], root)
    assert text == _readme("99.000") and skipped == [
        "demo: left as it is: eval/r.json made with uncommitted changes (commit 0123456789ab-dirty)"]


def test_mismatching_number_is_reported_and_rewritten(tmp_path):
    root = _root(tmp_path)
    problems, _ = rn.check(_readme("12.300"), [DEMO], root)
    assert problems == ["demo: line 1 of the block differs: README 'ppl **12.300**' — records give 'ppl **12.346**'"]
    text, skipped = rn.write(_readme("12.300"), [DEMO], root)
    assert text == _readme("12.346") and skipped == []  # the prose around the block is kept


def test_an_empty_block_is_filled_between_its_markers(tmp_path):
    """A new block (markers only) is rendered inside them (the former substitution wrote it before the first)."""
    empty = "# x\n\nprose\n<!-- numbers:demo -->\n<!-- /numbers:demo -->\nmore prose\n"
    text, skipped = rn.write(empty, [DEMO], _root(tmp_path))
    assert text == _readme("12.346") and skipped == []


def test_missing_record_commitless_record_unbacked_number_and_missing_markers(tmp_path):
    problems, _ = rn.check(_readme("1.000"), [DEMO], tmp_path)
    assert problems == ["demo: eval/r.json: missing"]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "r.json").write_text(json.dumps({"ppl": 1.0}))
    unbacked = rn.Block("demo", DEMO.sources, DEMO.commands, DEMO.render, ("21.381: no record",))
    problems, _ = rn.check("no markers\n", [unbacked], tmp_path)
    assert problems == ["demo: eval/r.json: names no commit", "demo: unbacked number 21.381: no record",
                        "demo: no <!-- numbers:demo --> block in the README"]
    assert rn.commits("2026-12-02, commit ec3abb84c9ac-dirty.") == ["ec3abb84c9ac-dirty"]


def test_run_refuses_modified_tracked_files(tmp_path, monkeypatch, capsys):
    root = _root(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["add", "eval/r.json"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "r"], cwd=root, check=True)
    assert rn.tracked_changes(root) == []
    (root / "eval" / "r.json").write_text("{}")
    monkeypatch.setattr(rn, "ROOT", root)
    monkeypatch.setattr(rn, "BLOCKS", [DEMO])
    assert rn.main(["--run", "demo", "--readme", str(root / "README.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("readme_numbers: refusing to run: 1 tracked files modified") and "\n" not in err


def test_every_readme_block_has_an_entry_and_renders():
    """The real README and the script agree on the blocks, and every present record renders (numbers may differ)."""
    problems, _ = rn.check((ROOT / "README.md").read_text(), rn.BLOCKS, ROOT)
    structural = ("no <!-- numbers:", "no entry of this script renders", "do not hold what the block shows")
    assert [p for p in problems if any(s in p for s in structural)] == []
