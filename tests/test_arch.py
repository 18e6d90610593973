from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoConfig, BertForMaskedLM, LlamaModel

from normquant.models.arch import (
    ARCHITECTURES,
    UnsupportedArchitecture,
    block_attention,
    block_linear_mappings,
    block_mappings,
    block_norms,
    get_architecture,
    get_blocks,
    get_weight,
    head_geometry,
    linear_features,
    resolve_path,
    split_ref,
)
from tests.tiny_models import HIDDEN, TINY_CONFIGS, model_output, tiny_inputs, tiny_model

# every registered type, plus Qwen3-MoE with a dense block (mlp_only_layers) to cover block variants
CASES = [(t, {}) for t in sorted(ARCHITECTURES)] + [("qwen3_moe", {"mlp_only_layers": [1]})]
CASE_IDS = [t + ("-dense1" if kw else "") for t, kw in CASES]


def _is_linear_ref(model: nn.Module, ref: str) -> bool:
    """A Linear/Conv1D, another module with a 2-D ``weight`` (MoE router), or a ``module:param`` parameter."""
    module, param = split_ref(ref)
    m = model.get_submodule(module)
    if param is not None:
        return isinstance(getattr(m, param), nn.Parameter) and getattr(m, param).dim() >= 2
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" or (
        isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()


def test_every_registered_architecture_has_a_tiny_model():
    assert set(ARCHITECTURES) <= set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_mappings_resolve_on_tiny_model(model_type):
    model = tiny_model(model_type)
    arch = get_architecture(model)
    blocks = get_blocks(model)
    assert len(blocks) == 2
    seen_norms = set()
    for i in range(len(blocks)):
        for m in block_mappings(model, i):
            norm = model.get_submodule(m.norm)
            assert "norm" in type(norm).__name__.lower() and norm.weight.shape == (HIDDEN,), m.norm
            seen_norms.add(m.norm)
            for path in m.consumers:  # norm width == consumer in_features
                assert _is_linear_ref(model, path) and linear_features(model, path)[1] == HIDDEN, path
    own = {f"{resolve_path(model, arch.blocks)}.{i}.{m.norm}" for i in range(2) for m in arch.mappings}
    # every block norm is mapped, except a post-LN block's last norm in the last block (it feeds no mapped linear)
    assert own - seen_norms <= {f"{resolve_path(model, arch.blocks)}.1.{m.norm}" for m in arch.mappings
                                if any(c.startswith("next:") for c in m.consumers)}
    if arch.final_norm:
        assert "norm" in type(model.get_submodule(resolve_path(model, arch.final_norm))).__name__.lower()
    if arch.head:
        assert _is_linear_ref(model, resolve_path(model, arch.head))


