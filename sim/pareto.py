"""Pareto front of a set of design points over objectives that go up or down.

    mask = pareto_mask(values, ["max", "min", "min"])   # values: [points, objectives]

A point is on the front when no other point is at least as good in every objective and
strictly better in one. Equal points do not dominate each other, so duplicates all stay.
Rows with a NaN in any objective are never on the front (they were not measured).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SENSES = ("max", "min")


def pareto_mask(values: np.ndarray | Sequence[Sequence[float]], senses: Sequence[str]) -> np.ndarray:
    """Boolean mask [points]: True where the point is not dominated by any other point."""
    data = np.asarray(values, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"values must be a 2-D array [points, objectives], got shape {data.shape}")
    if data.shape[1] != len(senses):
        raise ValueError(f"{data.shape[1]} objective columns but {len(senses)} senses")
    for sense in senses:
        if sense not in SENSES:
            raise ValueError(f"objective sense must be 'max' or 'min', got {sense!r}")
    if data.shape[1] == 0:  # no objective was measured (every point infeasible): no front
        return np.zeros(len(data), dtype=bool)
    # flip maximised objectives so that smaller is better everywhere
    signs = np.array([-1.0 if s == "max" else 1.0 for s in senses])
    cost = data * signs
    valid = ~np.isnan(cost).any(axis=1)
    mask = np.zeros(len(cost), dtype=bool)
    idx = np.flatnonzero(valid)
    pts = cost[idx]
    keep = np.ones(len(pts), dtype=bool)
    # O(n^2 k) in blocks: fine for the tens of thousands of points a sweep makes
    for start in range(0, len(pts), 1024):
        block = pts[start : start + 1024]
        no_worse = (pts[None, :, :] <= block[:, None, :]).all(axis=2)
        better = (pts[None, :, :] < block[:, None, :]).any(axis=2)
        keep[start : start + len(block)] = ~(no_worse & better).any(axis=1)
    mask[idx] = keep
    return mask


def pareto_front(df, objectives: dict[str, str]):
    """Rows of a pandas DataFrame on the front of `objectives` ({column: 'max'|'min'})."""
    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise ValueError(f"objective column(s) {', '.join(missing)} not in the results")
    mask = pareto_mask(df[list(objectives)].to_numpy(dtype=float), list(objectives.values()))
    return df[mask]
