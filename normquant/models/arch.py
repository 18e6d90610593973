"""Architecture maps, as data: where the blocks are and which norm feeds which linears.

Keyed by ``config.model_type``. Module paths inside a block are relative to the block; ``next:`` marks a
consumer in the *next* block (post-LN models such as BERT, where a block's last LayerNorm feeds the next
block's q/k/v). ``pre_block_norms`` sit before the first block (BERT's embedding LayerNorm feeds block 0).

In a *post-LN* model (BERT; OPT with ``do_layer_norm_before=False``; BLOOM with
``apply_residual_connection_post_layernorm=True``) a norm's output also feeds the residual stream, so a
transform that rescales that output (RepQuant, SmoothQuant) is not function-preserving there:
:meth:`Architecture.is_post_ln` tells, and :func:`block_mappings` resolves the full module paths.

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
    post_ln_if: tuple[str, object] | None = None  # (config attribute, value) that makes the model post-LN

    def is_post_ln(self, config) -> bool:
        """True when a norm output also feeds the residual stream (so rescaling it changes the model)."""
        if self.post_ln:
            return True
        return self.post_ln_if is not None and getattr(config, self.post_ln_if[0], None) == self.post_ln_if[1]


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
     NormMapping("final_layer_norm", ("fc1",))),
    post_ln_if=("do_layer_norm_before", False)))
register(("gpt2",), Architecture(
    "gpt2", "transformer.h", "transformer.ln_f", "lm_head", "layernorm",
    (NormMapping("ln_1", ("attn.c_attn",)), NormMapping("ln_2", ("mlp.c_fc",)))))
register(("bloom",), Architecture(
    "bloom", "transformer.h", "transformer.ln_f", "lm_head", "layernorm",
    (NormMapping("input_layernorm", ("self_attention.query_key_value",)),
     NormMapping("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
    post_ln_if=("apply_residual_connection_post_layernorm", True)))
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


@dataclass(frozen=True)
class ResolvedMapping:
    """A norm and the linears reading its output, as full module paths from the top model."""

    norm: str
    consumers: tuple[str, ...]


def get_blocks(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    arch = arch or get_architecture(model)
    return model.get_submodule(resolve_path(model, arch.blocks))


def block_mappings(model: nn.Module, index: int, arch: Architecture | None = None) -> list[ResolvedMapping]:
    """The norm→consumer mappings owned by block ``index``, with full paths.

    A block owns the norms that live in it; ``next:`` consumers resolve into block ``index + 1`` (and are
    dropped for the last block, whose output feeds no mapped linear); block 0 also owns ``pre_block_norms``.

    >>> block_mappings(model, 0)[0]  # doctest: +SKIP
    ResolvedMapping(norm='model.layers.0.input_layernorm', consumers=('model.layers.0.self_attn.q_proj', ...))
    """
    arch = arch or get_architecture(model)
    blocks_path = resolve_path(model, arch.blocks)
    n_blocks = len(model.get_submodule(blocks_path))
    if not 0 <= index < n_blocks:
        raise IndexError(f"block index {index} out of range; the model has {n_blocks} blocks")
    here, nxt = f"{blocks_path}.{index}", f"{blocks_path}.{index + 1}"
    out = []
    for m in arch.mappings:
        if index + 1 == n_blocks and any(c.startswith("next:") for c in m.consumers):
            continue
        consumers = tuple(f"{nxt}.{c[len('next:'):]}" if c.startswith("next:") else f"{here}.{c}" for c in m.consumers)
        out.append(ResolvedMapping(f"{here}.{m.norm}", consumers))
    if index == 0:
        out += [ResolvedMapping(resolve_path(model, m.norm), tuple(f"{here}.{c}" for c in m.consumers))
                for m in arch.pre_block_norms]
    return out


def resolve_path(model: nn.Module, path: str) -> str:
    """The module path as it exists in ``model``.

    Architecture paths are written for one model class (``model.layers`` for a causal LM,
    ``encoder.layer`` for a bare BERT); a bare base model lacks the first component and a task model
    (``BertForMaskedLM``) adds its ``base_model_prefix``.
    """
    candidates = [path, path.split(".", 1)[-1]]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:
        candidates.append(f"{prefix}.{path}")
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            pass
    raise UnsupportedArchitecture(f"module '{path}' not found in {type(model).__name__} (tried {', '.join(candidates)})")
