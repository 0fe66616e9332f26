"""Engine and session settings (frozen)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vrex.limits import MAX_FPS, MAX_NEW_TOKENS, sampling_error
from vrex.memory import dtype_name
from vrex.resv import POLICIES, ResvConfig, preset


@dataclass(frozen=True)
class SessionSettings:
    """What a client chooses per session."""

    fps: float = 2.0
    policy: str = "resv"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    resv_preset: str = "default"
    budget_fraction: float = 0.1  # topk / rekv
    recent_tokens: int | None = None  # None: one frame's visual tokens
    system_prompt: str | None = None  # None: the adapter's default
    # any ReSV settings (sweeps, experiments); None: the named preset
    resv_config: ResvConfig | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.fps <= MAX_FPS:
            raise ValueError(f"fps must be in (0, {MAX_FPS:g}], got {self.fps}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {self.max_new_tokens}")
        problem = sampling_error(self.temperature, self.top_p)
        if problem:
            raise ValueError(problem)
        preset(self.resv_preset)  # raises for an unknown name
        object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.resv_config, dict):  # read back from a snapshot
            object.__setattr__(self, "resv_config", ResvConfig(**self.resv_config))

    @property
    def resv(self) -> ResvConfig:
        return self.resv_config or preset(self.resv_preset)

    def replace(self, **changes: object) -> SessionSettings:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EngineConfig:
    """What the operator chooses for the process."""

    model_dir: str | None = None  # None: the demo model
    device: str = "cpu"
    # "auto": float32 on CPU, bfloat16 on discrete CUDA (sm_80+), float16 on Jetson and older
    # GPUs (vrex.memory.dtype_name_for); or fp32 / fp16 / bf16
    dtype: str = "auto"
    device_kv_budget_bytes: int | None = None  # per session
    # per session; 0: no host tier (evictions go to disk); None: unbounded below a discrete GPU,
    # 0 where the device tier is host RAM (CPU, Jetson; vrex.memory.default_host_kv_budget)
    host_kv_budget_bytes: int | None = None
    data_dir: str | None = None
    # every session writes its retrieval trace here (<session id>.jsonl; a session restored
    # from a snapshot starts <id>.1.jsonl, .2, ...): what `vrex sim run --trace` replays
    trace_dir: str | None = None
    max_sessions: int = 8
    max_question_tokens: int = 512
    # pages are per cluster and ReSV's are near-singletons: 2-token blocks hold a 40K history in
    # 2.2x fewer bytes than 8-token ones for ~90 ms (2% of a step) more store time per step
    # (BENCHMARKS.md, "Block size")
    block_tokens: int = 2
    batch_frames: bool = True  # prefill concurrent sessions' frames in one forward
    max_batch_rows: int = 8  # sessions per batched forward

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {self.max_batch_rows}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))  # raises for an unknown name
        if self.device_kv_budget_bytes is not None and self.device_kv_budget_bytes <= 0:
            raise ValueError(
                f"device_kv_budget_bytes must be positive or None, got {self.device_kv_budget_bytes}"
            )
        if self.host_kv_budget_bytes is not None and self.host_kv_budget_bytes < 0:
            raise ValueError(
                f"host_kv_budget_bytes must be >= 0 (0: no host tier) or None, got {self.host_kv_budget_bytes}"
            )
