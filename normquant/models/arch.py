"""Architecture maps, as data: where the blocks are, which norms they hold and what feeds what.

Keyed by ``config.model_type``. One :class:`Architecture` declares, with paths relative to a block:

* ``norms``: every norm inside a block (norm tweaking finds them here, not by class name);
* ``mappings``: norm → the linears reading its output (:class:`NormMapping`; RepQuant, SmoothQuant);
* ``linear_mappings``: linear → linear through an elementwise or per-head op (:class:`LinearMapping`;
  v→o through attention, up→down through a GLU, fc1→fc2 through ReLU), for scales and rotations between
  two linears;
* ``attention``: per attention module, where q/k/v come from, the output projection and whether RoPE
  rotates q/k (:class:`AttentionSpec`; KV-cache quantization, per-head rotations).

A *reference* to a linear is ``"module"`` (``nn.Linear`` [out, in], GPT-2 ``Conv1D`` [in, out], or another
module with a 2-D ``weight`` [out, in] applied as ``F.linear``, e.g. a MoE router) or ``"module:param"``, a
parameter whose last axis is the input and second-to-last the output (fused MoE experts ``[E, out, in]``).
``next:`` marks a consumer in the *next* block (post-LN models such as BERT, where a block's last LayerNorm
feeds the next block's q/k/v). ``pre_block_norms`` sit before the first block (BERT's embedding LayerNorm
feeds block 0). A fused source (phi3 ``qkv_proj``/``gate_up_proj``, GPT-2 ``c_attn``, expert
``gate_up_proj``) names a ``part`` (``"q"``, ``"k"``, ``"v"``, ``"gate"``, ``"up"``) that resolves to a row
range from the config's head geometry (:func:`part_rows`).

Blocks may come in variants (Qwen3-MoE's dense ``mlp_only_layers``): ``Architecture.block_variant`` names a
block's variant and a mapping with ``variant`` set applies only to such blocks.

In a *post-LN* model (BERT; OPT with ``do_layer_norm_before=False``; BLOOM with
``apply_residual_connection_post_layernorm=True``) a norm's output also feeds the residual stream, so a
transform that rescales that output (RepQuant, SmoothQuant) is not function-preserving there:
:meth:`Architecture.is_post_ln` tells. :func:`block_mappings`, :func:`block_linear_mappings`,
:func:`block_attention` and :func:`block_norms` resolve full paths for one block.

>>> arch = get_architecture("llama")
>>> arch.mappings[0].norm, arch.mappings[0].consumers
('input_layernorm', ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'))
>>> arch.linear_mappings[0]
LinearMapping(source='self_attn.v_proj', consumer='self_attn.o_proj', through='attention', part=None, variant=None)
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from normquant.quant.linear import is_conv1d


class UnsupportedArchitecture(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class NormMapping:
    """A norm and the linears reading its output."""

    norm: str  # module path of the norm inside the block
    consumers: tuple[str, ...]  # linear references (block-relative, or "next:<ref>")
    variant: str | None = None  # only in blocks of this variant (None: every block)


@dataclass(frozen=True)
class LinearMapping:
    """A linear whose output rows feed another linear's input columns through ``through``.

    ``through`` is ``"attention"`` (softmax(QKᵀ)·V per head: a scale or a head_dim×head_dim transform per kv
    head commutes; with GQA, o's columns for query head h read kv head h // (num_heads/num_kv_heads)),
    ``"glu"`` (up ⊙ act(gate): any per-channel scale commutes), ``"relu"`` (positive scales only), a fixed
    non-commuting activation such as ``"gelu"``, or ``"act:<config attribute>"`` (the activation named by the
    config, e.g. OPT's ``activation_function``). :data:`COMMUTES` says which scales each one lets through.
    """

    source: str  # producing linear reference (its output rows)
    consumer: str  # consuming linear reference (its input columns)
    through: str
    part: str | None = None  # rows of a fused source: "q" | "k" | "v" | "gate" | "up" (see part_rows)
    variant: str | None = None


@dataclass(frozen=True)
class AttentionSpec:
    """One attention module: where q/k/v come from, where its output goes, and its position encoding.

    Give ``q``/``k``/``v`` (separate projections) or ``qkv`` (one fused projection). ``o`` reads the
    concatenated heads ``[num_heads * head_dim]``. Head geometry comes from the config (:func:`head_geometry`).
    """

    module: str  # the attention module
    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_layout: str = "contiguous"  # fused rows: "contiguous" [q | k | v], or "per_head" [head, (q, k, v), head_dim]
    rope: bool = True  # RoPE rotates q and k (after q_norm/k_norm); False: learned/absolute positions or ALiBi
    q_norm: str | None = None  # per-head norm on q before RoPE [head_dim] (qwen3, gemma3)
    k_norm: str | None = None


@dataclass(frozen=True)
class Architecture:
    """One model family: block paths, norms, and the three kinds of mappings (see the module docstring)."""

    name: str
    blocks: str  # dotted path of the ModuleList of blocks, from the top model
    final_norm: str | None  # dotted path from the top model
    head: str | None  # output projection (lm_head), or None for encoders
    norm_kind: str  # "rmsnorm" | "gemma_rmsnorm" (weight is 1+w) | "layernorm"
    mappings: tuple[NormMapping, ...]
    pre_block_norms: tuple[NormMapping, ...] = field(default=())  # e.g. BERT embeddings.LayerNorm -> block 0
    post_ln: bool = False  # norm after the residual add (BERT)
    post_ln_if: tuple[str, object] | None = None  # (config attribute, value) that makes the model post-LN
    norms: tuple[str, ...] = ()  # every norm inside a block (empty: the norms of `mappings`)
    linear_mappings: tuple[LinearMapping, ...] = ()
    attention: tuple[AttentionSpec, ...] = ()
    block_variant: Callable[[object, int], str] | None = None  # (config, block index) -> variant name

    def is_post_ln(self, config) -> bool:
        """True when a norm output also feeds the residual stream (so rescaling it changes the model)."""
        if self.post_ln:
            return True
        return self.post_ln_if is not None and getattr(config, self.post_ln_if[0], None) == self.post_ln_if[1]

    @property
    def declared_norms(self) -> tuple[str, ...]:
        """Every norm inside a block (block-relative paths)."""
        return self.norms or tuple(dict.fromkeys(m.norm for m in self.mappings))


# Which per-channel scales s an op between two linears lets through (op(s ⊙ x) = s ⊙ op(x)): "any" nonzero s,
# "positive" s only, or "none". Activations not listed (GELU, SiLU, ...) are "none".
COMMUTES: dict[str, str] = {"attention": "any", "glu": "any", "identity": "any", "relu": "positive"}

# ---------------------------------------------------------------------------------------------- the table
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_GEMMA2_NORMS = _LLAMA_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")

_ATTN_IN = NormMapping("input_layernorm", _QKV)
_LLAMA = (_ATTN_IN, NormMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
# Gemma2/3: post_attention_layernorm normalizes the attention output before the residual add (it feeds no linear);
# pre_feedforward_layernorm feeds the MLP.
_GEMMA2 = (_ATTN_IN, NormMapping("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")))

_V_O = LinearMapping("self_attn.v_proj", "self_attn.o_proj", "attention")
_UP_DOWN = LinearMapping("mlp.up_proj", "mlp.down_proj", "glu")
_LLAMA_LINEAR = (_V_O, _UP_DOWN)

_LLAMA_ATTN = AttentionSpec("self_attn", "self_attn.o_proj", *_QKV)
_QK_NORM_ATTN = replace(_LLAMA_ATTN, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")

# MoE (transformers ≥ 5): the router `mlp.gate` has weight [E, H] used as F.linear; the experts are fused 3-D
# parameters gate_up_proj [E, 2I, H] (rows: gate | up) and down_proj [E, H, I].
_MOE_IN = NormMapping("post_attention_layernorm", ("mlp.gate", "mlp.experts:gate_up_proj"))
_MOE_UP_DOWN = LinearMapping("mlp.experts:gate_up_proj", "mlp.experts:down_proj", "glu", part="up")


def _qwen3_moe_variant(config, index: int) -> str:
    """Qwen3-MoE: "moe" for sparse blocks, "dense" for `mlp_only_layers` and off-step blocks (as HF builds them)."""
    sparse = (index not in (getattr(config, "mlp_only_layers", None) or [])
              and config.num_experts > 0 and (index + 1) % config.decoder_sparse_step == 0)
    return "moe" if sparse else "dense"


ARCHITECTURES: dict[str, Architecture] = {}


def register(model_types: tuple[str, ...], arch: Architecture) -> None:
    for t in model_types:
        ARCHITECTURES[t] = arch


_llama = Architecture("llama", "model.layers", "model.norm", "lm_head", "rmsnorm", _LLAMA, norms=_LLAMA_NORMS,
                      linear_mappings=_LLAMA_LINEAR, attention=(_LLAMA_ATTN,))
register(("llama", "mistral", "qwen2"), _llama)
register(("qwen3",), replace(_llama, name="qwen3", norms=_LLAMA_NORMS + _QK_NORMS, attention=(_QK_NORM_ATTN,)))
register(("gemma",), replace(_llama, name="gemma", norm_kind="gemma_rmsnorm"))
_gemma2 = replace(_llama, name="gemma2", norm_kind="gemma_rmsnorm", mappings=_GEMMA2, norms=_GEMMA2_NORMS)
register(("gemma2",), _gemma2)
register(("gemma3_text",), replace(_gemma2, name="gemma3_text", norms=_GEMMA2_NORMS + _QK_NORMS,
                                   attention=(_QK_NORM_ATTN,)))
register(("phi3",), replace(
    _llama, name="phi3",
    mappings=(NormMapping("input_layernorm", ("self_attn.qkv_proj",)),
              NormMapping("post_attention_layernorm", ("mlp.gate_up_proj",))),
    linear_mappings=(LinearMapping("self_attn.qkv_proj", "self_attn.o_proj", "attention", part="v"),
                     LinearMapping("mlp.gate_up_proj", "mlp.down_proj", "glu", part="up")),
    attention=(AttentionSpec("self_attn", "self_attn.o_proj", qkv="self_attn.qkv_proj"),)))
register(("mixtral",), replace(_llama, name="mixtral", mappings=(_ATTN_IN, _MOE_IN),
                               linear_mappings=(_V_O, _MOE_UP_DOWN)))
register(("qwen3_moe",), replace(
    _llama, name="qwen3_moe", norms=_LLAMA_NORMS + _QK_NORMS, attention=(_QK_NORM_ATTN,),
    mappings=(_ATTN_IN, replace(_MOE_IN, variant="moe"), replace(_LLAMA[1], variant="dense")),
    linear_mappings=(_V_O, replace(_MOE_UP_DOWN, variant="moe"), replace(_UP_DOWN, variant="dense")),
    block_variant=_qwen3_moe_variant))
register(("opt",), Architecture(
    "opt", "model.decoder.layers", "model.decoder.final_layer_norm", "lm_head", "layernorm",
    (NormMapping("self_attn_layer_norm", _QKV), NormMapping("final_layer_norm", ("fc1",))),
    post_ln_if=("do_layer_norm_before", False), norms=("self_attn_layer_norm", "final_layer_norm"),
    linear_mappings=(LinearMapping("self_attn.v_proj", "self_attn.out_proj", "attention"),
                     LinearMapping("fc1", "fc2", "act:activation_function")),  # ReLU in every released OPT
    attention=(AttentionSpec("self_attn", "self_attn.out_proj", *_QKV, rope=False),)))  # learned positions
register(("gpt2",), Architecture(
    "gpt2", "transformer.h", "transformer.ln_f", "lm_head", "layernorm",
    (NormMapping("ln_1", ("attn.c_attn",)), NormMapping("ln_2", ("mlp.c_fc",))), norms=("ln_1", "ln_2"),
    linear_mappings=(LinearMapping("attn.c_attn", "attn.c_proj", "attention", part="v"),  # c_attn: [q | k | v]
                     LinearMapping("mlp.c_fc", "mlp.c_proj", "act:activation_function")),  # gelu_new: no scale
    attention=(AttentionSpec("attn", "attn.c_proj", qkv="attn.c_attn", rope=False),)))  # learned positions
register(("bloom",), Architecture(
    "bloom", "transformer.h", "transformer.ln_f", "lm_head", "layernorm",
    (NormMapping("input_layernorm", ("self_attention.query_key_value",)),
     NormMapping("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
    post_ln_if=("apply_residual_connection_post_layernorm", True),
    norms=("input_layernorm", "post_attention_layernorm"),
    # No v → dense mapping: query_key_value's rows are interleaved per head ([head, (q, k, v), head_dim]), so the
    # v rows are not one range. dense_h_to_4h → dense_4h_to_h goes through BloomGelu (no scale commutes).
    linear_mappings=(LinearMapping("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "gelu"),),
    attention=(AttentionSpec("self_attention", "self_attention.dense", qkv="self_attention.query_key_value",
                             qkv_layout="per_head", rope=False),)))  # ALiBi
register(("bert",), Architecture(
    "bert", "encoder.layer", None, None, "layernorm",
    (NormMapping("attention.output.LayerNorm", ("intermediate.dense",)),
     NormMapping("output.LayerNorm", ("next:attention.self.query", "next:attention.self.key", "next:attention.self.value"))),
    pre_block_norms=(NormMapping("embeddings.LayerNorm",
                                 ("attention.self.query", "attention.self.key", "attention.self.value")),),
    post_ln=True, norms=("attention.output.LayerNorm", "output.LayerNorm"),
    linear_mappings=(LinearMapping("attention.self.value", "attention.output.dense", "attention"),
                     LinearMapping("intermediate.dense", "output.dense", "act:hidden_act")),  # GELU: no scale
    attention=(AttentionSpec("attention.self", "attention.output.dense", "attention.self.query",
                             "attention.self.key", "attention.self.value", rope=False),)))  # absolute positions


def get_architecture(model_or_type: nn.Module | str) -> Architecture:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Register one with normquant.models.arch.register(...) (blocks path, norms and the linears they feed)"
        ) from None


# ---------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class HeadGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        """Query heads per kv head (GQA; 1 for MHA)."""
        return self.num_heads // self.num_kv_heads


def head_geometry(config) -> HeadGeometry:
    """Heads from a config: ``head_dim`` missing or None → hidden / heads, ``num_key_value_heads`` → heads;
    GPT-2/BLOOM's ``n_head``/``n_embd`` are read too."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    kv = getattr(config, "num_key_value_heads", None) or heads
    return HeadGeometry(heads, kv, getattr(config, "head_dim", None) or hidden // heads)


def part_rows(part: str | None, geometry: HeadGeometry, out_features: int) -> range:
    """The output rows of a fused source that make up ``part`` (all rows for None).

    ``q``/``k``/``v``: a contiguous fused qkv ``[q (heads·hd) | k (kv·hd) | v (kv·hd)]``; ``gate``/``up``: the
    halves of a fused gate_up ``[gate (I) | up (I)]``.
    """
    q, kv = geometry.num_heads * geometry.head_dim, geometry.num_kv_heads * geometry.head_dim
    half = out_features // 2
    rows = {None: range(out_features), "q": range(0, q), "k": range(q, q + kv), "v": range(q + kv, q + 2 * kv),
            "gate": range(0, half), "up": range(half, out_features)}
    try:
        return rows[part]
    except KeyError:
        raise ValueError(f"unknown part '{part}'; known: q, k, v, gate, up") from None


# ---------------------------------------------------------------------------------------------- references
def split_ref(ref: str) -> tuple[str, str | None]:
    """``"a.b:param"`` → ``("a.b", "param")``; ``"a.b"`` → ``("a.b", None)``."""
    module, _, param = ref.partition(":")
    return module, param or None


def get_weight(model: nn.Module, ref: str) -> torch.Tensor:
    """The weight a linear reference names (``module.weight`` or ``module.<param>``)."""
    module, param = split_ref(ref)
    return getattr(model.get_submodule(module), param or "weight")


def linear_features(model: nn.Module, ref: str) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear reference (Conv1D's weight is [in, out]; a 3-D expert
    parameter [E, out, in] gives its last two axes)."""
    module, param = split_ref(ref)
    w = get_weight(model, ref)
    if param is None and is_conv1d(model.get_submodule(module)):
        return w.shape[1], w.shape[0]
    return w.shape[-2], w.shape[-1]


# ---------------------------------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class ResolvedMapping:
    """A norm and the linears reading its output, as full module paths from the top model."""

    norm: str
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class ResolvedLinearMapping:
    """A source → consumer pair with full references and the rows/columns that connect them.

    Source rows ``rows`` (axis -2 of an expert parameter; Conv1D weight columns) feed the consumer's input.
    Through attention, consumer column ``h·head_dim + d`` reads source row ``(h // groups)·head_dim + d`` of
    ``rows``; otherwise column ``i`` reads ``rows[i]``. ``scales``: "any" | "positive" | "none" (:data:`COMMUTES`).
    """

    source: str
    consumer: str
    rows: range
    through: str  # the op, with "act:<attr>" resolved from the config (e.g. "relu", "gelu_new")
    scales: str
    head_dim: int | None = None  # attention only
    groups: int = 1  # attention: query heads per kv head

    def consumer_columns(self, r: torch.Tensor) -> torch.Tensor:
        """A per-source-row vector ``r [..., len(rows)]`` as the consumer's input columns ``[..., in]``
        (repeated across the query heads that share a kv head)."""
        if self.head_dim is None or self.groups == 1:
            return r
        heads = r.reshape(*r.shape[:-1], -1, self.head_dim)  # [..., kv, hd]
        return heads.repeat_interleave(self.groups, dim=-2).flatten(-2)


@dataclass(frozen=True)
class ResolvedAttention:
    """One attention module with full paths and the head geometry of the model's config.

    ``q``/``k``/``v`` name the same fused module when the projection is fused; ``*_rows`` are the rows of
    that output holding q/k/v, or None where they are not one range (BLOOM's per-head interleaved qkv).
    """

    module: str
    q: str
    k: str
    v: str
    o: str
    q_rows: range | None
    k_rows: range | None
    v_rows: range | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    q_norm: str | None = None
    k_norm: str | None = None

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def _applies(arch: Architecture, mapping, config, index: int) -> bool:
    """Whether ``mapping`` applies to block ``index`` (its ``variant`` is None or the block's)."""
    return mapping.variant is None or arch.block_variant is None or arch.block_variant(config, index) == mapping.variant


def get_blocks(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    arch = arch or get_architecture(model)
    return model.get_submodule(resolve_path(model, arch.blocks))


def _block_prefix(model: nn.Module, index: int, arch: Architecture) -> tuple[str, int]:
    blocks_path = resolve_path(model, arch.blocks)
    n_blocks = len(model.get_submodule(blocks_path))
    if not 0 <= index < n_blocks:
        raise IndexError(f"block index {index} out of range; the model has {n_blocks} blocks")
    return blocks_path, n_blocks


def block_mappings(model: nn.Module, index: int, arch: Architecture | None = None) -> list[ResolvedMapping]:
    """The norm→consumer mappings owned by block ``index``, with full paths.

    A block owns the norms that live in it; ``next:`` consumers resolve into block ``index + 1`` (and are
    dropped for the last block, whose output feeds no mapped linear); block 0 also owns ``pre_block_norms``.
    A consumer may be a ``module:param`` reference (MoE experts): use :func:`get_weight` for it.

    >>> block_mappings(model, 0)[0]  # doctest: +SKIP
    ResolvedMapping(norm='model.layers.0.input_layernorm', consumers=('model.layers.0.self_attn.q_proj', ...))
    """
    arch = arch or get_architecture(model)
    blocks_path, n_blocks = _block_prefix(model, index, arch)
    here, nxt = f"{blocks_path}.{index}", f"{blocks_path}.{index + 1}"
    out = []
    for m in arch.mappings:
        if not _applies(arch, m, model.config, index):
            continue
        if index + 1 == n_blocks and any(c.startswith("next:") for c in m.consumers):
            continue
        consumers = tuple(f"{nxt}.{c[len('next:'):]}" if c.startswith("next:") else f"{here}.{c}" for c in m.consumers)
        out.append(ResolvedMapping(f"{here}.{m.norm}", consumers))
    if index == 0:
        out += [ResolvedMapping(resolve_path(model, m.norm), tuple(f"{here}.{c}" for c in m.consumers))
                for m in arch.pre_block_norms]
    return out


def block_linear_mappings(model: nn.Module, index: int, arch: Architecture | None = None, *,
                          commuting_only: bool = True) -> list[ResolvedLinearMapping]:
    """The linear → linear mappings of block ``index`` (full references, source rows, head layout).

    With ``commuting_only`` (default) pairs whose op lets no scale through (GELU) are left out.
    """
    arch = arch or get_architecture(model)
    blocks_path, _ = _block_prefix(model, index, arch)
    here, geometry = f"{blocks_path}.{index}", head_geometry(model.config)
    out = []
    for m in arch.linear_mappings:
        if not _applies(arch, m, model.config, index):
            continue
        through = m.through
        if through.startswith("act:"):
            through = str(getattr(model.config, through[len("act:"):], "unknown"))
        scales = COMMUTES.get(through, "none")
        if commuting_only and scales == "none":
            continue
        source = f"{here}.{m.source}"
        rows = part_rows(m.part, geometry, linear_features(model, source)[0])
        attn = through == "attention"
        out.append(ResolvedLinearMapping(source, f"{here}.{m.consumer}", rows, through, scales,
                                         geometry.head_dim if attn else None, geometry.groups if attn else 1))
    return out


def block_attention(model: nn.Module, index: int, arch: Architecture | None = None) -> list[ResolvedAttention]:
    """The attention modules of block ``index`` (one for every architecture here), resolved."""
    arch = arch or get_architecture(model)
    blocks_path, _ = _block_prefix(model, index, arch)
    here, g = f"{blocks_path}.{index}", head_geometry(model.config)

    def full(p: str | None) -> str | None:
        return None if p is None else f"{here}.{p}"

    out = []
    for a in arch.attention:
        if a.qkv is not None:
            q = k = v = full(a.qkv)
            if a.qkv_layout == "per_head":
                rows = (None, None, None)
            else:
                n = linear_features(model, q)[0]
                rows = tuple(part_rows(p, g, n) for p in ("q", "k", "v"))
        else:
            q, k, v = full(a.q), full(a.k), full(a.v)
            rows = tuple(range(linear_features(model, r)[0]) for r in (q, k, v))
        out.append(ResolvedAttention(full(a.module), q, k, v, full(a.o), *rows, g.num_heads, g.num_kv_heads,
                                     g.head_dim, a.rope, full(a.q_norm), full(a.k_norm)))
    return out


def block_norms(model: nn.Module, index: int, arch: Architecture | None = None) -> dict[str, nn.Module]:
    """Every declared norm inside block ``index``: ``{full path: module}`` (``pre_block_norms`` excluded)."""
    arch = arch or get_architecture(model)
    blocks_path, _ = _block_prefix(model, index, arch)
    paths = [f"{blocks_path}.{index}.{n}" for n in arch.declared_norms]
    return {p: model.get_submodule(p) for p in paths}


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


def rotary_embedding(model: nn.Module) -> nn.Module | None:
    """The model's rotary embedding module (``forward(x, position_ids) -> (cos, sin)``, transformers' RoPE modules,
    which hold ``inv_freq``); None for a model without one (learned or absolute positions, ALiBi)."""
    return next((m for m in model.modules() if hasattr(m, "inv_freq") and "Rotary" in type(m).__name__), None)


def cache_argument(model: nn.Module) -> str:
    """The name under which the model's ``forward`` takes and returns the KV cache: ``cache`` in the transformers
    releases that renamed it (``past_key_values`` warns there that it goes in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def tied_aliases(model: nn.Module) -> set[str]:
    """State-dict names that alias an earlier parameter or buffer (tied weights), e.g. ``lm_head.weight``."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    every |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    unique = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return every - unique
