"""Configuration of a simulated system and of the workload scenario.

Frozen dataclasses, loaded from YAML (`sim/systems/*.yaml`; the model may come from a Hugging
Face config.json, sim/hf.py), overridable by dotted name
(`memory.link_bandwidth_gbps=8`), validated against documented ranges, with a stable hash
so sweeps can cache results. Architecture lives here; technology numbers (energy per action,
area per unit) live in `sim/data/tech_14nm.yaml`; the timing core emits action counts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from sim.tech import FRACTION_UNIT, load_entries

SYSTEMS_DIR = Path(__file__).parent / "systems"
BUILTIN_SYSTEMS = ("vrex8", "vrex48", "agx-orin", "a100")
POLICIES = ("resv", "flexgen", "infinigen", "infinigen_p", "rekv", "full")
STAGES = ("frame", "text", "decode", "e2e")
PREFETCH_MODES = ("never", "text", "always")


@dataclass(frozen=True)
class ModelConfig:
    """LLM backbone + vision tower. Defaults: VideoLLM-online (Llama-3-8B + SigLIP-L/16-384)."""

    name: str = "videollm-online-llama3-8b"
    num_layers: int = 32
    hidden_size: int = 4096
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 14336
    vocab_size: int = 128256
    tokens_per_frame: int = 10  # CLS + 3x3 pooled patches (VideoLLM-online live1+)
    dtype_bytes: int = 2  # BF16 weights, activations and KV
    vision_layers: int = 24
    vision_hidden_size: int = 1024
    vision_intermediate_size: int = 4096
    vision_tokens: int = 577  # 24x24 patches + CLS at 384 px
    projector_hidden_size: int = 4096  # 2-layer MLP vision_hidden -> hidden -> hidden
    ffn_gated: bool = True  # SwiGLU/GeGLU: gate, up and down matrices; False: up and down (GPT-2, OPT)
    tie_word_embeddings: bool = False  # the LM head reuses the embedding matrix (held once)
    # what the model's source did not say and was assumed (sim/hf.py); reported with each run
    source_notes: tuple[str, ...] = ()

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer, all KV heads (bytes)."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token_head(self) -> int:
        """K and V of one token in one layer and one KV head (bytes)."""
        return 2 * self.head_dim * self.dtype_bytes

    @property
    def ffn_matrices(self) -> int:
        return 3 if self.ffn_gated else 2

    @property
    def layer_weights(self) -> int:
        """Weights of one LLM layer's projections: QKV, output and FFN (count, not bytes)."""
        d, hd = self.hidden_size, self.head_dim
        attention = d * (self.num_heads + 2 * self.num_kv_heads) * hd + self.num_heads * hd * d
        return attention + self.ffn_matrices * d * self.intermediate_size

    @property
    def weight_bytes(self) -> int:
        """Every weight held in device DRAM: LLM layers, embedding and LM head (once if tied),
        vision tower and projector (bytes)."""
        d = self.hidden_size
        dv = self.vision_hidden_size
        tower = self.vision_layers * (4 * dv * dv + 2 * dv * self.vision_intermediate_size)
        projector = (
            (dv * self.projector_hidden_size + self.projector_hidden_size * d) if self.vision_layers else 0
        )
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * d
        params = self.num_layers * self.layer_weights + embeddings + tower + projector
        return params * self.dtype_bytes


FITTED_MAX_HISTORY_TOKENS = 80_000  # longest history of the paper's figures (Fig. 4b)


