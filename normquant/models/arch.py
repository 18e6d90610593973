"""Architecture maps, as data: where the blocks are and which norm feeds which linears.

Keyed by ``config.model_type``. Module paths inside a block are relative to the block; ``next:`` marks a
consumer in the *next* block (post-LN models such as BERT, where a block's last LayerNorm feeds the next
block's q/k/v). ``pre:`` norms sit before the first block (BERT's embedding LayerNorm feeds block 0).

>>> arch = get_architecture("llama")
>>> arch.mappings[0]
NormMapping(norm='input_layernorm', consumers=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'))
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class NormMapping:
    norm: str  # module path of the norm inside the block
    consumers: tuple[str, ...]  # linears reading the norm's output (block-relative, or "next:<path>")


@dataclass(frozen=True)
class Architecture:
    name: str
    blocks: str  # dotted path of the ModuleList of blocks, from the top model
    final_norm: str | None  # dotted path from the top model
    head: str | None  # output projection (lm_head), or None for encoders
    norm_kind: str  # "rmsnorm" | "gemma_rmsnorm" (weight is 1+w) | "layernorm"
    mappings: tuple[NormMapping, ...]
    pre_block_norms: tuple[NormMapping, ...] = field(default=())  # e.g. BERT embeddings.LayerNorm -> block 0
    post_ln: bool = False  # norm after the residual add (BERT)


_LLAMA = (
    NormMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    NormMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
_GEMMA2 = (
    NormMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    NormMapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)

ARCHITECTURES: dict[str, Architecture] = {}


def register(model_types: tuple[str, ...], arch: Architecture) -> None:
    for t in model_types:
        ARCHITECTURES[t] = arch


register(("llama", "mistral", "qwen2", "qwen3"),
         Architecture("llama", "model.layers", "model.norm", "lm_head", "rmsnorm", _LLAMA))
register(("gemma",), Architecture("gemma", "model.layers", "model.norm", "lm_head", "gemma_rmsnorm", _LLAMA))
register(("gemma2", "gemma3_text"),
         Architecture("gemma2", "model.layers", "model.norm", "lm_head", "gemma_rmsnorm", _GEMMA2))
register(("opt",), Architecture(
    "opt", "model.decoder.layers", "model.decoder.final_layer_norm", "lm_head", "layernorm",
    (NormMapping("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
     NormMapping("final_layer_norm", ("fc1",)))))
register(("gpt2",), Architecture(
    "gpt2", "transformer.h", "transformer.ln_f", "lm_head", "layernorm",
    (NormMapping("ln_1", ("attn.c_attn",)), NormMapping("ln_2", ("mlp.c_fc",)))))
register(("bloom",), Architecture(
    "bloom", "transformer.h", "transformer.ln_f", "lm_head", "layernorm",
    (NormMapping("input_layernorm", ("self_attention.query_key_value",)),
     NormMapping("post_attention_layernorm", ("mlp.dense_h_to_4h",)))))
register(("bert",), Architecture(
    "bert", "encoder.layer", None, None, "layernorm",
    (NormMapping("attention.output.LayerNorm", ("intermediate.dense",)),
     NormMapping("output.LayerNorm", ("next:attention.self.query", "next:attention.self.key", "next:attention.self.value"))),
    pre_block_norms=(NormMapping("embeddings.LayerNorm",
                                 ("attention.self.query", "attention.self.key", "attention.self.value")),),
    post_ln=True))


def get_architecture(model_or_type: nn.Module | str) -> Architecture:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Register one with normquant.models.arch.register(...) (blocks path, norms and the linears they feed)"
        ) from None


def get_blocks(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    arch = arch or get_architecture(model)
    return model.get_submodule(_strip_prefix(model, arch.blocks))


def _strip_prefix(model: nn.Module, path: str) -> str:
    """Paths are written for the task model (``model.layers``); a bare base model lacks the first component."""
    try:
        model.get_submodule(path)
        return path
    except AttributeError:
        return path.split(".", 1)[1]
