"""Norm Tweaking (normquant.methods.norm_tweak, the ``norm_tweak`` step) and self-generated calibration data
(normquant.data.selfgen), on tiny random models.

Measured values (torch 2.13 CPU, float32 unless stated) are written next to each tolerance.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from normquant.data.selfgen import allowed_first_tokens, cache_path, generate_calibration, passes_language_filter
from normquant.data.text import heldout_ids
from normquant.evaluation.norm_tweak_lr import select_norm_tweak_lr
from normquant.methods.norm_tweak import LOSSES, block_loss, find_norms, get_loss, l_dist, layer_lr, mean_std_mse, tweak_block
from normquant.methods.rtn import RTN
from normquant.pipeline.run import quantize, wrap_linears
from normquant.pipeline.step import StepError
from normquant.pipeline.runner import run_blocks
from normquant.quant.linear import QuantLinear
from normquant.recipe import RecipeError, parse_recipe
from tests.tiny_models import tiny_inputs, tiny_model

W3 = {"weights": {"bits": 3, "granularity": "channel"}}
CALIB = {"samples": 6, "seqlen": 16, "batch_size": 3}


@pytest.fixture(autouse=True)
def _one_thread():
    """Backward passes of tiny blocks are ~100x slower with 2 threads on a loaded 2-core machine (measured
    12.8 s vs 0.10 s for 30 Adam steps); these tests run single-threaded and restore the setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- losses
def naive_l_dist(f: torch.Tensor, q: torch.Tensor) -> float:
    """Per-channel loop over every value of channel c (all batch rows and tokens), biased variance."""
    C = f.shape[-1]
    total = 0.0
    for c in range(C):
        fc = [v.item() for v in f[..., c].reshape(-1)]
        qc = [v.item() for v in q[..., c].reshape(-1)]
        mf, mq = sum(fc) / len(fc), sum(qc) / len(qc)
        vf = sum((v - mf) ** 2 for v in fc) / len(fc)
        vq = sum((v - mq) ** 2 for v in qc) / len(qc)
        total += abs(mf - mq) + abs(vf - vq)
    return total / C


def test_l_dist_matches_naive_loop_float64():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    q = 1.3 * f + 0.2 * torch.randn(3, 7, 5, generator=g, dtype=torch.float64) + 0.1
    assert abs(l_dist(f, q).item() - naive_l_dist(f, q)) < 1e-12  # measured 0.0 (L_dist = 0.892)
    assert l_dist(f, f).item() == 0.0
    # mean_std_mse = Σ(μf−μq)² + Σ(σf−σq)², biased σ over batch and tokens
    ft, qt = f.reshape(-1, 5), q.reshape(-1, 5)
    want = ((ft.mean(0) - qt.mean(0)) ** 2).sum() + ((ft.std(0, unbiased=False) - qt.std(0, unbiased=False)) ** 2).sum()
    assert abs(mean_std_mse(f, q).item() - want.item()) < 1e-12  # measured 2.2e-16
    assert set(LOSSES) == {"l_dist", "mse", "mean_std_mse"}


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown loss 'kl' for norm tweaking; available: l_dist, mean_std_mse, mse"):
        get_loss("kl")
    with pytest.raises(RecipeError, match=r"unknown loss 'kl'; available: l_dist, mean_std_mse, mse"):
        parse_recipe({"scheme": W3, "steps": [{"norm_tweak": {"loss": "kl"}}]})


