"""Tier capacities of the KV store, and byte-size parsing for settings like `--device-kv-budget 2GiB`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# Binary multiples for the IEC units and for the bare K/M/G/T shorthands (as `docker --memory 2g`
# reads them); decimal multiples for KB/MB/GB/TB.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """Parse a byte count such as "2GiB", "512MiB", "1.5GB", "1e9" or "4096".

    Args:
        text: a number with an optional unit: B; KiB/MiB/GiB/TiB (1024-based); KB/MB/GB/TB
            (1000-based); K/M/G/T alone are 1024-based. Units are case-insensitive. An int is
            returned unchanged (after a sign check).

    Returns:
        The size in bytes, rounded down to a whole byte.

    Raises:
        ValueError: naming the value when it is not a non-negative size.
    """
    if isinstance(text, bool):
        raise ValueError(f"byte size must be a number with an optional unit, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"byte size must not be negative, got {text!r}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"byte size must be a string like '2GiB' or '4096', got {text!r}")
    match = _BYTES_RE.match(text)
    if match is None:
        raise ValueError(f"cannot read {text!r} as a byte size; write e.g. '2GiB', '512MiB', '1e9' or '4096'")
    number, unit = match.groups()
    multiple = _UNITS.get(unit.lower())
    if multiple is None:
        raise ValueError(
            f"unknown unit {unit!r} in byte size {text!r}; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
        )
    value = float(number) * multiple
    if value > 2**62:
        raise ValueError(f"byte size {text!r} is too large")
    if unit == "" and value != int(value):
        raise ValueError(f"byte size {text!r} is not a whole number of bytes")
    return int(value)


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
