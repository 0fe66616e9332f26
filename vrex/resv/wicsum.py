"""WiCSum thresholding (Eq. 1-3 of the paper): per row, the fewest largest-weight clusters
whose weight passes ``ratio`` of the row total; exact and hardware bucketed variants."""

from __future__ import annotations

import torch
from torch import Tensor


def _check(weights: Tensor, ratio: float) -> None:
    if not isinstance(weights, Tensor) or weights.ndim != 2:
        raise ValueError("weights must be a 2-D tensor [rows, clusters]")
    if not weights.is_floating_point():
        raise ValueError(f"weights must be floating point, got {weights.dtype}")
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights contain NaN or Inf")
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative (count-weighted scores)")
    if not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")


def wicsum_select(weights: Tensor, ratio: float) -> Tensor:
    """Bool mask ``[rows, clusters]``: per row the smallest set of largest-weight clusters
    whose sum exceeds ``ratio * row_sum`` (ties broken by lower index). With ratio 1 every
    cluster of positive weight is taken; an all-zero row selects nothing."""
    _check(weights, ratio)
    rows, n = weights.shape
    if n == 0:
        return torch.zeros_like(weights, dtype=torch.bool)
    w = weights.to(torch.float64)
    sorted_w, order = torch.sort(w, dim=1, descending=True, stable=True)
    cums = sorted_w.cumsum(1)
    threshold = ratio * cums[:, -1:]
    crossed = cums > threshold
    positive = (sorted_w > 0).sum(1)
    first = torch.where(crossed.any(1), crossed.float().argmax(1) + 1, positive)
    keep_sorted = torch.arange(n, device=w.device).unsqueeze(0) < first.unsqueeze(1)
    mask = torch.zeros(rows, n, dtype=torch.bool, device=w.device)
    mask.scatter_(1, order, keep_sorted)
    return mask


def wicsum_select_bucketed(weights: Tensor, ratio: float, num_buckets: int) -> tuple[Tensor, Tensor]:
    """The hardware's early-exit variant (Fig. 11): scores are binned into ``num_buckets``
    equal ranges of the row's [min, max]; buckets are taken whole, from the top, until the
    running sum passes the threshold. Returns ``(mask, fraction_processed)`` where the mask
    is a superset of :func:`wicsum_select` and ``fraction_processed[row]`` is the share of
    the row's clusters that fell into the buckets it had to accumulate before exiting."""
    _check(weights, ratio)
    if int(num_buckets) < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    rows, n = weights.shape
    if n == 0:
        return torch.zeros_like(weights, dtype=torch.bool), torch.zeros(rows, device=weights.device)
    w = weights.to(torch.float64)
    lo = w.min(1, keepdim=True).values
    hi = w.max(1, keepdim=True).values
    span = (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)
    # bucket 0 holds the largest weights; monotone in w, so equal weights share a bucket
    top = ((hi - w) / span * num_buckets).floor().clamp(0, num_buckets - 1).long()
    bucket_sum = torch.zeros(rows, num_buckets, dtype=torch.float64, device=w.device)
    bucket_sum.scatter_add_(1, top, w)
    cums = bucket_sum.cumsum(1)
    threshold = ratio * cums[:, -1:]
    crossed = cums > threshold
    # with nothing crossing (ratio 1 or an all-zero row) every bucket holding weight is taken
    nonempty = bucket_sum > 0
    last_nonempty = torch.where(
        nonempty.any(1),
        num_buckets - 1 - nonempty.flip(1).float().argmax(1),
        torch.full_like(lo[:, 0], -1).long(),
    )
    exit_bucket = torch.where(crossed.any(1), crossed.float().argmax(1), last_nonempty)
    mask = (top <= exit_bucket.unsqueeze(1)) & (w > 0)
    fraction = (top <= exit_bucket.unsqueeze(1)).sum(1).to(torch.float32) / n
    return mask, fraction.to(weights.device)
