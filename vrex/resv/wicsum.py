"""WiCSum thresholding (Eq. 1-3 of the paper): per row, the fewest largest-weight clusters
whose weight passes ``ratio`` of the row total; exact and hardware bucketed variants.

How the exact variant stays fast: the cut depends only on the row's values in descending
order (a running float64 sum, compared with ``ratio`` times the row total), never on which
index holds which value, so the rows are sorted by value alone (NumPy's SIMD sort on CPU,
an order of magnitude faster than an index-carrying sort), in their own precision. The
running sum is only needed until it crosses, which with softmax weights is a short prefix: it
is taken over the top 64 values, then 4x more for the rows that have not crossed yet. The
chosen set is read back by comparing each weight with the value at the cut; ties at the cut go
to the lower index. The row total is the float64 sum of the row's values. On CPU both float64
passes go through NumPy, whose cast-while-summing is ~5x faster than torch's
(`sum(dtype=float64)` over float32 rows was half of the cut's time). On CPU, with enough rows,
only each row's candidates are sorted: the weights large enough that those below them cannot
hold the rest of the row (see `_select_cpu`), or just the largest weight where it alone
passes the threshold (an early exit, as the paper's WTU has). On the model's own keys that
is a few hundred of 10-30K clusters per frame row.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _check_shape(weights: Tensor, ratio: float) -> None:
    if not isinstance(weights, Tensor) or weights.ndim != 2:
        raise ValueError("weights must be a 2-D tensor [rows, clusters]")
    if not weights.is_floating_point():
        raise ValueError(f"weights must be floating point, got {weights.dtype}")
    if not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")


def _check(weights: Tensor, ratio: float) -> None:
    _check_shape(weights, ratio)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights contain NaN or Inf")
    if bool((weights < 0).any()):
        raise ValueError("weights must be non-negative (count-weighted scores)")


def sorted_values(weights: Tensor) -> Tensor:
    """Each row's values in ascending order (values only, no indices): float32 rows stay
    float32 on CPU, everything else becomes float64.

    Raises ValueError for NaN, Inf or negative weights (read off the sorted ends)."""
    if weights.device.type == "cpu" and weights.dtype in (torch.float32, torch.float64):
        out = torch.from_numpy(np.sort(weights.detach().numpy(), axis=1))
    else:
        out = torch.sort(weights.to(torch.float64), dim=1).values
    if out.shape[1]:
        # NumPy sorts NaN last; -Inf and negatives come first. Both checks in one read (one
        # sync on a GPU).
        not_finite = (~torch.isfinite(out[:, -1])).any() | torch.isinf(out[:, 0]).any()
        not_finite, negative = torch.stack([not_finite, (out[:, 0] < 0).any()]).tolist()
        if not_finite:
            raise ValueError("weights contain NaN or Inf")
        if negative:
            raise ValueError("weights must be non-negative (count-weighted scores)")
    return out


def _row_sums_f64(a: Tensor) -> Tensor:
    if a.device.type == "cpu":
        return torch.from_numpy(a.detach().numpy().sum(1, dtype=np.float64))
    return a.sum(1, dtype=torch.float64)


def _running_sums_on(start: Tensor, terms: Tensor) -> Tensor:
    """``[rows, 1 + width]`` float64: ``start``, then the running sums adding ``terms[:, -1]``,
    ``terms[:, -2]``, ... (each row's ascending values from the largest down) one addition at a
    time, so a row summed in several pieces gets the same numbers as summed at once."""
    rows, width = terms.shape
    if terms.device.type == "cpu":
        out = np.empty((rows, width + 1), dtype=np.float64)
        out[:, 0] = start.numpy()
        out[:, 1:] = terms.detach().numpy()[:, ::-1]
        return torch.from_numpy(np.cumsum(out, axis=1, out=out))
    return torch.cat([start[:, None], terms.flip(1).to(torch.float64)], 1).cumsum(1)


def cut_counts(
    ascending: Tensor, ratio: float, first_prefix: int = 64, totals: Tensor | None = None
) -> Tensor:
    """How many of each row's largest weights WiCSum keeps (``[rows]`` int64), from the
    row's values in ascending order: the prefix of the largest ones whose running float64 sum
    (largest first) first exceeds ``ratio`` times the row total; every positive weight when no
    prefix does (ratio 1). A row that has not crossed after ``first_prefix`` terms goes on
    with 4x as many, continuing its running sum. ``totals`` (float64 row sums) if the caller
    has them already."""
    rows, n = ascending.shape
    keep = torch.zeros(rows, dtype=torch.int64, device=ascending.device)
    if n == 0:
        return keep
    never = torch.ones(rows, dtype=torch.bool, device=ascending.device)  # rows no prefix crosses
    # ratio 1 keeps every positive weight by definition; no running sum needs to reach a
    # total that another summation order may round a last bit lower
    if ratio < 1.0:
        threshold = ratio * (_row_sums_f64(ascending) if totals is None else totals)
        running = torch.zeros(rows, dtype=torch.float64, device=ascending.device)
        todo = torch.arange(rows, device=ascending.device)
        done, width = 0, min(n, first_prefix)
        while todo.numel():
            sums = _running_sums_on(running[todo], ascending[todo, n - width : n - done])
            t = threshold[todo]
            crossed = sums[:, -1] > t
            # the running sum never decreases and starts at or below t (the row had not
            # crossed), so a row crosses right after its terms whose sum is still <= t
            at = torch.searchsorted(sums, t[:, None], right=True)[:, 0] + done
            keep[todo[crossed]] = at[crossed]
            never[todo[crossed]] = False
            running[todo] = sums[:, -1]
            todo = todo[~crossed]
            if width == n:
                break
            done, width = width, min(n, 4 * width)
    if never.any():  # every positive weight
        rest = never.nonzero()[:, 0]
        zero = torch.zeros(rest.numel(), 1, dtype=ascending.dtype, device=ascending.device)
        keep[rest] = n - torch.searchsorted(ascending[rest], zero, right=True)[:, 0]
    return keep


def mask_of_cut(weights: Tensor, ascending: Tensor, keep: Tensor, out: Tensor | None = None) -> Tensor:
    """The ``keep[r]`` largest weights of each row as a bool mask, ties to the lower index.

    ``ascending`` holds each row's values in ascending order, or only its largest ones (with
    smaller padding in front) as long as they include every value at or above the cut.
    ``out``: a bool buffer of the weights' shape to write the mask into."""
    n = ascending.shape[1]
    cut = ascending.gather(1, (n - keep).clamp(0, n - 1)[:, None])  # [rows, 1] the smallest kept
    cut = torch.where(keep[:, None] > 0, cut, torch.full_like(cut, torch.inf))
    above = n - torch.searchsorted(ascending, cut, right=True)[:, 0]
    ties = n - above - torch.searchsorted(ascending, cut)[:, 0]
    room = keep - above  # how many of the ties at the cut are kept
    cut_w = cut.to(weights.dtype)  # exact: the value came from the row
    mask = weights >= cut_w if out is None else torch.ge(weights, cut_w, out=out)
    crowded = (ties > room).nonzero()[:, 0]
    if crowded.numel():  # more weights equal the cut than it keeps: the lower indices win
        sub, c = weights[crowded], cut_w[crowded]
        at_cut = sub == c
        mask[crowded] = (sub > c) | (at_cut & (at_cut.cumsum(1) <= room[crowded, None]))
    return mask


