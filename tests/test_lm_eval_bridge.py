"""The lm-eval bridge (``normquant eval --tasks``) on a task the tests own: tests/data/lmeval_tiny, ten multiple-choice
questions read by lm-eval's ``json`` loader (nothing downloads).

lm-eval scores each choice of a document by the summed log-probability of ``" " + choice`` after
``"Question: ...\\nAnswer:"`` and counts the document right when the correct choice has the largest sum (``acc``).
The tests compute those sums themselves from the model's logits and expect lm-eval's ``acc`` to equal the fraction
they get, exactly: both are argmaxes over the same sums. To show that equality is no luck, the tests also check that
lm-eval's sums agree with theirs to 1e-4 and that the two best choices of every document lie further apart than that
(so a rounding difference could not flip an argmax).
"""
import json
import sys
from pathlib import Path

import pytest
import torch

import normquant as nq
from normquant.cli import main
from normquant.evaluation.lm_eval_bridge import evaluate_tasks, result_rows
from normquant.models.loading import load_model
from normquant.quant.linear import QuantLinear
from tests.test_cli import tiny_dir  # noqa: F401  (a tiny random llama on disk with SmolLM2's tokenizer)

REPO = Path(__file__).resolve().parents[1]
TASK = "tests/data/lmeval_tiny/tiny_facts.yaml"  # its data_files are relative to the repository root
TASK_NAME = "normquant_tiny_facts"
ITEMS = [json.loads(line) for line in (REPO / "tests/data/lmeval_tiny/tiny_facts.jsonl").read_text().splitlines()]
W4 = {"scheme": {"ignore": [], "weights": {"bits": 4, "granularity": "channel"}}, "steps": ["rtn"]}  # lm_head too
TOL = 1e-4


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture
def lm_eval():
    return pytest.importorskip("lm_eval")


@torch.no_grad()
def choice_loglikelihoods(model, tok, item) -> list[float]:
    """log P(" " + choice | context) per choice, summed over the choice's tokens (the context's tokens are those of
    the context alone; the choice's, the rest of the whole text's). The choices run as one batch, padded on the
    right: a causal model's positions never see the padding after them."""
    context = f"Question: {item['question']}\nAnswer:"
    n_context = len(tok(context).input_ids)
    whole = [tok(f"{context} {choice}").input_ids for choice in item["choices"]]
    ids = torch.tensor([w + [0] * (max(map(len, whole)) - len(w)) for w in whole])
    logprobs = torch.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)  # row t predicts token t + 1
    return [logprobs[i, n_context - 1:len(w) - 1].gather(-1, ids[i, n_context:len(w), None]).sum().item()
            for i, w in enumerate(whole)]


def own_accuracy(model, tok, items) -> tuple[float, list[list[float]]]:
    sums = [choice_loglikelihoods(model, tok, item) for item in items]
    for s in sums:
        best, second = sorted(s, reverse=True)[:2]
        assert best - second > 10 * TOL, f"near-tie {s}: exact equality of acc would be luck"
    right = sum(max(range(len(s)), key=s.__getitem__) == item["answer"] for s, item in zip(sums, items))
    return right / len(items), sums


def lm_eval_acc(results) -> float:
    (row,) = [r for r in result_rows(results) if r["task"] == TASK_NAME and r["metric"] == "acc"]
    assert 0.0 <= row["value"] <= 1.0 and row["n_shot"] == 0
    return row["value"]


def assert_same_sums(results, own_sums):
    docs = sorted(results["samples"][TASK_NAME], key=lambda d: d["doc_id"])
    theirs = [[resp[0] for resp in d["filtered_resps"]] for d in docs]
    assert torch.allclose(torch.tensor(theirs), torch.tensor(own_sums), atol=TOL, rtol=0)


def test_float_model_acc_is_the_fraction_of_own_argmaxes(lm_eval, tiny_dir):
    model, tok = load_model(str(tiny_dir))
    results = evaluate_tasks(model, tok, [TASK], samples=True)
    acc, sums = own_accuracy(model, tok, ITEMS)
    assert_same_sums(results, sums)
    assert lm_eval_acc(results) == acc  # exact
    assert results["n-samples"][TASK_NAME] == {"original": 10, "effective": 10}


