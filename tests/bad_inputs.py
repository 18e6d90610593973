"""The bad-input catalogue: what a hostile or careless user can feed normquant, and what must come back.

Every case runs the real command line (:func:`normquant.cli.main`, in process; interruption cases in a
subprocess that is killed) against a small workspace: a tiny random llama with a word-level tokenizer saved to
disk, synthetic offline data laid out like ``../shared/data``, and valid exports to corrupt. A case passes when
the command ends in one line ``normquant: error: <what to fix>`` with exit status 2 (or, for interruptions, the
documented outcome: exit 130 and one line, nothing partial left, the rerun complete), the message contains what
the case expects (the key, tensor or flag to fix), and the case's own checks hold (nothing quantized before a
destination refusal, no ``.partial-*`` left after ``kill -9`` + rerun).

Outcomes: ``ok``; ``traceback`` (an exception escaped ``main``, or a traceback was printed); ``internal`` (exit
1, classified as a normquant bug); ``silent`` (exit 0 where an error was due: a corrupt export evaluated to a
number); ``multi-line`` / ``wrong-message`` / ``check-failed``.

``tests/test_bad_inputs.py`` runs every case; ``scripts/eval_bad_inputs.py`` writes the totals to
``eval/bad_inputs.json``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
MAX_LINE = 700  # longest acceptable error line (messages are cut at ~600 characters)
ERROR_LINE = re.compile(r"^normquant(?: [a-z]+)?: error: \S")


# ---------------------------------------------------------------------------------------------- workspace
def _word(i: int) -> str:
    """Alphabetic word ``i`` (``"ba"``, ``"bb"``, ...): passes self-generation's Latin first-token filter."""
    return "b" + "".join(chr(97 + int(d, 26)) for d in __import__("numpy").base_repr(i, 26).lower())


def _tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {_word(i): i for i in range(vocab - 2)} | {"<unk>": vocab - 2, "<eos>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _text(n_lines: int, vocab: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(_word(rng.randrange(vocab - 2)) for _ in range(rng.randrange(5, 30))) for _ in range(n_lines)]


@dataclass
class Workspace:
    root: Path
    model: Path = None
    data: Path = None
    exports: dict = field(default_factory=dict)

    def recipe(self, name: str, text: str) -> Path:
        p = self.root / "recipes" / name
        p.parent.mkdir(exist_ok=True)
        p.write_text(text)
        return p


W8A8 = ("scheme:\n  weights: {bits: 8, granularity: channel}\n"
        "  input_activations: {bits: 8, granularity: token, dynamic: true}\nsteps: [rtn]\n")
W8 = "scheme:\n  weights: {bits: 8, granularity: channel}\nsteps: [rtn]\n"
W4G16 = "scheme:\n  weights: {bits: 4, granularity: group, group_size: 16}\nsteps: [rtn]\n"
W8ASYM = "scheme:\n  weights: {bits: 8, symmetric: false, granularity: channel}\nsteps: [rtn]\n"
STATIC = ("scheme:\n  weights: {bits: 8}\n  input_activations: {bits: 8, granularity: tensor}\nsteps: [rtn]\n"
          "calibration: {samples: 4, seqlen: 32, batch_size: 2}\n")


def build_workspace(root: Path) -> Workspace:
    """The tiny model, the offline data and the valid exports the cases start from (a few seconds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from normquant.cli import main

    root = Path(root)
    ws = Workspace(root)
    vocab = 128
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, eos_token_id=vocab - 1,
                      bos_token_id=None, pad_token_id=None)
    ws.model = root / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(ws.model)
    _tiny_tokenizer(vocab).save_pretrained(ws.model)
    ws.data = root / "data"
    ws.data.mkdir()
    (ws.data / "wiki.test.raw").write_text("\n".join(_text(400, vocab, 0)) + "\n")
    (ws.data / "ptb.test.txt").write_text("\n".join(_text(200, vocab, 1)) + "\n")
    pq.write_table(pa.table({"text": _text(300, vocab, 2)}), ws.data / "c4_validation_2k.parquet")
    quiet = io.StringIO()
    for name, text in {"w8a8": W8A8, "w8": W8, "w4g16": W4G16, "w8asym": W8ASYM, "static": STATIC}.items():
        out = root / "exports" / name
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            rc = main(["export", str(ws.recipe(f"{name}.yaml", text)), "--model", str(ws.model), "--data-dir",
                       str(ws.data), "--output", str(out), "--quiet"])
        assert rc == 0, quiet.getvalue()
        ws.exports[name] = out
    return ws


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str
    escaped: str | None = None  # traceback of an exception that escaped main


def run_cli(argv: list[str], env: dict | None = None) -> Result:
    """``normquant.cli.main(argv)`` in process, stdout/stderr captured."""
    from normquant.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 2
            except BaseException:
                return Result(None, out.getvalue(), err.getvalue(), traceback.format_exc())
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(rc, out.getvalue(), err.getvalue())


def run_subprocess(code: str, cwd: Path, timeout: float = 120) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {path.name}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def leftovers(folder: Path) -> list[str]:
    """Temporaries of atomic writes (``.<name>.partial-*`` / ``.<name>.old-*``) in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if re.match(r"^\..*\.(partial|old)-", p.name))


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    id: str
    category: str  # recipe | model | data | export | reload | interruption
    build: Callable  # (ws, tmp) -> argv, or (ws, tmp) -> Outcome for custom cases
    expect: tuple[str, ...] = ()  # substrings of the error line (case-insensitive)
    check: Callable | None = None  # (ws, tmp, result) -> None, raises AssertionError
    context: Callable | None = None  # (ws, tmp) -> context manager around the run (monkeypatches)
    custom: bool = False  # build runs the case itself and returns (outcome, detail)
    note: str = ""
    slow: bool = False  # a subprocess variant the test suite leaves to scripts/eval_bad_inputs.py


