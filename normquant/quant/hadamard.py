"""Fast Walsh–Hadamard transforms for ``n = K·2^m`` (METHODS §4.4): offline on weight rows
(:func:`hadamard_transform`, float64) and online on activations (:class:`OnlineHadamard`, which multiplies by the
matrix that same function builds), so ``(W Tᵀ)(T x) = W x`` holds to rounding.

``T = (H_K ⊗ H_{2^m}) / √n``: ``x`` (last axis, length ``n``) viewed row-major as ``X [K, 2^m]``; the
Sylvester (natural-order) ``H_{2^m}`` by butterflies along the second axis, then ``H_K`` along the first.
``T`` is orthogonal (``T Tᵀ = I``).

The ``K``-matrices are built here, deterministically, by Paley's constructions (the spec's tables come from
Sloane's library; any Hadamard matrix of order K serves, only orthogonality matters):

* Paley I, ``q`` prime with ``q ≡ 3 (mod 4)``: order ``q + 1`` — K = 12, 20, 60, 108, 140;
* Paley II, ``q`` prime with ``q ≡ 1 (mod 4)``: order ``2(q + 1)`` — K = 28, 36;
* doubling: K = 40 = 2·20.

K = 52, 156, 172 (prime-power or Williamson constructions) are not built [NQ]: a size that needs them, or
any size with no ``K·2^m`` factorization, falls back to the block-diagonal ``I_{n/2^k} ⊗ H_{2^k}`` with the
largest power-of-two block that divides ``n`` (orthogonal, weaker mixing), with a warning
(:func:`hadamard_plan` says which). SmolLM2: hidden 576 = 36·16, intermediate 1536 = 12·128, head 64 = 2^6.

>>> import torch
>>> x = torch.randn(3, 576, dtype=torch.float64)
>>> y = hadamard_transform(x)
>>> torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
True
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Orders K of the stored (constructed) Hadamard matrices, in the spec's selection order (largest first).
K_ORDERS = (140, 108, 60, 36, 28, 40, 20, 12)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _legendre(a: int, q: int) -> int:
    """Quadratic character of ``a`` mod prime ``q``: 0, 1 or -1."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j − i)`` ``[q, q]`` for a prime ``q``."""
    idx = torch.arange(q)
    diff = (idx[None, :] - idx[:, None]) % q
    chi = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.int64)
    return chi[diff]


def _paley1(q: int) -> torch.Tensor:
    """Order ``q + 1`` for prime ``q ≡ 3 (mod 4)``: ``H = I + [[0, 1ᵀ], [−1, Q]]``."""
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.int64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(n, dtype=torch.int64) + S


def _paley2(q: int) -> torch.Tensor:
    """Order ``2(q + 1)`` for prime ``q ≡ 1 (mod 4)``: in ``C = [[0, 1ᵀ], [1, Q]]`` replace 0 by
    ``[[1, −1], [−1, −1]]`` and ±1 by ±``[[1, 1], [1, −1]]``."""
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.int64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
    plus = torch.tensor([[1, 1], [1, -1]])
    zero = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(C, plus) + torch.kron((C == 0).long(), zero)


@functools.lru_cache(maxsize=None)
def hadamard_k(k: int) -> torch.Tensor:
    """The stored Hadamard matrix of order ``k`` (entries ±1, float64, ``H Hᵀ = k I``)."""
    builders = {12: lambda: _paley1(11), 20: lambda: _paley1(19), 60: lambda: _paley1(59),
                108: lambda: _paley1(107), 140: lambda: _paley1(139), 28: lambda: _paley2(13),
                36: lambda: _paley2(17), 40: lambda: torch.kron(torch.tensor([[1, 1], [1, -1]]), _paley1(19))}
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if k not in builders:
        raise ValueError(f"no stored Hadamard matrix of order {k}; stored: {sorted(builders)}")
    return builders[k]().double()


@dataclass(frozen=True)
class HadamardPlan:
    """How a length-``n`` transform is built: ``T = I_blocks ⊗ (H_K ⊗ H_{2^m}) / √(K·2^m)``.

    ``blocks == 1`` is the full transform; ``blocks > 1`` is the [NQ] block-diagonal fallback."""

    n: int
    k: int
    m: int
    blocks: int = 1

    @property
    def exact(self) -> bool:
        return self.blocks == 1

    @property
    def block(self) -> int:
        """Size ``K·2^m`` of one diagonal block (``n`` for a full transform)."""
        return self.k * 2**self.m


