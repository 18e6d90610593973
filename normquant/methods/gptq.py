"""GPTQ (Frantar et al., ICLR 2023) as pure math: METHODS.md §6.2, with the §5.2 MSE clip search.

Notation follows the paper and its reference code. For one linear ``y = x Wᵀ`` with ``W`` ``[out, in]``:

* ``H = (2/N) Σ x xᵀ`` ``[in, in]``: the Hessian of the layer-output error ``‖XWᵀ − XŴᵀ‖²`` w.r.t. each row of W;
* ``Hinv`` ``[in, in]``: the upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``(H + λI)⁻¹ = UᵀU``);
* columns are quantized one at a time; the error of column ``j`` is spread over the not-yet-quantized
  columns ``F`` (OBS update): ``W[:, F] −= (w_j − q_j) / U_jj · U[j, F]``;
* lazy batches: inside a block of ``block_size`` columns the update follows every column; the columns right
  of the block get the block's accumulated update once (``W[:, i2:] −= Err1 · Hinv[i1:i2, i2:]``).

Quantization grid and qparams are those of :mod:`normquant.quant.primitives` (symmetric: signed grid with
zero point 0; asymmetric: unsigned grid with an integer zero point), so the result can be installed with
``QuantLinear.set_quantized_weight`` and exported as ``round(W/s) + z`` with no further bookkeeping.

>>> import torch
>>> from normquant.quant.spec import QuantSpec
>>> X = torch.randn(256, 32)
>>> acc = HessianAccumulator(32)
>>> acc.add(X)
>>> W = torch.randn(16, 32)
>>> res = gptq_quantize(W, acc.H, QuantSpec(bits=4, granularity="group", group_size=8))
>>> res.weight.shape, res.scale.shape, res.zero.shape
(torch.Size([16, 32]), torch.Size([64, 1]), torch.Size([64, 1]))
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from pydantic import Field

from normquant.pipeline.step import Step, register_step
from normquant.quant.primitives import QuantError, check_finite, fake_quantize_view, minmax_qparams_view, reduction_view
from normquant.quant.search import mse_clip_qparams
from normquant.quant.spec import QuantSpec

log = logging.getLogger(__name__)

#: On a failed Cholesky, percdamp is multiplied by 10 this many times (0.01 -> 0.1 -> 1.0) before giving up.
DAMP_RETRIES = 2


class HessianAccumulator:
    """Running average ``H = (2/N) Σ_t x_t x_tᵀ`` over all calibration tokens seen by one linear.

    ``N`` counts tokens (every row of ``x.reshape(-1, in)``), not sequences as the reference code does; the
    overall scale of H does not matter to GPTQ because the dampening ``λ = percdamp·mean(diag H)`` is relative.
    Counting tokens makes H independent of how the calibration data is batched.

    ``dtype`` defaults to float32: H is a running *average*, so its magnitude does not grow with N and float32
    rounding (~1e-7 relative) is far below the 1 % dampening added before the Cholesky; a float64 H would cost
    2x memory on the accelerator (``in = 28672`` gives a 3.3 GB float32 H). Pass ``dtype=torch.float64`` for
    exactness tests. H is allocated on the device of the first input.

    >>> acc = HessianAccumulator(4)
    >>> acc.add(torch.ones(2, 3, 4))   # [batch, seq, in]: 6 tokens
    >>> acc.nsamples, acc.H[0, 0].item()
    (6, 2.0)
    """

    def __init__(self, in_features: int, *, name: str = "", dtype: torch.dtype = torch.float32):
        self.in_features = in_features
        self.name = name
        self.dtype = dtype
        self.nsamples = 0
        self._H: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Fold the tokens of ``x`` ``[..., in]`` into the running average."""
        if x.shape[-1] != self.in_features:
            raise QuantError(f"Hessian of {self.name or 'layer'}: input has {x.shape[-1]} features, expected {self.in_features}")
        check_finite(x, f"GPTQ calibration input of {self.name or 'layer'}")
        X = x.reshape(-1, self.in_features).to(self.dtype)  # [..., in] -> [m, in]
        m = X.shape[0]
        if m == 0:
            return
        if self._H is None:
            self._H = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=x.device)
        n = self.nsamples
        with _ieee_fp32_matmul(X.device):
            self._H.mul_(n / (n + m)).addmm_(X.T, X, alpha=2.0 / (n + m))  # H = n/(n+m)·H + 2/(n+m)·XᵀX
        self.nsamples = n + m

    @property
    def H(self) -> torch.Tensor:
        """The averaged Hessian ``[in, in]``."""
        if self._H is None:
            raise QuantError(f"Hessian of {self.name or 'layer'} has seen no calibration tokens; run calibration first")
        return self._H