CASES: list[Case] = []


def case(id, category, expect=(), check=None, context=None, custom=False, note="", slow=False):
    def register(build):
        CASES.append(Case(id, category, build, tuple(expect) if isinstance(expect, (tuple, list)) else (expect,),
                          check, context, custom, note, slow))
        return build
    return register


def _run_args(ws: Workspace, tmp: Path, recipe: Path | str, *extra) -> list:
    return ["run", recipe, "--model", ws.model, "--data-dir", ws.data, "--windows", "1", "--seqlen", "32",
            "--no-baseline", "--quiet", "--output", tmp / "results", *extra]


def _recipe_case(id, text: str | Callable, expect, extra=(), note=""):
    def build(ws, tmp):
        body = text() if callable(text) else text
        path = tmp / "r.yaml"
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        return _run_args(ws, tmp, path, *extra)
    case(id, "recipe", expect, note=note)(build)


_LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
_recipe_case("yaml-billion-laughs", _LAUGHS, "expands to more than")
_recipe_case("yaml-self-referencing-anchor", "scheme: &s {weights: *s}\n", "self-referencing")
_recipe_case("yaml-self-referencing-list", "name: x\nsteps: &l [rtn, *l]\nscheme: {weights: {bits: 8}}\n",
             "self-referencing")
_recipe_case("yaml-timestamp-tag", W8 + "name: !!timestamp 2024-01-01\n", ("explicit yaml tag", "!!timestamp"))
_recipe_case("yaml-int-tag", "scheme:\n  weights: {bits: !!int abc}\n", ("explicit yaml tag", "!!int"))
_recipe_case("yaml-python-tag", "scheme: !!python/object/apply:os.system ['echo pwned']\n", "explicit yaml tag")
_recipe_case("yaml-binary-tag", W8 + "name: !!binary aGVsbG8=\n", "explicit yaml tag")
_recipe_case("yaml-custom-tag", W8 + "name: !mytag x\n", "explicit yaml tag")
_recipe_case("steps-null-key", W8.replace("steps: [rtn]", "steps: [{null: 1}]"), "not a name")
_recipe_case("steps-a-string", W8.replace("steps: [rtn]", "steps: rtn"), "steps: [rtn]")
_recipe_case("steps-a-mapping", W8.replace("steps: [rtn]", "steps: {gptq: {}}"), "steps is a list")
_recipe_case("step-options-not-mapping", W8.replace("steps: [rtn]", "steps: [{gptq: 3}]"), "gptq")
_recipe_case("step-unknown", W8.replace("steps: [rtn]", "steps: [gtpq]"), "did you mean 'gptq'")
_recipe_case("steps-order", W8.replace("steps: [rtn]", "steps: [gptq, repquant]\ncalibration: {}"),
             ("repquant", "gptq", "first"))
_recipe_case("steps-two-weight-steps", W8.replace("steps: [rtn]", "steps: [rtn, gptq]\ncalibration: {}"),
             "both quantize")
_recipe_case("yaml-syntax-unclosed", "scheme:\n  weights: {bits: 8\n", ("r.yaml:3:", "not valid yaml"))
_recipe_case("yaml-syntax-tab", "scheme:\n\tweights: {bits: 8}\n", ("r.yaml:2:1", "\\t"))
_recipe_case("yaml-syntax-bad-indent", "scheme:\n  weights:\n    bits: 8\n   granularity: channel\n", "r.yaml:4:")
_recipe_case("yaml-duplicate-key", "scheme:\n  weights: {bits: 8}\n  weights: {bits: 4}\n",
             ("duplicate key 'weights'", "line 2"))
_recipe_case("yaml-duplicate-top-key", W8 + "name: a\nname: b\n", "duplicate key 'name'")
_recipe_case("static-without-calibration", "scheme:\n  weights: {bits: 8}\n"
             "  input_activations: {bits: 8, granularity: tensor}\n", "calibration section")
_recipe_case("gptq-without-calibration", W8.replace("[rtn]", "[gptq]"), ("calibration section", "gptq"))
_recipe_case("recipe-too-large", lambda: W8 + "description: '" + "x" * (1 << 20) + "'\n", "larger than")
_recipe_case("recipe-not-utf8", b"scheme:\n  weights: {bits: 8}\nname: \xff\xfe\n", ("r.yaml:3", "utf-8"))
_recipe_case("recipe-binary-garbage", bytes(range(256)) * 4, "r.yaml")
_recipe_case("recipe-empty", "", "empty")
_recipe_case("recipe-only-comment", "# nothing\n", "empty")
_recipe_case("recipe-top-level-list", "- rtn\n- gptq\n", "mapping")
_recipe_case("recipe-scalar", "just a string\n", "mapping")
_recipe_case("yaml-deep-nesting", "name: " + "[" * 2000 + "]" * 2000 + "\n", "nested")
_recipe_case("yaml-huge-integer", W8 + "calibration: {seed: " + "9" * 5000 + "}\n", "digits")
_recipe_case("value-500kb-echo", "scheme:\n  weights: {bits: '" + "x" * 500_000 + "'}\n", ("bits", "characters"))
_recipe_case("bits-9", "scheme:\n  weights: {bits: 9}\n", ("bits", "less than or equal to 8"))
_recipe_case("bits-string", "scheme:\n  weights: {bits: eight}\n", ("bits", "valid integer"))
_recipe_case("integer-key", W8 + "1: 2\n", "not a name")
_recipe_case("yes-key", W8 + "yes: 1\n", "bool")
_recipe_case("complex-key", W8 + "? [a, b]\n: 1\n", "as a key")
_recipe_case("scheme-null", "scheme: null\n", "scheme")
_recipe_case("bad-regex-target", "scheme:\n  targets: ['re:(']\n  weights: {bits: 8}\n", "regular expression")
_recipe_case("undefined-alias", "scheme: *nope\n", "undefined alias")
_recipe_case("merge-int-key", "scheme:\n  weights: {<<: {1: 2}, bits: 8}\n", "not a name")
_recipe_case("evaluation-a-string-with-flag", W8 + "evaluation: wikitext2\n", ("evaluation", "mapping", "--windows"))
_recipe_case("windows-0-on-run", W8, ("evaluation.windows = 0", "command line"), extra=("--windows", "0"))
_recipe_case("seqlen-1-on-run", W8, ("evaluation.seqlen = 1", "command line"), extra=("--seqlen", "1"))
_recipe_case("calib-samples-0-on-run", STATIC, ("calibration.samples = 0", "command line"),
             extra=("--calib-samples", "0"))
