"""QuantLinear: an ``nn.Linear`` (or GPT-2 ``Conv1D``) with a weight quantizer and an input-activation quantizer.

The weight is stored *fake-quantized* (``s * (q - z)`` in float) together with its ``weight_scale`` and
``weight_zero_point``; :meth:`QuantLinear.integer_weight` recovers the integer codes exactly as
``round(W / s) + z`` — the one place where exports and integer kernels read them.

>>> import torch
>>> from normquant.quant.spec import QuantSpec
>>> ql = QuantLinear.wrap(torch.nn.Linear(16, 8), QuantSpec(bits=8), QuantSpec(bits=8, granularity="token", dynamic=True))
>>> ql.quantize_weight()
>>> ql(torch.randn(2, 3, 16)).shape
torch.Size([2, 3, 8])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normquant.quant.llm_int8 import decompose
from normquant.quant.observers import ReservoirObserver
from normquant.quant.prefix import float_prefix_length
from normquant.quant.primitives import (
    QuantError,
    check_finite,
    choose_qparams,
    code_dtype,
    dequantize_view,
    fake_quantize,
    fake_quantize_activation,
    qparams_from_range,
    quantize_view,
    reduction_view,
)
from normquant.quant.search import percentile_init
from normquant.quant.spec import QuantSpec

PERCENTILE_SAMPLE_VALUES = 2**24  # values kept per quantizer for observer: percentile (64 MiB in float32)

class ActivationQuantizer(nn.Module):
    """Fake-quantizes a linear's input ``[..., C]`` with the serving stack's arithmetic
    (:func:`~normquant.quant.primitives.fake_quantize_activation`: what compressed-tensors computes when it runs
    an export, so normquant's numbers are the deployed model's).

    Dynamic specs compute qparams per call (compressed-tensors' formula). Static specs (``tensor`` or ``channel``) are calibrated: while
    ``observing`` is true the input passes unchanged and is recorded — the running min/max, or for
    ``observer: percentile`` a uniform sample of at most :data:`PERCENTILE_SAMPLE_VALUES` values (whole
    tokens); :meth:`freeze` turns the range (min-max, or the percentile search of
    :func:`~normquant.quant.search.percentile_init` on the sample) into ``scale``/``zero_point`` buffers.
    """

    def __init__(self, spec: QuantSpec):
        super().__init__()
        if not spec.dynamic and spec.granularity not in ("tensor", "channel"):
            raise QuantError(f"static activation quantization supports granularity tensor or channel, got '{spec.granularity}'; "
                             "use dynamic: true for token/group")
        self.spec = spec
        self.enabled = True  # False passes inputs through (while a block's steps run)
        self.observing = False
        self.fixed = False  # a step chose the range (RepQuant): calibration leaves it alone
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("running_min", None)
        self.register_buffer("running_max", None)
        self.sample: ReservoirObserver | None = None  # observer: percentile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        p = float_prefix_length()
        if p and x.dim() == 3 and x.shape[1] > p:  # [B, T, C]: the prefixed positions stay float
            return torch.cat([x[:, :p], self._quantize(x[:, p:])], dim=1)
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:
            if self.spec.outlier_threshold is not None:  # LLM.int8(): outlier columns stay float
                return decompose(x, self.spec.outlier_threshold, lambda v: fake_quantize_activation(v, self.spec))
            return fake_quantize_activation(x, self.spec)
        if self.observing:
            self.observe(x)
            return x
        if self.scale is None:
            raise QuantError("static activation quantizer used before calibration; run calibration first")
        return fake_quantize_activation(x, self.spec, self.scale, self.zero_point)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        check_finite(x, "calibration activations")
        if self.spec.observer == "percentile":
            if self.sample is None:
                self.sample = ReservoirObserver(size=max(256, PERCENTILE_SAMPLE_VALUES // x.shape[-1]))
            self.sample.update(x.detach().float())
            return
        xv, _ = reduction_view(x.detach().float(), self.spec, channel_axis=-1)
        lo, hi = xv.amin(dim=1, keepdim=True), xv.amax(dim=1, keepdim=True)
        if self.running_min is None:
            self.running_min, self.running_max = lo, hi
        else:
            self.running_min = torch.minimum(self.running_min, lo)
            self.running_max = torch.maximum(self.running_max, hi)

    @torch.no_grad()
    def freeze(self) -> None:
        if self.running_min is None and self.sample is None:
            raise QuantError("static activation quantizer saw no calibration data")
        if self.sample is not None:
            x = self.sample.compute()["sample"]  # [k, C]
            x = x.reshape(-1, 1) if self.spec.granularity == "tensor" else x  # per-tensor: all values, one "channel"
            lo, hi = percentile_init(x, self.spec.bits, symmetric=self.spec.symmetric)  # [1] or [C]
            self.running_min, self.running_max = lo[:, None], hi[:, None]
        self.scale, self.zero_point = qparams_from_range(self.running_min, self.running_max, self.spec)
        self.running_min = self.running_max = self.sample = None
        self.observing = False

    def extra_repr(self) -> str:
        return self.spec.short()


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (transformers.pytorch_utils): a linear whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    """A module normquant can quantize: ``nn.Linear``, GPT-2's ``Conv1D`` (weight ``[in, out]``) or a QuantLinear."""
    return isinstance(module, (nn.Linear, QuantLinear)) or is_conv1d(module)


def set_activation_quant(qls, enabled: bool) -> None:
    """Turn the input quantizers of the given QuantLinear modules on or off."""
    for ql in qls:
        if ql.input_quant is not None:
            ql.input_quant.enabled = enabled


@torch.no_grad()
def calibrate_static_inputs(qls, run) -> None:
    """(Re)calibrate the static input quantizers of ``qls`` that no step fixed: observe while ``run()`` feeds
    data (quantizers already calibrated start afresh), then freeze. Fixed ones (RepQuant's) are left as set."""
    static = [ql.input_quant for ql in qls if ql.input_quant is not None and not ql.input_quant.spec.dynamic
              and not ql.input_quant.fixed]
    if not static:
        return
    for q in static:
        q.scale = q.zero_point = None
        q.enabled, q.observing = True, True
    run()
    for q in static:
        q.freeze()


class OnlineInputTransform(nn.Module):
    """The ``input_transform`` slot of a quantized linear (fake-quant or integer): an online transform ``T``
    (QuaRot's Hadamard before ``down_proj``) applied to the input before the input quantizer."""

    input_transform: nn.Module | None

    def transformed_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` after the online ``input_transform`` ``T`` (before the input quantizer): what the stored weight
        ``W Tᵀ`` multiplies, so also what GPTQ's Hessian is taken of."""
        return x if self.input_transform is None else self.input_transform(x)


class QuantLinear(OnlineInputTransform):
    """Linear layer with fake-quantized weight and (optionally) input activations; ``y = Q(T(x)) Q(W)^T + b``.

    ``input_transform`` ``T`` (optional) is an online transform applied before the input quantizer (QuaRot's
    Hadamard before ``down_proj``); the offline half of it is already folded into the weight. A QuantLinear
    with no specs and a transform is a float carrier of the transform until :meth:`set_specs` gives it specs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_spec: QuantSpec | None,
                 input_spec: QuantSpec | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # shares the wrapped module's storage (no copy of the model): quantize_weight installs a new tensor
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.weight_spec = weight_spec
        self.input_quant = ActivationQuantizer(input_spec) if input_spec is not None else None
        self.input_transform: nn.Module | None = None
        self.source_type: type = nn.Linear
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero_point", None)

    @property
    def has_specs(self) -> bool:
        return self.weight_spec is not None or self.input_quant is not None

    def set_specs(self, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> None:
        """Give a spec-less QuantLinear (a carrier of an online transform) its quantizers."""
        if self.has_specs:
            raise QuantError("this layer already has quantization specs")
        self.weight_spec = weight_spec
        self.input_quant = ActivationQuantizer(input_spec).to(self.weight.device) if input_spec is not None else None

    @classmethod
    def wrap(cls, module: nn.Module, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> "QuantLinear":
        """Build from ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight ``[in, out]``, transposed here)."""
        if isinstance(module, nn.Linear):
            weight = module.weight
        elif is_conv1d(module):
            weight = module.weight.t()
        else:
            raise QuantError(f"cannot quantize module of type {type(module).__name__}; only Linear and Conv1D")
        ql = cls(weight, module.bias, weight_spec, input_spec)
        ql.source_type = type(module)  # target matching by class name still sees Linear / Conv1D
        return ql

    @property
    def weight_quantized(self) -> bool:
        return self.weight_scale is not None

    @torch.no_grad()
    def quantize_weight(self, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> None:
        """Round-to-nearest the weight with min-max qparams (or the given ones, e.g. from GPTQ / clip search)."""
        if self.weight_spec is None:
            return
        w = self.weight.data.float()
        check_finite(w, "weight")
        if scale is None:
            scale, zero = choose_qparams(w, self.weight_spec, channel_axis=0)
        self.weight.data = fake_quantize(w, scale, zero, self.weight_spec, channel_axis=0).to(self.weight.dtype)
        self.weight_scale, self.weight_zero_point = scale.float(), zero.float()

    @torch.no_grad()
    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The integers behind the quantized weight: ``(codes, scale, zero)``.

        ``codes`` ``[out, in]`` (int8, int16 for unsigned 8-bit) on normquant's grid (``weight_spec.qmin`` ..
        ``qmax``: signed for symmetric specs, unsigned with an integer zero point otherwise); ``scale`` and
        ``zero`` are ``weight_scale`` / ``weight_zero_point``, ``[n, 1]`` float32 on the reduction view of
        :mod:`normquant.quant.primitives` (one row per tensor / output row / group), so that
        ``dequantize(codes, scale, zero, weight_spec)`` is the weight. Computed on the weight's device.

        This is the seam between simulation and deployment: the exports (:mod:`normquant.export`) and a real
        integer kernel (a later ``convert`` of QuantLinear modules) read the integers here. Recovery is exact
        because the weight is stored as ``s * (q - z)``: ``round(W / s) + z`` gives ``q`` back. Raises
        :class:`QuantError` when the weight was never quantized, or is off its grid (changed after
        ``quantize_weight`` / ``set_quantized_weight``), where codes would not reproduce it.
        """
        spec = self.weight_spec
        if spec is None or not self.weight_quantized:
            what = f"weight spec {spec.short()}" if spec is not None else "no weight spec"
            raise QuantError(f"layer has {what} but its weight was never quantized; call quantize_weight() "
                             "(or run the recipe) first")
        w = self.weight.detach()
        wv, restore = reduction_view(w.float(), spec, channel_axis=0)  # [n, k], one (s, z) per row
        s, z = self.weight_scale, self.weight_zero_point  # [n, 1]
        q = quantize_view(wv, s, z, spec)
        w_hat = dequantize_view(q, s, z).to(w.dtype).float()
        eps = torch.finfo(w.dtype).eps
        off_grid = (w_hat - wv).abs() > 4 * eps * wv.abs() + torch.finfo(torch.float32).eps * s
        if off_grid.any():
            raise QuantError(f"weight is off its quantization grid at {int(off_grid.sum())} entries (changed after "
                             "quantize_weight?); re-run quantize_weight")
        return restore(q).to(code_dtype(spec)), s, z

    @torch.no_grad()
    def set_quantized_weight(self, w_hat: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Install an already fake-quantized weight (``s * (q - z)``) and its qparams (GPTQ's output)."""
        self.weight.data = w_hat.to(self.weight.dtype)
        self.weight_scale, self.weight_zero_point = scale.float(), zero.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformed_input(x)
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = self.weight_spec.short() if self.weight_spec else "float"
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, w={w}"
