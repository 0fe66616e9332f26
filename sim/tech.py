"""Technology table: per-action energies, per-unit areas, leakage (sim/data/tech_14nm.yaml).

Each entry carries value, unit, node, source and a low/high range; a corner picks the value,
low or high column for every entry at once (`--tech-corner`). A system may pin single entries
(`tech.<entry>=value`, SystemConfig.tech); a pinned entry keeps its value at every corner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import yaml

TECH_FILE = Path(__file__).parent / "data" / "tech_14nm.yaml"
CORNERS = ("low", "nominal", "high")
REQUIRED_KEYS = ("value", "unit", "node", "source", "low", "high")
FRACTION_UNIT = "fraction"  # entries whose unit starts with this are bounded to [0, 1]


@dataclass(frozen=True)
class TechEntry:
    name: str
    value: float
    unit: str
    node: str
    source: str
    low: float
    high: float


@lru_cache(maxsize=4)
def load_entries(path: str = str(TECH_FILE)) -> dict[str, TechEntry]:
    data = yaml.safe_load(Path(path).read_text())
    entries = {}
    for name, raw in (data.get("entries") or {}).items():
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise ValueError(f"{path}: entry {name!r} must specify {', '.join(missing)}")
        entry = TechEntry(name=name, **{k: raw[k] for k in REQUIRED_KEYS})
        if not (entry.low <= entry.value <= entry.high):
            raise ValueError(
                f"{path}: entry {name!r} value {entry.value} outside [{entry.low}, {entry.high}]"
            )
        entries[name] = entry
    return entries


def tech_values(corner: str = "nominal", path: str = str(TECH_FILE)) -> dict[str, float]:
    """Return {entry name: number} for a corner (low | nominal | high)."""
    if corner not in CORNERS:
        raise ValueError(f"tech corner {corner!r} is not allowed; choose one of {', '.join(CORNERS)}")
    attr = "value" if corner == "nominal" else corner
    return {name: float(getattr(e, attr)) for name, e in load_entries(path).items()}


def pinned(system) -> dict[str, float]:
    """The entries a system pins (`tech.<entry>=value`), whatever its corner."""
    return {k: float(v) for k, v in asdict(system.tech).items() if v is not None}


def tech_for(system) -> dict[str, float]:
    """The numbers one system runs with: its corner's column, then its pinned entries."""
    return tech_values(system.tech_corner) | pinned(system)