_recipe_case("calibration-on-test-split", STATIC.replace("batch_size: 2}", "batch_size: 2, split: test}"),
             "test split")
_recipe_case("dtype-float8", W8 + "dtype: float8\n", "dtype")
_recipe_case("clip-ratio-nan", "scheme:\n  weights: {bits: 8, clip_ratio: .nan}\n", "clip_ratio")
_recipe_case("two-documents", W8 + "---\nname: b\n", "another document")
_recipe_case("typo-top-key", W8 + "evalution: {windows: 1}\n", "did you mean 'evaluation'")
_recipe_case("group-size-without-group", "scheme:\n  weights: {bits: 4, group_size: 16}\n", "group_size")
_recipe_case("quantizes-nothing", "scheme: {}\n", "quantizes nothing")
_recipe_case("samples-zero", STATIC.replace("samples: 4", "samples: 0"), "samples")


@case("recipe-is-a-directory", "recipe", "not a file")
def _(ws, tmp):
    (tmp / "dir.yaml").mkdir()
    return _run_args(ws, tmp, tmp / "dir.yaml")


@case("recipe-missing", "recipe", "not found")
def _(ws, tmp):
    return _run_args(ws, tmp, tmp / "nope.yaml")


@case("recipe-unreadable", "recipe", ("cannot read", "r.yaml"),
      context=lambda ws, tmp: _patched("builtins.open", _deny(tmp / "r.yaml")))
def _(ws, tmp):
    (tmp / "r.yaml").write_text(W8)
    return _run_args(ws, tmp, tmp / "r.yaml")


# ---- model
def _model_case(id, make, expect, command="eval", extra=(), note=""):
    def build(ws, tmp):
        model = make(ws, tmp)
        if command == "eval":
            return ["eval", "--model", model, "--data-dir", ws.data, "--windows", "1", "--seqlen", "32", "--quiet",
                    *extra]
        return _run_args(ws, tmp, ws.recipe("w8.yaml", W8), "--model", model, *extra)
    case(id, "model", expect, note=note)(build)


def _copy_model(ws, tmp) -> Path:
    dest = tmp / "model"
    shutil.copytree(ws.model, dest)
    return dest


def _edit_json(path: Path, edit: Callable) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _mk_truncated(ws, tmp):
    d = _copy_model(ws, tmp)
    _truncate(d / "model.safetensors")
    return d


def _mk_model_type(ws, tmp):
    d = _copy_model(ws, tmp)
    _edit_json(d / "config.json", lambda c: c.update(model_type="llamazing"))
    return d


def _mk_bad_config_json(ws, tmp):
    d = _copy_model(ws, tmp)
    (d / "config.json").write_text("{\"model_type\": \"llama\",")
    return d