@pytest.mark.parametrize("model_type,overrides", CASES, ids=CASE_IDS)
def test_declared_norms_are_every_norm_in_the_block(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    blocks_path = resolve_path(model, get_architecture(model).blocks)
    for i, block in enumerate(get_blocks(model)):
        declared = block_norms(model, i)
        found = {f"{blocks_path}.{i}.{n}" for n, m in block.named_modules() if n and _is_norm(m)}
        assert set(declared) == found
        for path, norm in declared.items():
            assert isinstance(norm.weight, nn.Parameter) and norm.weight.dim() == 1, path


@pytest.mark.parametrize("model_type,overrides", CASES, ids=CASE_IDS)
def test_linear_mappings_widths_match(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    n = 0
    for i in range(len(get_blocks(model))):
        maps = block_linear_mappings(model, i, commuting_only=False)
        assert {m.source for m in maps} >= {m.source for m in block_linear_mappings(model, i)}
        for m in maps:
            assert _is_linear_ref(model, m.source) and _is_linear_ref(model, m.consumer), m
            out_features, _ = linear_features(model, m.source)
            assert 0 <= m.rows.start < m.rows.stop <= out_features, m
            _, in_features = linear_features(model, m.consumer)
            assert len(m.rows) * m.groups == in_features, m  # GQA: each kv row feeds `groups` query-head columns
            assert m.consumer_columns(torch.zeros(len(m.rows))).shape == (in_features,)
            ws, wc = get_weight(model, m.source), get_weight(model, m.consumer)
            assert ws.shape[:-2] == wc.shape[:-2], m  # same expert count for fused MoE parameters
            if m.through == "attention":
                assert m.head_dim is not None and len(m.rows) % m.head_dim == 0
            n += 1
    assert n > 0 or model_type == "bloom"


def test_linear_mapping_kinds():
    def kinds(t):
        model = tiny_model(t)
        here = f"{resolve_path(model, get_architecture(t).blocks)}.0."
        return {(m.source.removeprefix(here), m.through, m.scales)
                for m in block_linear_mappings(model, 0, commuting_only=False)}
    assert kinds("llama") == {("self_attn.v_proj", "attention", "any"), ("mlp.up_proj", "glu", "any")}
    assert ("fc1", "relu", "positive") in kinds("opt")
    assert ("mlp.c_fc", "gelu_new", "none") in kinds("gpt2")
    assert {m.through for m in block_linear_mappings(tiny_model("bloom"), 0, commuting_only=False)} == {"gelu"}
    assert block_linear_mappings(tiny_model("bloom"), 0) == []  # GELU only; v→dense left out (interleaved qkv)
    moe = block_linear_mappings(tiny_model("mixtral"), 0)[1]
    assert (moe.source, moe.consumer, moe.rows) == ("model.layers.0.mlp.experts:gate_up_proj",
                                                    "model.layers.0.mlp.experts:down_proj", range(64, 128))
    assert block_mappings(tiny_model("mixtral"), 0)[1].consumers == (
        "model.layers.0.mlp.gate", "model.layers.0.mlp.experts:gate_up_proj")
    dense = tiny_model("qwen3_moe", mlp_only_layers=[1])
    assert block_mappings(dense, 1)[1].consumers == ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    assert block_mappings(dense, 0)[1].consumers[0] == "model.layers.0.mlp.gate"


ROPE = {"opt": False, "gpt2": False, "bloom": False, "bert": False}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_attention_geometry_matches_projections(model_type):
    model = tiny_model(model_type)
    cfg = model.config
    for i in range(len(get_blocks(model))):
        (a,) = block_attention(model, i)
        assert a.rope == ROPE.get(model_type, True)
        assert isinstance(model.get_submodule(a.module), nn.Module)
        q_width, kv_width = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        assert linear_features(model, a.o)[1] == q_width
        if a.q_rows is None:  # BLOOM: one fused [head, (q, k, v), head_dim] projection
            assert a.q == a.k == a.v and linear_features(model, a.q)[0] == 3 * q_width
        else:
            assert (len(a.q_rows), len(a.k_rows), len(a.v_rows)) == (q_width, kv_width, kv_width)
            for ref, rows in ((a.q, a.q_rows), (a.k, a.k_rows), (a.v, a.v_rows)):
                assert _is_linear_ref(model, ref) and rows.stop <= linear_features(model, ref)[0]
                assert linear_features(model, ref)[1] == HIDDEN
        for norm in (a.q_norm, a.k_norm):
            if norm is not None:
                assert model.get_submodule(norm).weight.shape == (a.head_dim,)
        has_qk_norm = model_type in {"qwen3", "qwen3_moe", "gemma3_text"}
        assert (a.q_norm is not None) == (a.k_norm is not None) == has_qk_norm
        assert a.num_heads == getattr(cfg, "num_attention_heads") and a.groups * a.num_kv_heads == a.num_heads


def test_head_geometry_fallbacks():
    assert head_geometry(SimpleNamespace(n_head=4, n_embd=32)) == head_geometry(
        SimpleNamespace(num_attention_heads=4, hidden_size=32, head_dim=None, num_key_value_heads=None))
    g = head_geometry(SimpleNamespace(n_head=4, n_embd=32))
    assert (g.num_heads, g.num_kv_heads, g.head_dim, g.groups) == (4, 4, 8, 1)
    g = head_geometry(SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=32, head_dim=16))
    assert (g.head_dim, g.groups) == (16, 2)
    assert head_geometry(tiny_model("mixtral").config).head_dim == 8  # MixtralConfig.head_dim is None


# ---------------------------------------------------------------------------------------------- function checks
@torch.no_grad()
def _scale_pair(model: nn.Module, m, r: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """Source rows ``m.rows`` ×= r (weight and bias); consumer input columns ×= c (default 1 / r expanded)."""
    c = 1 / m.consumer_columns(r) if c is None else c
    rows = slice(m.rows.start, m.rows.stop)
    src_mod, src_param = split_ref(m.source)
    src = model.get_submodule(src_mod)
    if type(src).__name__ == "Conv1D":
        src.weight[:, rows] *= r
    else:
        get_weight(model, m.source)[..., rows, :] *= r[..., :, None]
    if src_param is None and getattr(src, "bias", None) is not None:
        src.bias[rows] *= r
    con_mod, _ = split_ref(m.consumer)
    w = get_weight(model, m.consumer)
    if type(model.get_submodule(con_mod)).__name__ == "Conv1D":
        w *= c[:, None]
    else:
        w *= c[..., None, :]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("model_type,overrides", CASES, ids=CASE_IDS)
def test_commuting_linear_mappings_preserve_the_function(model_type, overrides):
    """Every commuting pair: source rows × r > 0 (per expert for MoE), consumer columns × 1/r, logits unchanged.

    float64, tolerance 1e-10: measured max relative change 5.3e-16 (opt; 0.0 for the llama family and MoE).
    GELU pairs (scales "none") do change the output: measured ≥ 7.2e-4 relative (bert), checked > 1e-4.
    """
    model = tiny_model(model_type, dtype=torch.float64, **overrides)
    ids = tiny_inputs(model)
    ref = model_output(model, ids)
    g = torch.Generator().manual_seed(1)
    maps = [m for i in range(len(get_blocks(model))) for m in block_linear_mappings(model, i, commuting_only=False)]
    for m in maps:
        lead = get_weight(model, m.source).shape[:-2]  # [E] for fused experts: a different r per expert
        r = 0.5 + 1.5 * torch.rand(*lead, len(m.rows), generator=g, dtype=torch.float64)
        if m.scales == "none":
            probe = tiny_model(model_type, dtype=torch.float64, **overrides)
            _scale_pair(probe, m, r)
            assert _rel(model_output(probe, ids), ref) > 1e-4, m  # the mark is right: the scale does not commute
        else:
            _scale_pair(model, m, r)
    assert _rel(model_output(model, ids), ref) <= 1e-10


def test_llama_up_down_and_gqa_v_o_scaling():
    """llama (GQA: 4 q heads / 2 kv heads), float64, tolerance 1e-10 relative: up rows × r, down columns × 1/r
    leaves the logits unchanged (measured 0.0; up × r alone: 3.0e-2); v rows × r, o columns × 1/r repeated over
    each kv head's query heads: measured 0.0; tiling r over the heads instead (wrong GQA order): measured 0.19."""
    model = tiny_model("llama", dtype=torch.float64)
    ids = tiny_inputs(model)
    ref = model_output(model, ids)
    v_o, up_down = block_linear_mappings(model, 0)
    assert (v_o.source, v_o.consumer) == ("model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj")
    assert (up_down.source, up_down.consumer) == ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj")
    g = torch.Generator().manual_seed(0)
    r_up = 0.5 + 1.5 * torch.rand(64, generator=g, dtype=torch.float64)
    alone = tiny_model("llama", dtype=torch.float64)
    _scale_pair(alone, block_linear_mappings(alone, 0)[1], r_up, c=torch.ones(64, dtype=torch.float64))
    assert _rel(model_output(alone, ids), ref) > 1e-3  # the check can fail
    _scale_pair(model, up_down, r_up)
    assert _rel(model_output(model, ids), ref) <= 1e-10
    r = 0.5 + 1.5 * torch.rand(16, generator=g, dtype=torch.float64)  # [kv 2 · head_dim 8]
    assert v_o.groups == 2 and torch.equal(v_o.consumer_columns(r)[8:16], r[:8])  # q head 1 reads kv head 0
    wrong = tiny_model("llama", dtype=torch.float64)
    _scale_pair(wrong, block_linear_mappings(wrong, 0)[0], r, c=1 / r.repeat(2))
    assert _rel(model_output(wrong, ids), ref) > 1e-3
    _scale_pair(model, v_o, r)
    assert _rel(model_output(model, ids), ref) <= 1e-10


def test_bert_next_and_pre_block_mappings():
    model = tiny_model("bert")
    m0 = {m.norm: m.consumers for m in block_mappings(model, 0)}
    assert m0["embeddings.LayerNorm"] == tuple(f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value"))
    assert m0["encoder.layer.0.output.LayerNorm"][0] == "encoder.layer.1.attention.self.query"
    assert "encoder.layer.1.output.LayerNorm" not in {m.norm for m in block_mappings(model, 1)}
    with pytest.raises(IndexError, match="out of range"):
        block_mappings(model, 2)
    with pytest.raises(IndexError, match="out of range"):
        block_norms(model, 2)


def test_paths_resolve_on_base_and_task_models():
    llama_cfg = AutoConfig.for_model("llama", vocab_size=128, **TINY_CONFIGS["llama"])
    base = LlamaModel(llama_cfg)
    assert resolve_path(base, "model.layers") == "layers"
    assert block_attention(base, 1)[0].v == "layers.1.self_attn.v_proj"
    bert_cfg = AutoConfig.for_model("bert", vocab_size=128, **TINY_CONFIGS["bert"])
    mlm = BertForMaskedLM(bert_cfg)
    assert resolve_path(mlm, "encoder.layer") == "bert.encoder.layer"
    assert block_mappings(mlm, 1)[0].norm == "bert.encoder.layer.1.attention.output.LayerNorm"
    assert "bert.encoder.layer.1.output.LayerNorm" in block_norms(mlm, 1)
    with pytest.raises(UnsupportedArchitecture, match="not found in BertForMaskedLM"):
        resolve_path(mlm, "decoder.layers")


def test_post_ln_detection():
    assert get_architecture("bert").is_post_ln(None)
    assert not get_architecture("opt").is_post_ln(tiny_model("opt").config)
    assert get_architecture("opt").is_post_ln(tiny_model("opt", do_layer_norm_before=False).config)
    assert get_architecture("bloom").is_post_ln(tiny_model("bloom", apply_residual_connection_post_layernorm=True).config)
    assert not get_architecture("llama").is_post_ln(tiny_model("llama").config)


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedArchitecture, match=r"unsupported architecture 'mamba'; supported: bert, bloom, gemma,"):
        get_architecture("mamba")