@functools.lru_cache(maxsize=None)
def hadamard_plan(n: int) -> HadamardPlan:
    """The factorization of ``n``: first stored ``K`` with ``n/K`` a power of two, else ``n`` a power of two,
    else the block-diagonal fallback (warned once per size)."""
    for k in K_ORDERS:
        if n % k == 0 and _is_power_of_two(n // k):
            return HadamardPlan(n, k, int(math.log2(n // k)))
    if _is_power_of_two(n):
        return HadamardPlan(n, 1, int(math.log2(n)))
    block = n & -n  # largest power of two dividing n
    log.warning("no K*2^m Hadamard of size %d (stored K: %s): using the block-diagonal I_%d (x) H_%d, "
                "which mixes only within blocks of %d channels", n, sorted(K_ORDERS), n // block, block, block)
    return HadamardPlan(n, 1, int(math.log2(block)), n // block)


#: Up to this size the Sylvester factor is applied as a dense ``[2^m, 2^m]`` matmul, above it by butterflies.
DENSE_SYLVESTER_MAX = 512


@functools.lru_cache(maxsize=16)
def _sylvester_cpu(p: int, dtype: torch.dtype) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # H_{2k} = [[H, H], [H, -H]]
    return h.to(dtype)


def _sylvester(p: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The natural-order Sylvester matrix ``H_p`` (±1, unnormalized)."""
    return _sylvester_cpu(p, dtype).to(device)


def hadamard_transform(x: torch.Tensor, plan: HadamardPlan | None = None) -> torch.Tensor:
    """``T x`` along the last axis ``[..., n]`` (a new tensor, ``x``'s dtype; computed in ``x``'s dtype).

    Apply it to activations online and to the rows of a weight offline (``W ← W Tᵀ`` is ``T`` on each row).
    """
    n = x.shape[-1]
    plan = plan or hadamard_plan(n)
    if plan.n != n:
        raise ValueError(f"Hadamard plan is for size {plan.n}, input has {n}")
    p = 2 ** plan.m
    shape = x.shape
    y = x.reshape(-1, plan.blocks, plan.k, p)  # [T, blocks, K, 2^m]
    if p <= DENSE_SYLVESTER_MAX:  # one small matmul beats log2(p) butterfly passes in PyTorch
        y = y @ _sylvester(p, y.dtype, y.device)  # H_{2^m} is symmetric
    else:
        h = 1
        while h < p:  # Sylvester butterflies: pairs (j, j + h) inside runs of 2h
            y = y.reshape(*y.shape[:-1], p // (2 * h), 2, h)
            a, b = y[..., 0, :], y[..., 1, :]
            y = torch.stack((a + b, a - b), dim=-2).reshape(*y.shape[:-3], p)
            h *= 2
    if plan.k > 1:
        y = torch.einsum("kl,tblj->tbkj", hadamard_k(plan.k).to(y.dtype).to(y.device), y)
    return (y / math.sqrt(plan.k * p)).reshape(shape)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense ``T [n, n]`` (``T[:, j] = T e_j``); for tests and for small offline rotations."""
    return hadamard_transform(torch.eye(n, dtype=dtype)).t().contiguous()


def random_hadamard_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's randomized Hadamard ``Q = diag(s)·Tᵀ`` ``[n, n]`` with ``s ∈ {±1}^n`` from ``seed``
    (orthogonal: ``Q Qᵀ = I``); row ``i`` is ``s_i · T e_i``."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g).to(dtype) * 2 - 1
    return hadamard_transform(torch.diag(s))


def hadamard_signs(plan: HadamardPlan) -> torch.Tensor:
    """``S = √b · T_bᵀ`` ``[b, b]`` (float64, entries ±1; ``b = plan.block``): one diagonal block of the
    transform, transposed and unnormalized, so that ``T x = (x S) / √b`` block by block. The online transform
    multiplies by it, and exports store it (``normquant.export.transforms``)."""
    b = plan.block
    rows = hadamard_transform(torch.eye(b, dtype=torch.float64), HadamardPlan(b, plan.k, plan.m))  # row i: T e_i
    return (rows * math.sqrt(b)).round()


@functools.lru_cache(maxsize=16)
def _online_factors(plan: HadamardPlan, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return hadamard_signs(plan).to(dtype=dtype, device=device), torch.tensor(plan.block, dtype=torch.float64).sqrt()


class OnlineHadamard(nn.Module):
    """``x ↦ T x`` on the last axis, computed in float32 (or float64 for float64 inputs), cast back: the online
    transform a QuantLinear applies before its input quantizer (QuaRot's R4 before ``down_proj``).

    The arithmetic is compressed-tensors' ``HadamardTransform`` (0.20), op for op, so an export that carries the
    transform computes the same bits in transformers + compressed-tensors: a dense ``x @ S`` with the ±1 matrix
    :func:`hadamard_signs` (per block of ``b`` channels for the block-diagonal fallback), then ``/ √b`` by a float64
    scalar. That is ``n·b`` multiply-adds per token (``b = n`` for a full transform) instead of the butterflies'
    ``n·(2^m + K)``: for SmolLM2's 1536 on one CPU thread, 2.4× the time of :func:`hadamard_transform` and 2.3×
    that of ``down_proj``'s own matmul (0.24 s per 2048 tokens)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.plan = hadamard_plan(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        signs, root_b = _online_factors(self.plan, dt, x.device)  # [b, b], √b
        v = x.to(dt)
        if self.plan.blocks == 1:
            y = v @ signs
        else:
            y = (v.unflatten(-1, (self.plan.blocks, self.plan.block)) @ signs).flatten(-2, -1)  # [..., blocks, b] @ S
        return (y / root_b).to(x.dtype)

    def extra_repr(self) -> str:
        p = self.plan
        return f"n={self.n}, K={p.k}, 2^{p.m}" + (f", blocks={p.blocks} (fallback)" if p.blocks > 1 else "")
