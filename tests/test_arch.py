import pytest
from torch import nn
from transformers import AutoConfig, BertForMaskedLM, LlamaModel

from normquant.models.arch import (
    ARCHITECTURES,
    UnsupportedArchitecture,
    block_mappings,
    get_architecture,
    get_blocks,
    resolve_path,
)
from tests.tiny_models import HIDDEN, TINY_CONFIGS, tiny_model


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _in_features(m: nn.Module) -> int:
    return m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.in_features


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
            for path in m.consumers:
                linear = model.get_submodule(path)
                assert _is_linear(linear) and _in_features(linear) == HIDDEN, path
    own = {f"{resolve_path(model, arch.blocks)}.{i}.{m.norm}" for i in range(2) for m in arch.mappings}
    # every block norm is mapped, except a post-LN block's last norm in the last block (it feeds no mapped linear)
    assert own - seen_norms <= {f"{resolve_path(model, arch.blocks)}.1.{m.norm}" for m in arch.mappings
                                if any(c.startswith("next:") for c in m.consumers)}
    if arch.final_norm:
        assert "norm" in type(model.get_submodule(resolve_path(model, arch.final_norm))).__name__.lower()
    if arch.head:
        assert _is_linear(model.get_submodule(resolve_path(model, arch.head)))


def test_bert_next_and_pre_block_mappings():
    model = tiny_model("bert")
    m0 = {m.norm: m.consumers for m in block_mappings(model, 0)}
    assert m0["embeddings.LayerNorm"] == tuple(f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value"))
    assert m0["encoder.layer.0.output.LayerNorm"][0] == "encoder.layer.1.attention.self.query"
    assert "encoder.layer.1.output.LayerNorm" not in {m.norm for m in block_mappings(model, 1)}
    with pytest.raises(IndexError, match="out of range"):
        block_mappings(model, 2)


def test_paths_resolve_on_base_and_task_models():
    llama_cfg = AutoConfig.for_model("llama", vocab_size=128, **TINY_CONFIGS["llama"])
    assert resolve_path(LlamaModel(llama_cfg), "model.layers") == "layers"
    bert_cfg = AutoConfig.for_model("bert", vocab_size=128, **TINY_CONFIGS["bert"])
    mlm = BertForMaskedLM(bert_cfg)
    assert resolve_path(mlm, "encoder.layer") == "bert.encoder.layer"
    assert block_mappings(mlm, 1)[0].norm == "bert.encoder.layer.1.attention.output.LayerNorm"
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
