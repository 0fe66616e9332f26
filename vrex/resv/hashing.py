"""Random-hyperplane hash codes of keys and their Hamming distances (XOR + popcount).

Codes are packed 32 bits to an int64 word, so a code has shape ``[..., W]`` with
``W = ceil(n_bits / 32)``; the paper's 32 hyperplanes give one word per token. ``popcount`` and
``hamming`` count all 64 bits of a word, so codes packed elsewhere, 64 bits to a word, work too.
"""

from __future__ import annotations

import torch
from torch import Tensor

BITS_PER_WORD = 32


def make_planes(dim: int, n_bits: int, seed: int, *, device: torch.device | str = "cpu") -> Tensor:
    """N(0, 1) hyperplanes ``[dim, n_bits]`` from a fixed seed (same planes on every device)."""
    if dim <= 0 or n_bits <= 0:
        raise ValueError(f"dim and n_bits must be positive, got dim={dim}, n_bits={n_bits}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(dim, n_bits, generator=gen, dtype=torch.float32).to(device)


def num_words(n_bits: int) -> int:
    return (n_bits + BITS_PER_WORD - 1) // BITS_PER_WORD


def hash_codes(keys: Tensor, planes: Tensor) -> Tensor:
    """Sign bits of ``keys @ planes`` (value > 0 -> 1), packed into int64 words.

    keys: ``[..., dim]`` float; planes: ``[dim, n_bits]`` (or batched ``[B, dim, n_bits]``
    against keys ``[B, T, dim]``). Returns ``[..., W]`` int64.
    """
    if not isinstance(keys, Tensor) or not keys.is_floating_point():
        raise ValueError("keys must be a floating-point tensor [..., dim]")
    if not isinstance(planes, Tensor) or planes.ndim < 2 or not planes.is_floating_point():
        raise ValueError("planes must be a floating-point tensor [dim, n_bits]")
    if keys.shape[-1] != planes.shape[-2]:
        raise ValueError(f"keys last dim {keys.shape[-1]} != planes dim {planes.shape[-2]}")
    n_bits = planes.shape[-1]
    bits = (keys.to(planes.dtype) @ planes) > 0  # [..., n_bits]
    words = num_words(n_bits)
    pad = words * BITS_PER_WORD - n_bits
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*bits.shape[:-1], words, BITS_PER_WORD).to(torch.int64)
    weights = torch.bitwise_left_shift(
        torch.ones(BITS_PER_WORD, dtype=torch.int64, device=bits.device),
        torch.arange(BITS_PER_WORD, device=bits.device),
    )
    return (bits * weights).sum(-1)


def _popcount32(x: Tensor) -> Tensor:
    """Set bits of int64 elements in [0, 2**32) (SWAR, no lookup tables; nothing overflows)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def popcount(x: Tensor) -> Tensor:
    """Set bits of each int64 element, all 64 of them (a negative value's sign bit counts)."""
    if not isinstance(x, Tensor) or x.dtype != torch.int64:
        raise ValueError(f"popcount takes an int64 tensor, got {_describe(x)}")
    # two 32-bit halves: a 64-bit SWAR would overflow int64; the mask drops the sign bits
    # that `>>` copies into the high half of a negative value
    return _popcount32(x & 0xFFFFFFFF) + _popcount32((x >> 32) & 0xFFFFFFFF)


def hamming(a: Tensor, b: Tensor) -> Tensor:
    """Hamming distance between packed codes ``[..., W]`` of int64 words, broadcasting the
    leading dims. Every bit of a word counts: 32 from ``hash_codes``, up to 64 from elsewhere."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.ndim < 1:
            raise ValueError(f"{name} must be an int64 tensor of packed codes [..., W], got {_describe(t)}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a and b have different word counts: {a.shape[-1]} vs {b.shape[-1]}")
    return popcount(torch.bitwise_xor(a, b)).sum(-1)


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {list(t.shape)}"
    return f"a {type(t).__name__}"
