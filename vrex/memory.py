"""Memory sizing per device: the `--device-kv-budget auto` rule, unified memory, precision.

On a discrete GPU the device tier of the KV store is GPU memory and the host tier is pinned RAM.
On a Jetson (Tegra) CPU and GPU share one LPDDR5 pool: there the device tier is sized from
`MemAvailable` in /proc/meminfo, and a host tier would only copy bytes within the same DRAM, so
`host_tier_enabled()` is False and evicted pages go straight to the disk tier (NVMe).

Call `device_kv_budget_auto()` after the model is loaded: it sizes the device tier from what is
free at that moment, minus a stated headroom.
"""

from __future__ import annotations

import re
from pathlib import Path

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# Kept free for activations, the vision tower, allocator slack and (on Jetson) the OS and the
# rest of the process: the larger of the two wins.
DEFAULT_HEADROOM_BYTES = 1 * GiB
DEFAULT_HEADROOM_FRACTION = 0.10

# Module-level so tests can point them elsewhere.
MEMINFO_FILE = Path("/proc/meminfo")
TEGRA_RELEASE_FILE = Path("/etc/nv_tegra_release")
DEVICE_TREE_COMPATIBLE = Path("/proc/device-tree/compatible")


def read_meminfo(text: str | None = None) -> dict[str, int]:
    """/proc/meminfo as bytes per field ("MemTotal", "MemAvailable", ...)."""
    if text is None:
        text = MEMINFO_FILE.read_text()
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+(?:\(\w+\))?):\s+(\d+)(?:\s+kB)?\s*$", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if line.rstrip().endswith("kB") else 1)
    return out


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def resolve_device(device: str | object | None = "auto") -> str:
    """'cuda', 'cuda:1', 'cpu', 'mps' ...; 'auto'/None picks cuda when available."""
    if device is None or str(device) == "auto":
        torch = _torch()
        return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    return str(device)


