"""Streaming sessions over one model: frame sampling, iterative prefill with retrieval,
questions and streamed answers, stats, traces and snapshots."""

from vrex.kv.snapshot import SnapshotError

from .config import EngineConfig, SessionSettings
from .engine import CapacityError, Engine
from .retrieval import RetrievalPolicy, StepRecord, light_attention
from .session import AnswerStats, FrameResult, Session, TokenDelta

__all__ = [
    "AnswerStats",
    "CapacityError",
    "Engine",
    "EngineConfig",
    "FrameResult",
    "RetrievalPolicy",
    "Session",
    "SessionSettings",
    "SnapshotError",
    "StepRecord",
    "TokenDelta",
    "light_attention",
]
