"""The bad-input catalogue (tests/bad_inputs.py) as tests: every case ends in one line ``normquant: error: ...``
(exit 2) naming what to fix, a refusal naming the tensor, or — for interruptions — exit 130 with nothing partial
left and a complete rerun. The few slow subprocess variants run in ``scripts/eval_fail_loudly.py`` only."""
import pytest

from tests.bad_inputs import CASES, build_workspace, run_case

FAST = [c for c in CASES if not c.slow]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("bad-inputs"))


def test_catalogue_size():
    categories = {c.category for c in CASES}
    assert len(CASES) >= 60 and categories == {"recipe", "model", "data", "export", "reload", "interruption"}
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", FAST, ids=[c.id for c in FAST])
def test_bad_input(workspace, case, tmp_path):
    outcome, detail = run_case(workspace, case, tmp_path / "case")
    assert outcome == "ok", f"{case.id}: {outcome}: {detail}"


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch):
    """A bug (not a user error) is one 'internal error' line, exit 1; --debug (anywhere) prints the traceback."""
    from normquant import cli
    from tests.bad_inputs import run_cli

    def bug(args):
        raise TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")

    monkeypatch.setitem(cli.COMMANDS, "eval", bug)
    plain = run_cli(["eval", "--model", "x"])
    assert plain.rc == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [
        "normquant: internal error: TypeError: unsupported operand type(s) for +: 'NoneType' and 'int' -- a bug in "
        "normquant; rerun with --debug for the traceback and report it"]
    debug = run_cli(["eval", "--model", "x", "--debug"])
    assert debug.rc == 1 and "Traceback (most recent call last)" in debug.stderr and "in bug" in debug.stderr
    assert run_cli(["--debug", "eval", "--model", "x"]).rc == 1
