"""`vrex run`: stream a video file through a session without a server, ask, print answers and stats."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vrex.memory import add_dtype_flag


def register(sub) -> None:
    p = sub.add_parser("run", help="stream a video through a local session and ask questions")
    p.add_argument(
        "--video", required=True, help="video file, or a sample name (bigbuckbunny.mp4, bikes.mp4, vtest.avi)"
    )
    p.add_argument("--model", help="local model folder (default: the demo model)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second kept (default 2)")
    p.add_argument("--policy", default="resv", choices=["resv", "full", "window", "topk", "rekv"])
    p.add_argument("--preset", default="default", help="ReSV preset: default | paper")
    p.add_argument("--ask", action="append", default=[], help="a question (repeatable)")
    p.add_argument(
        "--ask-at",
        action="append",
        type=float,
        default=[],
        help="video time in seconds for the matching --ask (default: at the end)",
    )
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-seconds", type=float, default=None, help="stop streaming after this much video")
    p.add_argument(
        "--device-kv-budget",
        help="device KV tier size per session, e.g. 2GiB, or 'auto': free memory once the model is loaded "
        "minus max(1 GiB, 10%% of total) (default: unbounded)",
    )
    p.add_argument("--host-kv-budget", help="host KV tier size per session (default: unbounded)")
    p.add_argument("--device", default="cpu")
    add_dtype_flag(p)
    p.add_argument("--trace", help="write the retrieval trace (JSON lines) here")
    p.add_argument("--json", action="store_true", help="print one JSON object with answers and stats")
    p.set_defaults(func=_main)


def _resolve_video(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    from vrex.video import sample_video

    try:
        return sample_video(name)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{name}: no such file, and not an installed sample video "
            "(run scripts/fetch_assets.sh to install the samples)"
        ) from None


def _main(args: argparse.Namespace) -> int:
    from vrex.engine import Engine, EngineConfig, SessionSettings
    from vrex.kv import parse_bytes
    from vrex.power import SessionEnergy, start_detected_sampler
    from vrex.video import FileSource

    if not args.ask:
        raise ValueError("give at least one --ask QUESTION")
    if args.ask_at and len(args.ask_at) != len(args.ask):
        raise ValueError(f"{len(args.ask)} --ask but {len(args.ask_at)} --ask-at: give one time per question")
    video = _resolve_video(args.video)
    source = FileSource(video, fps=None)  # the session's sampler keeps --fps
    auto_budget = str(args.device_kv_budget or "").strip().lower() == "auto"
    budget = parse_bytes(args.device_kv_budget) if args.device_kv_budget and not auto_budget else None
    host = parse_bytes(args.host_kv_budget) if args.host_kv_budget else None
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
    settings = SessionSettings(
        fps=args.fps, policy=args.policy, resv_preset=args.preset, max_new_tokens=args.max_new_tokens
    )
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

    try:
        for ts, image in source:
            if args.max_seconds is not None and ts > args.max_seconds:
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
            answer(q, min(at, last_t))
    finally:
        source.close()
    stats = session.stats()
    session.close()
    if sampler is not None:
        time.sleep(2 * sampler.interval_ms / 1e3)  # a sample after the last event settles it
        sampler.stop()
    stats.update(energy.stats())
    if args.json:
        print(json.dumps({"model": info, "video": str(video), "answers": answers, "stats": stats}, indent=1))
    else:
        print("\nstats (per layer and KV head, and the last step: see --json):")
        for k, v in stats.items():
            if k not in ("last_step", "fetched_fraction_per_layer_head"):
                print(f"  {k:28s} {v:.4g}" if isinstance(v, float) else f"  {k:28s} {v}")
    return 0
