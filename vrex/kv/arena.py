"""Block arenas, one per tier: fixed-size KV blocks in memory (device or host) or in a memory-mapped file.

A block holds `block_tokens` tokens of one (layer, KV head, cluster), keys then values:
`[2, block_tokens, head_dim]`. Arenas know slots and bytes only; which block sits where is the
store's bookkeeping (vLLM keeps its block manager apart from the tensors the same way).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import torch

# numpy has no bfloat16, so bytes go to and from disk through a signed integer of the same width.
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype with the same element size as `dtype` (for byte-exact numpy round trips)."""
    size = torch.empty((), dtype=dtype).element_size()
    return _INT_VIEW[size]


def to_numpy_bits(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's bits (any dtype, bfloat16 included)."""
    return tensor.contiguous().view(int_view_dtype(tensor.dtype)).numpy()


def from_numpy_bits(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `to_numpy_bits`."""
    return torch.from_numpy(np.ascontiguousarray(array)).view(dtype)


class MemoryArena:
    """A pool of KV blocks in one tensor `[capacity, 2, block_tokens, head_dim]` on one device.

    The tensor grows by doubling up to `max_blocks` (the tier budget), so the memory it holds
    never exceeds the budget. With `preallocate` a bounded arena takes its whole budget at the
    first allocation instead (as vLLM does on the GPU): growing would briefly hold old and new
    tensors together, over the budget. `owner[slot]` is the global block id there, -1 when free;
    the free slots are also kept as a sorted list, so an allocation does not scan the arena.
    """

    def __init__(
        self,
        block_tokens: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_blocks: int | None,
        pin_memory: bool = False,
        preallocate: bool = False,
    ) -> None:
        self.block_tokens = block_tokens
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.max_blocks = max_blocks
        self.pin_memory = pin_memory
        self.preallocate = preallocate and max_blocks is not None
        self.data = self._empty(0)
        self.owner = torch.empty(0, dtype=torch.int64)
        self.num_used = 0
        self._free: torch.Tensor | None = torch.empty(0, dtype=torch.int64)  # None: rebuild from owner

    def _empty(self, num_blocks: int) -> torch.Tensor:
        shape = (num_blocks, 2, self.block_tokens, self.head_dim)
        if self.pin_memory:
            return torch.zeros(shape, dtype=self.dtype, pin_memory=True)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    @property
    def rows(self) -> torch.Tensor:
        """The arena as token rows `[capacity * 2 * block_tokens, head_dim]`; key row of (slot, off) is
        `slot * 2 * block_tokens + off`, its value row is `block_tokens` further."""
        return self.data.view(-1, self.head_dim)

    def num_free(self) -> int | None:
        """Blocks that can still be allocated (None when unbounded)."""
        if self.max_blocks is None:
            return None
        return self.max_blocks - self.num_used

    def _grow(self, needed_blocks: int) -> None:
        if needed_blocks <= self.capacity:
            return
        new_capacity = max(needed_blocks, 2 * self.capacity, 16)
        if self.preallocate:
            new_capacity = self.max_blocks
        if self.max_blocks is not None:
            new_capacity = min(new_capacity, self.max_blocks)
        assert new_capacity >= needed_blocks, "arena asked for more blocks than its budget"
        data = self._empty(new_capacity)
        data[: self.capacity].copy_(self.data)
        self.data = data
        owner = torch.full((new_capacity,), -1, dtype=torch.int64)
        owner[: self.owner.numel()] = self.owner
        if self._free is not None:
            self._free = torch.cat([self._free, torch.arange(self.owner.numel(), new_capacity)])
        self.owner = owner

    def allocate(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Take one free slot per block id (lowest slots first, so a run of blocks stays contiguous)."""
        count = block_ids.numel()
        if count == 0:
            return torch.empty(0, dtype=torch.int64)
        self._grow(self.num_used + count)
        if self._free is None:
            self._free = torch.nonzero(self.owner < 0).flatten()
        free, self._free = self._free[:count], self._free[count:]
        assert free.numel() == count, "arena out of free slots"
        self.owner[free] = block_ids
        self.num_used += count
        return free

    def release(self, slots: torch.Tensor) -> None:
        self.owner[slots] = -1
        self.num_used -= slots.numel()
        if self._free is not None:
            self._free = torch.sort(torch.cat([self._free, slots])).values

    def load(self, data: torch.Tensor, owner: torch.Tensor, num_used: int) -> None:
        """Take the first `data.shape[0]` blocks and the slot owners of a saved arena."""
        self.data = self._empty(owner.numel())
        self.data[: data.shape[0]].copy_(data)
        self.owner = owner
        self.num_used = num_used
        self._free = None

    def used_prefix(self) -> int:
        """One past the highest used slot (what a snapshot has to keep)."""
        used = torch.nonzero(self.owner >= 0)
        return int(used[-1]) + 1 if used.numel() else 0

    def read_blocks(self, slots: torch.Tensor) -> torch.Tensor:
        """Blocks `[n, 2, block_tokens, head_dim]` at `slots`, on this arena's device."""
        return self.data.index_select(0, slots.to(self.data.device))

    def write_blocks(self, slots: torch.Tensor, blocks: torch.Tensor) -> None:
        self.data.index_copy_(0, slots.to(self.data.device), blocks.to(self.data.device))

    @property
    def allocated_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _allocate(fd: int, size: int) -> None:
    """Give the file `size` bytes of real disk space (not a sparse hole)."""
    current = os.fstat(fd).st_size
    if size <= current:
        return
    try:
        os.posix_fallocate(fd, current, size - current)
    except (AttributeError, OSError) as exc:  # not on this OS or file system: a sparse file
        if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


class DiskArena:
    """KV blocks of one layer in a memory-mapped file `[capacity, 2, block_tokens, head_dim]`.

    Blocks only ever arrive here (nothing moves up), so slots are handed out in order and a run
    of evicted blocks, such as one cluster's page, lands contiguously in the file.
    """

    def __init__(self, path: Path, block_tokens: int, head_dim: int, dtype: torch.dtype) -> None:
        self.path = Path(path)
        self.block_tokens = block_tokens
        self.head_dim = head_dim
        self.dtype = dtype
        self.np_dtype = np.dtype(str(int_view_dtype(dtype)).removeprefix("torch."))
        self.num_used = 0
        self.capacity = 0
        self.memmap: np.memmap | None = None

    @property
    def block_nbytes(self) -> int:
        return 2 * self.block_tokens * self.head_dim * self.np_dtype.itemsize

    def reserve(self, needed_blocks: int) -> None:
        """Make the file hold `needed_blocks` blocks, its disk space taken now: a write through
        the memory map into space the disk does not have kills the process (SIGBUS), so a
        full disk is found here, as an OSError that says what to do, before anything moved.
        """
        if needed_blocks <= self.capacity:
            return
        new_capacity = max(needed_blocks, 2 * self.capacity, 16)
        size = new_capacity * self.block_nbytes
        with open(self.path, "ab") as handle:
            try:
                _allocate(handle.fileno(), size)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"disk KV tier {self.path}: no room for {size} bytes ({exc.strerror}); free space "
                    "there or give the host tier more room (--host-kv-budget)",
                ) from None
        if self.memmap is not None:
            self.memmap.flush()
            self.memmap = None
        self.memmap = np.memmap(
            self.path,
            dtype=self.np_dtype,
            mode="r+",
            shape=(new_capacity, 2, self.block_tokens, self.head_dim),
        )
        self.capacity = new_capacity

    def allocate(self, count: int) -> torch.Tensor:
        self.reserve(self.num_used + count)
        slots = torch.arange(self.num_used, self.num_used + count, dtype=torch.int64)
        self.num_used += count
        return slots

    def write_blocks(self, slots: torch.Tensor, blocks: torch.Tensor) -> None:
        """Write CPU blocks `[n, 2, block_tokens, head_dim]` at `slots` (ascending, usually one run)."""
        assert self.memmap is not None
        bits = to_numpy_bits(blocks.cpu())
        first, last = int(slots[0]), int(slots[-1])
        if last - first + 1 == slots.numel():
            self.memmap[first : last + 1] = bits
        else:
            self.memmap[slots.numpy()] = bits

    def read_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Token rows (see `MemoryArena.rows`) as a CPU tensor `[n, head_dim]`."""
        assert self.memmap is not None
        flat = self.memmap.reshape(-1, self.head_dim)
        return from_numpy_bits(flat[rows.numpy()], self.dtype)

    def used_bits(self) -> np.ndarray:
        """The used part of the file, `[num_used, 2, block_tokens, head_dim]` (for snapshots)."""
        if self.memmap is None:
            return np.zeros((0, 2, self.block_tokens, self.head_dim), dtype=self.np_dtype)
        return self.memmap[: self.num_used]

    def close(self) -> None:
        if self.memmap is not None:
            self.memmap.flush()
            self.memmap = None

    @property
    def file_bytes(self) -> int:
        return self.capacity * self.block_nbytes if os.path.exists(self.path) else 0