@dataclass(frozen=True)
class ResvConfig:
    """Synthetic ReSV statistics used when no trace is given (see sim/workload.py).

    selected(H) = min(H, ratio_ref * H_ref * (H / H_ref) ** exponent), per stage;
    the paper's Table II gives the average ratios. Frames: growth_exponent < 1 says
    selection grows slower than history (calibrated to Fig. 13's latencies); text steps:
    text_growth_exponent = 1 keeps Table II's ratio at every history (see workload.py).
    Fitted to the paper's 1K-80K histories (FITTED_MAX_HISTORY_TOKENS); a run beyond says so.
    """

    frame_ratio: float = 0.327  # Table II ReSV average, frame stage
    text_ratio: float = 0.025  # Table II ReSV average, text stage
    reference_history_tokens: int = 10000
    growth_exponent: float = 0.10
    text_growth_exponent: float = 1.0  # 1: Table II's text ratio at every history
    tokens_per_cluster: float = 32.0  # paper: 1.67% HC overhead at 32 tokens per cluster
    early_exit_fraction: float = 0.16  # WTU: mean fraction of a row processed before exit
    layer_ratio_min: float = 0.042  # Fig. 20 per-layer range
    layer_ratio_max: float = 0.44
    hash_bits: int = 32
    seed: int = 0


@dataclass(frozen=True)
class AcceleratorConfig:
    """V-Rex cores: LXE (DPE + VPE + SRAM) and DRE (HCU, WTU, KVMU) per core."""

    num_cores: int = 8
    clock_mhz: float = 800.0
    dpe_trees: int = 64
    dpe_tree_width: int = 64
    vpe_width: int = 64
    # Per core: a double-buffered weight tile and two ping-pong activation halves; an
    # activation that does not fit a half spills to DRAM (Lxe.spill_bytes), e.g. the vision
    # tower's.
    sram_kb: float = 384.0
    hcu_width: int = 16
    wtu_width: int = 16
    hcu_buffer_bytes: int = 4224  # current hash bits 128 B + key-cache hash bits 4 KB
    wtu_buffer_bytes: int = 16384  # score memory 8 KB + token-count memory 8 KB
    # Fraction of DPE peak reached on GEMMs with many rows (vision tower): the MAC-tree
    # dataflow is built for GEMV; calibrated so the 1K frame matches Fig. 13 (documented).
    gemm_utilization: float = 0.25
    sync_cycles: int = 200  # per-op all-gather/reduce between cores (tensor parallel)
    pipeline_fill_cycles: int = 16  # MAC-tree depth + SRAM latency, paid once per op
    use_hcu: bool = True  # False: ReSV without clustering (score every key)
    use_wtu: bool = True  # False: WiCSum sort runs on the VPE
    use_kvmu: bool = True  # False: no cluster-contiguous layout, token-granular fetch
    # Speculative selection one layer ahead, so the fetch overlaps the layer's compute:
    # "text" = in text steps only (question, decode); frames select exactly (CALIBRATION.md).
    prefetch_next_layer: str = "text"
    # Batch schedule: 0 = the scheduler tries 1 group (lockstep, weights once per layer) and
    # 2 groups (ping-pong: one group's fetch overlaps the other's compute) and keeps the
    # faster; N > 0 forces N stream groups (sim/timing.py, stream_group_candidates).
    stream_groups: int = 0


@dataclass(frozen=True)
class GpuConfig:
    """GPU baseline as a calibrated roofline (sim/gpu.py)."""

    peak_tflops: float = 26.7  # dense BF16/FP16 tensor
    compute_efficiency: float = 0.5
    dram_efficiency: float = 0.45
    kernel_launch_us: float = 10.0
    kernels_per_layer: int = 14
    power_w: float = 40.0  # module/board power while kernels run
    idle_power_w: float = 7.0  # while the GPU only waits for PCIe fetches
    # Token-level prediction (InfiniGen-style top-k, ReSV in software): data-dependent
    # kernels run far below roofline on a GPU.
    topk_elements_per_us: float = 300.0
    partial_key_fraction: float = 0.3  # InfiniGen: fraction of key dims kept for prediction
    irregular_ops_per_us: float = 2000.0  # hashing/clustering/thresholding in software