def check_device(device: str) -> str:
    """`device` if torch can run on it here; otherwise a ValueError that says what to change."""
    import torch

    try:
        dev = torch.device(resolve_device(device))
    except RuntimeError as exc:
        raise ValueError(
            f"device {device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = (
                "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            )
            raise ValueError(
                f"device {device!r}: {built} (torch {torch.__version__}); install a CUDA build of torch "
                "(README, GPU users) or use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    return str(dev)


def is_tegra() -> bool:
    """A Jetson (Tegra SoC): its L4T release file, or a tegra device tree (containers may lack the file)."""
    if TEGRA_RELEASE_FILE.exists():
        return True
    return DEVICE_TREE_COMPATIBLE.exists() and b"nvidia,tegra" in DEVICE_TREE_COMPATIBLE.read_bytes()


def is_unified_memory(device: str | object | None = "auto") -> bool:
    """True on Jetson/Tegra (one DRAM pool for CPU and GPU) and on integrated CUDA GPUs."""
    if is_tegra():
        return True
    name = resolve_device(device)
    if name.startswith("cuda"):
        torch = _torch()
        if torch is not None and torch.cuda.is_available():
            return bool(getattr(torch.cuda.get_device_properties(torch.device(name)), "is_integrated", False))
    return False


def host_tier_enabled(device: str | object | None = "auto") -> bool:
    """Whether a separate host-RAM tier makes sense: not where host and device share memory.

    On a CPU-only machine the device tier already is host RAM, so there is no host tier either.
    """
    name = resolve_device(device)
    return name != "cpu" and not is_unified_memory(name)


def default_host_kv_budget(device: str | object | None, requested: int | None) -> int | None:
    """The host-tier budget a session uses: `requested` if given; else 0 (evict straight to
    disk) where the device tier already lives in host RAM, on the CPU and on a GPU that shares
    its DRAM with the CPU (Jetson): a host tier would hold the evicted pages in the very memory
    they left, and --device-kv-budget would not bound the RAM the KV cache takes; else None
    (unbounded host RAM below a discrete GPU)."""
    if requested is not None:
        return requested
    if not host_tier_enabled(device):
        return 0
    return None


def free_and_total_bytes(device: str | object | None = "auto") -> tuple[int, int, str]:
    """(free, total, where it came from) for the memory the device tier lives in."""
    name = resolve_device(device)
    if name.startswith("cuda") and not is_unified_memory(name):
        torch = _torch()
        if torch is None or not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
        dev = torch.device(name)
        free, total = torch.cuda.mem_get_info(dev)
        # Blocks torch has cached but not handed out are free for our KV tensors too.
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free), int(total), "torch.cuda.mem_get_info"
    info = read_meminfo()
    if "MemAvailable" not in info or "MemTotal" not in info:
        raise ValueError(f"{MEMINFO_FILE} has no MemAvailable/MemTotal; pass an explicit budget (e.g. 2GiB)")
    return info["MemAvailable"], info["MemTotal"], f"{MEMINFO_FILE} MemAvailable"


def device_kv_budget_auto(
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
    headroom_fraction: float = DEFAULT_HEADROOM_FRACTION,
    device: str | object | None = "auto",
) -> int:
    """Bytes for the device KV tier: free memory now, minus max(headroom_bytes, fraction x total).

    Free memory is `torch.cuda.mem_get_info` (plus torch's cached-but-unused blocks) on a discrete
    GPU, and `MemAvailable` from /proc/meminfo on a CPU or a unified-memory Jetson. Call it after
    the model is loaded. Never negative: 0 means "no room; the device tier holds nothing".
    """
    if headroom_bytes < 0:
        raise ValueError(f"headroom_bytes must be >= 0, got {headroom_bytes}")
    if not 0.0 <= headroom_fraction < 1.0:
        raise ValueError(f"headroom_fraction must be in [0, 1), got {headroom_fraction}")
    free, total, _ = free_and_total_bytes(device)
    reserve = max(int(headroom_bytes), int(headroom_fraction * total))
    return max(0, free - reserve)


# Binary multiples for the IEC units and for the bare K/M/G/T shorthands (as `docker --memory 2g`
# reads them); decimal multiples for KB/MB/GB/TB.
_BYTE_UNITS = {
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
    multiple = _BYTE_UNITS.get(unit.lower())
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


def parse_budget(value: str | int, field: str = "--device-kv-budget", **auto_kwargs) -> int:
    """Bytes from "auto", "2GiB", "512MB", "1.5g", "0" or an int.

    "auto" calls `device_kv_budget_auto(**auto_kwargs)`. KB/MB/GB are powers of 1000; KiB/MiB/GiB
    and bare K/M/G are powers of 1024.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return device_kv_budget_auto(**auto_kwargs)
    try:
        return parse_bytes(value)
    except ValueError as e:
        raise ValueError(f"{field}: {e}; or 'auto'") from None


def dtype_name_for(
    device_kind: str,
    capability: tuple[int, int] | None = None,
    integrated: bool = False,
    bf16_supported: bool = True,
) -> str:
    """The precision rule, without torch: "float32", "bfloat16" or "float16".

    - CPU: float32 (half-precision matmuls on CPU are slow or emulated).
    - Jetson (integrated CUDA, e.g. Orin sm_87): float16. Orin runs bf16, but JetPack's tuned
      kernels (cuDNN/TensorRT paths, SDPA) favour fp16; measure before switching.
    - Discrete CUDA with bf16 (Ampere sm_80 and newer): bfloat16 (no overflow risk in activations).
    - Older CUDA, MPS: float16.
    """
    if device_kind == "cpu":
        return "float32"
    if device_kind == "cuda":
        if integrated:
            return "float16"
        if capability is not None and capability >= (8, 0) and bf16_supported:
            return "bfloat16"
        return "float16"
    return "float16"


_DTYPE_ALIASES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}  # fmt: skip


DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")


def add_dtype_flag(parser) -> None:
    """`--dtype`, for the commands that load a model (argparse names the choices on a typo)."""
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="weights and KV precision; auto: float32 on CPU, bfloat16 on discrete GPUs, float16 on Jetson",
    )


def dtype_name(value: str) -> str:
    """The torch dtype name `value` stands for (fp32/float32, fp16/half, bf16, ...), or "auto"."""
    if str(value).lower() == "auto":
        return "auto"
    name = _DTYPE_ALIASES.get(str(value).lower())
    if name is None:
        raise ValueError(f"dtype: unknown {value!r}; use one of auto, fp32, fp16, bf16")
    return name


def choose_dtype(device: str | object | None = "auto", override: str | None = None):
    """torch dtype for weights and KV on `device` (see `dtype_name_for`); `override` forces one."""
    import torch

    name = "auto" if override is None else dtype_name(override)
    if name != "auto":
        return getattr(torch, name)
    dev = torch.device(resolve_device(device))
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name = dtype_name_for(
            "cuda",
            (props.major, props.minor),
            integrated=is_unified_memory(str(dev)),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        name = dtype_name_for(dev.type)
    return getattr(torch, name)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of one token across all layers: 2 x layers x kv_heads x head_dim x bytes."""
    checks = {
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "dtype_bytes": dtype_bytes,
    }
    for name, v in checks.items():
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes
