"""Tiered KV store: device / host / disk tiers, cluster-contiguous pages, prefetch, snapshots."""

from vrex._lazy import lazy_exports

# loaded on first use: vrex.kv.cli (the `vrex kv-bench` parser) must not load torch for `--help`
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "vrex.kv.budgets": ("TierBudgets", "parse_bytes"),
        "vrex.kv.snapshot": ("SnapshotError",),
        "vrex.kv.store": (
            "DEVICE",
            "DISK",
            "HOST",
            "TIER_NAMES",
            "ClusterTiers",
            "FetchResult",
            "PrefetchHandle",
            "StepTooLargeError",
            "TieredKVStore",
        ),
    },
)