# What an offload tier does when its fields are unset. SSD: Kioxia BG6 datasheet (the paper's
# SSD power source), 6,000 MB/s sequential and 850K IOPS 4 KiB random read; the datasheet gives
# no latency: 50 us is a client PCIe 4.0/5.0 SSD's QD1 4 KiB random read (~80 MB/s). Host:
# 8-channel DDR4-3200 (one socket), ~100 ns to the first byte, 4 KiB row gathers by a DMA
# engine far above PCIe's request rate.
OFFLOAD_TIERS: dict[str, dict[str, float]] = {
    "ssd": {"read_bandwidth_gbps": 6.0, "read_latency_us": 50.0, "random_read_iops": 850_000.0},
    "host": {"read_bandwidth_gbps": 204.8, "read_latency_us": 0.1, "random_read_iops": 1.0e8},
}


@dataclass(frozen=True)
class MemoryConfig:
    """Device DRAM, the PCIe link and the offload tier (SSD or host DRAM)."""

    dram_type: str = "lpddr5"
    dram_bandwidth_gbps: float = 204.8
    dram_efficiency: float = 0.85
    dram_capacity_gb: float = 32.0
    link_bandwidth_gbps: float = 4.0  # PCIe 3.0 x4 as in Table I
    link_lanes: int = 4  # link power only (W per lane); the rate is link_bandwidth_gbps
    link_efficiency: float = 0.85
    link_request_latency_us: float = 10.0  # per request, pipelined (one per burst group)
    offload_tier: str = "ssd"  # "ssd" or "host"
    # The offload tier serves reads on its own (sim/timing.py OffloadTier); the link forwards
    # each read's data as it arrives. Unset (None): the tier's own figures, OFFLOAD_TIERS.
    offload_read_bandwidth_gbps: float | None = None
    offload_read_latency_us: float | None = None
    # Without the KVMU (ablation) the offloaded KV is read a token row at a time (one
    # request per token and layer); the tier's small-read rate caps that.
    offload_random_read_iops: float | None = None
    # a bulk read's command size (a common NVMe MDTS), the unit the link forwards: smaller
    # chunks start the link sooner, but each is one read, under the tier's request rate
    offload_chunk_kib: float = 128.0
    recent_window_tokens: int = 5000  # KVMU keeps the newest tokens in device DRAM

    def offload(self, name: str) -> float:
        """An offload-tier figure (`read_bandwidth_gbps`, `read_latency_us`,
        `random_read_iops`): the field if set, else the tier's default."""
        value = getattr(self, f"offload_{name}")
        return OFFLOAD_TIERS[self.offload_tier][name] if value is None else value

    def offload_read_bytes_per_s(self, request_bytes: float | None = None) -> float:
        """Read rate of the offload tier: its bandwidth, or what its request rate allows for
        reads of `request_bytes` each (default: a bulk read's chunks) if that is lower."""
        size = self.offload_chunk_kib * 1024 if request_bytes is None else request_bytes
        return min(self.offload("read_bandwidth_gbps") * 1e9, self.offload("random_read_iops") * size)

    def fetch_bytes_per_s(self, request_bytes: float | None = None) -> float:
        """Sustained rate of offload tier -> link -> device: the slower of the two stages."""
        link = self.link_bandwidth_gbps * 1e9 * self.link_efficiency
        return min(link, self.offload_read_bytes_per_s(request_bytes))


# One optional field per technology-table entry (sim/data/tech_14nm.yaml): None takes the
# table's value at the system's corner; a number pins that entry (`tech.lpddr5_energy_pj_per_bit=5`).
TechOverrides = dataclasses.make_dataclass(
    "TechOverrides",
    [(name, "float | None", field(default=None)) for name in load_entries()],
    frozen=True,
)
TechOverrides.__module__ = __name__  # so configs pickle (sweep worker processes)