@dataclass(frozen=True)
class GPTQResult:
    """Output of :func:`gptq_quantize`.

    * ``weight`` ``[out, in]`` float32: the fake-quantized weight ``s·(q − z)``, columns in W's original order.
    * ``scale``, ``zero`` ``[n, 1]`` float32 in the reduction-view layout of :mod:`normquant.quant.primitives`:
      tensor ``[1, 1]``; channel ``[out, 1]``; group ``[out·in/g, 1]`` (row-major over ``[out, in/g]``, group
      ``k`` = original columns ``k·g … k·g+g−1``).
    * ``perm`` ``[in]`` int64: the act-order column order used by the loop (``None`` without act-order);
      informational only, ``weight``/``scale``/``zero`` need no reordering.
    * ``loss``: ``Σ (w − q)² / (2·Hinv_jj²)`` over all entries, the reference's GPTQ objective estimate.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    perm: torch.Tensor | None
    loss: float


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, block_size: int = 128, percdamp: float = 0.01,
                  act_order: bool = False, static_groups: bool | None = None, mse: bool = False,
                  layer_name: str = "") -> GPTQResult:
    """Quantize ``W`` ``[out, in]`` column by column, compensating each column's error with ``H`` ``[in, in]``.

    ``spec.granularity`` is ``tensor`` (one qparam), ``channel`` (one per output row, fitted on the whole W
    before the loop, as in the reference) or ``group`` (``group_size`` must divide ``in``).

    * ``act_order``: quantize columns in order of descending ``diag(H)``.
    * ``static_groups``: fit all group qparams before the loop on the unmodified W, in original column order
      (otherwise a group's qparams are refitted on the *current, error-updated* columns when the loop reaches
      its first column). ``None`` means "static exactly when ``act_order``". Act-order with dynamic groups is
      refused: its groups would be runs of permuted columns, which the export layout (group ``k`` = original
      columns ``k·g …``) cannot express.
    * ``mse``: per-row / per-group clip search (:func:`mse_clip_qparams`) instead of min-max
      (``spec.clip_ratio``, if set, shrinks every range further, as everywhere in the primitives).
    * ``percdamp``: ``λ = percdamp·mean(diag H)``; if the Cholesky fails it is retried with ``percdamp`` ×10,
      ×100 (each logged as a warning) before a :class:`QuantError` naming ``layer_name``.

    Inputs are not modified. Computation runs on W's device in float32 (Cholesky in float64, TF32 off).
    """
    out_features, in_features = W.shape
    who = layer_name or "this layer"
    if spec.granularity not in ("tensor", "channel", "group"):
        raise QuantError(f"GPTQ of {who}: weight granularity must be tensor, channel or group, got '{spec.granularity}'")
    if H.shape != (in_features, in_features):
        raise QuantError(f"GPTQ of {who}: H has shape {tuple(H.shape)}, expected [{in_features}, {in_features}] for W {tuple(W.shape)}")
    if block_size < 1 or percdamp <= 0:
        raise QuantError(f"GPTQ of {who}: block_size must be >= 1 and percdamp > 0 (got {block_size}, {percdamp})")
    reduction_view(W, spec)  # raises the primitives' error when group_size does not divide in
    grouped = spec.granularity == "group"
    if static_groups is None:
        static_groups = act_order
    if grouped and act_order and not static_groups:
        raise QuantError(f"GPTQ of {who}: act_order with group quantization needs static_groups=True, so that group k "
                         "holds original columns k*g..k*g+g-1 and the checkpoint needs no reordering")
    check_finite(W, f"GPTQ: weight of {who}")
    check_finite(H, f"GPTQ: Hessian of {who}")

    device = W.device
    W = W.detach().to(torch.float32, copy=True)  # [out, in], updated in place below
    H = H.detach().to(device=device, dtype=torch.float64, copy=True)  # [in, in]
    fit = (lambda xv: mse_clip_qparams(xv, spec)) if mse else (lambda xv: minmax_qparams_view(xv, spec))

    with _ieee_fp32_matmul(device), _one_cpu_thread(device):
        # Dead inputs (never active in calibration) carry no information: fix H_ii = 1 and drop their weights.
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        # Qparams table S, Z [out or 1, n_groups] in original group order; col_group[j] = group of loop column j.
        g = spec.group_size if grouped else in_features
        n_groups = in_features // g
        if not grouped or static_groups:
            S, Z = fit(reduction_view(W, spec)[0])  # [1 | out | out*in/g, 1], from the unmodified W
            S, Z = S.reshape(-1, n_groups), Z.reshape(-1, n_groups)  # -> [1 | out, n_groups]
        else:
            S = torch.zeros(out_features, n_groups, device=device)  # refitted inside the loop
            Z = torch.zeros_like(S)

        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            W, H = W[:, perm], H[perm][:, perm]
        order = perm.tolist() if perm is not None else range(in_features)
        col_group = [c // g for c in order]  # loop column -> group (by original column index)

        Hinv = _inverse_cholesky_upper(H, percdamp, who).to(torch.float32)  # U with (H + λI)⁻¹ = UᵀU
        del H  # [in, in] float64: not needed past here (the widest layer's dominates GPTQ's working memory)
        Q = torch.zeros_like(W)
        loss = torch.zeros((), dtype=torch.float64, device=device)

        for i1 in range(0, in_features, block_size):
            i2 = min(i1 + block_size, in_features)
            W1 = W[:, i1:i2].clone()  # [out, B], the block being quantized (gets in-block updates)
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                if grouped and not static_groups and j % g == 0:
                    # Refit on the group's current columns: in-block ones are up to date in W1; those right of
                    # the block still owe this block's pending update Err1 · Hinv[i1:i2, i2:].
                    Wg = W1[:, i:i + g]
                    if j + g > i2:
                        Wg = torch.cat([Wg, W[:, i2:j + g] - Err1 @ Hinv[i1:i2, i2:j + g]], dim=1)  # [out, g]
                    S[:, j // g : j // g + 1], Z[:, j // g : j // g + 1] = fit(Wg)
                k = col_group[j]
                w = W1[:, i]
                d = Hinv1[i, i]
                q = fake_quantize_view(w, S[:, k], Z[:, k], spec)  # q_j = Quant(w_j)
                Q1[:, i] = q
                err1 = (w - q) / d  # e_j = (w_j − q_j) / U_jj
                W1[:, i + 1:] -= err1.unsqueeze(1) * Hinv1[i, i + 1:].unsqueeze(0)  # w_F −= e_j · U[j, F]
                Err1[:, i] = err1
            Q[:, i1:i2] = Q1
            loss += Err1.double().pow(2).sum() / 2  # Σ (w − q)² / (2·U_jj²)
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the columns right of the block

    Q.add_(0.0)  # -0.0 -> +0.0 (a code of 0 rounded from a negative w): GPTQ weights have always stored +0.0
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]  # back to the original column order
    return GPTQResult(weight=Q, scale=S.reshape(-1, 1), zero=Z.reshape(-1, 1), perm=perm, loss=loss.item())


def _inverse_cholesky_upper(H: torch.Tensor, percdamp: float, who: str) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = percdamp·mean(diag H)``, retrying larger dampening."""
    mean_diag = torch.diag(H).mean()
    for attempt in range(DAMP_RETRIES + 1):  # at most three [in, in] float64 matrices alive at once (H included)
        damp = percdamp * 10**attempt
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)  # H + λI, without materializing λI
        L, info = torch.linalg.cholesky_ex(Hd)  # H + λI = L Lᵀ
        del Hd
        if info == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)  # (H + λI)⁻¹ = UᵀU
            del inverse
            if info == 0:
                return U
        if attempt < DAMP_RETRIES:
            log.warning("GPTQ: Cholesky of the Hessian of %s failed with dampening %g; retrying with %g",
                        who, damp, damp * 10)
    raise QuantError(f"GPTQ: Hessian of {who} is not positive definite even with dampening {damp:g} "
                     f"(lambda = {(damp * mean_diag).item():.3g}); its calibration inputs are degenerate: check them "
                     "(too few or repeated tokens), raise percdamp, or quantize this layer with RTN instead")


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on CPU for the column loop: its many small ops are latency-bound, and with two
    threads on a busy machine every op waits on a thread barrier (measured: one [1536, 576] layer 0.9 s with
    one thread vs 17.8 s with two, on this 2-core machine under load)."""
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Full-precision float32 matmuls on CUDA (no TF32) for the duration; a no-op elsewhere."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        saved, matmul.fp32_precision = matmul.fp32_precision, "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
    else:
        saved, matmul.allow_tf32 = matmul.allow_tf32, False
        try:
            yield
        finally:
            matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------- the step
@register_step
class GPTQ(Step):
    """GPTQ weights (METHODS.md §6.2) from Hessians of the block's quantized-path inputs.

    By default all linears of a block collect their Hessians in one pass over the calibration inputs, then each
    is quantized column by column with error feedback. ``true_sequential`` (the reference code's
    ``--true-sequential``) quantizes the block's linears in call order, a group at a time (linears reading one
    input tensor form a group: q/k/v, then o_proj, then gate/up, then down_proj in a llama block), each group's
    Hessians taken from a pass in which the groups before it are already quantized: one calibration pass per
    group instead of one per block. ``act_order`` uses static groups, so an export needs no reordering. ``mse``
    adds the per-row/group clip search (§5.2).
    """

    name = "gptq"
    needs_data = True
    quantizes_weights = True
    block_size: int = Field(128, gt=0)
    dampening: float = Field(0.01, gt=0)
    act_order: bool = False
    mse: bool = False
    true_sequential: bool = Field(False, exclude_if=lambda v: not v)  # not dumped when off: former recipes keep their hash

    @torch.no_grad()
    def apply_block(self, ctx) -> None:
        qls = {n: ql for n, ql in ctx.quant_linears.items() if ql.weight_spec is not None}
        for group in (call_groups(ctx, qls) if self.true_sequential else [list(qls)]):
            self._quantize(ctx, {n: qls[n] for n in group})

    def _quantize(self, ctx, qls: dict) -> None:
        """One calibration pass collecting the Hessians of ``qls``, then GPTQ on each of them."""
        accs = {n: HessianAccumulator(ql.in_features, name=f"{ctx.name}.{n}") for n, ql in qls.items()}
        # a layer with an online transform T stores W Tᵀ: its Hessian is E[(Tx)(Tx)ᵀ], of the transformed input
        hooks = [ql.register_forward_pre_hook(lambda m, args, acc=accs[n]: acc.add(m.transformed_input(args[0])))
                 for n, ql in qls.items()]
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


@torch.no_grad()
def call_groups(ctx, qls: dict) -> list[list[str]]:
    """The names of ``qls`` in the order the block calls them on one calibration sample, split into groups of
    consecutive calls on the same input tensor (q/k/v | o_proj | gate/up | down_proj in a llama block); linears
    the block never calls come last, as one group."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [ql.register_forward_pre_hook(lambda m, args, n=n: calls.append((n, args[0]))) for n, ql in qls.items()]
    try:
        ctx.forward(ctx.inputs[:1])
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    seen, last = set(), None
    for n, x in calls:
        if n in seen:
            continue
        if groups and x is last:
            groups[-1].append(n)
        else:
            groups.append([n])
        seen.add(n)
        last = x
    missing = [n for n in qls if n not in seen]
    return groups + ([missing] if missing else [])
