"""The built-in recipe steps: thin wrappers that call the math in ``algorithms/`` and ``transforms/``.

Each step's pydantic fields are its YAML keys; ``apply_block(ctx)`` runs it on one block
(:class:`normquant.calibration.runner.BlockContext`).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PrivateAttr, field_validator, model_validator

from normquant.algorithms.gptq import HessianAccumulator, gptq_quantize, mse_clip_qparams
from normquant.calibration.observers import make_observer, observe_modules
from normquant.models.arch import block_mappings
from normquant.quant.linear import QuantLinear
from normquant.quant.primitives import reduction_view
from normquant.quant.spec import QuantSpec
from normquant.recipe import RecipeError, Step, register_step
from normquant.transforms.repquant import (channel_qparams, install_input_quantizers, learn_dual_clipping,
                                           percentile_init, reparameterize_block, search_range_floor)


@register_step
class RTN(Step):
    """Round-to-nearest weights with min-max qparams (what every weight gets when no other step quantizes it).

    ``mse: true`` picks each row's (or group's) range by the clip search of §5.2 instead of min-max — the same
    search as ``gptq: {mse: true}``, so RTN and GPTQ can be compared with equal ranges.
    """

    name = "rtn"
    mse: bool = False

    def apply_block(self, ctx) -> None:
        self.quantize_linears(ctx.quant_linears.values())

    def quantize_linears(self, qls) -> None:
        for ql in qls:
            if self.mse and ql.weight_spec is not None:
                wv, _ = reduction_view(ql.weight.data.float(), ql.weight_spec, channel_axis=0)  # [n, k]
                ql.quantize_weight(*mse_clip_qparams(wv, ql.weight_spec))
            else:
                ql.quantize_weight()


@register_step
class GPTQ(Step):
    """GPTQ weights (METHODS.md §6.2) from Hessians of the block's quantized-path inputs.

    All linears of a block collect their Hessians in one pass over the calibration inputs, then each is
    quantized column by column with error feedback. ``act_order`` uses static groups, so an export needs no
    reordering. ``mse`` adds the per-row/group clip search (§5.2).
    """

    name = "gptq"
    needs_data = True
    block_size: int = Field(128, gt=0)
    dampening: float = Field(0.01, gt=0)
    act_order: bool = False
    mse: bool = False

    @torch.no_grad()
    def apply_block(self, ctx) -> None:
        qls = {n: ql for n, ql in ctx.quant_linears.items() if ql.weight_spec is not None}
        accs = {n: HessianAccumulator(ql.in_features, name=f"{ctx.name}.{n}") for n, ql in qls.items()}
        hooks = [ql.register_forward_pre_hook(lambda _m, args, acc=accs[n]: acc.add(args[0])) for n, ql in qls.items()]
        try:
            for x in ctx.batches():
                ctx.forward(x)
        finally:
            for h in hooks:
                h.remove()
        for n, ql in qls.items():
            res = gptq_quantize(ql.weight.data, accs.pop(n).H, ql.weight_spec, block_size=self.block_size,
                                percdamp=self.dampening, act_order=self.act_order, mse=self.mse,
                                layer_name=f"{ctx.name}.{n}")
            ql.set_quantized_weight(res.weight, res.scale, res.zero)


@register_step
class RepQuant(Step):
    """RepQuant (METHODS.md §1): per-channel quantizers on norm outputs, reparameterized to per-tensor.

    Per block: sample each mapped norm's output on the calibration inputs, initialize per-channel bounds by
    the RepQ-ViT percentile search, optionally learn dual clipping (block-output MSE, Adam; [NQ] defaults
    lr 5e-3, 20 epochs; with ``weights_in_loop`` (default) the consumers compute with the RTN weights they
    will have after the reparameterization, so the bounds also pay for the weight error a wide channel
    range causes — the paper's "quantized weight reconstruction", whose details are UNVERIFIED); before it,
    ``range_floor`` [NQ, not in the paper] picks per norm the floor ``rho`` that widens narrow channels to
    ``rho``× the widest (grid 0 … 1, block-output MSE with the same weights in the loop), bounding the weight
    column factors ``r1`` by ``1/rho``; then either fold the channel scales into the norm and its consumers and install
    one per-tensor quantizer ``(s̃, integer z̃)`` on the consumers (``mode: reparameterize``), or install the
    per-channel quantizers on the unchanged model (``mode: per_channel``, the simulation the
    reparameterization must reproduce). Bits and symmetry come from the consumers' ``input_activations``
    spec; symmetric on RMSNorm is option A, asymmetric is option B (norm bias + consumer bias).
    Weights are quantized after this step (on the reparameterized weights).
    """

    name = "repquant"
    needs_data = True
    mode: Literal["reparameterize", "per_channel"] = "reparameterize"
    percentiles: list[float] = [0.999, 0.9999, 0.99999]
    learn_clipping: bool = True
    weights_in_loop: bool = True
    range_floor: bool = True
    lr: float = Field(5e-3, gt=0)
    epochs: int = Field(20, ge=1)
    sample_rows: int = Field(65536, gt=0)
    _report: dict = PrivateAttr(default_factory=dict)  # per norm: chosen rho, clipping losses (for eval records)

    @property
    def report(self) -> dict:
        return self._report

    def apply_block(self, ctx) -> None:
        maps = block_mappings(ctx.model, ctx.index, ctx.arch)
        consumers = {m.norm: [ctx.model.get_submodule(c) for c in m.consumers] for m in maps}
        specs = {n: _static_input_spec(n, cs) for n, cs in consumers.items()}
        maps = [m for m in maps if specs[m.norm] is not None]
        if not maps:
            return
        observers = {m.norm: make_observer("percentile", size=self.sample_rows) for m in maps}
        inside = {n: o for n, o in observers.items() if n.startswith(ctx.name + ".")}
        with observe_modules(ctx.model, inside, where="output"), torch.no_grad():
            targets = [ctx.forward(x) for x in ctx.batches()]  # float block outputs
        for n in set(observers) - set(inside):  # a norm before block 0 (BERT's embeddings): its output is the input
            for x in ctx.batches():
                observers[n].update(x)
        bounds = {m.norm: percentile_init(observers[m.norm].compute()["sample"], specs[m.norm].bits,
                                          tuple(self.percentiles), specs[m.norm].symmetric) for m in maps}
        if self.learn_clipping or self.range_floor:
            bits = {specs[m.norm].bits for m in maps}
            sym = {specs[m.norm].symmetric for m in maps}
            if len(bits) > 1 or len(sym) > 1:
                raise RecipeError("repquant tunes all norms of a block together: give their consumers one input spec")
            bits, sym = bits.pop(), sym.pop()
            norms = {m.norm: ctx.model.get_submodule(m.norm) for m in maps}
            inputs = list(ctx.batches())
            # per_channel mode keeps the original weights, so the reparameterized ones have no place in its loop
            in_loop = {n: cs for n, cs in consumers.items() if n in norms} \
                if self.weights_in_loop and self.mode == "reparameterize" else {}
            if self.range_floor:
                bounds, rho = search_range_floor(ctx.forward, norms, in_loop, inputs, targets, bounds, bits, symmetric=sym)
                self._report.update({n: {"rho": r} for n, r in rho.items()})
            if self.learn_clipping:
                result = learn_dual_clipping(ctx.forward, norms, inputs, targets, bounds, bits, symmetric=sym,
                                             lr=self.lr, epochs=self.epochs, consumers=in_loop)
                bounds = result.bounds
                for n in norms:
                    self._report.setdefault(n, {})["clipping_losses"] = result.losses
        qparams = {n: channel_qparams(lo, hi, specs[n].bits, specs[n].symmetric) for n, (lo, hi) in bounds.items()}
        if self.mode == "reparameterize":
            reps = reparameterize_block(ctx.model, ctx.index, qparams)
            qparams = {n: (r.s_tilde, r.z_tilde) for n, r in reps.items()}
        for n, (s, z) in qparams.items():
            install_input_quantizers(consumers[n], s, z, specs[n].bits, specs[n].symmetric)
            for c in consumers[n]:
                c.input_quant.enabled = False  # the pipeline enables activation quantization after the steps


def _static_input_spec(norm: str, consumers) -> QuantSpec | None:
    """The shared static input spec of a norm's consumers, or None if they quantize no input activation."""
    specs = {c.input_quant.spec for c in consumers if isinstance(c, QuantLinear) and c.input_quant is not None}
    if not specs:
        return None
    if len(specs) > 1 or any(s.dynamic for s in specs):
        raise RecipeError(f"repquant needs one static input_activations spec for the consumers of {norm}, "
                          f"got {sorted(s.short() for s in specs)}")
    return specs.pop()


# ---------------------------------------------------------------------------------------------- norm tweaking


@register_step
class NormTweak(Step):
    """Norm Tweaking (METHODS.md §2): quantize the block's weights, then tune its norm parameters with Adam so
    that the quantized block's per-channel output statistics match the float block's.

    The step quantizes the weights *itself*, because the targets are the float block's outputs on the
    quantized-path inputs and QuantLinear keeps no float weights once quantized. Per block it
    (a) computes the float targets ``[N, L, C]`` (weights still float, activation quantizers off),
    (b) runs the weight algorithm ``weights`` (the ``gptq`` step with the options under ``gptq:``, or ``rtn``),
    (c) tunes the norms (LayerNorm γ, β; RMSNorm γ; Gemma's w) with
    :func:`~normquant.algorithms.norm_tweak.tweak_block`
    at lr ``lr · (1 + kappa·l/L)`` for block ``l`` (0-based) of ``L``.
    So a recipe lists it *instead of* its weight step (an earlier step that quantizes the weights is refused)::

        steps:
          - norm_tweak: {weights: gptq, gptq: {block_size: 128, act_order: true}, lr: 1.0e-5, kappa: 1, loss: l_dist}

    Function-preserving transforms (SmoothQuant, RepQuant) may come before it. Joint W/A mode (§2.6): with
    ``activations: true`` (default) and input quantizers in the scheme, they are on during tuning (static ones
    calibrated first on the pre-tweak block; the runner recalibrates them after the step). ``norms: all``
    tunes every norm inside the block (incl. Qwen3 q/k norms, Gemma2 post-norms) [NQ]; ``mapped`` only those
    of the architecture's norm→linear map. ``epochs: 0`` quantizes the weights without tweaking (a baseline).
    Defaults [NQ]: lr 1e-5 (the paper's initial grid value), kappa 1 [UNVERIFIED schedule], 1 epoch, 1 sample
    per Adam step; choose lr/kappa with :func:`~normquant.algorithms.norm_tweak.select_norm_tweak_lr`.
    """

    name = "norm_tweak"
    needs_data = True
    weights: Literal["gptq", "rtn"] = "gptq"
    gptq: GPTQ = Field(default_factory=GPTQ)  # options of the gptq weight step (weights: gptq)
    lr: float = Field(1e-5, ge=0)
    kappa: float = Field(1.0, ge=0)
    loss: str = "l_dist"
    epochs: int = Field(1, ge=0)
    batch_size: int = Field(1, gt=0)
    norms: Literal["all", "mapped"] = "all"
    activations: bool = True

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from normquant.algorithms.norm_tweak import LOSSES

        if v not in LOSSES:
            raise ValueError(f"unknown loss '{v}'; available: {', '.join(sorted(LOSSES))}")
        return v

    @model_validator(mode="after")
    def _options_match_weights(self) -> "NormTweak":
        if self.weights != "gptq" and self.gptq != GPTQ():
            raise ValueError(f"gptq options given but weights is '{self.weights}'; set weights: gptq or drop them")
        return self

    def weight_step(self) -> Step:
        return self.gptq if self.weights == "gptq" else RTN()

    def apply_block(self, ctx) -> None:
        import logging

        from normquant.algorithms.norm_tweak import find_norms, layer_lr, tweak_block
        from normquant.models.arch import get_blocks
        from normquant.quantize import calibrate_static_activations
        from normquant.recipe import RecipeError

        qls = list(ctx.quant_linears.values())
        done = [n for n, ql in ctx.quant_linears.items() if ql.weight_spec is not None and ql.weight_quantized]
        if done:
            raise RecipeError(f"norm_tweak: {ctx.name}.{done[0]} is already quantized, so the float targets are lost; "
                              "norm_tweak quantizes the weights itself: remove the earlier weight step and set "
                              "norm_tweak's `weights` (and `gptq:` options) instead")
        if self.epochs == 0:
            self.weight_step().apply_block(ctx)
            return
        names = [m.norm for m in ctx.arch.mappings] if self.norms == "mapped" else None
        norms = find_norms(ctx.block, names)
        if not norms:
            raise RecipeError(f"norm_tweak: block {ctx.name} has no norm parameters to tune (weightless norms, e.g. "
                              "after a rotation's γ-fusion)")
        aq = [ql.input_quant for ql in qls if ql.input_quant is not None]
        was = [q.enabled for q in aq]
        for q in aq:
            q.enabled = False
        forward = ctx.forward
        with torch.no_grad():  # [N, L, C]: the float block on the quantized-path inputs
            targets = torch.cat([forward(x).to(ctx.inputs.device) for x in ctx.inputs.split(ctx.batch_size)])
        self.weight_step().apply_block(ctx)
        try:
            if self.activations and aq:
                calibrate_static_activations(qls, ctx.outputs)  # enables them; static ranges from the pre-tweak block
                for q in aq:
                    q.enabled = True
            lr = layer_lr(self.lr, self.kappa, ctx.index, len(get_blocks(ctx.model, ctx.arch)))
            res = tweak_block(forward, norms, ctx.inputs, targets, loss=self.loss, lr=lr, epochs=self.epochs,
                              batch_size=self.batch_size, block=ctx.block)
        finally:
            for q, e in zip(aq, was):
                q.enabled = e
        logging.getLogger(__name__).info("norm_tweak %s: lr %.3g, %d params, %s per epoch %s", ctx.name, lr, res.params,
                                         self.loss, ", ".join(f"{v:.4g}" for v in res.epoch_means))
