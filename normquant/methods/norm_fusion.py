"""Norm fusion (QuaRot §3.4; METHODS §4.1): make every norm scale-free so that an orthogonal rotation of the
residual stream commutes with it (``RMSNorm(x Qᵀ) = RMSNorm(x) Qᵀ`` for a weightless RMSNorm).

For each norm → linears mapping of the architecture table (and the final norm → ``lm_head``):

* LayerNorm β into the consumers' biases, ``b ← b + W β`` (with the pre-fold ``W``);
* γ into the consumers' input columns, ``W ← W · diag(γ)`` (Gemma: γ = 1 + w);
* the norm's own γ set to 1 (β to 0); a tied ``lm_head`` is untied first (its weight changes, the embedding's not).

LayerNorm models (OPT, GPT-2) also get a zero-mean residual stream, so that LayerNorm ≡ RMSNorm there: every
embedding row minus its mean; every residual writer (attention output, MLP output) ``W ← W − 1·mean_out(W)``,
``b ← b − mean(b)``; then each LayerNorm is replaced by a :class:`~normquant.models.fold.RMSNorm` with the same
ε and γ = 1. The norms keep a γ parameter (= 1), which norm tweaking can tune later in the rotated basis
(METHODS §8). q/k norms (Qwen3) act per head inside attention and stay as they are.

Logits are unchanged (tests: ≤1e-10 relative in float64 on tiny llama/qwen2/qwen3/gemma/opt/gpt2/phi3).
Refused: post-LN models (the norm output feeds the residual), fused MoE experts (3-D expert parameters are no
linear module), and blocks with norms that feed no linear (Gemma2/3 post-norms on the residual branch).
"""
from __future__ import annotations

import torch
from torch import nn

from normquant.models.arch import (
    Architecture,
    block_attention,
    block_linear_mappings,
    block_mappings,
    get_blocks,
    resolve_path,
    split_ref,
)
from normquant.models.fold import GAMMA_OFFSET, RMSNorm, effective_gamma, hf_weight
from normquant.pipeline.step import Step, StepError, register_step