def _mk_nan(ws, tmp):
    import torch
    from safetensors.torch import load_file, save_file

    d = _copy_model(ws, tmp)
    tensors = load_file(d / "model.safetensors")
    key = next(k for k in tensors if "mlp.down_proj" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _mk_no_weights(ws, tmp):
    d = _copy_model(ws, tmp)
    (d / "model.safetensors").unlink()
    return d


def _mk_no_tokenizer(ws, tmp):
    d = _copy_model(ws, tmp)
    for p in d.glob("tokenizer*"):
        p.unlink()
    (d / "special_tokens_map.json").unlink(missing_ok=True)
    return d


def _mk_bad_hidden(ws, tmp):
    d = _copy_model(ws, tmp)
    _edit_json(d / "config.json", lambda c: c.update(hidden_size=48))
    return d


def _mk_empty_dir(ws, tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _mk_gguf(ws, tmp):
    (tmp / "m.gguf").write_bytes(b"GGUF" + os.urandom(256))
    return tmp / "m.gguf"


def _mk_text_file(ws, tmp):
    (tmp / "model.txt").write_text("not a model\n")
    return tmp / "model.txt"


_model_case("model-unknown-name", lambda ws, tmp: "smollm9-1t", "not a packaged model")
_model_case("model-missing-path", lambda ws, tmp: "./no/such/model", "not a packaged model")
_model_case("model-empty-folder", _mk_empty_dir, "cannot load model")
_model_case("model-truncated-safetensors", _mk_truncated, "cannot load model")
_model_case("model-unknown-model-type", _mk_model_type, "cannot load model")
_model_case("model-config-not-json", _mk_bad_config_json, "cannot load model")
_model_case("model-nan-weights", _mk_nan, ("nan/inf", "down_proj"))
_model_case("model-nan-weights-run", _mk_nan, ("nan/inf", "down_proj"), command="run")
_model_case("model-garbage-gguf", _mk_gguf, "cannot load model")
_model_case("model-no-weights-file", _mk_no_weights, "cannot load model")
_model_case("model-no-tokenizer", _mk_no_tokenizer, "cannot load model")
_model_case("model-config-wrong-size", _mk_bad_hidden, "cannot load model")
_model_case("model-is-a-text-file", _mk_text_file, "model")
_model_case("device-missing-cuda", lambda ws, tmp: ws.model, ("cuda:7", "--device cpu"), extra=("--device", "cuda:7"))
_model_case("device-unknown", lambda ws, tmp: ws.model, "unknown device", extra=("--device", "tpu"))


@case("targets-match-nothing", "model", "match no linear")
def _(ws, tmp):
    return _run_args(ws, tmp, ws.recipe("nothing.yaml", "scheme:\n  targets: [nothing_here]\n  weights: {bits: 8}\n"))


@case("group-size-does-not-divide", "model", ("group", "divid"))
def _(ws, tmp):
    return _run_args(ws, tmp, ws.recipe("g24.yaml", "scheme:\n  weights: {bits: 4, granularity: group, "
                                                    "group_size: 24}\n"))


# ---- data
def _data_copy(ws, tmp) -> Path:
    d = tmp / "data"
    shutil.copytree(ws.data, d)
    return d


def _eval_args(ws, data, *extra):
    return ["eval", "--model", ws.model, "--data-dir", data, "--quiet", *extra]


@case("inspect-samples-0", "data", "at least 1 sample")
def _(ws, tmp):
    return ["inspect", ws.model, "--samples", "0", "--seqlen", "16", "--data-dir", ws.data, "--output", tmp / "i"]


@case("inspect-output-unwritable", "export", "/sys/normquant-inspect")
def _(ws, tmp):
    return ["inspect", ws.model, "--samples", "2", "--seqlen", "16", "--data-dir", ws.data, "--output",
            "/sys/normquant-inspect"]


@case("eval-windows-0", "data", "windows")
def _(ws, tmp):
    return _eval_args(ws, ws.data, "--windows", "0", "--seqlen", "32")


@case("eval-windows-negative", "data", "windows")
def _(ws, tmp):
    return _eval_args(ws, ws.data, "--windows", "-3", "--seqlen", "32")


@case("eval-seqlen-1", "data", "seqlen")
def _(ws, tmp):
    return _eval_args(ws, ws.data, "--windows", "1", "--seqlen", "1")


@case("seqlen-longer-than-data", "data", ("tokens", "window"))
def _(ws, tmp):
    d = _data_copy(ws, tmp)
    (d / "wiki.test.raw").write_text("ba bb bc\n" * 10)
    return _eval_args(ws, d, "--windows", "1", "--seqlen", "128")


@case("seqlen-longer-than-model", "data", ("seqlen", "max_position_embeddings"))
def _(ws, tmp):
    return _eval_args(ws, ws.data, "--windows", "1", "--seqlen", "1024")


@case("empty-eval-text", "data", "tokens")
def _(ws, tmp):
    d = _data_copy(ws, tmp)
    (d / "wiki.test.raw").write_text("")
    return _eval_args(ws, d, "--windows", "1", "--seqlen", "32")


@case("eval-text-not-utf8", "data", "wiki.test.raw")
def _(ws, tmp):
    d = _data_copy(ws, tmp)
    (d / "wiki.test.raw").write_bytes(b"ba bb\n\xff\xfe\xfa bc\n" * 100)
    return _eval_args(ws, d, "--windows", "1", "--seqlen", "32")


@case("data-dir-missing-file", "data", "not found")
def _(ws, tmp):
    (tmp / "nodata").mkdir()
    return _eval_args(ws, tmp / "nodata", "--windows", "1", "--seqlen", "32")


@case("data-dir-is-a-file", "data", "not found")
def _(ws, tmp):
    (tmp / "file").write_text("x")
    return _eval_args(ws, tmp / "file", "--windows", "1", "--seqlen", "32")


@case("ptb-missing", "data", "ptb.test.txt")
def _(ws, tmp):
    d = _data_copy(ws, tmp)
    (d / "ptb.test.txt").unlink()
    return _eval_args(ws, d, "--dataset", "ptb", "--windows", "1", "--seqlen", "32")


@case("calibration-parquet-corrupt", "data", "c4_validation_2k.parquet")
def _(ws, tmp):
    d = _data_copy(ws, tmp)
    _truncate(d / "c4_validation_2k.parquet", 0.3)
    return _run_args(ws, tmp, ws.recipe("static.yaml", STATIC), "--data-dir", d)


@case("calibration-parquet-empty", "data", "tokens")
def _(ws, tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = _data_copy(ws, tmp)
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "c4_validation_2k.parquet")
    return _run_args(ws, tmp, ws.recipe("static.yaml", STATIC), "--data-dir", d)


@case("calibration-seqlen-longer-than-data", "data", "tokens")
def _(ws, tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = _data_copy(ws, tmp)
    pq.write_table(pa.table({"text": ["ba bb bc"] * 5}), d / "c4_validation_2k.parquet")
    return _run_args(ws, tmp, ws.recipe("longcal.yaml", STATIC.replace("seqlen: 32", "seqlen: 128")), "--data-dir", d)


@case("calibration-seqlen-longer-than-model", "data", ("calibration seqlen", "max_position_embeddings"))
def _(ws, tmp):
    return _run_args(ws, tmp, ws.recipe("longcal.yaml", STATIC.replace("seqlen: 32", "seqlen: 4096")))


# ---- export destinations (all refused before any quantizing: nothing printed, nothing written)
def _nothing_done(ws, tmp, result):
    assert "ppl" not in result.stdout and "exported" not in result.stdout, result.stdout
    assert not (tmp / "results" / "results.json").exists()


def _export_args(ws, tmp, dest, *extra):
    return ["export", ws.recipe("w8.yaml", W8), "--model", ws.model, "--data-dir", ws.data, "--output", dest,
            "--quiet", *extra]


@contextlib.contextmanager
def _immutable(path: Path):
    path.mkdir(exist_ok=True)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        os.chmod(path, 0o555)  # enough for a non-root user
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


@case("sensitivity-report-unwritable", "export", ("report folder", "not writable"), check=_nothing_done)
def _(ws, tmp):
    return ["sensitivity", ws.recipe("w8.yaml", W8), "--model", ws.model, "--data-dir", ws.data, "--windows", "1",
            "--seqlen", "32", "--output", "/sys/normquant-report.json"]


@case("sensitivity-report-is-a-folder", "export", "is a folder", check=_nothing_done)
def _(ws, tmp):
    (tmp / "rep").mkdir()
    return ["sensitivity", ws.recipe("w8.yaml", W8), "--model", ws.model, "--data-dir", ws.data, "--windows", "1",
            "--seqlen", "32", "--output", tmp / "rep"]


@case("export-dest-read-only", "export", ("not writable", "ro"), check=_nothing_done,
      context=lambda ws, tmp: _immutable(tmp / "ro"))
def _(ws, tmp):
    return _export_args(ws, tmp, tmp / "ro" / "model")


@case("run-export-dest-read-only", "export", ("not writable",), check=_nothing_done,
      context=lambda ws, tmp: _immutable(tmp / "ro"))
def _(ws, tmp):
    return _run_args(ws, tmp, ws.recipe("w8.yaml", W8), "--export", tmp / "ro" / "model")


@case("export-dest-unwritable-mount", "export", "not writable", check=_nothing_done,
      note="/sys is not writable in a container, even for root")
def _(ws, tmp):
    return _export_args(ws, tmp, "/sys/normquant-test-export")


@case("export-dest-is-a-file", "export", "not a directory", check=_nothing_done)
def _(ws, tmp):
    (tmp / "file").write_text("x")
    return _export_args(ws, tmp, tmp / "file")


@case("export-dest-exists", "export", "--force", check=_nothing_done)
def _(ws, tmp):
    (tmp / "exists").mkdir()
    return _export_args(ws, tmp, tmp / "exists")


@case("export-dest-under-a-file", "export", "is a file", check=_nothing_done)
def _(ws, tmp):
    (tmp / "file").write_text("x")
    return _export_args(ws, tmp, tmp / "file" / "sub" / "model")


@case("export-dest-no-space", "export", "not enough free space", check=_nothing_done,
      context=lambda ws, tmp: _patched("shutil.disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10)))
def _(ws, tmp):
    return _export_args(ws, tmp, tmp / "model")


@case("run-results-folder-is-a-file", "export", "not a directory", check=_nothing_done)
def _(ws, tmp):
    (tmp / "results").write_text("x")
    return _run_args(ws, tmp, ws.recipe("w8.yaml", W8))


@case("recipe-export-path-read-only", "export", "not writable", check=_nothing_done,
      context=lambda ws, tmp: _immutable(tmp / "ro"))
def _(ws, tmp):
    return _run_args(ws, tmp, ws.recipe("exp.yaml", W8 + f"export: {{enabled: true, path: '{tmp / 'ro' / 'm'}'}}\n"))


@case("export-write-fails-midway", "export", ("no space left", "model.safetensors"),
      context=lambda ws, tmp: _patched("normquant.export.checkpoint.save_file", _enospc))
def _(ws, tmp):
    return _export_args(ws, tmp, tmp / "model")


@case("export-per-channel-static-activations", "export", "per-channel activation")
def _(ws, tmp):
    argv = _export_args(ws, tmp, tmp / "model")
    argv[1] = ws.recipe("pc.yaml", "scheme:\n  weights: {bits: 8}\n  input_activations: {bits: 8, granularity: channel}"
                                   "\ncalibration: {samples: 4, seqlen: 32}\n")
    return argv


def _enospc(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 100)
    raise OSError(28, "No space left on device", filename)


def _deny(path: Path):
    import builtins

    real = builtins.open

    def fake(file, *args, **kwargs):
        if Path(str(file)) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)
    return fake


@contextlib.contextmanager
def _patched(target: str, value):
    import importlib

    module_name, _, attr = target.rpartition(".")
    module = importlib.import_module(module_name)
    old = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, old)


# ---- reload: corrupt or hand-edited exports must be refused, never evaluated
def _corrupt(source: str, edit: Callable, expect, id: str, note: str = ""):
    def build(ws, tmp):
        d = tmp / "export"
        shutil.copytree(ws.exports[source], d)
        edit(d)
        return ["eval", "--model", d, "--data-dir", ws.data, "--windows", "1", "--seqlen", "32", "--quiet"]
    case(id, "reload", expect, note=note)(build)


def _config(d: Path, edit: Callable) -> None:
    _edit_json(d / "config.json", edit)


def _group(c: dict) -> dict:
    return c["quantization_config"]["config_groups"]["group_0"]


def _rewrite_tensors(d: Path, edit: Callable) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _rehash_manifest(d: Path) -> None:
    """An adversarial edit: recompute the manifest after editing (only the structural checks can catch it)."""
    from normquant.export.verify import write_manifest

    write_manifest(d, "model.safetensors")


def _flip_byte(d: Path) -> None:
    from normquant.export.verify import read_safetensors_header

    header, start = read_safetensors_header(d / "model.safetensors")
    name = next(k for k in sorted(header) if k.endswith("mlp.up_proj.weight_packed"))
    offset = start + header[name]["data_offsets"][0] + 5
    data = bytearray((d / "model.safetensors").read_bytes())
    data[offset] ^= 0x10
    (d / "model.safetensors").write_bytes(bytes(data))


def _cut_columns(t: dict) -> None:
    k = _first(t, "self_attn.q_proj.weight_packed")
    t[k] = t[k][:, :-1].contiguous()


def _scale_shape(t: dict) -> None:
    k = _first(t, "mlp.gate_proj.weight_scale")
    t[k] = t[k][:, :1].contiguous()


def _scale_fp16(t: dict) -> None:
    k = _first(t, "mlp.gate_proj.weight_scale")
    t[k] = t[k].half()


def _scale_nan(t: dict) -> None:
    k = _first(t, "mlp.gate_proj.weight_scale")
    t[k][0, 0] = float("nan")


def _weight_shape(t: dict) -> None:
    import torch

    k = _first(t, "self_attn.o_proj.weight_shape")
    t[k] = torch.tensor([32, 16], dtype=torch.int64)


def _extra_tensor(t: dict) -> None:
    import torch

    t["model.layers.0.mlp.extra"] = torch.zeros(3)


def _drop_tensor(t: dict) -> None:
    del t[_first(t, "self_attn.k_proj.weight_scale")]


def _both_bits(d: Path, bits: int) -> None:
    def edit(c):
        _group(c)["weights"]["num_bits"] = bits
        c["normquant"]["quant_specs"]["group_0"]["weights"]["bits"] = bits
    _config(d, edit)


def _both_group_size(d: Path) -> None:
    def edit(c):
        _group(c)["weights"]["group_size"] = 8
        c["normquant"]["quant_specs"]["group_0"]["weights"]["group_size"] = 8
    _config(d, edit)


def _both_symmetric(d: Path) -> None:
    def edit(c):
        _group(c)["weights"]["symmetric"] = False
        c["normquant"]["quant_specs"]["group_0"]["weights"]["symmetric"] = False
    _config(d, edit)


_corrupt("w8", lambda d: _config(d, lambda c: _group(c)["weights"].update(num_bits=4)), ("num_bits", "edited"),
         "bits-edited-8-to-4-in-quantization-config")
_corrupt("w8", lambda d: _both_bits(d, 4), ("weight_packed", "4-bit"), "bits-edited-in-config-and-specs")
_corrupt("w8", lambda d: (_both_bits(d, 4), _rehash_manifest(d)), ("weight_packed", "4-bit"),
         "bits-edited-and-manifest-rehashed", note="structural checks alone")
_corrupt("w8a8", lambda d: (_both_bits(d, 6), _rehash_manifest(d)), ("weight holds codes", "outside the 6-bit grid"),
         "int-codes-outside-edited-grid")
_corrupt("w4g16", lambda d: _rewrite_tensors(d, _cut_columns), ("q_proj.weight_packed", "shape"),
         "weight-packed-columns-cut")
_corrupt("w4g16", lambda d: (_rewrite_tensors(d, _cut_columns), _rehash_manifest(d)), ("q_proj.weight_packed",),
         "weight-packed-columns-cut-rehashed")
_corrupt("w4g16", lambda d: (_rewrite_tensors(d, _weight_shape), _rehash_manifest(d)), "o_proj.weight_shape",
         "weight-shape-edited")
_corrupt("w4g16", lambda d: (_rewrite_tensors(d, _scale_shape), _rehash_manifest(d)), "gate_proj.weight_scale",
         "scales-do-not-match-groups")
_corrupt("w4g16", lambda d: (_both_group_size(d), _rehash_manifest(d)), "weight_scale", "group-size-edited")
_corrupt("w4g16", lambda d: (_rewrite_tensors(d, _scale_fp16), _rehash_manifest(d)), ("weight_scale", "float"),
         "scale-dtype-changed")
_corrupt("w4g16", lambda d: (_rewrite_tensors(d, _scale_nan), _rehash_manifest(d)), ("weight_scale", "non-finite"),
         "scale-nan")
_corrupt("w4g16", lambda d: (_both_symmetric(d), _rehash_manifest(d)), "weight_zero_point", "symmetric-flag-edited")
_corrupt("w4g16", lambda d: _rewrite_tensors(d, _extra_tensor), "mlp.extra", "extra-tensor")
_corrupt("w4g16", lambda d: (_rewrite_tensors(d, _extra_tensor), _rehash_manifest(d)), "mlp.extra",
         "extra-tensor-rehashed")
_corrupt("w4g16", lambda d: _rewrite_tensors(d, _drop_tensor), "k_proj.weight_scale", "tensor-removed")
_corrupt("w4g16", _flip_byte, ("up_proj.weight_packed", "checksum"), "bit-flip-in-tensor")
_corrupt("w4g16", lambda d: _truncate(d / "model.safetensors", 0.7), "truncated", "truncated-safetensors")
_corrupt("w4g16", lambda d: _truncate(d / "model.safetensors", 0.0001), "model.safetensors", "safetensors-8-bytes")
_corrupt("w4g16", lambda d: (d / "normquant_manifest.json").unlink(), "manifest", "manifest-missing")
_corrupt("w4g16", lambda d: (d / "normquant_manifest.json").write_text("{"), "manifest", "manifest-garbage")
_corrupt("w4g16", lambda d: (d / "model.safetensors").unlink(), "model.safetensors", "weights-file-missing")
_corrupt("w8", lambda d: _config(d, lambda c: c["quantization_config"].update(config_groups="group_0")),
         "config_groups", "config-groups-a-string")
_corrupt("w8", lambda d: _config(d, lambda c: c["quantization_config"].update(quant_method="gptq")),
         ("quant_method", "gptq"), "quant-method-gptq")
_corrupt("w8", lambda d: _config(d, lambda c: _group(c)["weights"].update(num_bits="eight")), "num_bits",
         "num-bits-a-string")
_corrupt("w8", lambda d: _config(d, lambda c: _group(c).update(format="int-quantized")), "format",
         "format-edited")
_corrupt("w8", lambda d: _config(d, lambda c: _group(c).update(targets=["model.layers.9.mlp.up_proj"])),
         "match no linear", "targets-edited")
_corrupt("w8", lambda d: _config(d, lambda c: _group(c).update(targets="all")), "targets", "targets-a-string")
_corrupt("w8", lambda d: _config(d, lambda c: c["normquant"].update(export_version=99)), "upgrade",
         "export-version-from-the-future")
_corrupt("w8", lambda d: _config(d, lambda c: c["normquant"].update(quant_specs=[])), "quant_specs",
         "quant-specs-a-list")
_corrupt("w8", lambda d: _config(d, lambda c: c["normquant"]["quant_specs"]["group_0"]["weights"].update(bits=99)),
         "quant_specs", "quant-spec-invalid")
_corrupt("w8", lambda d: (d / "config.json").write_text("{not json"), "config.json", "config-not-json")
_corrupt("w8", lambda d: _config(d, lambda c: c.update(model_type="llamazing")), "config.json",
         "model-type-edited")
_corrupt("w8", lambda d: _config(d, lambda c: c.update(hidden_size=48)), "shape", "hidden-size-edited")
_corrupt("w8", lambda d: (d / "tokenizer.json").write_text("{}"), ("tokenizer.json", "checksum"),
         "tokenizer-edited")
_corrupt("w8asym", lambda d: _rewrite_tensors(d, lambda t: t.pop(_first(t, "v_proj.weight_zero_point"))),
         "v_proj.weight_zero_point", "zero-point-removed")
_corrupt("static", lambda d: (_rewrite_tensors(d, lambda t: t.pop(_first(t, "q_proj.input_scale"))),
                              _rehash_manifest(d)), "q_proj.input_scale", "input-scale-removed")


# ---- interruption (subprocesses, killed)
# The child restores Python's own SIGINT handling: a shell that starts the test run in the background (`cmd &`)
# hands its children SIGINT ignored, and Ctrl-C is what these cases are about.
_WRAP = """
import sys, time, pathlib, signal
signal.signal(signal.SIGINT, signal.default_int_handler)
flag = pathlib.Path({flag!r})
import {module} as m
real = m.{attr}
def slow(*a, **k):
    flag.write_text("here")
    time.sleep(120)
    return real(*a, **k)
m.{attr} = slow
from normquant.cli import main
sys.exit(main({argv!r}))
"""


def _spawn_and_wait(ws, tmp, module, attr, argv):
    flag = tmp / "flag"
    proc = run_subprocess(_WRAP.format(flag=str(flag), module=module, attr=attr, argv=[str(a) for a in argv]), tmp)
    _wait_for(flag, proc)
    return proc


def _outcome_of(result: Result, expect=(), check=None, ws=None, tmp=None) -> tuple[str, str]:
    if result.escaped:
        return "traceback", result.escaped.strip().splitlines()[-1]
    if "Traceback (most recent call last)" in result.stderr:
        return "traceback", result.stderr.strip().splitlines()[-1]
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if result.rc == 0:
        return "silent", (result.stdout.strip().splitlines() or [""])[-1][:200]
    if result.rc == 1 and "internal error" in last:
        return "internal", last[:300]
    if result.rc != 2 or not ERROR_LINE.match(last):
        return "multi-line", f"rc {result.rc}: {last[:300]}"
    if len(last) > MAX_LINE:
        return "multi-line", f"{len(last)} characters"
    missing = [e for e in expect if e.lower() not in last.lower()]
    if missing:
        return "wrong-message", f"missing {missing}: {last[:400]}"
    if check is not None:
        try:
            check(ws, tmp, result)
        except AssertionError as e:
            return "check-failed", str(e)[:300]
    return "ok", last


@case("kill-9-during-export-then-rerun", "interruption", custom=True)
def _(ws, tmp):
    argv = _export_args(ws, tmp, tmp / "model")
    proc = _spawn_and_wait(ws, tmp, "normquant.export.checkpoint", "write_manifest", argv)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = leftovers(tmp)
    assert left and not (tmp / "model").exists(), left  # the kill left its partial export behind
    rerun = run_cli(argv)
    assert rerun.rc == 0, rerun.stderr
    after = leftovers(tmp)
    if after:
        return "check-failed", f"left after rerun: {after}"
    from normquant.export import load_quantized

    load_quantized(tmp / "model")
    return "ok", f"killed with {left[0][:24]}... on disk; rerun removed it and exported (0 left)"


@case("kill-9-during-forced-replacement-then-rerun", "interruption", custom=True)
def _(ws, tmp):
    """Killed between the two renames of a --force replacement: the old export is aside, the new one not in place."""
    from normquant.io import _host

    argv = _export_args(ws, tmp, tmp / "model", "--force")
    dead = subprocess.Popen(["true"])
    dead.wait()
    shutil.copytree(ws.exports["w8"], tmp / f".model.old-{_host()}-{dead.pid}-0123abcd")
    shutil.copytree(ws.exports["w8"], tmp / f".model.partial-{_host()}-{dead.pid}-4567cdef")
    rerun = run_cli(argv)
    assert rerun.rc == 0, rerun.stderr
    after = leftovers(tmp)
    if after:
        return "check-failed", f"left after rerun: {after}"
    return "ok", "aside copy restored, then replaced; 0 left"


@case("stale-partial-of-live-process-kept", "interruption", custom=True)
def _(ws, tmp):
    from normquant.io import _host

    live = subprocess.Popen(["sleep", "60"])
    try:
        keep = tmp / f".other.partial-{_host()}-{live.pid}-89abcdef"
        keep.mkdir()
        rerun = run_cli(_export_args(ws, tmp, tmp / "model"))
        assert rerun.rc == 0, rerun.stderr
        if not keep.exists():
            return "check-failed", "removed the temporary of a live process"
        return "ok", "temporary of a running process left alone"
    finally:
        live.kill()
        live.wait()


def _signal_case(sig, module, attr, command):
    def build(ws, tmp):
        argv = (_export_args(ws, tmp, tmp / "model") if command == "export"
                else _run_args(ws, tmp, ws.recipe("w8.yaml", W8), "--export", tmp / "model"))
        proc = _spawn_and_wait(ws, tmp, module, attr, argv)
        proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            return "check-failed", "did not stop"
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        if "Traceback" in err:
            return "traceback", lines[-1] if lines else ""
        if proc.returncode != 130 or not lines or not lines[-1].startswith("normquant: interrupted"):
            return "check-failed", f"rc {proc.returncode}: {lines[-1:] }"
        left = leftovers(tmp) + [p.name for p in tmp.iterdir() if p.name == "model"]
        if left:
            return "check-failed", f"left behind: {left}"
        return "ok", lines[-1]
    return build


case("sigint-while-quantizing", "interruption", custom=True)(
    _signal_case(signal.SIGINT, "normquant.pipeline.run", "process_block", "run"))
case("sigterm-while-quantizing", "interruption", custom=True, slow=True)(
    _signal_case(signal.SIGTERM, "normquant.pipeline.run", "process_block", "run"))
case("sigint-while-writing-export", "interruption", custom=True, slow=True)(
    _signal_case(signal.SIGINT, "normquant.export.checkpoint", "write_manifest", "export"))
case("sigterm-while-writing-export", "interruption", custom=True, slow=True)(
    _signal_case(signal.SIGTERM, "normquant.export.checkpoint", "write_manifest", "export"))

_WRAP_BLOCK = """
import sys, time, pathlib, signal
signal.signal(signal.SIGINT, signal.default_int_handler)
flag = pathlib.Path({flag!r})
import normquant.pipeline.run as m
real = m.process_block
def slow(ctx, recipe):
    if ctx.index == {index}:
        flag.write_text("here")
        time.sleep(120)
    return real(ctx, recipe)
m.process_block = slow
from normquant.cli import main
sys.exit(main({argv!r}))
"""


def _dir_sha(path: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@case("kill-9-during-resumable-export-then-resume", "interruption", custom=True)
def _(ws, tmp):
    """--resume: killed while quantizing block 1, rerun: block 0 restored, the export byte-identical to an
    uninterrupted one, the checkpoints removed."""
    argv = _export_args(ws, tmp, tmp / "model", "--resume")
    argv[1] = ws.recipe("static.yaml", STATIC)
    flag = tmp / "flag"
    proc = run_subprocess(_WRAP_BLOCK.format(flag=str(flag), index=1, argv=[str(a) for a in argv]), tmp)
    _wait_for(flag, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((tmp / "model.resume" / "state.json").read_text())
    assert state["done"] == 1, state
    rerun = run_cli(argv)
    assert rerun.rc == 0, rerun.stderr
    after = leftovers(tmp) + [p.name for p in tmp.iterdir() if p.name.endswith(".resume")]
    if after:
        return "check-failed", f"left after rerun: {after}"
    if _dir_sha(tmp / "model") != _dir_sha(ws.exports["static"]):
        return "check-failed", "resumed export differs from an uninterrupted one"
    return "ok", "resumed at block 1 of 2; export byte-identical to an uninterrupted run; checkpoints removed"


# ---------------------------------------------------------------------------------------------- driver
def run_case(ws: Workspace, c: Case, tmp: Path) -> tuple[str, str]:
    """``(outcome, detail)`` of one case in the empty folder ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        if c.custom:
            return c.build(ws, tmp)
        argv = c.build(ws, tmp)
        ctx = c.context(ws, tmp) if c.context else contextlib.nullcontext()
        with ctx:
            result = run_cli(argv)
        return _outcome_of(result, c.expect, c.check, ws, tmp)
    except AssertionError as e:
        return "check-failed", str(e)[:300]
    except Exception:
        return "harness-error", traceback.format_exc().strip().splitlines()[-1][:300]


def summarize(results: dict[str, tuple[str, str]]) -> dict:
    by_cat: dict[str, dict] = {}
    for c in CASES:
        if c.id not in results:
            continue
        outcome = results[c.id][0]
        cat = by_cat.setdefault(c.category, {"cases": 0, "ok": 0})
        cat["cases"] += 1
        cat["ok"] += outcome == "ok"
    outcomes = [o for o, _ in results.values()]
    kill_cases = [c.id for c in CASES if c.id.startswith("kill-9") and c.id in results]  # kill -9, then a rerun
    return {
        "cases": len(results),
        "ok": outcomes.count("ok"),
        "ok_fraction": outcomes.count("ok") / max(1, len(results)),
        "tracebacks": outcomes.count("traceback"),
        "internal_errors": outcomes.count("internal"),
        "silent_corrupt_reloads": sum(1 for c in CASES if c.category == "reload" and results.get(c.id, ("",))[0]
                                      == "silent"),
        "silent_other": sum(1 for c in CASES if c.category != "reload" and results.get(c.id, ("",))[0] == "silent"),
        "leftovers_after_kill_and_rerun": sum(results[i][0] != "ok" for i in kill_cases),
        "kill_cases": len(kill_cases),
        "other_failures": sum(o not in ("ok", "traceback", "internal", "silent") for o in outcomes),
        "by_category": by_cat,
    }
