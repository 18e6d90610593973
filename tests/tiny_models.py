"""Tiny random-weight Hugging Face models built from configs (no download), for fast exact tests.

Every model has 2 blocks, hidden size 32, vocab 128 and eager attention. Norm parameters are randomized
(HF initializes γ = 1, β = 0, which would hide folding mistakes), and so are existing biases.

>>> model = tiny_model("llama", dtype=torch.float64)
>>> ids = tiny_inputs(model)
>>> model_output(model, ids).shape
torch.Size([2, 16, 128])
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

VOCAB = 128
HIDDEN = 32

_DECODER = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
_GEMMA = dict(_DECODER, head_dim=8)

TINY_CONFIGS: dict[str, dict] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": dict(_DECODER, head_dim=8),
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "phi3": dict(_DECODER, pad_token_id=0, bos_token_id=0, eos_token_id=0),  # defaults (32000) exceed the vocab
    "mixtral": dict(_DECODER, num_local_experts=4, experts_implementation="eager"),  # grouped_mm lacks float64
    "qwen3_moe": dict(_DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1, experts_implementation="eager"),
    "opt": dict(hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=HIDDEN),
    "gpt2": dict(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "bloom": dict(hidden_size=HIDDEN, n_layer=2, n_head=4),
    "bert": dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64),
}
ENCODERS = {"bert"}


def tiny_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, **config_overrides) -> nn.Module:
    """A 2-block random model of ``kind`` (a ``model_type`` in :data:`TINY_CONFIGS`), in eval mode.

    Causal LMs come as ``*ForCausalLM``; encoders (BERT) as the bare base model.
    """
    if kind not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for '{kind}'; available: {', '.join(sorted(TINY_CONFIGS))}")
    config = AutoConfig.for_model(kind, **{"vocab_size": VOCAB, **TINY_CONFIGS[kind], **config_overrides})
    torch.manual_seed(seed)
    auto = AutoModel if kind in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager")
    _randomize_norms_and_biases(model)
    return model.to(dtype).eval()


@torch.no_grad()
def _randomize_norms_and_biases(model: nn.Module) -> None:
    for name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if is_norm and isinstance(weight, nn.Parameter):
            centre = 0.0 if weight.detach().abs().max() == 0 else 1.0  # Gemma stores w with γ = 1 + w
            weight.copy_(centre + 0.3 * torch.randn_like(weight))
        if isinstance(bias, nn.Parameter) and not isinstance(module, nn.Embedding):
            bias.copy_(0.1 * torch.randn_like(bias))


def tiny_inputs(model: nn.Module, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """Random token ids ``[batch, seq]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)


@torch.no_grad()
def model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` for a causal LM, the last hidden state ``[B, T, C]`` for an encoder."""
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
