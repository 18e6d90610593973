"""Real integer execution (``convert``): quantized linears run as integer GEMMs instead of fake-quant.

:func:`convert` replaces every :class:`~normquant.quant.linear.QuantLinear` it can run as an integer GEMM with
an :class:`Int8Linear`, every other quantized weight with a :class:`PackedLinear` (the weight held packed at its
bit width, dequantized per call: the fake path's numbers, bit for bit, in a fraction of the memory), and says
which and why. The fake path stays the reference: the real one computes the same integers.

**Int8Linear** (W8A8 on CPU): int8 symmetric weights (per output channel or per tensor; the codes of
:meth:`QuantLinear.integer_weight`) and activations dynamic per token (symmetric, compressed-tensors' arithmetic:
:func:`~normquant.quant.primitives.serving_qparams_view`, ``clip_ratio`` included) or static per tensor (the
calibrated scale; asymmetric too: its integer zero point ``z`` is oneDNN's activation zero point, or on
``int_mm`` the precomputed correction ``z · Σ_k q_w``, so ``Σ (q - z) q_w`` is still an exact integer sum) — through oneDNN's u8×s8 GEMM (``torch.ops.onednn.qlinear_pointwise``) with int32
accumulation::

    q_x = round(clamp(x / s_x, -2^(b-1), 2^(b-1)-1))            [M, K]  the fake path's codes, op for op
    u   = q_x + 2^(b-1)  (uint8), zero point 2^(b-1)           oneDNN takes unsigned activations
    y   = s_x · (s_w ⊙ Σ_k (u - 2^(b-1)) q_w) + b              [M, N]  integer sum exact in int32

The fake path computes ``(s_x q_x)(s_w q_w)ᵀ`` in float32: the same value up to float32 rounding of the sum.

**Activation bits the CPU sums exactly** (:func:`exact_activation_bits`, probed once): CPUs without VNNI
(AVX2) multiply u8×s8 pairs into *saturating* int16 (``vpmaddubsw``), so two products of 255·127 overflow;
with codes of at most 7 bits (``u`` ≤ 127) no pair can. The probe runs a worst-case GEMM: 8 where it is exact
(VNNI/AMX), else 7. On a 7-bit machine, layers with 8-bit activations stay fake (a recipe with ``bits: 7``
activations runs for real; fbgemm's ``reduce_range`` is the same constraint).

**On CUDA** (``backend="int_mm"``, the default for a CUDA model): the same codes, signed, through
``torch._int_mm`` (cuBLASLt int8, int32 sums, exact at 8 bits; more than 16 rows — fewer are zero-padded — and
K, N multiples of 8, else packed weights with the reason); and W4A16 through tinygemm (:class:`Int4Linear`,
bfloat16 activations and scales). Both kernels have CPU twins with the same inputs (``torch._int_mm`` on CPU,
``_weight_int4pack_mm_for_cpu``), which is how the tests check the CUDA code's arithmetic without a GPU.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from normquant.messages import one_line
from normquant.quant.linear import OnlineInputTransform, QuantLinear
from normquant.quant.prefix import prefix_of
from normquant.quant.packing import pack_codes, unpack_codes
from normquant.quant.primitives import QuantError, activation_view, code_dtype, dequantize, serving_qparams_view

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def exact_activation_bits() -> int | None:
    """The widest activation code (bits) this CPU's oneDNN u8×s8 GEMM sums exactly; None without the op."""
    op = getattr(torch.ops.onednn, "qlinear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    k, n = 64, 8
    w = torch.full((n, k), 127, dtype=torch.int8)
    for bits in (8, 7):
        zero = 2 ** (bits - 1)
        u = torch.full((4, k), 2 * zero - 1, dtype=torch.uint8)  # the largest code: (2^b - 1) - 2^(b-1)
        try:
            y = int8_gemm(u, zero, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(n),
                      torch.zeros(n, dtype=torch.long))
        except RuntimeError:
            return None
        if torch.equal(y, torch.full((4, n), float((zero - 1) * 127 * k))):
            return bits
    return None


def int8_gemm(u: torch.Tensor, zero: int, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor
          ) -> torch.Tensor:
    """``w_scale ⊙ Σ_k (u - zero) q_w`` ``[M, N]`` float32 (oneDNN, int32 accumulation)."""
    return torch.ops.onednn.qlinear_pointwise(u, 1.0, zero, packed, w_scale, w_zero, None, 1.0, 0, torch.float32,
                                              "none", [], "")


def why_not_int8(ql: QuantLinear, activation_bits: int | None, backend: str = "onednn") -> str:
    """Why ``ql`` cannot run as an :class:`Int8Linear` here ("" when it can)."""
    w, a = ql.weight_spec, None if ql.input_quant is None else ql.input_quant.spec
    if activation_bits is None:
        return "this PyTorch build has no oneDNN int8 GEMM"
    if backend == "int_mm" and (ql.in_features % 8 or ql.out_features % 8):
        return f"shape [{ql.out_features}, {ql.in_features}] (torch._int_mm needs multiples of 8)"
    if w is None or not ql.weight_quantized:
        return "float weights"
    if w.bits != 8 or not w.symmetric or w.granularity not in ("channel", "token", "tensor"):
        return f"weights {w.short()} (needs int8 symmetric per channel or per tensor)"
    if a is None:
        return "float activations (weight-only)"
    if (a.dynamic and not a.symmetric) or a.outlier_threshold is not None or not (
            (a.dynamic and a.granularity == "token") or (not a.dynamic and a.granularity == "tensor")):
        return f"activations {a.short()} (needs symmetric dynamic per-token or static per-tensor)"
    if a.bits > activation_bits:
        return (f"{a.bits}-bit activations: this CPU's int8 GEMM sums at most {activation_bits}-bit codes exactly "
                "(no VNNI: saturating int16 pair sums)")
    return ""


def quantize_rows(xv: torch.Tensor, spec, scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned activation codes ``u = q + 2^(b-1)`` ``[n, k]`` uint8 and the scale ``[n, 1]`` (or the static one) of
    a reduction view: ``q`` is :func:`~normquant.quant.primitives.fake_quantize_serving_view`'s, op for op (a static
    asymmetric ``zero``, on the signed grid, is added before the clamp and rounding, as there)."""
    s = serving_qparams_view(xv, spec)[0] if scale is None else scale
    half = 2 ** (spec.bits - 1)
    v = torch.div(xv, s)
    if zero is not None:
        v.add_(zero)
    q = v.clamp_(-half, half - 1).round_()
    return (q + half).to(torch.uint8), s


_COMPILED: dict = {}


def row_quantizer():
    """:func:`quantize_rows` compiled (``torch.compile`` fuses its ~8 elementwise passes into two loops: 1 ms
    instead of 32 ms on a ``[2048, 576]`` input here; identical codes and scales, tested), or the eager function
    when ``NORMQUANT_COMPILE=0`` or compiling fails (then with one warning)."""
    if os.environ.get("NORMQUANT_COMPILE", "1") == "0" or _COMPILED.get("failed"):
        return quantize_rows
    if "fn" not in _COMPILED:
        compiled = torch.compile(quantize_rows)

        def guarded(xv, spec, scale=None, zero=None):
            try:
                return compiled(xv, spec, scale, zero)
            except Exception as e:  # no C++ compiler, an unsupported platform: the eager codes are the same
                log.warning("torch.compile of the activation quantizer failed (%s); running it eagerly",
                            one_line(e, 160))
                _COMPILED["failed"] = True
                return quantize_rows(xv, spec, scale, zero)

        _COMPILED["fn"] = guarded
    return _COMPILED["fn"]


class Int8Linear(OnlineInputTransform):
    """A quantized linear run as an int8 GEMM (module docstring); built from a QuantLinear by :meth:`from_quant`.

    ``backend``: ``"onednn"`` (CPU: u8×s8 ``qlinear_pointwise``, unsigned codes) or ``"int_mm"``
    (``torch._int_mm``: cuBLASLt int8 tensor cores on CUDA, a reference kernel on CPU; signed codes, exact for 8
    bits; CUDA needs more than 16 rows — fewer are padded with zero rows — and K, N multiples of 8)."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, input_spec,
                 input_scale: torch.Tensor | None, input_transform: nn.Module | None, backend: str = "onednn",
                 input_zero: int = 0):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.input_spec, self.backend = input_spec, backend
        self.input_zero = int(input_zero)  # static asymmetric: the zero point on the signed grid (0 otherwise)
        self.register_buffer("input_zero_point", torch.tensor(float(input_zero)) if input_zero else None)
        if backend == "onednn":
            self.register_buffer("weight_packed", torch.ops.onednn.qlinear_prepack(codes.contiguous(), None))  # int8
        else:
            self.register_buffer("weight_packed", codes.contiguous())  # int8 [N, K]; the GEMM reads its transpose
        # Σ_k q_w per output: the zero point's correction, Σ (q - z) q_w = Σ q q_w - z Σ q_w (int_mm; exact in int32)
        self.register_buffer("weight_row_sums", codes.int().sum(dim=1) if backend == "int_mm" else None)
        self.register_buffer("weight_scale", w_scale.float().reshape(-1).expand(self.out_features).contiguous())
        self.register_buffer("weight_zero", torch.zeros(self.out_features, dtype=torch.long))
        self.register_buffer("input_scale", input_scale)  # static: [1, 1]; dynamic: None
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.input_transform = input_transform

    @classmethod
    def from_quant(cls, ql: QuantLinear, backend: str = "onednn") -> "Int8Linear":
        codes, scale, _ = ql.integer_weight()  # int8 [N, K]; scale [N, 1] or [1, 1]
        a = ql.input_quant
        zero = 0 if a.spec.symmetric else int(a.zero_point.item()) - 2 ** (a.spec.bits - 1)  # static asymmetric
        return cls(codes.to(torch.int8), scale, ql.bias, a.spec, None if a.spec.dynamic else a.scale.float(),
                   ql.input_transform, backend, zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformed_input(x)
        spec, dtype, shape = self.input_spec, x.dtype, x.shape
        xv, _ = activation_view(x, spec)  # compressed-tensors' rows: [B*T, C], or the whole tensor
        z, zp = self.input_zero, self.input_zero_point
        u, s = row_quantizer()(xv, spec, None if self.input_scale is None else self.input_scale.to(x.dtype),
                               None if zp is None else zp.to(x.dtype))
        u, half = u.reshape(-1, self.in_features), 2 ** (spec.bits - 1)
        if self.backend == "onednn":  # u - (half + z) = q - z: oneDNN subtracts the activation zero point itself
            y = int8_gemm(u, half + z, self.weight_packed, self.weight_scale, self.weight_zero)  # [M, N]
        else:
            y = int_mm_gemm((u.to(torch.int16) - half).to(torch.int8), self.weight_packed, self.weight_scale, z,
                            self.weight_row_sums)
        y = y.reshape(*shape[:-1], self.out_features).mul_(s.reshape(*shape[:-1], 1) if s.numel() > 1 else s)
        if self.bias is not None:
            y = y + self.bias
        return y.to(dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"int8 x {self.input_spec.short()} ({self.backend})")


def int_mm_gemm(q: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor, zero: int = 0,
                row_sums: torch.Tensor | None = None) -> torch.Tensor:
    """``w_scale ⊙ Σ_k (q - zero) q_w`` ``[M, N]`` float32 through ``torch._int_mm`` (int32 sums); ``q`` int8
    ``[M, K]``, ``codes`` int8 ``[N, K]``; a zero point is the precomputed correction ``zero · Σ_k q_w``
    (``row_sums`` ``[N]`` int32). CUDA's kernel takes more than 16 rows: fewer are padded with zeros."""
    m = q.shape[0]
    if q.is_cuda and m <= 16:
        q = torch.cat([q, q.new_zeros(17 - m, q.shape[1])])
    acc = torch._int_mm(q, codes.t())[:m]
    if zero:
        acc = acc - zero * row_sums
    return acc.float().mul_(w_scale)


def int4_pack(u: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Unsigned 4-bit codes ``u`` ``[N, K]`` (0..15) in the int4 kernel's layout on ``device``: tinygemm's on CUDA
    (two codes per byte, ``[N, K/2]`` uint8, then ``_convert_weight_to_int4pack``), its CPU twin's otherwise."""
    tiles = next(t for t in (8, 4, 2) if u.shape[1] % (t * 16) == 0)
    if device.type == "cuda":
        nibbles = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8).to(device)
        return torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.int(), tiles)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """``x`` ``[M, K]`` times the weight of :func:`int4_pack` (``scales_and_zeros`` ``[K/g, N, 2]``): tinygemm on
    CUDA, its CPU twin otherwise."""
    mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    return mm(x, packed, group_size, scales_and_zeros)


