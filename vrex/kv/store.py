"""The tiered KV store: device -> host -> disk, with cluster-contiguous pages.

Why pages per cluster: ReSV selects whole clusters, so the store keeps each cluster's tokens
together in a chain of fixed-size blocks (its page). A fetch of a selected cluster then reads a
few contiguous runs instead of scattered tokens, which is what makes host and disk reads cheap.

Layout. Every tier holds blocks `[2, block_tokens, head_dim]` (keys, then values) of one
(layer, KV head, cluster). Device and host are one block pool each, shared by all layers, so a
tier budget is a plain block count; the disk tier is one memory-mapped file per layer. All
bookkeeping lives in CPU LongTensors, never one Python object per token or cluster:

    blocks:    cluster, tier, slot, fill                       (one entry per block)
    clusters:  layer, head, id, tail block, last-append stamp  (one entry per cluster)
    per layer: sorted (head << 32 | cluster id) -> cluster,
               position -> (block, offset) as [Hkv, N] tables

so a fetch is one vectorised gather per tier. When a tier is full, the blocks of the clusters
appended to least recently move down a tier, whole blocks at a time (oldest blocks of a cluster
first), up to 1/32 of the tier more than the append needs so the next appends find room
without another scan; the blocks being written in the current append never move.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vrex.kv.arena import DiskArena, MemoryArena, from_numpy_bits, int_view_dtype, to_numpy_bits
from vrex.kv.budgets import TierBudgets
from vrex.kv.snapshot import (
    SnapshotError,
    atomic_folder,
    resolve_snapshot_folder,
    verify_manifest,
    write_manifest,
)

DEVICE, HOST, DISK = 0, 1, 2
TIER_NAMES = ("device", "host", "disk")
SNAPSHOT_FORMAT = "vrex.kv.store/1"
_MAX_CLUSTER_ID = 2**32
# A full tier frees 1/32 of itself beyond what the append needs, at most 64 MiB: the cap keeps
# the one append that pays for the move (and the disk write below it) from stalling a stream.
_EVICT_SLACK_DIVISOR = 32
_EVICT_SLACK_MAX_BYTES = 64 << 20
_DTYPES = {
    str(dt).removeprefix("torch."): dt for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
}
_COUNTERS = (
    "appended_bytes",
    "fetched_bytes_device",
    "fetched_bytes_host",
    "fetched_bytes_disk",
    "evicted_bytes_device_to_host",
    "evicted_bytes_device_to_disk",
    "evicted_bytes_host_to_disk",
    "peak_resident_bytes_device",
    "peak_allocated_bytes_device",
)


class _Column:
    """A 1-D tensor that grows by doubling; `.t` is the used part."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.buf = torch.zeros(64, dtype=dtype)  # never empty, so masked lookups of index 0 are safe
        self.n = 0

    @property
    def t(self) -> torch.Tensor:
        return self.buf[: self.n]

    def extend(self, values: torch.Tensor) -> None:
        need = self.n + values.numel()
        if need > self.buf.numel():
            buf = torch.empty(max(need, 2 * self.buf.numel(), 64), dtype=self.buf.dtype)
            buf[: self.n] = self.t
            self.buf = buf
        self.buf[self.n : need] = values
        self.n = need

    def load(self, values: torch.Tensor) -> None:
        self.buf = torch.zeros(max(values.numel(), 64), dtype=self.buf.dtype)
        self.buf[: values.numel()] = values
        self.n = values.numel()


@dataclass
class FetchResult:
    """What one fetch returns.

    keys, values: `[Hkv, L, head_dim]` on the compute device, L = the longest request; rows past a
        head's length are zero.
    lengths: LongTensor `[Hkv]`, the number of valid rows per head.
    bytes_device/host/disk: K+V bytes read from each tier by this call.
    """

    keys: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor
    bytes_device: int
    bytes_host: int
    bytes_disk: int

    @property
    def bytes_total(self) -> int:
        return self.bytes_device + self.bytes_host + self.bytes_disk


@dataclass(frozen=True)
class ClusterTiers:
    """Per cluster of one (layer, KV head): its id and the tier of its tail block.

    The tail block is where the cluster's next token would go and the last of its blocks to move
    down, so `tiers != 0` means the cluster has left the device tier (ReSV closes it).
    """

    cluster_ids: torch.Tensor  # [C] int64, ascending
    tiers: torch.Tensor  # [C] int8: 0 device, 1 host, 2 disk

    def on_device(self) -> torch.Tensor:
        return self.cluster_ids[self.tiers == DEVICE]

    def off_device(self) -> torch.Tensor:
        return self.cluster_ids[self.tiers != DEVICE]


class PrefetchHandle:
    """An in-flight fetch; `result()` waits for it (and, on CUDA, orders the compute stream after it)."""

    def __init__(self, future: Future, layer: int, positions: list[torch.Tensor]) -> None:
        self._future = future
        self.layer = layer
        self.positions = positions

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> FetchResult:
        result, event = self._future.result()
        if event is not None:
            stream = torch.cuda.current_stream(result.keys.device)
            stream.wait_event(event)
            # The output was allocated on the copy stream; keep it alive for the compute stream too.
            result.keys.record_stream(stream)
            result.values.record_stream(stream)
        return result


