"""Fetch throughput of the tiered KV store, per tier (what `vrex kv-bench` prints)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from vrex.kv.budgets import TierBudgets

if TYPE_CHECKING:
    from vrex.kv.store import TieredKVStore

# torch and the store load inside the functions that run the benchmark: `vrex kv-bench --help`
# reads KVBenchConfig's defaults and should not wait seconds for torch.


@dataclass(frozen=True)
class KVBenchConfig:
    history_tokens: int = 32768
    num_kv_heads: int = 4
    head_dim: int = 64
    cluster_tokens: int = 8  # mean cluster size of the synthetic stream
    block_tokens: int = 16
    select_fraction: float = 0.3  # share of clusters fetched per call, whole clusters
    append_tokens: int = 64  # tokens per append call (one frame of visual tokens)
    repeats: int = 5
    dtype: str = "float16"
    device: str = "cpu"
    seed: int = 0


def small_device_tokens(config: KVBenchConfig) -> int:
    """Tokens per KV head the host and disk runs keep on the device: one block per token of an
    append, plus one (an append may open a block per token), as `_build` sizes that tier."""
    return (config.append_tokens + 1) * config.block_tokens


def min_history_tokens(config: KVBenchConfig) -> int:
    """Shortest history whose host and disk rows fetch mostly from their own tier: four times
    what the small device tier holds (70-95% of their bytes then come from the lower tier;
    at twice, 45-80%), and at least 256 tokens (fewer selected clusters make the shares noisy)."""
    return max(4 * small_device_tokens(config), 256)


def check_config(config: KVBenchConfig) -> None:
    """ValueError when the run would time the device tier in the host and disk rows."""
    least = min_history_tokens(config)
    if config.history_tokens < least:
        raise ValueError(
            f"--tokens must be >= {least} with --append-tokens {config.append_tokens} and --block-tokens "
            f"{config.block_tokens}: the host and disk runs keep {small_device_tokens(config)} tokens per "
            "KV head on the device, so a shorter history would time the device tier in their rows; "
            "raise --tokens or lower --append-tokens / --block-tokens"
        )


def _build(config: KVBenchConfig, tier: str, disk_dir: str) -> TieredKVStore:
    import torch

    from vrex.kv.store import TieredKVStore

    dtype = getattr(torch, config.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    token_bytes = 2 * config.head_dim * itemsize
    # The smallest device tier that holds one append, so nearly everything lands in the lower tier.
    small_device = small_device_tokens(config) * config.num_kv_heads * token_bytes
    budgets = {
        "device": TierBudgets(disk_dir=disk_dir),
        "host": TierBudgets(device_bytes=small_device, disk_dir=disk_dir),
        "disk": TierBudgets(device_bytes=small_device, host_bytes=0, disk_dir=disk_dir),
    }[tier]
    store = TieredKVStore(
        1,
        config.num_kv_heads,
        config.head_dim,
        dtype=dtype,
        device=config.device,
        budgets=budgets,
        block_tokens=config.block_tokens,
    )
    gen = torch.Generator().manual_seed(config.seed)
    num_clusters = max(1, config.history_tokens // config.cluster_tokens)
    for start in range(0, config.history_tokens, config.append_tokens):
        n = min(config.append_tokens, config.history_tokens - start)
        keys = torch.randn(config.num_kv_heads, n, config.head_dim, generator=gen).to(dtype)
        # Clusters are local in time (frames), so consecutive tokens tend to share one.
        ids = ((start + torch.arange(n)) // config.cluster_tokens).expand(config.num_kv_heads, n)
        ids = (ids + torch.randint(0, 2, ids.shape, generator=gen)) % num_clusters
        store.append(0, keys.to(config.device), keys.to(config.device), ids)
    return store


def measure_fetch_throughput(config: KVBenchConfig = KVBenchConfig()) -> dict:
    """Build one store per tier, fetch whole selected clusters from it, return GB/s per tier
    (best of `repeats` calls).

    Disk numbers are usually page-cache reads (the files were just written), i.e. an upper bound
    on a cold SSD. Raises ValueError when the history is too short for that (`check_config`).
    """
    import torch

    from vrex.kv.store import TIER_NAMES

    check_config(config)
    results = {"config": asdict(config), "tiers": {}}
    gen = torch.Generator().manual_seed(config.seed + 1)
    for tier in TIER_NAMES:
        with tempfile.TemporaryDirectory(prefix="vrex-kv-bench-") as disk_dir:
            store = _build(config, tier, disk_dir)
            positions = []
            for head in range(config.num_kv_heads):
                ids = store.cluster_tier(0, head).cluster_ids
                keep = ids[torch.rand(ids.numel(), generator=gen) < config.select_fraction]
                positions.append(store.positions_of_clusters(0, head, keep))
            store.fetch(0, positions)  # warm-up
            before = store.stats()
            seconds = float("inf")  # best of the repeats: the machine may be shared
            for _ in range(config.repeats):
                start = time.perf_counter()
                result = store.fetch(0, positions)
                if result.keys.device.type == "cuda":
                    torch.cuda.synchronize(result.keys.device)
                seconds = min(seconds, time.perf_counter() - start)
            after = store.stats()
            moved = {
                t: (after[f"fetched_bytes_{t}"] - before[f"fetched_bytes_{t}"]) // config.repeats
                for t in TIER_NAMES
            }
            total = sum(moved.values())
            results["tiers"][tier] = {
                "fetch_ms": seconds * 1e3,
                "bytes_per_fetch": total,
                "share_from_tier": moved[tier] / total if total else 0.0,
                "gb_per_s": total / seconds / 1e9 if seconds > 0 else 0.0,
                "tokens_per_fetch": int(result.lengths.sum()),
            }
            store.close()
    return results
