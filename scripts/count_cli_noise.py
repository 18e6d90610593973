"""Count the CLI's noise for one or more source trees: stderr lines of a hub-id failure, ``\\r`` in a log.

    git worktree add /tmp/before 6e63b12
    python scripts/count_cli_noise.py --tree before=/tmp/before --tree after=. --out eval/cli_noise
    git worktree remove /tmp/before

Per tree (``normquant`` imported from it through ``PYTHONPATH``, the same virtual environment, stderr redirected
to a file, so not a terminal):

* ``offline_hub_id``: ``normquant eval --model some-org/not-a-model --windows 1`` with ``HF_HUB_OFFLINE=1``:
  lines on stderr;
* ``no_network_hub_id``: the same without ``HF_HUB_OFFLINE``, on a machine without network (huggingface_hub
  retries and logs every attempt: about a minute);
* ``redirected_log``: ``normquant eval --model smollm2-135m --windows 1 --seqlen 256`` with ``HF_HUB_OFFLINE=1``
  (data from ``$NORMQUANT_DATA_DIR``): carriage returns (``\\r``, progress-bar updates) and lines in its log.

Writes ``OUT.json`` (counts, commands, commits, package files the tree does not track, the first stderr lines)
and a five-line ``OUT.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from normquant.evaluation.records import git_commit  # noqa: E402

HUB_ID = ["eval", "--model", "some-org/not-a-model", "--windows", "1"]
COMMANDS = {  # name -> (arguments, with HF_HUB_OFFLINE=1)
    "offline_hub_id": (HUB_ID, True),
    "no_network_hub_id": (HUB_ID, False),
    "redirected_log": (["eval", "--model", "smollm2-135m", "--windows", "1", "--seqlen", "256"], True),
}
QUIET_VARS = ("NORMQUANT_DEBUG", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS",
              "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "HF_HUB_VERBOSITY", "HF_HUB_OFFLINE")


def _env(tree: Path, offline: bool) -> dict[str, str]:
    """The caller's environment importing normquant from ``tree``, without the variables that quiet output."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_VARS}
    return {**env, "PYTHONPATH": str(tree), **({"HF_HUB_OFFLINE": "1"} if offline else {})}


def _git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, check=True).stdout.strip()


def measure(tree: Path) -> dict:
    """The counts for one source tree (see the module doc)."""
    imported = subprocess.run([sys.executable, "-c", "import normquant; print(normquant.__file__)"], cwd=tree,
                              env=_env(tree, True), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(imported).resolve().is_relative_to(tree):
        raise SystemExit(f"normquant imported from {imported}, not from {tree}")
    out = {"tree": str(tree), "commit": git_commit(tree),
           "untracked_package_files": _git(tree, "ls-files", "--others", "--exclude-standard", "normquant").split(),
           "normquant_imported_from": imported}
    for name, (args, offline) in COMMANDS.items():
        with tempfile.TemporaryFile() as err:
            rc = subprocess.run([sys.executable, "-m", "normquant.cli", *args], cwd=tree, env=_env(tree, offline),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err).returncode
            err.seek(0)
            log = err.read().decode("utf-8", "replace")
        out[name] = {"command": ("HF_HUB_OFFLINE=1 " if offline else "") + "normquant " + " ".join(args), "exit": rc,
                     "stderr_lines": len(log.splitlines()), "carriage_returns": log.count("\r"),
                     "stderr_head": log.splitlines()[:5]}
    return out


def markdown(result: dict) -> str:
    """Five lines: what was run, the counts per tree (two trees), when and what else the trees held."""
    lines = ["# CLI noise before/after (`scripts/count_cli_noise.py`; stderr redirected to a file, not a terminal)",
             f"- hub-id failure: `normquant {' '.join(HUB_ID)}` with `HF_HUB_OFFLINE=1` and without it (no network "
             f"here); log: `HF_HUB_OFFLINE=1 normquant {' '.join(COMMANDS['redirected_log'][0])} 2> log`"]
    for label, t in result["trees"].items():
        off, net, log = (t[k] for k in COMMANDS)
        lines.append(f"- {label} ({t['commit']}): hub-id failure {off['stderr_lines']} stderr lines offline, "
                     f"{net['stderr_lines']} without network; log: {log['carriage_returns']} `\\r` in "
                     f"{log['stderr_lines']} lines (exit codes {off['exit']}/{net['exit']}/{log['exit']})")
    extra = "".join(f"; {label} also ran untracked {', '.join(t['untracked_package_files'])}"
                    for label, t in result["trees"].items() if t["untracked_package_files"])
    lines.append(f"- {result['date']}, {result['cpu_cores']} CPU cores (shared), one venv{extra}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, metavar="LABEL=PATH", help="a source tree to measure")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = ap.parse_args()
    from normquant.io import atomic_write_text

    result = {"what": __doc__.split("\n\n")[0], "date": datetime.date.today().isoformat(), "cpu_cores": os.cpu_count(),
              "trees": {label: measure(Path(path).resolve()) for label, path in (t.split("=", 1) for t in args.tree)}}
    atomic_write_text(args.out + ".json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out + ".md", markdown(result))
    print(markdown(result), end="")


if __name__ == "__main__":
    main()
