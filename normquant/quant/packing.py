"""Dense int32 packing of low-bit integer codes, in the layout of compressed-tensors 0.20
(``compressors/pack_quantized/helpers.py``: ``pack_to_int32`` / ``unpack_from_int32``).

Used by the compressed-tensors export (``weight_packed``, packed zero points); a packed integer kernel would
read the same words.

>>> import torch
>>> q = torch.arange(-8, 0, dtype=torch.int8)[None]   # 4-bit codes -8..-1
>>> hex(pack_to_int32(q, 4).item())                    # stored +8 -> 0..7, low nibble first
'0x76543210'
>>> torch.equal(unpack_from_int32(pack_to_int32(q, 4), 4, (1, 8)), q)
True
"""
from __future__ import annotations

import math

import torch
from torch import nn


def pack_to_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed ``bits``-bit codes into int32 along ``dim``, densely (no padding bits between codes).

    Layout of compressed-tensors 0.20: along ``dim``, each code is offset by ``+2^(b-1)`` to ``[0, 2^b)``
    and code ``i`` occupies bits ``[i*b, (i+1)*b)`` of a little-endian bit stream (a code may straddle two
    words); the stream is cut into ceil(n*b/32) int32 words. For ``b = 4`` this is 8 nibbles per word, low
    nibble first.

    ``codes`` int ``[rows, cols]`` -> int32 ``[rows, ceil(cols*b/32)]`` (``dim=1``) or
    ``[ceil(rows*b/32), cols]`` (``dim=0``).
    """
    if dim == 0:
        return pack_to_int32(codes.t(), bits).t().contiguous()
    rows, cols = codes.shape
    n_groups = math.ceil(cols / 32)  # 32 codes fill exactly `bits` words
    u = codes.to(torch.int32) + 2 ** (bits - 1)
    u = nn.functional.pad(u, (0, n_groups * 32 - cols)).reshape(rows, n_groups, 32)  # [rows, cols] -> [rows, G, 32]
    u = u.permute(2, 0, 1).contiguous()  # [32, rows, G]: code i of every group
    words = torch.zeros(bits, rows, n_groups, dtype=torch.int32, device=codes.device)  # [b, rows, G]
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        words[word] |= u[i] << offset  # wraps around: only the low 32 bits are kept
        if offset + bits > 32:  # the high bits spill into the next word
            words[word + 1] |= u[i] >> (32 - offset)
    words = words.permute(1, 2, 0).reshape(rows, n_groups * bits)  # [rows, G*b]
    return words[:, : math.ceil(cols * bits / 32)].contiguous()


def unpack_from_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_to_int32`: int32 words -> int8 signed codes of ``shape`` (the unpacked shape)."""
    if dim == 0:
        return unpack_from_int32(packed.t(), bits, (shape[1], shape[0])).t().contiguous()
    rows, cols = shape
    n_groups = math.ceil(cols / 32)
    words = nn.functional.pad(packed, (0, n_groups * bits - packed.shape[1])).reshape(rows, n_groups, bits)
    words = words.permute(2, 0, 1).contiguous()  # [b, rows, G]
    u = torch.empty(32, rows, n_groups, dtype=torch.int32, device=packed.device)  # [32, rows, G]: code i of every group
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        value = words[word] >> offset
        if offset + bits > 32:  # drop the sign-extension bits, then take the low bits of the next word
            value = (value & (2 ** (32 - offset) - 1)) | (words[word + 1] << (32 - offset))
        u[i] = value & (2**bits - 1)
    u = u.permute(1, 2, 0).reshape(rows, n_groups * 32)  # [rows, G*32]
    return (u[:, :cols] - 2 ** (bits - 1)).to(torch.int8)


def packed_width(n: int, bits: int) -> int:
    """int32 words holding ``n`` codes of ``bits`` bits (dense, compressed-tensors' order)."""
    return math.ceil(n * bits / 32)


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Integer codes ``[..., D]`` -> int32 words ``[..., packed_width(D, bits)]`` (unsigned codes are shifted by
    ``-2^(b-1)`` onto the signed grid :func:`pack_to_int32` takes): KV caches, packed weights of --real."""
    shape = codes.shape
    signed_codes = codes if signed else codes - 2 ** (bits - 1)
    return pack_to_int32(signed_codes.reshape(-1, shape[-1]), bits).reshape(*shape[:-1], -1)


def unpack_codes(words: torch.Tensor, bits: int, n: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[..., W]`` -> float codes ``[..., n]``."""
    shape = words.shape
    codes = unpack_from_int32(words.reshape(-1, shape[-1]), bits, (words[..., 0].numel(), n)).float()
    codes = codes if signed else codes + 2 ** (bits - 1)
    return codes.reshape(*shape[:-1], n)
