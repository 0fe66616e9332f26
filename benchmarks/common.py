"""Shared helpers for benchmark reports: a machine description and table printing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence


def machine() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    try:
        with open("/proc/meminfo") as f:
            info["ram_gb"] = round(int(f.readline().split()[1]) / 1e6, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    return info


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
