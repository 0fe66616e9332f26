"""Tier capacities of the KV store (sizes may be written like `--device-kv-budget 2GiB`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vrex.memory import parse_bytes


@dataclass(frozen=True)
class TierBudgets:
    """Capacity of each KV tier in bytes; None means unbounded.

    A size may also be given as a string ("2GiB"); it is parsed on construction.
    `host_bytes=0` sends evictions from the device straight to disk.
    `disk_dir` is where the store makes its session folder of memory-mapped files; None uses
    the system temp folder (created only when the disk tier is first needed).
    """

    device_bytes: int | None = None
    host_bytes: int | None = None
    disk_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                parsed = parse_bytes(value)
            except ValueError as err:
                raise ValueError(f"TierBudgets.{name}: {err}") from None
            object.__setattr__(self, name, parsed)
