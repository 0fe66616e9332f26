"""Tiered KV store: device / host / disk tiers, cluster-contiguous pages, prefetch, snapshots."""

from vrex.kv.budgets import TierBudgets, parse_bytes
from vrex.kv.snapshot import SnapshotError
from vrex.kv.store import (
    DEVICE,
    DISK,
    HOST,
    TIER_NAMES,
    ClusterTiers,
    FetchResult,
    PrefetchHandle,
    TieredKVStore,
)

__all__ = [
    "DEVICE",
    "DISK",
    "HOST",
    "TIER_NAMES",
    "ClusterTiers",
    "FetchResult",
    "PrefetchHandle",
    "SnapshotError",
    "TierBudgets",
    "TieredKVStore",
    "parse_bytes",
]