def check_fusable(model: nn.Module, arch: Architecture) -> None:
    """Raise :class:`StepError` when the model's norms cannot all be fused into linears."""
    if arch.is_post_ln(model.config):
        raise StepError(f"{arch.name}: post-LN model (a norm's output also feeds the residual stream), its norms "
                        "cannot be fused; rotation and norm fusion need a pre-LN model")
    inside = {id(m) for m in get_blocks(model, arch).modules()}
    final = resolve_path(model, arch.final_norm) if arch.final_norm else None
    outer = [n for n, m in model.named_modules() if id(m) not in inside and n != final
             and (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"))]
    if outer:
        raise StepError(f"{arch.name}: {outer[0]} normalizes the residual stream outside the blocks (e.g. BLOOM's "
                        "embedding LayerNorm) and cannot be fused; norm fusion and rotation do not support it")
    for i in range(len(get_blocks(model, arch))):
        maps = block_mappings(model, i, arch)
        fused = [c for m in maps for c in m.consumers if split_ref(c)[1] is not None]
        if fused:
            raise StepError(f"{fused[0]}: fused MoE expert parameters cannot take a fused norm yet; "
                            "norm fusion and rotation support models whose norms feed linear modules")
        mapped = {m.norm for m in maps}
        prefix = f"{resolve_path(model, arch.blocks)}.{i}."
        loose = [n for n in arch.declared_norms if prefix + n not in mapped
                 and not n.split(".")[-1] in ("q_norm", "k_norm")]
        if loose:
            raise StepError(f"{arch.name}: {prefix}{loose[0]} normalizes a residual branch and feeds no linear, "
                            "so it cannot be fused (Gemma2/3 post-norms); norm fusion and rotation do not support it")


def residual_writers(model: nn.Module, index: int, arch: Architecture) -> list[str]:
    """Full paths of block ``index``'s linears whose output is added to the residual stream: the attention
    output projections and the MLP's last linear (the consumer of its linear → linear mapping)."""
    writers = [a.o for a in block_attention(model, index, arch)]
    writers += [m.consumer for m in block_linear_mappings(model, index, arch, commuting_only=False)
                if m.through != "attention"]
    return list(dict.fromkeys(writers))


def residual_embeddings(model: nn.Module, arch: Architecture) -> list[nn.Embedding]:
    """Embeddings whose rows are added to the residual stream: every ``nn.Embedding`` outside the blocks with
    the hidden width (token embeddings, OPT's / GPT-2's learned positions)."""
    inside = {id(m) for m in get_blocks(model, arch).modules()}
    width = model.config.hidden_size
    found = [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in inside]
    if any(m.embedding_dim != width for m in found if m is model.get_input_embeddings()):
        raise StepError("the token embeddings are narrower than the residual stream (OPT's project_in); "
                        "norm fusion and rotation do not support that layout")
    return [m for m in found if m.embedding_dim == width]


def untie_head(model: nn.Module, arch: Architecture) -> nn.Module | None:
    """The ``lm_head`` with its own weight (a copy when it was tied to the embeddings), or None."""
    if arch.head is None:
        return None
    head = model.get_submodule(resolve_path(model, arch.head))
    emb = model.get_input_embeddings()
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    return head


@torch.no_grad()
def fuse_norm_into(norm: nn.Module, norm_kind: str, consumers: list[nn.Module]) -> None:
    """γ (and β) of ``norm`` into ``consumers`` (``b ← b + Wβ``, ``W ← W·diag(γ)``), then γ = 1, β = 0."""
    gamma = effective_gamma(norm, norm_kind)  # [C] float64
    beta = getattr(norm, "bias", None)
    for c in consumers:
        w = hf_weight(c)  # [out, in] view
        W = w.double()
        if beta is not None:
            delta = W @ beta.double()  # [out]
            if c.bias is None:
                c.bias = nn.Parameter(delta.to(w.dtype), requires_grad=False)
            else:
                c.bias.copy_((c.bias.double() + delta).to(c.bias.dtype))
        w.copy_((W * gamma[None, :]).to(w.dtype))
    norm.weight.fill_(1.0 - GAMMA_OFFSET[norm_kind])
    if beta is not None:
        beta.zero_()


@torch.no_grad()
def center_residual(model: nn.Module, arch: Architecture) -> None:
    """Zero-mean residual stream: embedding rows and residual writers' outputs minus their mean over the
    hidden dimension."""
    for emb in residual_embeddings(model, arch):
        E = emb.weight.double()  # [V, d]
        emb.weight.copy_((E - E.mean(dim=1, keepdim=True)).to(emb.weight.dtype))
    for i in range(len(get_blocks(model, arch))):
        for path in residual_writers(model, i, arch):
            lin = model.get_submodule(path)
            w = hf_weight(lin)  # [d, in]
            W = w.double()
            w.copy_((W - W.mean(dim=0, keepdim=True)).to(w.dtype))
            if lin.bias is not None:
                lin.bias.copy_((lin.bias.double() - lin.bias.double().mean()).to(lin.bias.dtype))


@torch.no_grad()
def fuse_norms(model: nn.Module, arch: Architecture) -> None:
    """Fuse every norm of ``model`` into its consumers (see the module docstring); in place."""
    check_fusable(model, arch)
    norms: list[str] = []
    for i in range(len(get_blocks(model, arch))):
        for m in block_mappings(model, i, arch):
            fuse_norm_into(model.get_submodule(m.norm), arch.norm_kind, [model.get_submodule(c) for c in m.consumers])
            norms.append(m.norm)
    head = untie_head(model, arch)
    if arch.final_norm is not None and head is not None:
        final = resolve_path(model, arch.final_norm)
        fuse_norm_into(model.get_submodule(final), arch.norm_kind, [head])
        norms.append(final)
    if arch.norm_kind == "layernorm":
        center_residual(model, arch)
        for path in norms:
            ln = model.get_submodule(path)
            model.set_submodule(path, RMSNorm(ln.weight.shape[0], eps=ln.eps).to(ln.weight.device, ln.weight.dtype))


@register_step
class FuseNorms(Step):
    """``fuse_norms``: model-wide norm fusion (no data). The rotation step does it itself."""

    name = "fuse_norms"
    needs_float_weights = True

    def apply_model(self, model, arch) -> None:
        fuse_norms(model, arch)
