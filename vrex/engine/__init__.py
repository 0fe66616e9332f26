"""Streaming sessions over one model: frame sampling, iterative prefill with retrieval,
questions and streamed answers, stats, traces and snapshots."""

from vrex._lazy import lazy_exports

# loaded on first use: vrex.engine.cli (the `vrex run` parser) must not load torch for `--help`
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "vrex.kv.snapshot": ("SnapshotError",),
        "vrex.engine.config": ("EngineConfig", "SessionSettings"),
        "vrex.engine.engine": ("CapacityError", "Engine"),
        "vrex.engine.retrieval": ("PartialStepError", "RetrievalPolicy", "StepRecord", "light_attention"),
        "vrex.engine.session": ("AnswerStats", "FrameResult", "Session", "SessionBrokenError", "TokenDelta"),
    },
)
