"""The machine a benchmark ran on, recorded with every result."""

from __future__ import annotations

import os
import platform
import subprocess
import sys


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
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    return info