class Int4Linear(OnlineInputTransform):
    """W4A16 through PyTorch's int4 GEMM: tinygemm (``torch.ops.aten._weight_int4pack_mm``, CUDA, bfloat16) or
    its CPU twin (``_weight_int4pack_mm_for_cpu``, the activations' dtype). The kernel dequantizes
    ``(u - 8) · s + z_t`` per group from unsigned 4-bit codes ``u``; normquant's ``s (q - z)`` is that with
    ``u = q`` and ``z_t = s (8 - z)`` (asymmetric) or ``u = q + 8``, ``z_t = 0`` (symmetric); per-channel scales are
    repeated over groups of 128. Scales and activations run in the kernel's dtype, so outputs match the fake path
    to that dtype's rounding (bfloat16 on CUDA), not bit for bit."""

    GROUPS = (32, 64, 128, 256)

    def __init__(self, ql: QuantLinear, device: torch.device):
        super().__init__()
        spec = ql.weight_spec
        codes, scale, zero = ql.integer_weight()  # [N, K]; [n, 1] rows of the reduction view
        n, k = codes.shape
        g = spec.group_size if spec.granularity == "group" else 128
        self.out_features, self.in_features, self.group_size = n, k, g
        dtype = torch.bfloat16 if device.type == "cuda" else ql.weight.dtype  # the kernel's; .to() may change it
        def per_group(t):  # [n, 1] qparam rows -> [N, K/g] (a per-channel row repeated over its groups)
            t = t.float().reshape(n, -1)
            return t.repeat_interleave(k // g // t.shape[1], dim=1)

        s, z = per_group(scale), per_group(zero)
        u = codes.int() + (8 if spec.symmetric else 0)  # unsigned 0..15
        z_t = torch.zeros_like(s) if spec.symmetric else s * (8 - z)
        self.register_buffer("scales_and_zeros", torch.stack([s, z_t], dim=2).transpose(0, 1).contiguous()
                             .to(device=device, dtype=dtype))  # [K/g, N, 2]
        self.register_buffer("weight_packed", int4_pack(u, device))
        self.bias = ql.bias
        self.input_transform = ql.input_transform

    @staticmethod
    def why_not(ql: QuantLinear) -> str:
        """Why ``ql`` cannot run through the int4 kernel ("" when it can)."""
        w = ql.weight_spec
        if w is None or not ql.weight_quantized or w.bits != 4:
            return "not a 4-bit weight"
        if ql.input_quant is not None:
            return "quantized activations (the int4 kernel takes float activations)"
        n, k = ql.out_features, ql.in_features
        if w.granularity == "group" and w.group_size not in Int4Linear.GROUPS:
            return f"group size {w.group_size} (the kernel takes {', '.join(map(str, Int4Linear.GROUPS))})"
        if w.granularity == "tensor":
            return "per-tensor scale"
        g = w.group_size if w.granularity == "group" else 128
        if k % g or k % 32 or n % 8:
            return f"shape [{n}, {k}] (needs in_features divisible by {max(g, 32)}, out_features by 8)"
        return ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformed_input(x)
        dtype, shape = x.dtype, x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        y = int4_mm(x2, self.weight_packed, self.group_size, self.scales_and_zeros).reshape(*shape[:-1],
                                                                                          self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 g{self.group_size} x {self.scales_and_zeros.dtype}"


class PackedLinear(OnlineInputTransform):
    """A quantized linear whose weight is held as its integer codes, packed at their bit width (int32 words,
    :func:`normquant.quant.packing.pack_to_int32`), with its float32 scales (and zero points when asymmetric);
    each call dequantizes ``s (q - z)`` — the very float weight the QuantLinear held — and runs a float GEMM, so
    outputs are bit-identical to the fake path while the resident weight shrinks to ``bits/8`` bytes per element
    plus qparams (W4 g64 symmetric: 0.56 bytes, 0.28x float16). Input activations keep the QuantLinear's
    (fake-quant) quantizer and online transform."""

    def __init__(self, ql: QuantLinear):
        super().__init__()
        codes, scale, zero = ql.integer_weight()  # [N, K] on normquant's grid; [n, 1] on the reduction view
        self.spec, self.shape, self.dtype = ql.weight_spec, tuple(codes.shape), ql.weight.dtype
        self.register_buffer("weight_packed", pack_codes(codes.int(), self.spec.bits, self.spec.symmetric))
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("weight_zero_point", None if self.spec.symmetric else zero.to(torch.int16))
        self.bias = ql.bias
        self.input_quant, self.input_transform = ql.input_quant, ql.input_transform

    @property
    def weight_spec(self):
        return self.spec

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes, scale, zero)`` exactly as :meth:`QuantLinear.integer_weight` gave them (exports read here)."""
        q, scale, zero = self._float_codes()
        return q.to(code_dtype(self.spec)), scale, zero

    def _float_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = unpack_codes(self.weight_packed, self.spec.bits, self.shape[1], self.spec.symmetric)  # float [N, K]
        zero = torch.zeros_like(self.weight_scale) if self.weight_zero_point is None else self.weight_zero_point.float()
        return q, self.weight_scale, zero

    def dequantized_weight(self) -> torch.Tensor:
        """``s (q - z)`` ``[N, K]`` in the model's dtype: the fake path's weight, bit for bit (tested)."""
        return dequantize(*self._float_codes(), self.spec).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformed_input(x)
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.shape[1]}, out={self.shape[0]}, w={self.spec.short()} packed"


#: the modules an export reads as quantized linears (the same interface: weight_spec, input_quant, bias,
#: input_transform, integer_weight(), in_features / out_features)
QUANTIZED_LINEARS = (QuantLinear, PackedLinear)


def pack_weights(root: nn.Module) -> int:
    """Replace every QuantLinear under ``root`` whose weight is quantized by a :class:`PackedLinear` (same
    outputs, the weight held at its bit width); returns how many. Streamed quantization packs each block once it
    is done (:mod:`normquant.models.streaming`)."""
    n = 0
    for name, module in list(root.named_modules()):
        if isinstance(module, QuantLinear) and module.weight_spec is not None and module.weight_quantized:
            root.set_submodule(name, PackedLinear(module))
            n += 1
    return n


def convert(model: nn.Module, *, backend: str | None = None, int4: bool | None = None) -> dict:
    """Run the quantized linears of ``model`` for real, in place: an :class:`Int8Linear` where the int8 GEMM
    applies, an :class:`Int4Linear` for 4-bit weights with float activations when ``int4`` (default: on CUDA,
    where tinygemm is fast; on CPU the kernel is slow with float32 activations), else a :class:`PackedLinear`
    (packed weights, the same outputs) for every quantized weight; QuantLinears with float weights stay as they
    are. ``backend``: ``"onednn"`` (CPU default) or ``"int_mm"`` (CUDA default; also runs on CPU, for tests).
    Returns ``{"converted": {name: "int8-gemm" | "int4-gemm" | "packed-weights"}, "kept": {name: why},
    "why_not_int8": {name: why}, "activation_bits": b, "backend": backend}``."""
    if prefix_of(model) is not None:
        raise QuantError("this model has a PrefixQuant prefix, whose positions the integer GEMM would quantize: "
                         "evaluate it without --real")
    device = next(model.parameters()).device
    backend = backend or ("int_mm" if device.type == "cuda" else "onednn")
    int4 = device.type == "cuda" if int4 is None else int4
    bits = exact_activation_bits() if backend == "onednn" else 8  # int_mm: int8 x int8 -> int32, exact
    report: dict = {"converted": {}, "kept": {}, "why_not_int8": {}, "activation_bits": bits, "backend": backend}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        why = why_not_int8(module, bits, backend)
        if not why:
            real, kind = Int8Linear.from_quant(module, backend), "int8-gemm"
        elif int4 and not Int4Linear.why_not(module):
            real, kind = Int4Linear(module, module.weight.device), "int4-gemm"
        elif module.weight_spec is not None and module.weight_quantized:
            real, kind = PackedLinear(module), "packed-weights"
            report["why_not_int8"][name] = why
        else:
            report["kept"][name] = why
            continue
        model.set_submodule(name, real)
        report["converted"][name] = kind
    return report