@dataclass(frozen=True)
class SystemConfig:
    name: str = "vrex8"
    kind: str = "vrex"  # "vrex" or "gpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    resv: ResvConfig = field(default_factory=ResvConfig)
    accel: AcceleratorConfig = field(default_factory=AcceleratorConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    tech_corner: str = "nominal"
    tech: TechOverrides = field(default_factory=TechOverrides)


@dataclass(frozen=True)
class Scenario:
    """What to simulate. kv_tokens is the pre-existing history per stream."""

    kv_tokens: int = 40000
    batch: int = 1
    stage: str = "frame"  # frame | text | decode | e2e
    policy: str = "resv"
    frames: int = 26  # COIN average scenario (e2e)
    question_tokens: int = 25
    answer_tokens: int = 39
    trace: str | None = None  # path of a vrex.trace/1 JSON-lines file


# Allowed ranges: (low, high) inclusive; or a tuple of allowed strings.
RANGES: dict[str, Any] = {
    "kind": ("vrex", "gpu"),
    "tech_corner": ("low", "nominal", "high"),
    "model.num_layers": (1, 512),
    "model.hidden_size": (16, 65536),
    "model.num_heads": (1, 512),
    "model.num_kv_heads": (1, 512),
    "model.head_dim": (8, 1024),
    "model.intermediate_size": (16, 262144),
    "model.vocab_size": (1, 1_000_000),
    "model.tokens_per_frame": (1, 10000),
    "model.dtype_bytes": (1, 4),
    "model.vision_layers": (0, 128),
    "model.vision_hidden_size": (0, 16384),
    "model.vision_intermediate_size": (0, 65536),
    "model.vision_tokens": (0, 100000),
    "model.projector_hidden_size": (0, 65536),
    "resv.frame_ratio": (0.0, 1.0),
    "resv.text_ratio": (0.0, 1.0),
    "resv.reference_history_tokens": (1, 10_000_000),
    "resv.growth_exponent": (0.0, 1.0),
    "resv.text_growth_exponent": (0.0, 1.0),
    "resv.tokens_per_cluster": (1.0, 4096.0),
    "resv.early_exit_fraction": (0.0, 1.0),
    "resv.layer_ratio_min": (0.0, 1.0),
    "resv.layer_ratio_max": (0.0, 1.0),
    "resv.hash_bits": (1, 1024),
    "resv.seed": (0, 2**31),
    "accel.num_cores": (1, 1024),
    "accel.clock_mhz": (10.0, 10000.0),
    "accel.dpe_trees": (1, 4096),
    "accel.dpe_tree_width": (1, 4096),
    "accel.vpe_width": (1, 4096),
    "accel.sram_kb": (1.0, 1_048_576.0),  # and twice the double-buffered weight tile (validate)
    "accel.hcu_width": (1, 1024),
    "accel.wtu_width": (1, 1024),
    "accel.hcu_buffer_bytes": (0, 1 << 30),
    "accel.wtu_buffer_bytes": (0, 1 << 30),
    "accel.gemm_utilization": (0.01, 1.0),
    "accel.sync_cycles": (0, 1_000_000),
    "accel.pipeline_fill_cycles": (0, 100_000),
    "accel.stream_groups": (0, 4096),
    "gpu.peak_tflops": (0.1, 10000.0),
    "gpu.compute_efficiency": (0.01, 1.0),
    "gpu.dram_efficiency": (0.01, 1.0),
    "gpu.kernel_launch_us": (0.0, 1000.0),
    "gpu.kernels_per_layer": (0, 1000),
    "gpu.power_w": (0.1, 5000.0),
    "gpu.idle_power_w": (0.0, 5000.0),
    "gpu.topk_elements_per_us": (1.0, 1e9),
    "gpu.partial_key_fraction": (0.0, 1.0),
    "gpu.irregular_ops_per_us": (1.0, 1e9),
    "accel.prefetch_next_layer": PREFETCH_MODES,
    "memory.dram_type": ("lpddr5", "hbm2e"),
    "memory.dram_bandwidth_gbps": (1.0, 100000.0),
    "memory.dram_efficiency": (0.01, 1.0),
    "memory.dram_capacity_gb": (0.1, 100000.0),
    "memory.link_bandwidth_gbps": (0.1, 10000.0),
    "memory.link_lanes": (1, 64),
    "memory.link_efficiency": (0.01, 1.0),
    "memory.link_request_latency_us": (0.0, 100000.0),
    "memory.offload_tier": ("ssd", "host"),
    "memory.offload_read_bandwidth_gbps": (0.01, 100000.0),
    "memory.offload_read_latency_us": (0.0, 100000.0),
    "memory.offload_random_read_iops": (1e3, 1e12),
    "memory.offload_chunk_kib": (4.0, 1048576.0),
    "memory.recent_window_tokens": (0, 100_000_000),
    "kv_tokens": (0, 100_000_000),
    "batch": (1, 4096),
    "stage": STAGES,
    "policy": POLICIES,
    "frames": (1, 1_000_000),
    "question_tokens": (0, 1_000_000),
    "answer_tokens": (0, 1_000_000),
}
RANGES.update(
    {
        f"tech.{name}": (0.0, 1.0) if entry.unit.startswith(FRACTION_UNIT) else (0.0, float("inf"))
        for name, entry in load_entries().items()
    }
)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def config_hash(*objs: Any) -> str:
    """Stable 16-hex-digit hash of configs (sorted JSON of their fields)."""
    payload = json.dumps([to_dict(o) if is_dataclass(o) else o for o in objs], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _coerce(path: str, current: Any, value: Any, annotation: str = "") -> Any:
    """Convert a CLI string to the type of the field it replaces."""
    annotation = str(annotation)
    if "None" in annotation and (value is None or str(value).strip().lower() in ("", "none", "null")):
        return None  # an optional field set back to unset
    if current is None and annotation.startswith("float"):
        current = 0.0  # an unset optional number: coerce as a number
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{path}: expected true/false, got {value!r}")
    if isinstance(value, bool) and isinstance(current, int | float):
        raise ValueError(f"{path}: expected a number, got {value!r}")  # YAML `true` is not 1
    if isinstance(current, int) and not isinstance(current, bool):
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        return int(as_float)
    if isinstance(current, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: expected a number, got {value!r}") from None
    if current is None or isinstance(current, str):
        return None if value is None else str(value)
    raise ValueError(f"{path}: cannot set a field of type {type(current).__name__}")


def override(obj: Any, path: str, value: Any, _prefix: str = "") -> Any:
    """Return a copy of a (nested) frozen dataclass with the dotted field `path` set."""
    head, _, rest = path.partition(".")
    full = f"{_prefix}{path}"
    names = {f.name for f in fields(obj)}
    if head not in names:
        raise ValueError(f"unknown config field {full!r}; known fields here: {', '.join(sorted(names))}")
    current = getattr(obj, head)
    if rest:
        if not is_dataclass(current):
            raise ValueError(f"{_prefix}{head!r} has no sub-fields (tried to set {full!r})")
        return replace(obj, **{head: override(current, rest, value, f"{_prefix}{head}.")})
    if is_dataclass(current):
        if not isinstance(value, dict):
            raise ValueError(f"{full}: expected a mapping of sub-fields")
        for key, sub in value.items():
            current = override(current, key, sub, f"{full}.")
        return replace(obj, **{head: current})
    annotation = next(f.type for f in fields(obj) if f.name == head)
    return replace(obj, **{head: _coerce(full, current, value, annotation)})


def apply_overrides(obj: Any, items: dict[str, Any] | list[str] | None) -> Any:
    """Apply {dotted: value} or ["dotted=value", ...] overrides, then validate."""
    if not items:
        return obj
    if isinstance(items, list):
        parsed: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--set expects field=value, got {item!r}")
            parsed[key.strip()] = value.strip()
        items = parsed
    for key, value in items.items():
        obj = override(obj, key, value)
    validate(obj)
    return obj


def _walk(obj: Any, prefix: str = ""):
    for f in fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if is_dataclass(value):
            yield from _walk(value, path + ".")
        else:
            yield path, value


def weight_tiles_bytes(system: SystemConfig) -> int:
    """A core's double-buffered weight tile: 2 x accel.dpe_trees x accel.dpe_tree_width x
    model.dtype_bytes (the weights stream through it; the rest of the SRAM holds activations)."""
    a = system.accel
    return 2 * a.dpe_trees * a.dpe_tree_width * system.model.dtype_bytes


class InfeasibleDesign(ValueError):
    """A design that cannot work although each field is in range (too little SRAM for its
    weight tiles, too little DRAM for its model): a sweep records the point as infeasible."""


def validate(obj: Any, prefix: str = "", fields_only: bool = False) -> None:
    """Raise ValueError naming the first field outside its allowed range (after `prefix`,
    e.g. the file that set it). `fields_only`: skip the checks across fields (a file in a
    `base:` chain may be fixed by the files or --set after it)."""
    for path, value in _walk(obj):
        allowed = RANGES.get(path)
        if allowed is None or value is None:
            continue
        if isinstance(allowed[0], str):
            if value not in allowed:
                raise ValueError(
                    f"{prefix}{path}={value!r} is not allowed; choose one of {', '.join(allowed)}"
                )
            continue
        low, high = allowed
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}{path}={value} must be a finite number in [{low}, {high}]")
        if not (low <= value <= high):
            raise ValueError(f"{prefix}{path}={value} is out of range; allowed range is [{low}, {high}]")
    if isinstance(obj, SystemConfig) and not fields_only:
        _check_fields_apply(obj, prefix)
        m, r = obj.model, obj.resv
        if m.num_heads % m.num_kv_heads:
            raise ValueError(
                f"{prefix}model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}"
            )
        if r.layer_ratio_min > r.layer_ratio_max:
            raise ValueError(f"{prefix}resv.layer_ratio_min must be <= resv.layer_ratio_max")
        a = obj.accel
        weight_tiles_kb = weight_tiles_bytes(obj) / 1024
        if a.sram_kb < 2 * weight_tiles_kb:
            raise InfeasibleDesign(
                f"{prefix}accel.sram_kb={a.sram_kb:g} is too small: it must be at least "
                f"{2 * weight_tiles_kb:g} KB, twice the double-buffered weight tile ({weight_tiles_kb:g} KB = "
                "2 x accel.dpe_trees x accel.dpe_tree_width x model.dtype_bytes), the rest holding activations"
            )


# The technology entries a GPU baseline's energy uses (sim/cost.py link_offload_energy_mj);
# its module power is gpu.power_w / gpu.idle_power_w.
GPU_TECH_ENTRIES = ("pcie_w_per_lane", "ssd_active_w", "ssd_idle_w", "ddr4_energy_pj_per_bit")


def field_applies(kind: str, path: str) -> bool:
    """Whether a system of `kind` reads the dotted field: a V-Rex system has no GPU roofline;
    a GPU baseline has no accelerator, no DRAM efficiency of its own (gpu.dram_efficiency)
    and no per-action energies (its module power is gpu.power_w / gpu.idle_power_w)."""
    if kind == "gpu":
        if path.startswith("accel.") or path == "memory.dram_efficiency":
            return False
        return not path.startswith("tech.") or path.removeprefix("tech.") in GPU_TECH_ENTRIES
    return not path.startswith("gpu.")


@functools.lru_cache(maxsize=1)
def _default_fields() -> dict[str, Any]:
    return dict(_walk(SystemConfig()))  # validate() runs once per sweep point


def _check_fields_apply(system: SystemConfig, prefix: str = "") -> None:
    """Refuse fields set on a system whose kind never reads them (they would change nothing)."""
    defaults = _default_fields()
    unused = [
        f"{path}={value!r}"
        for path, value in _walk(system)
        if not field_applies(system.kind, path) and value != defaults[path]
    ]
    if unused:
        other = "V-Rex" if system.kind == "gpu" else "GPU"
        message = (
            f"{prefix}{', '.join(unused)}: not read by {system.name!r}, a {system.kind} system; drop "
            f"{'it' if len(unused) == 1 else 'them'} or pick a {other} system"
        )
        if system.kind == "gpu":
            message += f"; of the technology table a GPU baseline reads only {', '.join(GPU_TECH_ENTRIES)}"
        message += "; a field set by a `base:` file comes with it: base a file on a system of its own kind"
        raise ValueError(message)


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    obj = cls()
    return override_many(obj, data, prefix)


def override_many(obj: Any, data: dict[str, Any], prefix: str = "") -> Any:
    for key, value in (data or {}).items():
        try:
            obj = override(obj, key, value)
        except ValueError as exc:
            raise ValueError(f"{prefix}{exc}") from None
    return obj


def with_hf_model(system: SystemConfig, hf_config: str | None, relative_to: Path = Path(".")) -> SystemConfig:
    """The system running the model a Hugging Face config.json (or model folder) describes."""
    if not hf_config:
        return system
    from sim.hf import model_from_hf  # sim.hf builds on ModelConfig

    path = Path(hf_config).expanduser()
    return replace(
        system, model=model_from_hf(path if path.is_absolute() else relative_to / path, system.model)
    )


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what PyYAML could not parse, on one line: " at line 4, column 7: mapping values
    are not allowed here". Its own text names the file "<unicode string>" and spans lines."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:  # no position to report: its words, on one line
        return ": " + " ".join(str(exc).split())
    text = f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"  # marks count from 0
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:  # e.g. where the unclosed bracket opened
        text += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        text += f" ({context})"
    return text


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file's top-level mapping; every way it can be unreadable is a ValueError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a YAML file of {what}")
    if not path.exists():
        raise FileNotFoundError(f"YAML file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML{_yaml_problem(exc)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file; expected YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a mapping of {what} (key: value lines), got a {type(data).__name__}"
        )
    return data


def load_system(
    name_or_path: str,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    relative_to: Path | None = None,
    complete: bool = True,
    _chain: tuple[Path, ...] = (),
) -> SystemConfig:
    """Load a built-in system by name or a YAML file; a YAML file may say `base: vrex8` (or a
    file beside it) and `hf_config: path/to/config.json` (the model; `model:` fields still
    override it). `complete=False`: more overrides follow, so only single fields are
    checked here (the caller validates the final system)."""
    path = Path(name_or_path)
    if name_or_path in BUILTIN_SYSTEMS:
        path = SYSTEMS_DIR / f"{name_or_path}.yaml"
    elif relative_to is not None and not path.is_absolute() and (relative_to / path).exists():
        path = relative_to / path  # a base named by a YAML file is found beside it
    elif not path.exists():
        if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
            raise ValueError(f"YAML file not found: {name_or_path}")
        raise ValueError(
            f"unknown system {name_or_path!r}: use one of {', '.join(BUILTIN_SYSTEMS)} or a YAML file path"
        )
    path = path.resolve()
    if path in _chain:
        names = " -> ".join(p.name for p in (*_chain, path))
        raise ValueError(
            f"`base:` files name each other in a loop ({names}); end the chain at a built-in system"
        )
    data = read_yaml_mapping(path, "config fields")
    if name_or_path not in BUILTIN_SYSTEMS:
        data.setdefault("name", path.stem)  # a file's system is named after it unless it says
    base = data.pop("base", None)
    system = (
        load_system(str(base), relative_to=path.parent, complete=False, _chain=(*_chain, path))
        if base
        else SystemConfig()
    )
    system = with_hf_model(system, data.pop("hf_config", None), path.parent)
    prefix = f"{path.name}: "
    system = override_many(system, data, prefix=prefix)
    validate(system, prefix, fields_only=True)
    system = apply_overrides(system, overrides)
    validate(system, fields_only=not complete)
    return system


def make_scenario(**kwargs: Any) -> Scenario:
    scenario = override_many(Scenario(), {k: v for k, v in kwargs.items() if v is not None})
    validate(scenario)
    return scenario