CANDIDATE_MIN_ROWS = 32  # a decode step's few rows sort faster than the candidate passes


def _sorted_cut(weights: Tensor, ratio: float, totals: Tensor | None = None) -> Tensor:
    ascending = sorted_values(weights)
    return mask_of_cut(weights, ascending, cut_counts(ascending, ratio, totals=totals))


def _packed_ascending(w: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Each row's candidate values in ascending order, zero-padded in front to the longest
    row's count: ``[rows, max count]``."""
    rows, n = w.shape
    flat = np.flatnonzero(candidate)
    which = flat // n
    count = np.bincount(which, minlength=rows)
    place = np.arange(flat.size) - np.repeat(np.cumsum(count) - count, count)
    packed = np.zeros((rows, max(int(count.max(initial=0)), 1)), dtype=w.dtype)
    packed[which, place] = w.ravel()[flat]
    packed.sort(axis=1)
    return packed


def _select_cpu(w: np.ndarray, ratio: float) -> np.ndarray:
    """:func:`wicsum_select` of a float32/float64 array, sorting only each row's candidates.

    Weights below ``(1 - ratio) * total / (2 n)`` sum to at most half of ``(1 - ratio) *
    total``, so the weights at or above it pass the threshold together, with a margin of
    half the rest of the row: the cut lies among them, and the running sums over them are
    the full sort's. Where the largest weight alone passes, it is the only candidate (with
    its ties). On the model's own keys that leaves a few hundred candidates of ~10-30K
    clusters per frame row, and the mask is one comparison with the cut."""
    rows, n = w.shape
    # near ratio 1 the margin (1 - ratio) / 2 of the total shrinks toward float64 rounding
    if ratio >= 1.0 - 1e-6 or rows < CANDIDATE_MIN_ROWS:
        return _sorted_cut(torch.from_numpy(w), ratio).numpy()
    top, lowest = w.max(1), w.min()  # NaN propagates into the max
    if not np.isfinite(top).all() or np.isinf(lowest):
        raise ValueError("weights contain NaN or Inf")
    if lowest < 0:
        raise ValueError("weights must be non-negative (count-weighted scores)")
    totals = w.sum(1, dtype=np.float64)
    single = top.astype(np.float64) > ratio * totals
    floor = np.where(single, top, (1 - ratio) * totals / (2 * n)).astype(w.dtype)
    floor = np.nextafter(floor, np.zeros_like(floor))  # rounded down: a superset
    floor[totals == 0] = np.inf  # an all-zero row keeps nothing
    mask = w >= floor[:, None]
    # broad rows: past ~an eighth of the weights, packing costs more than the sort (real keys)
    if 8 * np.count_nonzero(mask) > mask.size:
        return _sorted_cut(torch.from_numpy(w), ratio, torch.from_numpy(totals)).numpy()
    ascending = torch.from_numpy(_packed_ascending(w, mask))
    keep = cut_counts(ascending, ratio, totals=torch.from_numpy(totals))
    return mask_of_cut(torch.from_numpy(w), ascending, keep, out=torch.from_numpy(mask)).numpy()


def wicsum_select(weights: Tensor, ratio: float) -> Tensor:
    """Bool mask ``[rows, clusters]``: per row the smallest set of largest-weight clusters
    whose sum exceeds ``ratio * row_sum`` (ties broken by lower index). With ratio 1 every
    cluster of positive weight is taken; an all-zero row selects nothing."""
    _check_shape(weights, ratio)
    if weights.shape[1] == 0:
        return torch.zeros_like(weights, dtype=torch.bool)
    if weights.device.type == "cpu" and weights.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(_select_cpu(weights.detach().numpy(), float(ratio)))
    return _sorted_cut(weights, ratio)


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
