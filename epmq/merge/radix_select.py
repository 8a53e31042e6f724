"""Exact k-th smallest value of data too large to hold, by radix select on float32 bit patterns.

TIES trims each task vector at a quantile of its magnitudes over the *whole* model. Holding every
magnitude (what FusionBench does with ``kthvalue`` on the flattened model) costs K models of
memory; a sampled quantile is not exact. For non-negative finite float32 values the bit pattern,
read as an int32, orders exactly like the value, so two counting passes find the k-th smallest
exactly: pass 1 counts the high 16 bits (2^15 buckets, the sign bit being 0) and picks the bucket
holding rank k; pass 2 counts the low 16 bits inside that bucket. Memory is two histograms per
row, whatever the number of values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

_HIGH_BUCKETS = 1 << 15  # bits 30..16 of a non-negative float32 (bit 31, the sign, is 0)
_LOW_BUCKETS = 1 << 16  # bits 15..0


def kth_smallest_streamed(blocks: Callable[[], Iterable[Tensor]], k: int) -> Tensor:
    """The exact ``k``-th smallest (1-based) value of each row of a virtual ``(R, N)`` matrix.

    ``blocks()`` must yield the matrix as column blocks of shape ``(R, n_j)`` holding finite,
    non-negative float32 values (magnitudes from ``abs``, which maps ``-0.0`` to ``+0.0``), the
    same blocks each time it is called; it is called twice. Returns a float32 tensor of shape
    ``(R,)`` equal to ``torch.kthvalue(matrix, k, dim=1).values``.
    """
    high_counts = None
    total = 0
    for block in blocks():
        bits = _bits(block)
        if high_counts is None:
            high_counts = torch.zeros(bits.shape[0], _HIGH_BUCKETS, dtype=torch.int64)
        for row, row_bits in enumerate(bits):
            high_counts[row] += torch.bincount(row_bits >> 16, minlength=_HIGH_BUCKETS)
        total += bits.shape[1]
    if high_counts is None or not 1 <= k <= total:
        raise ValueError(f"rank k={k} is outside 1..{total}")
    bucket, rank_in_bucket = _locate(high_counts, torch.full((high_counts.shape[0],), k))

    low_counts = torch.zeros(high_counts.shape[0], _LOW_BUCKETS, dtype=torch.int64)
    for block in blocks():
        for row, row_bits in enumerate(_bits(block)):
            in_bucket = row_bits[(row_bits >> 16) == bucket[row]]
            low_counts[row] += torch.bincount(in_bucket & 0xFFFF, minlength=_LOW_BUCKETS)
    low_value, _ = _locate(low_counts, rank_in_bucket)
    return ((bucket << 16) | low_value).to(torch.int32).view(torch.float32)


def _bits(block: Tensor) -> Tensor:
    """The int32 bit patterns of float32 values; for non-negative floats they sort like the values."""
    return block.to(torch.float32).contiguous().view(torch.int32)


def _locate(counts: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: the bucket holding the ``rank``-th smallest entry, and that entry's rank inside it."""
    cumulative = counts.cumsum(dim=1)
    bucket = torch.searchsorted(cumulative, rank.to(torch.int64).unsqueeze(1)).squeeze(1)
    below = cumulative.gather(1, (bucket - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return bucket, rank - torch.where(bucket > 0, below, 0)