def test_layer_lr_schedule():
    assert layer_lr(1e-5, 0.0, 7, 8) == 1e-5
    assert layer_lr(1e-5, 1.0, 0, 4) == 1e-5
    assert layer_lr(1e-5, 5.0, 2, 4) == pytest.approx(3.5e-5, rel=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        layer_lr(1e-5, 1.0, 4, 4)


# ---------------------------------------------------------------------------------------------- tweak_block
def first_block_w3(kind: str, n: int = 6, seq: int = 16, dtype: torch.dtype = torch.float32):
    """Block 0 of a tiny model with W3 per-channel RTN weights, its quantized-path inputs and float targets."""
    model = tiny_model(kind, dtype=dtype)
    ids = tiny_inputs(model, batch=n, seq=seq)
    scheme = parse_recipe({"scheme": W3}).scheme
    ctx = next(iter(run_blocks(model, ids, batch_size=n)))
    ctx.quant_linears = wrap_linears(ctx.block, scheme, prefix=ctx.name + ".")
    forward = ctx.forward
    targets = ctx.outputs()  # [n, L, C], weights still float
    RTN().apply_block(ctx)
    return ctx, forward, targets


@pytest.mark.parametrize(("kind", "norm_params", "max_ratio"), [
    ("llama", ["input_layernorm.weight", "post_attention_layernorm.weight"], 0.9),  # measured 0.804 (1.00e-3 -> 8.0e-4)
    ("opt", ["self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
             "final_layer_norm.weight", "final_layer_norm.bias"], 0.5),  # measured 0.359 (7.2e-3 -> 2.6e-3)
    ("gemma", ["input_layernorm.weight", "post_attention_layernorm.weight"], 0.9),  # w of γ = 1 + w; measured 0.804
])
def test_tweak_lowers_l_dist_and_touches_only_norms(kind, norm_params, max_ratio):
    ctx, forward, targets = first_block_w3(kind)
    block = ctx.block
    norms = find_norms(ctx.model, 0)
    assert sorted(f"{n.removeprefix(ctx.name + '.')}.{p}" for n, m in norms.items()
                  for p, _ in m.named_parameters()) == sorted(norm_params)
    grad_flags = {n: p.requires_grad for n, p in block.named_parameters()}
    assert any(grad_flags.values()) and not all(grad_flags.values())  # HF norms True, QuantLinear weights False
    before_params = {n: p.detach().clone() for n, p in block.named_parameters()}

    before = block_loss(forward, ctx.inputs, targets)
    res = tweak_block(forward, norms, ctx.inputs, targets, loss="l_dist", lr=1e-2, epochs=5, block=block)
    after = block_loss(forward, ctx.inputs, targets)
    assert after < max_ratio * before, (before, after)
    assert res.steps == 5 * 6 and len(res.epoch_means) == 5

    for n, p in block.named_parameters():
        if n in norm_params:
            assert not torch.equal(p, before_params[n]), n
        else:
            assert torch.equal(p, before_params[n]), n  # bit-identical
        assert p.requires_grad == grad_flags[n] and p.grad is None, n


def test_half_precision_norms_move_through_float32_masters():
    """bf16 γ ≈ 1 has a half-ulp of 3.9e-3, so Adam steps of ~1e-3 applied to bf16 directly mostly round away;
    float32 master copies accumulate them. The parameters stay bf16."""
    ctx, forward, targets = first_block_w3("llama", dtype=torch.bfloat16)
    norms = find_norms(ctx.model, ctx.index)
    before = {n: m.weight.detach().clone() for n, m in norms.items()}
    with torch.no_grad():  # tweak_block turns gradients on itself
        tweak_block(forward, norms, ctx.inputs, targets, lr=1e-3, epochs=1, block=ctx.block)
    for n, m in norms.items():
        assert m.weight.dtype == torch.bfloat16
        moved = (m.weight != before[n]).float().mean().item()
        assert moved > 0.2, (n, moved)  # measured 0.44 and 0.69 of the 32 entries


@pytest.mark.parametrize("kind", ["llama", "opt", "bloom"])  # bloom: alibi [B·H, 1, L] is rebatched too
def test_runner_forward_is_batch_size_independent(kind):
    ctx, forward, _ = first_block_w3(kind, n=4)
    with torch.no_grad():
        ref = ctx.outputs()  # batches of 4: the captured mask's batch
        one = torch.cat([forward(x) for x in ctx.inputs.split(1)])
        three = torch.cat([forward(x) for x in ctx.inputs.split(3)])
    assert torch.allclose(one, ref, atol=1e-6) and torch.allclose(three, ref, atol=1e-6)  # measured 0.0 (bit-identical)


# ---------------------------------------------------------------------------------------------- the step
NT_YAML = """
scheme:
  weights: {bits: 3, granularity: channel}
steps:
  - norm_tweak: {weights: gptq, gptq: {block_size: 16}, lr: 1.0e-2, kappa: 1, loss: l_dist, epochs: 3}
calibration: {samples: 6, seqlen: 16, batch_size: 3}
"""


def norm_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}


