"""The machine a measurement ran on, recorded with every result, and the report-writing
helpers every command shares: strict JSON, output paths checked before a long run."""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

# The checkout this package was imported from (vrex/ and benchmarks/ sit side by side in it).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def machine_info() -> dict:
    """What a measurement ran on: CPU, cores, RAM, Python, torch, GPU, commit, and on a Jetson
    its power mode and clocks (results are only comparable at the same mode)."""
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
    from vrex.power import power_mode_info

    if (mode := power_mode_info()) is not None:  # a Jetson: nvpmodel mode, L4T release, clocks
        info["power_mode"] = mode
    info["commit"] = package_commit()
    return info


def package_commit(root: Path = PACKAGE_ROOT) -> str:
    """Short commit of the checkout holding the package, wherever the command runs from; "" when
    the package is not a git checkout (an installed wheel, or a venv inside someone else's repo)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = done.stdout.splitlines()  # a checkout path may hold spaces
    if done.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root.resolve():
        return ""
    return lines[1]


def _finite(value):
    """`value` with every NaN/inf float replaced by None (strict JSON has no NaN); numpy
    scalars become plain numbers."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(obj, **kwargs) -> str:
    """json.dumps for reports: NaN and infinities become null, so strict parsers read the output."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def check_output_path(path: str | os.PathLike | None, flag: str, *, folder: bool = False) -> None:
    """Fail now, naming `flag`, when `path` could not be written at the end of a long run.

    A file (folder=False) must not be a folder, and its nearest existing parent must be a
    writable folder (missing folders are created when the file is written). With folder=True
    `path` is a folder that exists or can be created. None or "" (the flag not given) passes.
    """
    if not path:
        return
    p = Path(path).expanduser()
    if p.exists():
        if folder and not p.is_dir():
            raise ValueError(f"{flag} {path}: is a file, not a folder")
        if not folder and p.is_dir():
            raise ValueError(f"{flag} {path}: is a folder; give a file path, e.g. {p / 'results.json'}")
        why = _cannot_write(p, folder)
        if why:
            raise ValueError(f"{flag} {path}: not writable ({why})")
        return
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    why = _cannot_write(parent, True)
    if why:
        raise ValueError(f"{flag} {path}: cannot create it in {parent} ({why})")


def _cannot_write(path: Path, folder: bool) -> str | None:
    """Why `path` cannot be written, or None. It tries, as os.access says yes to root even where
    writes fail: a temporary file in a folder, or an append-open of a file (nothing written)."""
    try:
        if folder:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".vrex-write-test-"):
                pass
        else:
            with open(path, "a"):
                pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def write_text(path: str | os.PathLike, text: str, mode: str = "w") -> None:
    """Write (or append) `text`, creating missing parent folders as `check_output_path` allows."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, mode) as f:
        f.write(text)


def check_at_least(*checks: tuple[str, float | None, float]) -> None:
    """(flag, value, least) triples: a ValueError naming the first flag below its least value.
    None means the flag was not given (its default applies), so it passes."""
    for flag, value, least in checks:
        if value is not None and value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
