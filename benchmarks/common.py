"""Shared helpers for benchmark reports: tables, and the size check benchmarks run before their
(long) work. The machine description, strict JSON and output-path checks are `vrex.host`'s
(every command uses them)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from vrex.host import dumps, write_text
from vrex.limits import MAX_FRAME_PIXELS


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """(width, height) from "WxH", e.g. "320x240"; a ValueError naming `flag` otherwise."""
    parts = str(text).lower().split("x")
    try:
        w, h = (int(v) for v in parts)
    except ValueError:
        raise ValueError(f"{flag} must be WIDTHxHEIGHT in pixels, e.g. 320x240, got {text!r}") from None
    # the synthetic source's floor, and the server's frame limit (4K)
    if w < 8 or h < 8 or w * h > MAX_FRAME_PIXELS:
        raise ValueError(
            f"{flag} must be at least 8x8 and at most {MAX_FRAME_PIXELS} pixels in area, got {text!r}"
        )
    return w, h


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
    doc = dumps(rows, indent=1)
    if out:
        write_text(out, doc + "\n")
    if as_json:
        print(doc)
    else:
        print_table(rows, columns)
