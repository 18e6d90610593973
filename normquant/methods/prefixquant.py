"""Prefixed outlier tokens (PrefixQuant, Chen et al. 2024, arXiv 2410.05265): static activation quantization
without the attention-sink token's massive activations.

A few tokens — on SmolLM2 the first position of every sequence — carry activations two orders of magnitude
above the rest at some linears' inputs (SmolLM2, rotated, ``down_proj`` of blocks 11, 28, 29: token-wise
``max|x|`` ≈ 100 at position 0, ≤ 7 at every other position; ``eval/outliers_smollm2.md``). A static
per-tensor scale must cover them and rounds every other token coarsely. PrefixQuant puts fixed tokens in front
of every sequence; they take the sink role (and its massive activations), their KV cache is computed once in
full precision and kept, and every real token is quantized statically with ranges that no longer see the
outliers.

Here the prefix is part of the quantized model: the ``prefix`` step stores the token ids ``[P]`` on the model
(buffer ``normquant_prefix``); calibration and perplexity evaluation prepend them to every sequence inside
:func:`~normquant.quant.prefix.float_prefix` (the prefix positions pass every activation quantizer in float,
which equals a KV cache computed once with float activations), and the loss counts the same tokens as the
unprefixed protocol. The paper selects the prefix from the tokens found to carry outliers; normquant's default
[NQ] is the model's BOS token (``config.bos_token_id``), or the ``tokens`` the recipe lists.

Deployment caveat: a compressed-tensors export cannot express a float-activation prefix cache; the export
records the ids in ``config.json["normquant"]["prefix_ids"]`` and says that the serving stack computes another
model (``normquant eval`` on the export applies the prefix).
"""
from __future__ import annotations

from normquant.pipeline.step import Step, StepError, register_step
from normquant.quant.prefix import set_prefix


@register_step
class Prefix(Step):
    """``prefix: {tokens: [ids]}`` — PrefixQuant's prefixed tokens (default: the model's BOS token)."""

    name = "prefix"
    tokens: list[int] | None = None

    def apply_model(self, model, arch) -> None:
        ids = self.tokens
        if ids is None:
            bos = getattr(model.config, "bos_token_id", None)
            if not isinstance(bos, int):
                raise StepError("the model config has no bos_token_id: give prefix.tokens (e.g. tokens: [1])")
            ids = [bos]
        try:
            set_prefix(model, ids)
        except ValueError as e:
            raise StepError(f"prefix.tokens: {e}") from None