def test_step_from_yaml_runs_end_to_end():
    recipe = parse_recipe(yaml.safe_load(NT_YAML))
    step = recipe.steps[0]
    assert step.name == "norm_tweak" and step.gptq.block_size == 16 and step.lr == 1e-2 and step.epochs == 3
    assert parse_recipe(recipe.to_dict()).steps[0] == step  # dumps and re-parses

    gptq_only = parse_recipe({"scheme": W3, "steps": [{"gptq": {"block_size": 16}}], "calibration": CALIB})
    model, ref = tiny_model("llama"), tiny_model("llama")
    ids = tiny_inputs(model, batch=6, seq=16)
    quantize(model, recipe, ids, progress=False)
    quantize(ref, gptq_only, ids, progress=False)

    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(qls) == 14 and all(q.weight_quantized for q in qls.values())
    # block 0 sees the same inputs in both runs: the step's GPTQ equals the gptq step's; block 1's inputs differ
    for n, q in qls.items():
        if n.startswith("model.layers.0."):
            assert torch.equal(q.weight, ref.get_submodule(n).weight), n
    assert not all(torch.equal(q.weight, ref.get_submodule(n).weight) for n, q in qls.items())
    tweaked, plain = norm_state(model), norm_state(ref)
    changed = sorted(n for n in tweaked if not torch.equal(tweaked[n], plain[n]))
    assert changed == [f"model.layers.{i}.{m}.weight" for i in (0, 1)
                       for m in ("input_layernorm", "post_attention_layernorm")]
    assert all(p.grad is None for p in model.parameters())