@pytest.fixture(scope="module")
def w4_tied(tiny_dir):
    """The tiny llama with its lm_head tied to the embeddings, quantized W4 by normquant (lm_head included), and
    the float model's scores of the first 3 documents."""
    model, tok = load_model(str(tiny_dir))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    float_sums = [choice_loglikelihoods(model, tok, item) for item in ITEMS[:3]]
    nq.quantize(model, W4)
    return model, tok, float_sums


def test_quantized_model_in_memory(lm_eval, w4_tied):
    """A model normquant just quantized, lm_head included and tied to the embeddings: lm-eval evaluates the
    QuantLinear modules as they are (HFLM's tie_weights() would otherwise put the float embedding back)."""
    model, tok, float_sums = w4_tied
    assert isinstance(model.lm_head, QuantLinear)
    ids = tok(ITEMS[0]["question"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    results = evaluate_tasks(model, tok, [TASK], limit=5, samples=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)  # the model lm-eval saw is the one still here
    acc, sums = own_accuracy(model, tok, ITEMS[:5])
    assert_same_sums(results, sums)
    assert lm_eval_acc(results) == acc  # exact
    assert max(abs(a - b) for f, q in zip(float_sums, sums) for a, b in zip(f, q)) > 1e-2  # W4 changed the scores


def test_cli_on_an_export_and_a_model_folder(lm_eval, tiny_dir, w4_tied, tmp_path, capsys):
    model, tok, _ = w4_tied
    recipe_hash = nq.as_recipe(W4).hash()
    export = nq.export(model, tmp_path / "w4", tokenizer=tok, metadata={"recipe_hash": recipe_hash})

    assert main(["eval", "--model", str(export), "--tasks", TASK, "--limit", "4", "--json", "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    (row,) = record["results"]
    reloaded, tok = load_model(str(export))
    acc, _ = own_accuracy(reloaded, tok, ITEMS[:4])
    assert row["value"] == acc  # exact, on the first 4 documents
    assert (row["task"], row["metric"], row["n_shot"], row["documents"], row["documents_total"]) == \
        (TASK_NAME, "acc", 0, 4, 10)
    assert row["stderr"] == pytest.approx((acc * (1 - acc) / 3) ** 0.5)  # sample std / sqrt(n), n = 4
    assert "first 4 of 10 documents" in row["protocol"]
    assert record["model"] == str(export) and record["recipe_hash"] == recipe_hash and record["limit"] == 4
    assert record["harness"] == f"lm-eval {lm_eval.__version__}" and record["environment"]["normquant"]

    assert main(["eval", "--model", str(tiny_dir), "--tasks", f"{TASK},", "--limit", "2", "--num-fewshot", "1",
                 "--batch-size", "2", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["task", "metric", "value", "stderr"]
    task, metric, value, stderr, n_shot, docs = lines[2].split()
    assert (task, metric, n_shot, docs) == (TASK_NAME, "acc", "1", "2/10") and 0 <= float(value) <= 1


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normquant: error: ") and "\n" not in err
    return err


def test_missing_lm_eval_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    err = _error(["eval", "--model", "not-loaded-before-the-check", "--tasks", TASK], capsys)
    assert "lm-eval" in err and "pip install 'normquant[lmeval]'" in err


def test_bad_task_options_are_one_line_before_loading(lm_eval, capsys):
    model = ["eval", "--model", "not-loaded-before-the-check"]
    assert "task file tests/data/nope.yaml not found" in _error(model + ["--tasks", "tests/data/nope.yaml"], capsys)
    assert "limit must be a positive number" in _error(model + ["--tasks", TASK, "--limit", "0"], capsys)
    assert "no task given" in _error(model + ["--tasks", " , "], capsys)
    assert "--num-fewshot goes with --tasks" in _error(model + ["--num-fewshot", "2"], capsys)
