"""`vrex run`: stream a video file through a session without a server, ask, print answers and stats."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import threading
import time

from vrex.host import check_output_path
from vrex.limits import (
    MAX_FPS,
    MAX_NEW_TOKENS,
    POLICIES,
    add_preset_flag,
    check_fps,
    check_max_new_tokens,
    check_questions,
    check_seconds,
)
from vrex.memory import add_dtype_flag


def register(sub) -> None:
    p = sub.add_parser("run", help="stream a video through a local session and ask questions")
    p.add_argument(
        "--video", required=True, help="video file, or a sample name (bigbuckbunny.mp4, bikes.mp4, vtest.avi)"
    )
    p.add_argument("--model", help="local model folder (default: the demo model)")
    p.add_argument(
        "--fps", type=float, default=2.0, help=f"frames per second kept, in (0, {MAX_FPS:g}] (default 2)"
    )
    p.add_argument(
        "--policy",
        default="resv",
        choices=POLICIES,
        help="which history each step attends to: resv (default), full, window, topk or rekv",
    )
    add_preset_flag(p, "--preset", "--resv-preset")
    p.add_argument("--ask", action="append", default=[], help="a question (repeatable)")
    p.add_argument(
        "--ask-at",
        action="append",
        type=float,
        default=[],
        help="video time in seconds (>= 0) for the matching --ask (default: at the end)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=48,
        help=f"longest answer in tokens, 1..{MAX_NEW_TOKENS} (default 48)",
    )
    p.add_argument(
        "--max-seconds", type=float, default=None, help="stop streaming after this much video (seconds, > 0)"
    )
    p.add_argument(
        "--device-kv-budget",
        help="device KV tier size per session, e.g. 2GiB, or 'auto': free memory once the model is loaded "
        "minus max(1 GiB, 10%% of total) (default: unbounded)",
    )
    p.add_argument(
        "--host-kv-budget",
        help="host KV tier size per session (default: unbounded below a discrete GPU, 0 on the CPU and Jetson)",
    )
    p.add_argument(
        "--device", default="cpu", help="torch device to run on: cpu, cuda, cuda:1, ... (default cpu)"
    )
    add_dtype_flag(p)
    p.add_argument("--trace", help="write the retrieval trace (JSON lines) here")
    p.add_argument("--json", action="store_true", help="print one JSON object with answers and stats")
    p.set_defaults(func=_main)


def _check_args(args: argparse.Namespace) -> None:
    """The checks that need no model, so a typo fails in milliseconds, not after loading it."""
    if not args.ask:
        raise ValueError("give at least one --ask QUESTION")
    check_questions(args.ask)
    if args.ask_at and len(args.ask_at) != len(args.ask):
        raise ValueError(f"{len(args.ask)} --ask but {len(args.ask_at)} --ask-at: give one time per question")
    for at_s in args.ask_at:
        if not math.isfinite(at_s) or at_s < 0:
            raise ValueError(f"--ask-at must be >= 0 seconds of video, got {at_s:g}")
    check_fps("--fps", args.fps)
    check_max_new_tokens("--max-new-tokens", args.max_new_tokens)
    check_seconds("--max-seconds", args.max_seconds)
    check_output_path(args.trace, "--trace")


def _warn(message: str) -> None:
    print(f"vrex run: warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _first_interrupt_ends_the_video():
    """The first Ctrl-C ends the video after the frame in progress (a step is never cut half-way),
    so the questions still due are asked and the stats printed; a second one quits at once."""
    stop = threading.Event()
    if (
        threading.current_thread() is not threading.main_thread()  # handlers are the main thread's
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # ignored, or someone's
    ):
        yield stop  # Ctrl-C does what it did
        return

    def on_interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(
            "\nvrex run: interrupted: the video ends after this frame; questions still due are asked "
            "now (Ctrl-C again to quit)",
            file=sys.stderr,
            flush=True,
        )

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _main(args: argparse.Namespace) -> int:
    from vrex.kv import parse_bytes
    from vrex.video import FileSource, resolve_video

    _check_args(args)
    video = resolve_video(args.video)
    # sampled here as `vrex stream` samples (the session's sampler agrees slot for slot), so
    # "dropped" counts frames the session refused, not the file's frames between picks
    source = FileSource(video, fps=args.fps, on_warning=_warn)  # probes now: a bad file fails here
    auto_budget = str(args.device_kv_budget or "").strip().lower() == "auto"
    budget = parse_bytes(args.device_kv_budget) if args.device_kv_budget and not auto_budget else None
    host = parse_bytes(args.host_kv_budget) if args.host_kv_budget else None

    from vrex.engine import Engine, EngineConfig, SessionSettings
    from vrex.power import SessionEnergy, start_detected_sampler

    settings = SessionSettings(
        fps=args.fps, policy=args.policy, resv_preset=args.preset, max_new_tokens=args.max_new_tokens
    )
    engine = Engine(
        EngineConfig(
            model_dir=args.model,
            device=args.device,
            dtype=args.dtype,
            device_kv_budget_bytes=budget,
            host_kv_budget_bytes=host,
        )
    )
    if auto_budget:  # sized now that the model is loaded; sessions read it when they open
        import dataclasses

        from vrex.memory import device_kv_budget_auto

        budget = device_kv_budget_auto(device=args.device)
        if budget <= 0:
            raise ValueError(
                "--device-kv-budget auto: no memory left after the headroom; pass a size like 512MiB"
            )
        engine.config = dataclasses.replace(engine.config, device_kv_budget_bytes=budget)
        print(
            f"--device-kv-budget auto: {budget} bytes ({budget / 2**30:.2f} GiB) for the device KV tier",
            file=sys.stderr,
        )
    info = engine.model_info
    if info["notice"] and not args.json:
        print(f"note: {info['notice']}", file=sys.stderr)
    session = engine.open_session(settings, trace_path=args.trace)
    sampler, _ = start_detected_sampler()  # a Jetson's tegrastats/jtop; None elsewhere
    energy = SessionEnergy(sampler)
    times = args.ask_at or [float("inf")] * len(args.ask)
    pending = sorted(zip(times, args.ask, strict=True), key=lambda x: x[0])
    answers = []
    t_start = time.perf_counter()
    last_t = 0.0
    progress_start, progress_end = ("\r", "") if sys.stderr.isatty() else ("", "\n")

    def answer(question: str, at: float) -> None:
        if not args.json:
            print(f"\n[{at:6.1f}s] Q: {question}\n         A: ", end="", flush=True)
        text = []
        t0_s = energy.clock()
        for delta in session.generate(question):
            text.append(delta.text)
            if not args.json:
                print(delta.text, end="", flush=True)
        energy.record("answer", t0_s, energy.clock())
        if not args.json:
            print()
        stats = session.last_answer_stats
        answers.append(
            {
                "question": question,
                "asked_at_s": at,
                "text": "".join(text),
                "tokens": stats.tokens,
                "finish_reason": stats.finish_reason,
                "time_to_first_token_ms": stats.time_to_first_token_ms,
                "fetched_fraction_text": stats.fetched_fraction_text,
                "fetched_fraction_decode": stats.fetched_fraction_decode,
            }
        )

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(source.close)
        with _first_interrupt_ends_the_video() as interrupted:
            for ts, image in source:
                if interrupted.is_set() or (args.max_seconds is not None and ts > args.max_seconds):
                    break
                while pending and pending[0][0] <= ts:
                    at, q = pending.pop(0)
                    answer(q, at)
                t0_s = energy.clock()
                result = session.add_frame(image, ts)
                if result.accepted:
                    energy.record("frame", t0_s, energy.clock())
                last_t = ts
                if result.accepted and not args.json:
                    st = session.stats()
                    wall = time.perf_counter() - t_start
                    # one status line rewritten in place on a terminal; one line per frame in a log
                    print(
                        f"{progress_start}{ts:6.1f}s  frames {st['frames_accepted']} kept / "
                        f"{st['frames_dropped']} dropped  {st['frames_accepted'] / wall:4.2f} fps  "
                        f"history {st['history_tokens']} tok  fetched {result.fetched_fraction:.2f}",
                        end=progress_end,
                        file=sys.stderr,
                        flush=True,
                    )
        for at, q in pending:
            if at != float("inf") and at > last_t and not args.json:
                print(
                    f"\nnote: --ask-at {at:g} is past the stream's end; asking at {last_t:.1f} s",
                    file=sys.stderr,
                )
            answer(q, min(at, last_t))
    stats = session.stats()
    session.close()
    if sampler is not None:
        time.sleep(2 * sampler.interval_ms / 1e3)  # a sample after the last event settles it
        sampler.stop()
    stats.update(energy.stats())
    if args.json:
        print(json.dumps({"model": info, "video": str(video), "answers": answers, "stats": stats}, indent=1))
    else:
        print("\nstats (--json adds them per layer and KV head, and the last step):")
        for k, v in stats.items():
            if k in ("last_step", "fetched_fraction_per_layer_head") or v is None or v == {}:
                continue
            if isinstance(v, dict):
                v = ", ".join(f"{name} {count}" for name, count in v.items())
            elif isinstance(v, float):
                v = f"{v:.4g}"
            elif isinstance(v, int) and not isinstance(v, bool):
                v = f"{v:,}"
            print(f"  {k:28s} {v}")
    return 0