def test_epochs_zero_is_the_weight_step_alone():
    recipe = parse_recipe({"scheme": W3, "steps": [{"norm_tweak": {"gptq": {"block_size": 16}, "epochs": 0}}],
                           "calibration": CALIB})
    gptq_only = parse_recipe({"scheme": W3, "steps": [{"gptq": {"block_size": 16}}], "calibration": CALIB})
    a, b = tiny_model("llama"), tiny_model("llama")
    ids = tiny_inputs(a, batch=6, seq=16)
    quantize(a, recipe, ids, progress=False)
    quantize(b, gptq_only, ids, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_joint_weight_activation_mode_tunes_through_activation_quant():
    """W4A4 (dynamic per-token): the activation quantizers are on while tuning, and on again afterwards."""
    def run(activations: bool):
        model = tiny_model("llama")
        recipe = parse_recipe({"scheme": {"weights": {"bits": 4, "granularity": "channel"},
                                          "input_activations": {"bits": 4, "granularity": "token", "dynamic": True}},
                               "steps": [{"norm_tweak": {"weights": "rtn", "lr": 1e-2, "activations": activations}}],
                               "calibration": CALIB})
        quantize(model, recipe, tiny_inputs(model, batch=6, seq=16), progress=False)
        assert all(m.input_quant.enabled for m in model.modules() if isinstance(m, QuantLinear))
        return norm_state(model)

    joint, weights_only, start = run(True), run(False), norm_state(tiny_model("llama"))
    assert len(joint) == 5  # 2 norms in each of the 2 blocks, and the final norm (never tweaked)
    for n in joint:
        if n == "model.norm.weight":
            assert torch.equal(joint[n], start[n])
            continue
        assert not torch.equal(joint[n], start[n]) and not torch.equal(joint[n], weights_only[n]), n


def test_static_activation_quantizers_in_joint_mode():
    model = tiny_model("opt")
    recipe = parse_recipe({"scheme": {"weights": {"bits": 4},
                                      "input_activations": {"bits": 8, "symmetric": False, "granularity": "tensor"}},
                           "steps": [{"norm_tweak": {"weights": "rtn", "lr": 1e-3}}], "calibration": CALIB})
    quantize(model, recipe, tiny_inputs(model, batch=6, seq=16), progress=False)
    aqs = [m.input_quant for m in model.modules() if isinstance(m, QuantLinear)]
    assert aqs and all(q.enabled and not q.observing and q.scale is not None for q in aqs)


def test_step_refuses_already_quantized_weights_and_mismatched_options():
    with pytest.raises(RecipeError, match="step 'norm_tweak' needs float weights but 'gptq' before it quantizes them"):
        parse_recipe({"scheme": W3, "steps": ["gptq", "norm_tweak"], "calibration": CALIB})
    with pytest.raises(RecipeError, match="gptq options given but weights is 'rtn'"):
        parse_recipe({"scheme": W3, "steps": [{"norm_tweak": {"weights": "rtn", "gptq": {"block_size": 8}}}]})
    with pytest.raises(RecipeError, match="unknown key 'gptq.block_sz'"):
        parse_recipe({"scheme": W3, "steps": [{"norm_tweak": {"gptq": {"block_sz": 8}}}]})


def test_select_norm_tweak_lr_grid():
    recipe = parse_recipe({"scheme": W3, "steps": [{"norm_tweak": {"gptq": {"block_size": 16}}}],
                           "calibration": CALIB})
    calib = tiny_inputs(tiny_model("llama"), batch=6, seq=16, seed=1)
    heldout = tiny_inputs(tiny_model("llama"), batch=3, seq=16, seed=2)  # [W, L] windows
    best, table = select_norm_tweak_lr(lambda: tiny_model("llama"), recipe, heldout, [(1e-2, 0.0), (1e-3, 5.0)],
                                       calib_ids=calib)
    assert [(r["lr0"], r["kappa"]) for r in table] == [(None, None), (1e-2, 0.0), (1e-3, 5.0)]
    assert all(r["windows"] == 3 and r["seqlen"] == 16 for r in table)
    assert best == min(table[1:], key=lambda r: r["ppl"])
    # lr changes the model: measured ppl 127.680 (no tweak), 127.686, 127.688
    assert len({round(r["ppl"], 9) for r in table}) == 3


# ---------------------------------------------------------------------------------------------- held-out text
def byte_tokenizer():
    """A byte-level tokenizer (256 single-byte tokens, no merges): one token per UTF-8 byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_heldout_slice_is_disjoint_from_calibration(data_dir):
    from normquant.data.text import DataError, calibration_samples

    tok = byte_tokenizer()
    calib = calibration_samples(tok, "c4", n=8, seqlen=512, seed=0, data_dir=data_dir)  # [8, 512]
    held = heldout_ids(tok, "c4", tokens=20_000, calib_samples=8, calib_seqlen=512, calib_seed=0, data_dir=data_dir)
    assert held.shape[0] == 1 and held.shape[1] >= 20_000
    text = bytes(held[0].tolist())
    for row in calib:  # no 512-byte calibration window occurs in the held-out text
        assert bytes(row.tolist()) not in text
    with pytest.raises(DataError, match="must not come from a test split"):
        heldout_ids(tok, "wikitext2", "test", tokens=10, data_dir=data_dir)


# ---------------------------------------------------------------------------------------------- selfgen
LATIN = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from", "his", "an",
         "were", "are", "which", "this", "be", "or", "had", "it", "not", "but", "their", "also", "has", "one",
         "new", "first", "after", "two", "its", "who", "they", "have", "her", "she", "he", "been", "other", "when",
         "during", "time", "would", "into", "all", "more", "there", "city", "café", "naïve", "Über", "Ñu"]
CYRILLIC = ["мир", "да", "нет", "город", "время", "год", "это", "как"]
CJK = ["中", "文", "日本", "語", "한글", "の", "カタ", "学"]
OTHER = ["0", "1", "2", "42", "1999", ".", ",", "!", "?", "-", "a1", "x_y", "e.g", "(", ")", "'s", "αβ", "ω", "::"]


def toy_tokenizer():
    """128 whole-word tokens: 4 specials (ids 0-3, like LLaMA's unk/bos/eos + pad), Latin, Cyrillic, CJK words,
    digits/punctuation/mixed strings, and filler Latin words up to the tiny models' vocabulary of 128."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + LATIN + CYRILLIC + CJK + OTHER
    words += [f"zz{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(128 - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def test_language_filter():
    assert passes_language_filter(" the") and passes_language_filter("café") and passes_language_filter("Ñu")
    for t in ("", "  ", "42", "a1", "x_y", "e.g", "'s", "мир", "中", "αβ"):
        assert not passes_language_filter(t), t
    assert passes_language_filter("мир", ("Latin", "Cyrillic")) and passes_language_filter("日本", ("cjk",))
    assert passes_language_filter("한글", ("CJK",)) and passes_language_filter("αβ", ("Greek",))

    tok, model = toy_tokenizer(), tiny_model("llama")
    assert len(tok) == 128
    filler = [i for i in range(128) if tok.convert_ids_to_tokens(i).startswith("zz")]
    latin = set(tok.convert_tokens_to_ids(LATIN) + filler)
    assert set(allowed_first_tokens(model, tok).tolist()) == latin
    wide = set(allowed_first_tokens(model, tok, ("Latin", "Cyrillic", "CJK")).tolist())
    assert wide == latin | set(tok.convert_tokens_to_ids(CYRILLIC + CJK))


def test_selfgen_shapes_determinism_and_first_tokens(tmp_path):
    tok, model = toy_tokenizer(), tiny_model("llama", dtype=torch.float64)
    kw = dict(n=7, seqlen=24, cache_dir=tmp_path, progress=False)
    a = generate_calibration(model, tok, seed=0, batch_size=3, **kw)
    assert a.shape == (7, 24) and a.dtype == torch.long
    assert torch.equal(a, generate_calibration(model, tok, seed=0, batch_size=7, use_cache=False, **kw))  # any batching
    assert not torch.equal(a, generate_calibration(model, tok, seed=1, **kw))
    assert len(set(a[:, 0].tolist())) == 7  # distinct first tokens
    assert all(passes_language_filter(tok.decode([t])) for t in a[:, 0].tolist())
    assert not set(a.reshape(-1).tolist()) & {0, 1, 2, 3}  # special tokens never generated

    # tokens 1..k (k = 3, 4, 5 rotating) are the top-1 of the model given the prefix, without KV cache here
    with torch.no_grad():
        logits = model(input_ids=a).logits  # [7, 24, V]
    logits[..., :4] = float("-inf")
    top1 = logits.argmax(-1)  # [7, 24]: prediction for position j + 1
    for i in range(7):
        k = 3 + i % 3
        assert torch.equal(a[i, 1:k + 1], top1[i, :k]), i
    # the sampled rest is not simply greedy
    assert not torch.equal(a[:, 6:], top1[:, 5:-1])


def test_selfgen_cache_is_reused(tmp_path, monkeypatch):
    tok, model = toy_tokenizer(), tiny_model("llama")
    ids = generate_calibration(model, tok, n=4, seqlen=12, seed=3, cache_dir=tmp_path, progress=False)
    path = cache_path(model, tok, 4, 12, 3, cache_dir=tmp_path)
    assert path.is_file()
    record = torch.load(path, weights_only=True)
    assert record["seed"] == 3 and torch.equal(record["input_ids"], ids) and record["n_greedy"].tolist() == [3, 4, 5, 3]

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran although the cache holds the data")

    monkeypatch.setattr(model, "forward", no_forward)
    again = generate_calibration(model, tok, n=4, seqlen=12, seed=3, cache_dir=tmp_path, progress=False)
    assert torch.equal(again, ids)
    other = tiny_model("llama", seed=1)  # other weights: another cache file
    assert cache_path(other, tok, 4, 12, 3, cache_dir=tmp_path) != path