def _plain_tensors(method):
    """Run a store method with autograd off and outside inference mode.

    The store's tables and arenas outlive any one call; if one grew inside a caller's
    `torch.inference_mode()` it would become an inference tensor that a later call outside it
    could not update in place. Inference-mode inputs are still accepted (they are only read).
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return method(*args, **kwargs)

    return wrapper


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + (b - 1), b, rounding_mode="floor")


def step_bytes_bound(
    new_tokens: int, *, num_kv_heads: int, block_tokens: int, block_bytes: int, one_page_per_step: bool
) -> int:
    """Most device-tier bytes one layer's append of `new_tokens` tokens needs at once: its new
    blocks plus the partly filled tail blocks it extends, over all KV heads.

    `one_page_per_step`: the step's tokens of a KV head share one new page id (step paging), so
    they fill ceil(T / block_tokens) fresh blocks; otherwise each token may start a page or
    extend an old page's tail (ReSV clusters): one block per token at most."""
    if new_tokens < 0:
        raise ValueError(f"new_tokens must be >= 0, got {new_tokens}")
    per_head = -(-new_tokens // block_tokens) if one_page_per_step else new_tokens
    return per_head * num_kv_heads * block_bytes


class StepTooLargeError(ValueError):
    """A step's append could need more device-tier room at once than the whole device budget.

    Raised before anything changes (`TieredKVStore.check_step`), so the caller can refuse
    the step and go on."""

    def __init__(self, message: str, *, new_tokens: int, needed_bytes: int, budget_bytes: int):
        super().__init__(message)
        self.new_tokens, self.needed_bytes, self.budget_bytes = new_tokens, needed_bytes, budget_bytes


class TieredKVStore:
    """KV history of one session for all layers, kept in device, host and disk tiers.

    Args:
        num_layers, num_kv_heads, head_dim: the model's KV geometry.
        dtype: K/V dtype; appends must match it exactly.
        device: where attention runs; fetches return tensors there and the device tier lives there.
        budgets: bytes per tier (`TierBudgets`); None means all tiers unbounded.
        block_tokens: tokens per block. Smaller blocks waste less on small clusters (a singleton
            cluster still owns a whole block); larger ones give longer contiguous runs.

    Raises:
        ValueError: a bad argument, or a device budget below one block per KV head per layer.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        budgets: TierBudgets | None = None,
        block_tokens: int = 16,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("block_tokens", block_tokens),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_kv_heads >= 2**31:
            raise ValueError(f"num_kv_heads must be < 2**31, got {num_kv_heads}")
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if budgets is None:
            budgets = TierBudgets()
        if not isinstance(budgets, TierBudgets):
            raise ValueError(f"budgets must be a TierBudgets, got {type(budgets).__name__}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device {device!r} is not a torch device: {err}") from None
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.budgets = budgets
        self.block_tokens = block_tokens
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.token_bytes = 2 * head_dim * itemsize  # K + V of one token of one head
        self.block_bytes = block_tokens * self.token_bytes

        self._device_max_blocks = None
        if budgets.device_bytes is not None:
            self._device_max_blocks = budgets.device_bytes // self.block_bytes
            minimum = num_layers * num_kv_heads * self.block_bytes
            if budgets.device_bytes < minimum:
                raise ValueError(
                    f"TierBudgets.device_bytes={budgets.device_bytes} is below the minimum of {minimum} bytes: "
                    f"one block ({self.block_bytes} B = block_tokens {block_tokens} x K+V x head_dim {head_dim} "
                    f"x {itemsize} B) per KV head ({num_kv_heads}) per layer ({num_layers}); "
                    "raise the device budget or lower block_tokens"
                )
        host_max_blocks = None if budgets.host_bytes is None else budgets.host_bytes // self.block_bytes
        use_cuda = device.type == "cuda" and torch.cuda.is_available()
        self._arenas = (
            MemoryArena(block_tokens, head_dim, dtype, device, self._device_max_blocks, preallocate=use_cuda),
            MemoryArena(
                block_tokens, head_dim, dtype, torch.device("cpu"), host_max_blocks, pin_memory=use_cuda
            ),
        )
        self._disk: list[DiskArena | None] = [None] * num_layers
        self._disk_folder: Path | None = None
        self._disk_cleanup: weakref.finalize | None = None

        self._blk_cluster = _Column(torch.int64)
        self._blk_tier = _Column(torch.int8)
        self._blk_slot = _Column(torch.int64)
        self._blk_fill = _Column(torch.int64)
        self._cl_layer = _Column(torch.int64)
        self._cl_head = _Column(torch.int64)
        self._cl_id = _Column(torch.int64)
        self._cl_tail = _Column(torch.int64)
        self._cl_stamp = _Column(torch.int64)
        self._keys_sorted = [torch.empty(0, dtype=torch.int64) for _ in range(num_layers)]
        self._keys_cluster = [torch.empty(0, dtype=torch.int64) for _ in range(num_layers)]
        self._pos_block = [torch.empty(num_kv_heads, 0, dtype=torch.int64) for _ in range(num_layers)]
        self._pos_offset = [torch.empty(num_kv_heads, 0, dtype=torch.int64) for _ in range(num_layers)]
        self._length = [0] * num_layers
        self._stamp = 0
        self._resident_tokens = [0, 0, 0]
        self._counters = dict.fromkeys(_COUNTERS, 0)

        self._lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        self._use_cuda = use_cuda
        self._copy_stream = torch.cuda.Stream(device) if use_cuda else None
        self._pending_events: list = []

    # ------------------------------------------------------------------ validation

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def _check_kv(self, name: str, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 3 or tensor.shape[0] != self.num_kv_heads or tensor.shape[2] != self.head_dim:
            raise ValueError(
                f"{name} must have shape [num_kv_heads={self.num_kv_heads}, T, head_dim={self.head_dim}], "
                f"got {list(tensor.shape)}"
            )
        if tensor.dtype != self.dtype:
            raise ValueError(
                f"{name} dtype {tensor.dtype} does not match the store dtype {self.dtype}; cast it first"
            )

    def _check_positions(self, layer: int, positions: list[torch.Tensor]) -> list[torch.Tensor]:
        if not isinstance(positions, (list, tuple)) or len(positions) != self.num_kv_heads:
            raise ValueError(f"positions must be a list of {self.num_kv_heads} tensors (one per KV head)")
        length = self._length[layer]
        checked = []
        for head, pos in enumerate(positions):
            if (
                not isinstance(pos, torch.Tensor)
                or pos.dim() != 1
                or pos.is_floating_point()
                or pos.is_complex()
            ):
                raise ValueError(f"positions[{head}] must be a 1-D integer tensor")
            pos = pos.to("cpu", torch.int64)
            if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= length):
                raise ValueError(
                    f"positions[{head}] must lie in [0, {length}) (layer {layer} history length), "
                    f"got values in [{int(pos.min())}, {int(pos.max())}]"
                )
            checked.append(pos)
        return checked

    # ------------------------------------------------------------------ append

    def length(self, layer: int) -> int:
        """History tokens of `layer` (per KV head)."""
        self._check_layer(layer)
        return self._length[layer]

    def max_step_tokens(self, *, one_page_per_step: bool) -> int | None:
        """The longest step `check_step` lets through; None when the device tier is unbounded."""
        if self._device_max_blocks is None:
            return None
        blocks_per_head = self._device_max_blocks // self.num_kv_heads
        return blocks_per_head * self.block_tokens if one_page_per_step else blocks_per_head

    def _step_bytes_bound(self, new_tokens: int, one_page_per_step: bool) -> int:
        return step_bytes_bound(
            new_tokens,
            num_kv_heads=self.num_kv_heads,
            block_tokens=self.block_tokens,
            block_bytes=self.block_bytes,
            one_page_per_step=one_page_per_step,
        )

    def check_step(self, new_tokens: int, *, one_page_per_step: bool) -> None:
        """Refuse, before anything changes, a step whose append may not fit the device budget
        (`StepTooLargeError`); a step that passes never hits the append's own budget check."""
        if self._device_max_blocks is None:
            return
        needed = self._step_bytes_bound(new_tokens, one_page_per_step)
        if needed > self._device_max_blocks * self.block_bytes:
            raise StepTooLargeError(
                f"TierBudgets.device_bytes={self.budgets.device_bytes} is too small for a step of "
                f"{new_tokens} tokens: its append may hold up to {needed} bytes on the device tier at once "
                f"({self.num_kv_heads} KV heads, {self.block_bytes}-byte blocks); raise the device budget to "
                "at least that or append fewer tokens per step",
                new_tokens=new_tokens,
                needed_bytes=needed,
                budget_bytes=int(self.budgets.device_bytes),
            )

    @_plain_tensors
    def make_room_for_step(self, new_tokens: int, *, one_page_per_step: bool) -> bool:
        """Move old pages down now, so that appending a step of `new_tokens` tokens to every
        layer evicts nothing more: a disk that fills up then fails the step before any layer
        changed. False, with nothing moved, when the device budget cannot hold the step's worst
        case in all layers at once (each append then makes its own room)."""
        if self._device_max_blocks is None:
            return True
        per_layer = self._step_bytes_bound(new_tokens, one_page_per_step)
        blocks = self.num_layers * per_layer // self.block_bytes
        if blocks > self._device_max_blocks:
            return False
        with self._lock:
            self._wait_pending_reads()
            self._make_room(DEVICE, blocks, torch.empty(0, dtype=torch.int64))
        return True

    @_plain_tensors
    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, cluster_ids: torch.Tensor) -> None:
        """Write new tokens of `layer` into their clusters' pages on the device tier.

        Args:
            layer: decoder layer index.
            keys, values: `[Hkv, T, head_dim]` in the store dtype.
            cluster_ids: integer `[Hkv, T]`, ids in [0, 2**32); ids name clusters per (layer, KV head).
                A new id starts a new cluster.

        The tokens get history positions length(layer) .. length(layer)+T-1. Older pages move down
        a tier first if the device budget needs room.

        Raises:
            ValueError: bad shapes, dtypes or ids, or a device budget too small for this step.
        """
        self._check_layer(layer)
        self._check_kv("keys", keys)
        self._check_kv("values", values)
        if keys.shape != values.shape:
            raise ValueError(f"values shape {list(values.shape)} must equal keys shape {list(keys.shape)}")
        num_heads, num_new, _ = keys.shape
        if (
            not isinstance(cluster_ids, torch.Tensor)
            or cluster_ids.is_floating_point()
            or cluster_ids.is_complex()
            or cluster_ids.dtype == torch.bool
        ):
            raise ValueError("cluster_ids must be an integer tensor [num_kv_heads, T]")
        if list(cluster_ids.shape) != [num_heads, num_new]:
            raise ValueError(
                f"cluster_ids must have shape [{num_heads}, {num_new}], got {list(cluster_ids.shape)}"
            )
        if num_new == 0:
            return
        ids = cluster_ids.to("cpu", torch.int64).reshape(-1)
        if int(ids.min()) < 0 or int(ids.max()) >= _MAX_CLUSTER_ID:
            raise ValueError(
                f"cluster_ids must lie in [0, 2**32), got values in [{int(ids.min())}, {int(ids.max())}]"
            )
        with self._lock:
            self._append_locked(layer, keys, values, ids)

    def _append_locked(self, layer: int, keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> None:
        self._wait_pending_reads()
        num_heads, num_new, _ = keys.shape
        bt = self.block_tokens
        heads = torch.arange(num_heads, dtype=torch.int64).repeat_interleave(num_new)  # [H*T]
        ukeys, inv, counts = torch.unique((heads << 32) | ids, return_inverse=True, return_counts=True)
        cluster = self._lookup(layer, ukeys)  # [U], -1 for clusters not seen before

        # Rank of each token inside its cluster for this append, keeping arrival order.
        order = torch.argsort(inv, stable=True)
        group_start = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(inv)
        rank[order] = torch.arange(inv.numel()) - group_start[inv[order]]

        # Fill the cluster's tail block first if it is still on the device, then new blocks.
        tail = torch.where(cluster >= 0, self._cl_tail.buf[cluster.clamp(min=0)], -1)
        has_tail = tail >= 0
        tail_safe = tail.clamp(min=0)
        tail_on_device = has_tail & (self._blk_tier.buf[tail_safe] == DEVICE)
        tail_fill = torch.where(tail_on_device, self._blk_fill.buf[tail_safe], 0)
        room = torch.where(tail_on_device, bt - tail_fill, 0)
        take = torch.minimum(room, counts)
        new_blocks = _ceil_div(counts - take, bt)
        num_new_blocks = int(new_blocks.sum())
        protected = tail[take > 0]
        needed = num_new_blocks + protected.numel()
        if self._device_max_blocks is not None and needed > self._device_max_blocks:
            raise ValueError(
                f"TierBudgets.device_bytes={self.budgets.device_bytes} is too small for this step: appending "
                f"{num_new} tokens x {num_heads} KV heads to layer {layer} writes {needed} blocks of "
                f"{self.block_bytes} B = {needed * self.block_bytes} bytes at once; raise the device budget to at "
                "least that, append fewer tokens per step, or lower block_tokens"
            )
        self._stamp += 1
        stamp = self._stamp
        unseen = cluster < 0
        if bool(unseen.any()):
            cluster[unseen] = self._create_clusters(layer, ukeys[unseen])
        self._cl_stamp.buf[cluster] = stamp  # clusters written now are the newest, whatever moves next
        self._make_room(DEVICE, num_new_blocks, protected)

        first_block = self._blk_cluster.n
        new_start = first_block + torch.cumsum(new_blocks, 0) - new_blocks  # [U]
        in_tail = rank < take[inv]
        beyond = rank - take[inv]
        block = torch.where(
            in_tail, tail_safe[inv], new_start[inv] + torch.div(beyond, bt, rounding_mode="floor")
        )
        offset = torch.where(in_tail, tail_fill[inv] + rank, beyond % bt)

        block_ids = torch.arange(first_block, first_block + num_new_blocks, dtype=torch.int64)
        slots = self._arenas[DEVICE].allocate(block_ids)
        self._blk_cluster.extend(cluster.repeat_interleave(new_blocks))
        self._blk_tier.extend(torch.full((num_new_blocks,), DEVICE, dtype=torch.int8))
        self._blk_slot.extend(slots)
        self._blk_fill.extend(torch.zeros(num_new_blocks, dtype=torch.int64))
        self._blk_fill.buf.index_add_(0, block, torch.ones_like(block))
        self._cl_tail.buf[cluster] = torch.where(new_blocks > 0, new_start + new_blocks - 1, tail)

        arena = self._arenas[DEVICE]
        rows = (self._blk_slot.t[block] * (2 * bt) + offset).to(arena.data.device)
        arena.rows.index_copy_(0, rows, keys.reshape(-1, self.head_dim).to(arena.data.device))
        arena.rows.index_copy_(0, rows + bt, values.reshape(-1, self.head_dim).to(arena.data.device))

        start = self._length[layer]
        self._ensure_positions(layer, start + num_new)
        self._pos_block[layer][:, start : start + num_new] = block.view(num_heads, num_new)
        self._pos_offset[layer][:, start : start + num_new] = offset.view(num_heads, num_new)
        self._length[layer] = start + num_new
        self._resident_tokens[DEVICE] += num_heads * num_new
        self._counters["appended_bytes"] += num_heads * num_new * self.token_bytes
        self._note_peaks()

    def _lookup(self, layer: int, ukeys: torch.Tensor) -> torch.Tensor:
        """Global cluster index per sorted unique key (head << 32 | id); -1 where unseen."""
        sorted_keys = self._keys_sorted[layer]
        where = torch.searchsorted(sorted_keys, ukeys)
        found = where < sorted_keys.numel()
        found[found.clone()] = sorted_keys[where[found]] == ukeys[found]
        cluster = torch.full_like(ukeys, -1)
        cluster[found] = self._keys_cluster[layer][where[found]]
        return cluster

    def _create_clusters(self, layer: int, fresh: torch.Tensor) -> torch.Tensor:
        """Add clusters for sorted unseen keys; return their global indices."""
        sorted_keys = self._keys_sorted[layer]
        first = self._cl_id.n
        fresh_index = torch.arange(first, first + fresh.numel(), dtype=torch.int64)
        self._cl_layer.extend(torch.full_like(fresh, layer))
        self._cl_head.extend(fresh >> 32)
        self._cl_id.extend(fresh & (_MAX_CLUSTER_ID - 1))
        self._cl_tail.extend(torch.full_like(fresh, -1))
        self._cl_stamp.extend(torch.zeros_like(fresh))
        # Merge two sorted, disjoint key lists without a full sort: each element's new place is
        # its own index plus the count of the other list's elements below it.
        old_at = torch.arange(sorted_keys.numel()) + torch.searchsorted(fresh, sorted_keys)
        fresh_at = torch.arange(fresh.numel()) + torch.searchsorted(sorted_keys, fresh)
        merged = torch.empty(sorted_keys.numel() + fresh.numel(), dtype=torch.int64)
        merged_cluster = torch.empty_like(merged)
        merged[old_at] = sorted_keys
        merged[fresh_at] = fresh
        merged_cluster[old_at] = self._keys_cluster[layer]
        merged_cluster[fresh_at] = fresh_index
        self._keys_sorted[layer] = merged
        self._keys_cluster[layer] = merged_cluster
        return fresh_index

    def _ensure_positions(self, layer: int, needed: int) -> None:
        table = self._pos_block[layer]
        if needed <= table.shape[1]:
            return
        capacity = max(needed, 2 * table.shape[1], 256)
        for tables in (self._pos_block, self._pos_offset):
            grown = torch.zeros(self.num_kv_heads, capacity, dtype=torch.int64)
            grown[:, : tables[layer].shape[1]] = tables[layer]
            tables[layer] = grown

    # ------------------------------------------------------------------ eviction

    def _make_room(self, tier: int, count: int, protected: torch.Tensor) -> None:
        """Move the least recently appended blocks out of `tier` until `count` blocks are free,
        plus the slack above: finding the oldest blocks scans the whole tier, so it is done once
        per slack rather than at every append (with 2-token blocks the per-append scan was half
        the time of an append)."""
        arena = self._arenas[tier]
        free = arena.num_free()
        if free is None or free >= count:
            return
        candidate = arena.owner >= 0
        if protected.numel():
            candidate[self._blk_slot.t[protected]] = False  # protected blocks are all on this tier
        blocks = arena.owner[candidate]
        # Oldest cluster (by its last append) first; inside a cluster, its oldest block first.
        age = self._cl_stamp.t[self._blk_cluster.t[blocks]] * 2**32 + blocks
        slack = min(arena.max_blocks // _EVICT_SLACK_DIVISOR, _EVICT_SLACK_MAX_BYTES // self.block_bytes)
        evict = min(count - free + slack, blocks.numel())
        pick = torch.topk(age, evict, largest=False, sorted=True).indices
        self._move_down(blocks[pick], tier)

    def _move_down(self, victims: torch.Tensor, tier: int) -> None:
        """Move `victims` (oldest first) from `tier` to the next tier that has room.

        What can fail (the disk's space, the host tier's own eviction) happens before the
        victims leave `tier`, so a full disk leaves the store as it was."""
        arena = self._arenas[tier]
        count = victims.numel()
        to_host = 0
        if tier == DEVICE:
            host_free = self._arenas[HOST].max_blocks
            to_host = count if host_free is None else min(count, host_free)
        direct = count - to_host  # the oldest ones skip a host tier that cannot take them all
        if direct:
            self._reserve_disk(victims[:direct])
        if to_host:
            self._make_room(HOST, to_host, torch.empty(0, dtype=torch.int64))
        slots = self._blk_slot.t[victims]
        data = arena.read_blocks(slots).cpu()
        arena.release(slots)
        fill = int(self._blk_fill.t[victims].sum())
        self._resident_tokens[tier] -= fill
        if to_host:
            host_victims = victims[direct:]
            host_slots = self._arenas[HOST].allocate(host_victims)
            self._arenas[HOST].write_blocks(host_slots, data[direct:])
            self._blk_tier.buf[host_victims] = HOST
            self._blk_slot.buf[host_victims] = host_slots
            self._resident_tokens[HOST] += int(self._blk_fill.t[host_victims].sum())
            self._counters["evicted_bytes_device_to_host"] += to_host * self.block_bytes
        if direct:
            self._write_disk(victims[:direct], data[:direct])
            key = "evicted_bytes_device_to_disk" if tier == DEVICE else "evicted_bytes_host_to_disk"
            self._counters[key] += direct * self.block_bytes

    def _reserve_disk(self, victims: torch.Tensor) -> None:
        """Disk space for `victims` in their layers' files (OSError when the disk is full)."""
        layers, counts = torch.unique(self._cl_layer.t[self._blk_cluster.t[victims]], return_counts=True)
        for layer, count in zip(layers.tolist(), counts.tolist(), strict=True):
            disk = self._disk_arena(layer)
            disk.reserve(disk.num_used + count)

    def _write_disk(self, victims: torch.Tensor, data: torch.Tensor) -> None:
        layers = self._cl_layer.t[self._blk_cluster.t[victims]]
        for layer in torch.unique(layers).tolist():
            sel = torch.nonzero(layers == layer).flatten()
            disk = self._disk_arena(layer)
            slots = disk.allocate(sel.numel())
            disk.write_blocks(slots, data[sel])
            self._blk_tier.buf[victims[sel]] = DISK
            self._blk_slot.buf[victims[sel]] = slots
        self._resident_tokens[DISK] += int(self._blk_fill.t[victims].sum())

    def _disk_arena(self, layer: int) -> DiskArena:
        if self._disk[layer] is None:
            folder = self._session_folder()
            self._disk[layer] = DiskArena(
                folder / f"layer{layer:03d}.kv", self.block_tokens, self.head_dim, self.dtype
            )
        return self._disk[layer]

    def _session_folder(self) -> Path:
        if self._disk_folder is None:
            parent = self.budgets.disk_dir
            if parent is not None:
                Path(parent).mkdir(parents=True, exist_ok=True)
            self._disk_folder = Path(tempfile.mkdtemp(prefix="vrex-kv-", dir=parent))
            self._disk_cleanup = weakref.finalize(self, shutil.rmtree, self._disk_folder, True)
        return self._disk_folder

    def _note_peaks(self) -> None:
        arena = self._arenas[DEVICE]
        counters = self._counters
        counters["peak_resident_bytes_device"] = max(
            counters["peak_resident_bytes_device"], arena.num_used * self.block_bytes
        )
        counters["peak_allocated_bytes_device"] = max(
            counters["peak_allocated_bytes_device"], arena.allocated_bytes
        )

    # ------------------------------------------------------------------ fetch

    @_plain_tensors
    def fetch(
        self, layer: int, positions: list[torch.Tensor], handle: PrefetchHandle | None = None
    ) -> FetchResult:
        """Gather K/V of the given history positions, per KV head, onto the compute device.

        Args:
            layer: decoder layer index.
            positions: one 1-D integer tensor per KV head (lengths may differ); output order per head
                is the given order.
            handle: a `prefetch` of the same request; its result is returned once ready.

        Returns:
            A `FetchResult` (keys/values `[Hkv, L, head_dim]` zero-padded to L = the longest request).
        """
        self._check_layer(layer)
        if handle is not None:
            if (
                handle.layer != layer
                or len(handle.positions) != len(positions)
                or not all(
                    torch.equal(a.cpu().long(), b) for a, b in zip(positions, handle.positions, strict=True)
                )
            ):
                raise ValueError("handle was prefetched for a different layer or positions than this fetch")
            return handle.result()
        positions = self._check_positions(layer, positions)
        with self._lock:
            result, _ = self._gather(layer, positions, use_stream=False)
        return result

    @_plain_tensors
    def prefetch(self, layer: int, positions: list[torch.Tensor]) -> PrefetchHandle:
        """Start `fetch(layer, positions)` in the background (copy stream + pinned staging on CUDA,
        a worker thread for host/disk reads on CPU); pass the handle to `fetch` or call `result()`."""
        self._check_layer(layer)
        positions = self._check_positions(layer, positions)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vrex-kv-prefetch")

        def run():
            with torch.inference_mode(False), torch.no_grad(), self._lock:
                return self._gather(layer, positions, use_stream=self._use_cuda)

        return PrefetchHandle(self._executor.submit(run), layer, positions)

    @_plain_tensors
    def fetch_all(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All history of `layer` in position order: keys, values `[Hkv, N, head_dim]` (full attention)."""
        self._check_layer(layer)
        everything = torch.arange(self._length[layer], dtype=torch.int64)
        result = self.fetch(layer, [everything] * self.num_kv_heads)
        return result.keys, result.values

    def _gather(self, layer: int, positions: list[torch.Tensor], use_stream: bool):
        """Fetch under the lock. Returns (FetchResult, CUDA event or None)."""
        lengths = torch.tensor([p.numel() for p in positions], dtype=torch.int64)
        width = int(lengths.max()) if lengths.numel() else 0
        total = int(lengths.sum())
        pos = torch.cat(positions) if total else torch.empty(0, dtype=torch.int64)
        heads = torch.arange(self.num_kv_heads, dtype=torch.int64).repeat_interleave(lengths)
        head_start = torch.cumsum(lengths, 0) - lengths
        out_row = heads * width + torch.arange(total, dtype=torch.int64) - head_start[heads]
        flat = heads * self._pos_block[layer].shape[1] + pos
        block = self._pos_block[layer].view(-1).index_select(0, flat)
        tier = self._blk_tier.buf.index_select(0, block)
        offset = self._pos_offset[layer].view(-1).index_select(0, flat)
        rows = self._blk_slot.buf.index_select(0, block) * (2 * self.block_tokens) + offset

        stream_ctx = torch.cuda.stream(self._copy_stream) if use_stream else _null_context()
        event = None
        num_rows = self.num_kv_heads * width
        bt = self.block_tokens
        counts = torch.bincount(tier.long(), minlength=3).tolist()
        moved = [c * self.token_bytes for c in counts]
        with stream_ctx:
            # The tier holding most of the request is read straight into the output order, keys and
            # values in one gather; the other tiers' rows and the padding are overwritten after.
            primary = max(range(3), key=lambda t: counts[t])
            if counts[primary]:
                src = torch.zeros(num_rows, dtype=torch.int64)
                in_primary = tier == primary
                src[out_row[in_primary]] = rows[in_primary]
                out = self._read_rows(layer, primary, torch.cat([src, src + bt]))
                out = out.view(2, num_rows, self.head_dim)
                if total < num_rows:
                    valid = torch.arange(width).expand(self.num_kv_heads, width) < lengths[:, None]
                    padding = torch.nonzero(~valid.flatten()).flatten()
                    out.index_fill_(1, padding.to(self.device), 0)
            else:
                out = torch.zeros(2, num_rows, self.head_dim, dtype=self.dtype, device=self.device)
            for t in (DEVICE, HOST, DISK):
                if t == primary or counts[t] == 0:
                    continue
                mask = tier == t
                src = rows[mask]
                kv = self._read_rows(layer, t, torch.cat([src, src + bt])).view(2, counts[t], self.head_dim)
                dst = out_row[mask].to(self.device)
                out[0].index_copy_(0, dst, kv[0])
                out[1].index_copy_(0, dst, kv[1])
            if use_stream:
                event = torch.cuda.Event()
                event.record(self._copy_stream)
                self._pending_events.append(event)
        for t, name in enumerate(TIER_NAMES):
            self._counters[f"fetched_bytes_{name}"] += moved[t]
        result = FetchResult(
            keys=out[0].view(self.num_kv_heads, width, self.head_dim),
            values=out[1].view(self.num_kv_heads, width, self.head_dim),
            lengths=lengths,
            bytes_device=moved[DEVICE],
            bytes_host=moved[HOST],
            bytes_disk=moved[DISK],
        )
        return result, event

    def _read_rows(self, layer: int, tier: int, rows: torch.Tensor) -> torch.Tensor:
        """Token rows (see `MemoryArena.rows`) of one tier, delivered on the compute device."""
        if tier == DEVICE:
            arena_rows = self._arenas[DEVICE].rows
            return arena_rows.index_select(0, rows.to(arena_rows.device))
        if tier == DISK:
            kv = self._disk[layer].read_rows(rows)
            if self._use_cuda:
                kv = kv.pin_memory()
        elif self._use_cuda:
            # Gather straight into pinned staging so the copy to the GPU is async.
            kv = torch.empty(rows.numel(), self.head_dim, dtype=self.dtype, pin_memory=True)
            torch.index_select(self._arenas[HOST].rows, 0, rows, out=kv)
        else:
            kv = self._arenas[HOST].rows.index_select(0, rows)
        return kv.to(self.device, non_blocking=True)

    def _wait_pending_reads(self) -> None:
        """Order arena writes after in-flight prefetch reads on the copy stream (CUDA only)."""
        if self._pending_events:
            stream = torch.cuda.current_stream(self.device)
            for event in self._pending_events:
                stream.wait_event(event)
            self._pending_events.clear()

    # ------------------------------------------------------------------ queries

    @_plain_tensors
    def position_clusters(self, layer: int) -> torch.Tensor:
        """The cluster id each history position of `layer` was appended with, `[Hkv, N]`."""
        self._check_layer(layer)
        blocks = self._pos_block[layer][:, : self._length[layer]]
        return self._cl_id.t[self._blk_cluster.t[blocks]]

    @_plain_tensors
    def tier_of(self, layer: int) -> torch.Tensor:
        """Tier of every history token of `layer`: int8 `[Hkv, N]` (0 device, 1 host, 2 disk)."""
        self._check_layer(layer)
        with self._lock:
            return self._blk_tier.t[self._pos_block[layer][:, : self._length[layer]]]

    @_plain_tensors
    def cluster_tier(self, layer: int, kv_head: int) -> ClusterTiers:
        """Tier of each cluster's tail block for one (layer, KV head); see `ClusterTiers`."""
        self._check_layer(layer)
        if not isinstance(kv_head, int) or not 0 <= kv_head < self.num_kv_heads:
            raise ValueError(f"kv_head must be an int in [0, {self.num_kv_heads}), got {kv_head!r}")
        with self._lock:
            keys = self._keys_sorted[layer]
            lo = int(torch.searchsorted(keys, torch.tensor(kv_head << 32)))
            hi = int(torch.searchsorted(keys, torch.tensor((kv_head + 1) << 32)))
            cluster = self._keys_cluster[layer][lo:hi]
            return ClusterTiers(
                cluster_ids=keys[lo:hi] & (_MAX_CLUSTER_ID - 1),
                tiers=self._blk_tier.t[self._cl_tail.t[cluster]],
            )

    @_plain_tensors
    def positions_of_clusters(self, layer: int, kv_head: int, cluster_ids: torch.Tensor) -> torch.Tensor:
        """Ascending history positions of the tokens of the given clusters of one (layer, KV head)."""
        self._check_layer(layer)
        if not isinstance(kv_head, int) or not 0 <= kv_head < self.num_kv_heads:
            raise ValueError(f"kv_head must be an int in [0, {self.num_kv_heads}), got {kv_head!r}")
        with self._lock:
            wanted = (kv_head << 32) | cluster_ids.to("cpu", torch.int64).reshape(-1)
            keys = self._keys_sorted[layer]
            where = torch.searchsorted(keys, wanted).clamp(max=max(keys.numel() - 1, 0))
            hit = keys[where] == wanted if keys.numel() else torch.zeros_like(wanted, dtype=torch.bool)
            clusters = self._keys_cluster[layer][where[hit]]
            token_cluster = self._blk_cluster.t[self._pos_block[layer][kv_head, : self._length[layer]]]
            return torch.nonzero(torch.isin(token_cluster, clusters)).flatten()

    @_plain_tensors
    def stats(self) -> dict:
        """Resident blocks/bytes/tokens and fill per tier, cumulative bytes moved, device peaks.

        `resident_bytes_*` count whole blocks (what the budgets bound); `fetched_bytes_*` count the
        K+V bytes of the tokens each tier delivered; `evicted_bytes_*` count whole blocks moved down;
        `appended_bytes` the K+V bytes written. All values are plain Python numbers (JSON-ready).
        """
        with self._lock:
            disk_blocks = sum(d.num_used for d in self._disk if d is not None)
            used = [self._arenas[DEVICE].num_used, self._arenas[HOST].num_used, disk_blocks]
            out = {
                "block_tokens": self.block_tokens,
                "block_bytes": self.block_bytes,
                "token_bytes": self.token_bytes,
                "num_clusters": self._cl_id.n,
                "num_blocks": self._blk_cluster.n,
                "history_tokens": sum(self._length) * self.num_kv_heads,
                "allocated_bytes_device": self._arenas[DEVICE].allocated_bytes,
                "allocated_bytes_host": self._arenas[HOST].allocated_bytes,
                "allocated_bytes_disk": sum(d.file_bytes for d in self._disk if d is not None),
                "budget_bytes_device": self.budgets.device_bytes,
                "budget_bytes_host": self.budgets.host_bytes,
            }
            for t, name in enumerate(TIER_NAMES):
                out[f"resident_blocks_{name}"] = used[t]
                out[f"resident_bytes_{name}"] = used[t] * self.block_bytes
                out[f"resident_tokens_{name}"] = self._resident_tokens[t]
                # Share of block slots holding tokens: low when clusters are much smaller than a block.
                slots = used[t] * self.block_tokens
                out[f"fill_fraction_{name}"] = self._resident_tokens[t] / slots if slots else 1.0
            out.update(self._counters)
            return out

    # ------------------------------------------------------------------ snapshot / restore

    @_plain_tensors
    def snapshot(self, folder: str | os.PathLike) -> None:
        """Write the whole store to `folder` atomically (temp folder + rename, sha256 manifest)."""
        with self._lock, atomic_folder(folder) as tmp:
            self.write_snapshot_files(tmp)
            write_manifest(tmp, SNAPSHOT_FORMAT)

    @_plain_tensors
    def write_snapshot_files(self, folder: str | os.PathLike) -> None:
        """Write the store's files into an existing folder (no manifest, not atomic); for callers
        that snapshot a larger state and make it atomic themselves."""
        folder = Path(folder)
        with self._lock:
            self._wait_pending_reads()
            if self._use_cuda:
                torch.cuda.synchronize(self.device)
            meta = {
                "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device),
                "budgets": {
                    "device_bytes": self.budgets.device_bytes,
                    "host_bytes": self.budgets.host_bytes,
                    "disk_dir": None if self.budgets.disk_dir is None else str(self.budgets.disk_dir),
                },
                "block_tokens": self.block_tokens,
                "length": self._length,
                "stamp": self._stamp,
                "resident_tokens": self._resident_tokens,
                "counters": self._counters,
                "arena_used": [a.num_used for a in self._arenas],
                "disk_used": [0 if d is None else d.num_used for d in self._disk],
                "disk_capacity": [0 if d is None else d.capacity for d in self._disk],
            }
            (folder / "meta.json").write_text(json.dumps(meta, indent=1))
            tables = {
                "blk_cluster": self._blk_cluster.t,
                "blk_tier": self._blk_tier.t,
                "blk_slot": self._blk_slot.t,
                "blk_fill": self._blk_fill.t,
                "cl_layer": self._cl_layer.t,
                "cl_head": self._cl_head.t,
                "cl_id": self._cl_id.t,
                "cl_tail": self._cl_tail.t,
                "cl_stamp": self._cl_stamp.t,
                "device_owner": self._arenas[DEVICE].owner,
                "host_owner": self._arenas[HOST].owner,
            }
            for layer in range(self.num_layers):
                n = self._length[layer]
                tables[f"keys_sorted_{layer}"] = self._keys_sorted[layer]
                tables[f"keys_cluster_{layer}"] = self._keys_cluster[layer]
                tables[f"pos_block_{layer}"] = self._pos_block[layer][:, :n]
                tables[f"pos_offset_{layer}"] = self._pos_offset[layer][:, :n]
            np.savez(folder / "tables.npz", **{k: v.numpy() for k, v in tables.items()})
            for t, name in ((DEVICE, "device"), (HOST, "host")):
                arena = self._arenas[t]
                to_numpy_bits(arena.data[: arena.used_prefix()].cpu()).tofile(folder / f"{name}_arena.bin")
            for layer, disk in enumerate(self._disk):
                if disk is not None:
                    disk.memmap.flush()
                    np.ascontiguousarray(disk.used_bits()).tofile(folder / f"disk_layer{layer:03d}.bin")

    @classmethod
    def restore(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device | None = None,
        disk_dir: str | os.PathLike | None = None,
    ) -> TieredKVStore:
        """Rebuild a store bit-exactly (data, tiers, slots, counters) from a `snapshot` folder.

        Args:
            folder: the snapshot folder.
            device: compute device; default the one it was saved from.
            disk_dir: where to put the restored disk tier; default the saved budgets' disk_dir.

        Raises:
            SnapshotError (a ValueError): missing folder, missing file or checksum mismatch.
        """
        folder = resolve_snapshot_folder(folder)
        verify_manifest(folder, SNAPSHOT_FORMAT)
        return cls.read_snapshot_files(folder, device=device, disk_dir=disk_dir)

    @classmethod
    @_plain_tensors
    def read_snapshot_files(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device | None = None,
        disk_dir: str | os.PathLike | None = None,
        budgets: TierBudgets | None = None,
    ) -> TieredKVStore:
        """Inverse of `write_snapshot_files` (checksums are the caller's job; `restore` does them).

        `budgets`: the tier budgets to go on under (default the saved ones). When they differ
        the saved store is read into host memory first and moved over (`with_budgets`), so a
        GPU never holds the old device tier and the new one at once."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            budgets_meta = meta["budgets"]
            dtype = _DTYPES[meta["dtype"]]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise SnapshotError(f"{folder}/meta.json is missing or unreadable: {err}") from None
        saved_budgets = TierBudgets(
            device_bytes=budgets_meta["device_bytes"],
            host_bytes=budgets_meta["host_bytes"],
            disk_dir=disk_dir if disk_dir is not None else budgets_meta["disk_dir"],
        )
        if budgets is not None and budgets != saved_budgets:
            target = meta["device"] if device is None else device
            saved = cls.read_snapshot_files(folder, device="cpu", disk_dir=disk_dir)
            return saved.with_budgets(budgets, device=target)
        budgets = saved_budgets
        store = cls(
            meta["num_layers"],
            meta["num_kv_heads"],
            meta["head_dim"],
            dtype=dtype,
            device=meta["device"] if device is None else device,
            budgets=budgets,
            block_tokens=meta["block_tokens"],
        )
        with np.load(folder / "tables.npz") as npz:
            tables = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
        store._blk_cluster.load(tables["blk_cluster"])
        store._blk_tier.load(tables["blk_tier"])
        store._blk_slot.load(tables["blk_slot"])
        store._blk_fill.load(tables["blk_fill"])
        for name in ("layer", "head", "id", "tail", "stamp"):
            getattr(store, f"_cl_{name}").load(tables[f"cl_{name}"])
        for layer in range(store.num_layers):
            store._keys_sorted[layer] = tables[f"keys_sorted_{layer}"]
            store._keys_cluster[layer] = tables[f"keys_cluster_{layer}"]
            store._pos_block[layer] = tables[f"pos_block_{layer}"]
            store._pos_offset[layer] = tables[f"pos_offset_{layer}"]
        store._length = list(meta["length"])
        store._stamp = meta["stamp"]
        store._resident_tokens = list(meta["resident_tokens"])
        store._counters = {k: int(meta["counters"][k]) for k in _COUNTERS}
        bt, d = store.block_tokens, store.head_dim
        for t, name in ((DEVICE, "device"), (HOST, "host")):
            arena = store._arenas[t]
            owner = tables[f"{name}_owner"]
            bits = np.fromfile(folder / f"{name}_arena.bin", dtype=_int_np(dtype))
            data = from_numpy_bits(bits, dtype).view(-1, 2, bt, d)
            arena.load(data, owner, int(meta["arena_used"][t]))
        for layer, used in enumerate(meta["disk_used"]):
            if used:
                bits = np.fromfile(folder / f"disk_layer{layer:03d}.bin", dtype=_int_np(dtype))
                disk = store._disk_arena(layer)
                disk.reserve(meta["disk_capacity"][layer])
                slots = disk.allocate(used)
                disk.write_blocks(slots, from_numpy_bits(bits, dtype).view(used, 2, bt, d))
        return store

    @_plain_tensors
    def with_budgets(self, budgets: TierBudgets, device: str | torch.device | None = None) -> TieredKVStore:
        """This store's history under other tier budgets (and device), in a new store; this one
        is closed. A store already under `budgets` on `device` is returned as it is.

        The tokens go in again as steps the new device budget holds, in position order, each
        step to every layer before the next (as they came), with their cluster ids: every
        position keeps its keys, values and cluster, and the new budgets decide which tier each
        page lands in, the most recent on the device. The counters carry over, plus the
        evictions the new budgets made.

        Raises:
            ValueError: `budgets` below the minimum (one block per KV head per layer).
        """
        device = self.device if device is None else torch.device(device)
        if budgets == self.budgets and device == self.device:
            return self
        new = TieredKVStore(
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            dtype=self.dtype,
            device=device,
            budgets=budgets,
            block_tokens=self.block_tokens,
        )
        counters = dict(self._counters)  # before the copy's own fetches
        try:
            longest = max(self._length, default=0)
            # a step of every layer fits the device tier at once, so the latest of each stays there
            most = new.max_step_tokens(one_page_per_step=False)
            chunk = max(1, most // self.num_layers) if most is not None else max(longest, 1)
            ids = [self.position_clusters(layer) for layer in range(self.num_layers)]
            for start in range(0, longest, chunk):
                for layer in range(self.num_layers):
                    end = min(self._length[layer], start + chunk)
                    if end <= start:
                        continue
                    got = self.fetch(layer, [torch.arange(start, end)] * self.num_kv_heads)
                    keys, values = got.keys.to(device), got.values.to(device)
                    new.append(layer, keys, values, ids[layer][:, start:end])
        except BaseException:
            new.close()
            raise
        for name, value in new._counters.items():
            if name.startswith("evicted_bytes"):
                counters[name] += value
            elif name.startswith("peak_"):
                counters[name] = max(counters[name], value)
        new._counters = counters
        self.close()
        return new

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop the prefetch worker and delete the disk session folder."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for disk in self._disk:
            if disk is not None:
                disk.close()
        if self._disk_cleanup is not None:
            self._disk_cleanup()

    def __enter__(self) -> TieredKVStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def disk_folder(self) -> Path | None:
        """The session folder holding the disk tier (None until something went to disk)."""
        return self._disk_folder

    def __repr__(self) -> str:
        return (
            f"TieredKVStore(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"dtype={self.dtype}, device={self.device}, budgets={asdict(self.budgets)}, "
            f"block_tokens={self.block_tokens})"
        )


def _int_np(dtype: torch.dtype) -> np.dtype:
    return np.dtype(str(int_view_dtype(dtype)).removeprefix("torch."))


class _null_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
