"""Engine benchmarks: where a frame step's time goes, and batched vs one-by-one prefill.

``python -m vrex.engine.bench phases`` streams a sample video through one session and reports
the mean time per frame of each phase (ReSV select, HC clustering, store append / fetch, light
attention, MLP, the rest). ``python -m vrex.engine.bench batch`` runs N sessions that submit a
frame each at the same moment, on two engines sharing one model, one batching their prefill and
one not, alternating rounds so machine load hits both alike; it reports frames per second.
Both print JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vrex.limits import POLICIES

if TYPE_CHECKING:
    from vrex.engine import Engine

# torch and the engine load inside the functions that run a benchmark, not here: the
# `vrex engine-bench` parser comes from this module, and `--help` should not wait for torch.


def _frames(video: str, count: int) -> list[tuple[float, object]]:
    from vrex.video import FileSource, resolve_video

    frames = list(itertools.islice(iter(FileSource(resolve_video(video))), count))
    if len(frames) < count:
        raise ValueError(f"{video} has only {len(frames)} frames; ask for fewer")
    return frames


class _Timers:
    """Wraps methods with wall-clock timers; ``undo()`` puts the originals back."""

    def __init__(self) -> None:
        self.ms: collections.Counter = collections.Counter()
        self._undo: list[tuple[object, str, Callable, bool]] = []

    def wrap(self, obj: object, name: str, key: str) -> None:
        fn = getattr(obj, name)
        ms = self.ms

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                ms[key] += (time.perf_counter() - t0) * 1e3

        self._undo.append((obj, name, fn, name in vars(obj)))
        setattr(obj, name, timed)

    def undo(self) -> None:
        for obj, name, fn, own in reversed(self._undo):
            if own:
                setattr(obj, name, fn)
            else:  # it was the class's method: drop the instance's wrapper
                delattr(obj, name)
        self._undo.clear()


def phase_profile(
    engine: Engine, *, policy: str = "resv", video: str = "bikes.mp4", warm_frames: int = 25, frames: int = 8
) -> dict:
    """Mean milliseconds per frame step of each phase, after ``warm_frames`` frames of history."""
    import torch

    from vrex.engine import SessionSettings

    session = engine.open_session(SessionSettings(policy=policy, fps=120))
    selector, store = session.policy.selector, session.store
    timers = _Timers()
    timers.wrap(selector, "select", "select_ms")
    timers.wrap(selector, "observe", "observe_hc_clustering_ms")
    timers.wrap(store, "append", "store_append_ms")
    timers.wrap(store, "fetch", "store_fetch_ms")
    from . import retrieval

    timers.wrap(retrieval, "light_attention", "light_attention_ms")
    for layer in engine.adapter.language_model.layers:
        timers.wrap(layer.mlp, "forward", "mlp_ms")
    try:
        clip = _frames(video, warm_frames + frames)
        for ts, image in clip[:warm_frames]:
            session.add_frame(image, ts)
        timers.ms.clear()
        step_ms = vision_ms = 0.0
        for ts, image in clip[warm_frames:]:
            result = session.add_frame(image, ts)
            vision_ms += result.phases_ms["vision_ms"]
            step_ms += result.latency_ms - result.phases_ms["vision_ms"]
        history_tokens = session.history_tokens
    finally:
        timers.undo()
        engine.close_session(session.id)
    out = {k: v / frames for k, v in timers.ms.items()}
    out["frame_step_ms"] = step_ms / frames
    out["vision_ms"] = vision_ms / frames
    out["rest_ms"] = max(
        0.0, out["frame_step_ms"] - sum(v for k, v in out.items() if k not in ("frame_step_ms", "vision_ms"))
    )
    return {
        "policy": policy,
        "history_tokens": history_tokens,
        "frames_measured": frames,
        "threads": torch.get_num_threads(),
        "per_frame_ms": {k: round(v, 2) for k, v in out.items()},
    }


def batch_throughput(
    adapter,
    *,
    sessions: int = 4,
    policy: str = "resv",
    video: str = "bikes.mp4",
    warm_frames: int = 6,
    rounds: int = 6,
) -> dict:
    """Frames per second of ``sessions`` concurrent sessions, batched prefill vs one by one."""
    import torch

    from vrex.engine import Engine, EngineConfig, SessionSettings

    clip = _frames(video, warm_frames + rounds)
    engines = {
        "batched": Engine(EngineConfig(model_dir=str(adapter.path), max_sessions=sessions), adapter=adapter),
        "sequential": Engine(
            EngineConfig(model_dir=str(adapter.path), max_sessions=sessions, batch_frames=False),
            adapter=adapter,
        ),
    }
    opened = {
        name: [e.open_session(SessionSettings(policy=policy, fps=120)) for _ in range(sessions)]
        for name, e in engines.items()
    }

    async def one_round(group, ts, image) -> float:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(s.submit_frame(image, ts) for s in group))
        if not all(r.accepted for r in results):
            raise RuntimeError("a benchmark frame was dropped")
        return time.perf_counter() - t0

    wall = collections.Counter()

    async def run() -> None:
        for i, (ts, image) in enumerate(clip):
            for name in ("batched", "sequential") if i % 2 else ("sequential", "batched"):
                seconds = await one_round(opened[name], ts, image)
                if i >= warm_frames:
                    wall[name] += seconds

    try:
        asyncio.run(run())
    finally:
        stats = engines["batched"].stats()
        for engine in engines.values():
            engine.shutdown()
    frames = sessions * rounds
    return {
        "sessions": sessions,
        "policy": policy,
        "rounds": rounds,
        "history_tokens": opened["batched"][0].history_tokens,
        "threads": torch.get_num_threads(),
        "frames_per_s_batched": round(frames / wall["batched"], 3),
        "frames_per_s_sequential": round(frames / wall["sequential"], 3),
        "speedup": round(wall["sequential"] / wall["batched"], 3),
        "batched_engine": stats,
    }


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "what",
        choices=["phases", "batch"],
        help="phases: one session's frame step split into its phases; batch: sessions' frames prefilled together vs one by one",
    )
    parser.add_argument(
        "--policy", default="resv", choices=POLICIES, help="KV selection policy (default resv)"
    )
    parser.add_argument(
        "--video", default="bikes.mp4", help="video file, or a sample name (bikes.mp4, vtest.avi, ...)"
    )
    parser.add_argument(
        "--warm-frames", type=int, default=None, help="frames streamed before measuring (default 25 / 6)"
    )
    parser.add_argument(
        "--frames", type=int, default=8, help="frames (phases) or rounds (batch) measured (default 8)"
    )
    parser.add_argument("--sessions", type=int, default=4, help="concurrent sessions of batch (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--model", help="local model folder (default: the demo model)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def register(subparsers) -> None:
    """``vrex engine-bench phases|batch``: the same as ``python -m vrex.engine.bench``."""
    parser = subparsers.add_parser("engine-bench", help="frame-step phases; batched vs one-by-one prefill")
    _add_arguments(parser)
    parser.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrex.engine.bench", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


def _check_args(args: argparse.Namespace) -> None:
    """The checks that need no model, so a typo fails at once, not after loading it."""
    from vrex.host import check_at_least
    from vrex.video import resolve_video

    # the means divide by --frames; torch refuses 0 threads
    check_at_least(
        ("--frames", args.frames, 1),
        ("--threads", args.threads, 1),
        ("--sessions", args.sessions, 1),
        ("--warm-frames", args.warm_frames, 0),
    )
    resolve_video(args.video)


def _run(args: argparse.Namespace) -> int:
    import torch

    from vrex.engine import Engine, EngineConfig

    _check_args(args)
    torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model_dir=args.model))
    if args.what == "phases":
        warm = 25 if args.warm_frames is None else args.warm_frames
        report = phase_profile(
            engine, policy=args.policy, video=args.video, warm_frames=warm, frames=args.frames
        )
    else:
        warm = 6 if args.warm_frames is None else args.warm_frames
        report = batch_throughput(
            engine.adapter,
            sessions=args.sessions,
            policy=args.policy,
            video=args.video,
            warm_frames=warm,
            rounds=args.frames,
        )
    from vrex.host import dumps, machine_info

    report["machine"] = machine_info()
    if args.json:
        print(dumps(report))
    else:
        for key, value in report.items():
            if isinstance(value, dict):  # one line per entry, not a Python dict
                print(key)
                for name, item in value.items():
                    print(f"  {name:26s} {item}")
            else:
                print(f"{key:28s} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
