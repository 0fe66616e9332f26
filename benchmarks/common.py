"""Shared helpers for benchmark reports: a machine description and table printing."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from vrex.host import machine_info as machine  # noqa: F401 - the benchmarks' name for it


def print_table(rows: Sequence[dict], columns: Sequence[str], file=sys.stdout) -> None:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)), file=file)


def emit(rows: list[dict], columns: Sequence[str], as_json: bool, out: str | None = None) -> None:
    """Print rows as JSON (``--json``) or as a table; optionally also save the JSON."""
    doc = json.dumps(rows, indent=1)
    if out:
        with open(out, "w") as f:
            f.write(doc + "\n")
    if as_json:
        print(doc)
    else:
        print_table(rows, columns)
