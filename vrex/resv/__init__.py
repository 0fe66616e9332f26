"""ReSV retrieval core: pure torch, tensors in and index sets out (no models, no sessions).

Public API:

- :func:`hash_codes` (keys, planes) -> packed sign-bit codes
- :func:`hamming` (a, b) -> XOR + popcount distances
- :func:`wicsum_select` (weights, ratio) -> bool mask of the fewest largest-weight clusters
  per row passing ``ratio`` of the row total
- :func:`wicsum_select_bucketed` (weights, ratio, num_buckets) -> (superset mask, share of
  each row processed before the early exit)
- :class:`HCTable`, the hash-cluster table of one layer
- :func:`make_selector` and the selectors ``full``, ``window``, ``topk``, ``rekv``, ``resv``
- :class:`ResvConfig` and the presets ``paper`` and ``default``
"""

from .clusters import HCTable, StepClusters, cluster_scores
from .config import DEFAULT, PAPER, PRESETS, ResvConfig, preset
from .hashing import hamming, hash_codes, make_planes, popcount
from .selectors import (
    POLICIES,
    FullSelector,
    RekvSelector,
    ResvSelector,
    Selection,
    Selector,
    SelectorConfig,
    TopKSelector,
    WindowSelector,
    make_selector,
    selector_class,
)
from .wicsum import wicsum_select, wicsum_select_bucketed

__all__ = [
    "DEFAULT",
    "PAPER",
    "POLICIES",
    "PRESETS",
    "FullSelector",
    "HCTable",
    "RekvSelector",
    "ResvConfig",
    "ResvSelector",
    "Selection",
    "Selector",
    "SelectorConfig",
    "StepClusters",
    "TopKSelector",
    "WindowSelector",
    "cluster_scores",
    "hamming",
    "hash_codes",
    "make_planes",
    "make_selector",
    "popcount",
    "preset",
    "selector_class",
    "wicsum_select",
    "wicsum_select_bucketed",
]
