"""Hadamard rotation of the residual stream, the attention heads and the MLP input (QuaRot, Ashkboos et al.
2024; placement of METHODS §4.2, names of SpinQuant: R1, R2, R4). Every rotation is orthogonal and folded into
the weights, except R4's activation half, which runs online in front of ``down_proj``'s input quantizer; the
float model's logits are unchanged (tests: ≤1e-10 relative in float64, ≤1e-4 in float32).

* **R1** ``Q = diag(s)·Tᵀ [d, d]`` (randomized Hadamard, ``s ∈ {±1}^d`` from ``seed``), after norm fusion
  (:mod:`normquant.methods.norm_fusion`): the residual stream becomes ``h Q``.
  Embeddings ``E ← E Q``; every linear reading a norm (q/k/v, gate/up, ``lm_head``) ``W ← W Q``; every residual
  writer (attention output, MLP output) ``W ← Qᵀ W``, ``b ← Qᵀ b``.
* **R2** per head on values/output: ``W_v[h] ← T_dh W_v[h]`` (rows of kv head ``h``, and its bias), ``W_o ← W_o
  (I_nh ⊗ T_dh)ᵀ`` (the columns of each query head) — offline only, exact through attention (GQA included: a
  query head reads its kv head's rotated values).
* **R4** ``T_dff`` on the MLP output linear's input: offline ``W_down ← W_down T_dffᵀ``, online ``x ← T_dff x``
  in float32 as the linear's ``input_transform`` (:class:`~normquant.quant.hadamard.OnlineHadamard`), before its
  input quantizer.

* **online before ``o_proj``** (``online_o``, off by default; QuaRot's "1½ Hadamards", METHODS §4.2): offline
  ``W_o ← W_o T_dᵀ``, online ``x ← T_d x`` on the attention output, like R4. QuaRot applies ``H_{n_h}`` across the
  head axis online so that, with R2's per-head ``H_{d_h}``, the attention output sees ``H_{n_h} ⊗ H_{d_h} = H_d``;
  that identity needs ``n_h`` of a Hadamard order (SmolLM2 has 9 heads), so normquant applies the full ``T_d``
  online after R2 [NQ]: the input of ``o_proj`` sees ``T_d (I ⊗ T_dh)``, orthogonal, mixing every head.

``T`` is :func:`~normquant.quant.hadamard.hadamard_transform` (``K·2^m`` sizes, block-diagonal fallback with a
warning otherwise). R3 (online q/k after RoPE) belongs to the KV-cache work and is not here.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from normquant.methods.norm_fusion import fuse_norms, residual_embeddings, residual_writers, untie_head
from normquant.models.arch import Architecture, block_attention, block_mappings, get_blocks
from normquant.models.fold import hf_weight
from normquant.pipeline.step import Step, StepError, register_step
from normquant.quant.hadamard import OnlineHadamard, hadamard_transform, random_hadamard_matrix
from normquant.quant.linear import QuantLinear


def _set(t: torch.Tensor, value: torch.Tensor) -> None:
    t.copy_(value.to(t.dtype))


@torch.no_grad()
def rotate_residual(model: nn.Module, arch: Architecture, Q: torch.Tensor) -> None:
    """R1: the residual stream ``h → h Q`` (``Q [d, d]`` orthogonal, float64); the model must be norm-fused."""
    for emb in residual_embeddings(model, arch):
        _set(emb.weight, emb.weight.double() @ Q.to(emb.weight.device))  # [V, d] @ [d, d]
    readers, writers = [], []
    for i in range(len(get_blocks(model, arch))):
        readers += [c for m in block_mappings(model, i, arch) for c in m.consumers]
        writers += residual_writers(model, i, arch)
    head = untie_head(model, arch)
    for lin in [model.get_submodule(p) for p in readers] + ([head] if head is not None else []):
        w = hf_weight(lin)  # [out, d]
        _set(w, w.double() @ Q.to(w.device))
    for lin in (model.get_submodule(p) for p in writers):
        w = hf_weight(lin)  # [d, in]
        Qd = Q.to(w.device)
        _set(w, Qd.t() @ w.double())
        if lin.bias is not None:
            _set(lin.bias, lin.bias.double() @ Qd)  # b ← Qᵀ b, as a row vector: b Q


def _rotate_rows(w: torch.Tensor, rows: range, head_dim: int) -> None:
    """``T_dh`` on the output side of each head's rows: ``W[rows of head h] ← T W[rows of head h]``."""
    block = w[rows.start:rows.stop].double()  # [heads·dh, in]
    heads = block.reshape(-1, head_dim, block.shape[-1])  # [h, dh, in]
    rotated = hadamard_transform(heads.transpose(1, 2)).transpose(1, 2)  # T applied along dh
    _set(w[rows.start:rows.stop], rotated.reshape(block.shape))


