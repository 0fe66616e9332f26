"""Server settings: one frozen dataclass, filled from `vrex serve` flags."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vrex.limits import MAX_FPS, MAX_FRAME_PIXELS
from vrex.memory import dtype_name

MIB = 1024 * 1024
DURABILITY_MODES = ("wal", "snapshot", "interval")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; a request over one gets INVALID_ARGUMENT and the session goes on."""

    max_frame_bytes: int = 8 * MIB  # encoded or raw payload of one frame
    max_frame_pixels: int = MAX_FRAME_PIXELS  # width * height (4K)
    max_question_chars: int = 2000
    max_new_tokens: int = 512
    # Transport cap: larger messages are refused by gRPC itself and end the call, so it sits
    # well above max_frame_bytes to let the per-frame check answer first.
    max_message_bytes: int = 32 * MIB
    max_fps: float = MAX_FPS

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_frame_pixels", "max_question_chars", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")
        if self.max_message_bytes < self.max_frame_bytes + 1024:
            raise ValueError("Limits.max_message_bytes must exceed max_frame_bytes by at least 1 KiB")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (the bound port is logged and written to ready_file)
    model_dir: Path | None = None
    device: str = "cpu"
    dtype: str = "auto"  # weights and KV: auto | fp32 | fp16 | bf16 (vrex.memory.dtype_name_for)
    device_kv_budget_bytes: int | None = None  # per session; None: unbounded
    # per session; 0: evict straight to disk; None: the engine's default (unbounded host RAM, or
    # none on a GPU that shares DRAM with the CPU)
    host_kv_budget_bytes: int | None = None
    # ReSV preset of every session ("default": keeps needles, costs selection compute; "paper":
    # the paper's coarse clusters, ~5x cheaper per step on a CPU, loses needles: BENCHMARKS.md)
    resv_preset: str = "default"
    # Size the per-session device budget from free memory once the model is loaded (--device-kv-budget auto).
    device_kv_budget_auto: bool = False
    data_dir: Path | None = None
    trace_dir: Path | None = None  # each session's retrieval trace (<id>.jsonl), for the simulator
    max_sessions: int = 8
    tls_cert: Path | None = None
    tls_key: Path | None = None
    api_keys: frozenset[str] = field(default_factory=frozenset)
    limits: Limits = field(default_factory=Limits)
    # Seconds SIGTERM waits for in-flight answers before cancelling them.
    grace_s: float = 10.0
    # How acknowledged frames and answers survive a crash (only with data_dir):
    #   "wal"      append each to a per-session write-ahead log and fsync before the ack; full
    #              snapshots every snapshot_every_frames records or snapshot_interval_s seconds
    #              empty the log (server/wal.py). Every ack survives kill -9, cheaply.
    #   "snapshot" a full snapshot before every accepted frame's ack (cost grows with the history).
    #   "interval" at most one snapshot per snapshot_interval_s; the last interval may be lost.
    durability: str = "wal"
    # Seconds between snapshots of a session with unsaved changes ("wal": 0 = by count only).
    snapshot_interval_s: float = 300.0
    # "wal": take a full snapshot (and empty the log) after this many logged records.
    snapshot_every_frames: int = 256
    # A resumed session no stream attaches to is snapshotted and closed after this long.
    idle_timeout_s: float = 60.0
    # Snapshots and logs of sessions closed longer ago than this are deleted (None: kept forever).
    keep_closed_s: float | None = 7 * 86400.0
    # Bounded per-session queues: frames waiting for the engine, and questions.
    max_pending_frames: int = 2
    max_pending_questions: int = 2
    max_outbound_events: int = 256
    metrics_port: int | None = None
    ready_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "tls_cert and tls_key go together: pass both --tls-cert and --tls-key, or neither"
            )
        if self.max_sessions <= 0:
            raise ValueError(f"max_sessions must be positive, got {self.max_sessions}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [1, 65535], got {self.metrics_port}")
        if self.metrics_port == self.port:
            raise ValueError(f"metrics_port and port are both {self.port}; give metrics another port")
        if self.max_pending_frames <= 0 or self.max_pending_questions <= 0 or self.max_outbound_events <= 0:
            raise ValueError(
                "queue sizes (max_pending_frames, max_pending_questions, max_outbound_events) must be positive"
            )
        if self.grace_s < 0 or self.snapshot_interval_s < 0 or self.idle_timeout_s <= 0:
            raise ValueError("grace_s and snapshot_interval_s must be >= 0 and idle_timeout_s > 0")
        if self.keep_closed_s is not None and self.keep_closed_s < 0:
            raise ValueError(f"keep_closed_s must be >= 0 or None (forever), got {self.keep_closed_s}")
        if self.durability not in DURABILITY_MODES:
            raise ValueError(
                f"durability must be one of {', '.join(DURABILITY_MODES)}, got {self.durability!r}"
            )
        if self.durability == "interval" and self.snapshot_interval_s <= 0:
            raise ValueError("durability 'interval' needs snapshot_interval_s > 0 (--snapshot-interval)")
        if self.snapshot_every_frames <= 0:
            raise ValueError(f"snapshot_every_frames must be positive, got {self.snapshot_every_frames}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))  # raises for an unknown name
        if self.device_kv_budget_auto and self.device_kv_budget_bytes is not None:
            raise ValueError("device_kv_budget_bytes and device_kv_budget_auto exclude each other")

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys)

    def config_hash(self) -> str:
        """Stable hash of the settings (API keys excluded)."""
        data = asdict(self)
        data.pop("api_keys")
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_api_keys_file(path: Path) -> frozenset[str]:
    """One key per line; blank lines and lines starting with '#' are ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read --api-keys-file {path}: {exc.strerror}") from exc
    keys = frozenset(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ValueError(f"--api-keys-file {path} holds no keys; put one key per line")
    return keys