@torch.no_grad()
def rotate_heads(model: nn.Module, arch: Architecture) -> None:
    """R2: per-head ``T_dh`` on the values' output rows and ``o_proj``'s input columns."""
    for i in range(len(get_blocks(model, arch))):
        for att in block_attention(model, i, arch):
            if att.v_rows is None:
                raise StepError(f"{att.module}: its fused q/k/v rows are interleaved per head; R2 (per-head "
                                "rotation of v and o) does not support that layout, set r2: false")
            v = model.get_submodule(att.v)
            _rotate_rows(hf_weight(v), att.v_rows, att.head_dim)
            if v.bias is not None:
                _rotate_rows(v.bias[:, None], att.v_rows, att.head_dim)
            w_o = hf_weight(model.get_submodule(att.o))  # [d, nh·dh]
            cols = w_o.double().reshape(w_o.shape[0], -1, att.head_dim)  # [d, nh, dh]
            _set(w_o, hadamard_transform(cols).reshape(w_o.shape))  # W_o (I ⊗ T)ᵀ: T on each head's segment


def _online_input_hadamard(model: nn.Module, path: str) -> None:
    """``W ← W Tᵀ`` offline and ``T`` online (float32, before the input quantizer) on the input of linear ``path``."""
    lin = model.get_submodule(path)
    carrier = lin if isinstance(lin, QuantLinear) else QuantLinear.wrap(lin, None, None)
    if carrier.input_transform is not None:
        raise StepError(f"{path} already has an online input transform; rotate the model once")
    _set(carrier.weight, hadamard_transform(carrier.weight.double()))  # [out, in]: T on each row
    carrier.input_transform = OnlineHadamard(carrier.in_features)
    if carrier is not lin:
        model.set_submodule(path, carrier)


@torch.no_grad()
def rotate_mlp_input(model: nn.Module, arch: Architecture) -> None:
    """R4: ``W_down ← W_down Tᵀ`` offline and ``T`` online, on the input of each MLP output linear."""
    for i in range(len(get_blocks(model, arch))):
        attention_o = {a.o for a in block_attention(model, i, arch)}
        for path in residual_writers(model, i, arch):
            if path not in attention_o:
                _online_input_hadamard(model, path)


@torch.no_grad()
def rotate_attention_output(model: nn.Module, arch: Architecture) -> None:
    """QuaRot's online half of the value/output rotation: ``W_o ← W_o T_dᵀ`` offline and ``T_d`` online on the
    attention output (all heads together), on top of R2's per-head ``T_dh``."""
    for i in range(len(get_blocks(model, arch))):
        for att in block_attention(model, i, arch):
            _online_input_hadamard(model, att.o)


def rotate_model(model: nn.Module, arch: Architecture, *, r1: bool = True, r2: bool = True, r4: bool = True,
                 online_o: bool = False, seed: int = 0) -> None:
    """Norm fusion, then the chosen rotations; in place, function-preserving."""
    fuse_norms(model, arch)
    if r1:
        rotate_residual(model, arch, random_hadamard_matrix(model.config.hidden_size, seed))
    if r2:
        rotate_heads(model, arch)
    if r4:
        rotate_mlp_input(model, arch)
    if online_o:
        rotate_attention_output(model, arch)


@register_step
class Rotation(Step):
    """``rotate: {r1, r2, r4, online_o, seed}``: QuaRot's Hadamard rotations, model-wide (no data); list it first.
    Steps after it (RepQuant, GPTQ, norm tweaking) see the rotated model; norm tweaking tunes the fused
    norms' γ (= 1) in the rotated basis."""

    name = "rotate"
    needs_float_weights = True
    r1: bool = True
    r2: bool = True
    r4: bool = True
    online_o: bool = Field(False, exclude_if=lambda v: not v)  # not dumped when off: former recipes keep their hash
    seed: int = Field(0, ge=0)

    def online_input_transforms(self) -> bool:
        return self.r4 or self.online_o

    def apply_model(self, model, arch) -> None:
        rotate_model(model, arch, r1=self.r1, r2=self.r2, r4=self.r4, online_o=self.online_o, seed=self.seed)
