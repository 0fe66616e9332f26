"""`vrex serve` and `vrex stream`.

Wire into vrex/cli.py with ("server.cli", "register"). `python -m server.cli ...` runs the
same commands without the top-level CLI (the tests use that).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server.config import DURABILITY_MODES
from server.retention import parse_keep
from vrex.host import check_at_least
from vrex.limits import add_preset_flag, check_fps, check_questions, check_seconds
from vrex.memory import add_dtype_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_serve(subparsers)
    _register_stream(subparsers)


# ====================================================================== serve


def _register_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the gRPC streaming server",
        description="Serve the V-Rex gRPC API (vrex.v1.VRex, health, reflection). Without --model it "
        "serves the embedded demo model, which answers text but cannot really see.",
    )
    p.add_argument(
        "--model", type=Path, default=None, help="local checkpoint folder (default: the demo model)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port (0 = any free port; see --ready-file)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain; needs --tls-key")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key; needs --tls-cert")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", default=None, help="require this key in metadata x-api-key")
    keys.add_argument("--api-keys-file", type=Path, default=None, help="file with one accepted key per line")
    p.add_argument("--max-sessions", type=int, default=8, help="most live sessions (default 8)")
    p.add_argument("--device", default="cpu", help="torch device for the engine (default cpu)")
    add_dtype_flag(p)
    p.add_argument(
        "--device-kv-budget",
        default=None,
        metavar="SIZE|auto",
        help="device KV tier per session, e.g. 512MiB or 2GB; 'auto': free memory once the model is "
        "loaded, minus max(1 GiB, 10%% of total), divided by --max-sessions (logged at start-up); "
        "default: unbounded",
    )
    add_preset_flag(
        p,
        "--resv-preset",
        "--preset",  # the name `vrex run` uses
        help="ReSV settings of every session: 'default' keeps needles the paper's settings lose, "
        "'paper' selects ~5x cheaper on a CPU and loses them (BENCHMARKS.md)",
    )
    p.add_argument(
        "--host-kv-budget",
        default=None,
        metavar="BYTES",
        help="host-RAM tier per session, e.g. 4GiB; 0 = none (evicted KV goes to disk). Default: "
        "unbounded below a discrete GPU; 0 on the CPU and on a GPU sharing DRAM with the CPU (Jetson), "
        "where the device tier already is host RAM",
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="where sessions are snapshotted; makes them resumable"
    )
    p.add_argument(
        "--trace-dir",
        type=Path,
        default=None,
        help="write each session's retrieval trace here (<session id>.jsonl) for `vrex sim run --trace`",
    )
    p.add_argument(
        "--durability",
        choices=DURABILITY_MODES,
        default=None,
        help="with --data-dir: 'wal' (default) logs each acked frame and answer to a per-session "
        "write-ahead log and fsyncs before the ack, with periodic full snapshots; 'snapshot' takes a "
        "full snapshot before every ack (slower as the history grows); 'interval' only snapshots every "
        "--snapshot-interval seconds (the last interval may be lost in a crash)",
    )
    p.add_argument(
        "--snapshot-interval",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="snapshot a session with unsaved changes at most this often (default 300; with 'wal', "
        "0 = only every --snapshot-every records)",
    )
    p.add_argument(
        "--snapshot-every",
        type=int,
        default=256,
        metavar="RECORDS",
        help="'wal': full snapshot, and an empty log, after this many logged frames and answers (default 256)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="SIGTERM grace for answers in flight (default 10)",
    )
    p.add_argument(
        "--keep-closed",
        default="7d",
        metavar="DURATION",
        help="delete a closed session's snapshot and log (in --data-dir) this long after its close: "
        "7d, 12h, 30m, 90s or 'forever' (default 7d)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="close resumed, unattached sessions after this (default 60)",
    )
    p.add_argument("--max-frame-bytes", type=int, default=None, help="largest frame payload (default 8 MiB)")
    p.add_argument(
        "--max-frame-pixels", type=int, default=None, help="largest width*height (default 3840*2160)"
    )
    p.add_argument("--max-question-chars", type=int, default=None, help="longest question (default 2000)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument(
        "--ready-file", type=Path, default=None, help="write {port, pid} as JSON here once listening"
    )
    p.add_argument(
        "--log-format",
        choices=("json", "text"),
        default="json",
        help="structured JSON logs (default) or text",
    )
    p.add_argument("--json", action="store_true", help="same as --log-format json")
    p.set_defaults(func=cmd_serve)


def check_tls_pair(cert: Path, key: Path) -> None:
    """A ValueError unless cert and key load as a PEM certificate chain and its private key
    (gRPC itself only says it could not listen)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")  # never prompt on a terminal
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ValueError(
            f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate chain and its unencrypted "
            f"private key ({exc})"
        ) from None


def server_config_from_args(args: argparse.Namespace):
    from server.config import Limits, ServerConfig, load_api_keys_file

    api_keys: frozenset[str] = frozenset()
    if args.api_key is not None:
        if not args.api_key.strip():
            raise ValueError("--api-key is empty; pass a non-empty key")
        api_keys = frozenset([args.api_key])
    elif args.api_keys_file is not None:
        api_keys = load_api_keys_file(args.api_keys_file)
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--model", args.model)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if args.tls_cert is not None and args.tls_key is not None:
        check_tls_pair(args.tls_cert, args.tls_key)
    for flag, folder in (("--data-dir", args.data_dir), ("--trace-dir", args.trace_dir)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise ValueError(
                f"{flag} {folder} is a file, not a folder; give a folder (it is created if missing)"
            )
    if args.durability is not None and args.data_dir is None:
        raise ValueError(f"--durability {args.durability} needs --data-dir (where snapshots and logs go)")
    # the flags' own names, before ServerConfig would name its fields
    check_at_least(
        ("--max-sessions", args.max_sessions, 1),
        ("--grace", args.grace, 0),
        ("--snapshot-interval", args.snapshot_interval, 0),
        ("--snapshot-every", args.snapshot_every, 1),
        ("--max-frame-bytes", args.max_frame_bytes, 1),
        ("--max-frame-pixels", args.max_frame_pixels, 1),
        ("--max-question-chars", args.max_question_chars, 1),
        ("--metrics-port", args.metrics_port, 1),
    )
    if args.idle_timeout <= 0:
        raise ValueError(f"--idle-timeout must be > 0 seconds, got {args.idle_timeout}")
    limit_overrides = {
        name: value
        for name, value in (
            ("max_frame_bytes", args.max_frame_bytes),
            ("max_frame_pixels", args.max_frame_pixels),
            ("max_question_chars", args.max_question_chars),
        )
        if value is not None
    }
    if "max_frame_bytes" in limit_overrides:
        limit_overrides["max_message_bytes"] = max(
            Limits().max_message_bytes, limit_overrides["max_frame_bytes"] + 1024 * 1024
        )
    budget_auto = args.device_kv_budget is not None and args.device_kv_budget.strip().lower() == "auto"
    budget = None
    if args.device_kv_budget is not None and not budget_auto:
        from vrex.memory import parse_budget

        budget = parse_budget(args.device_kv_budget)
        if budget <= 0:
            raise ValueError(f"--device-kv-budget must be positive or 'auto', got {args.device_kv_budget!r}")
    host_budget = None
    if args.host_kv_budget is not None:
        from vrex.memory import parse_bytes

        try:
            host_budget = parse_bytes(args.host_kv_budget)
        except ValueError as exc:
            raise ValueError(f"--host-kv-budget: {exc}") from None
        if host_budget < 0:
            raise ValueError(f"--host-kv-budget must be >= 0 (0 = no host tier), got {args.host_kv_budget!r}")
    return ServerConfig(
        host=args.host,
        port=args.port,
        model_dir=args.model,
        device=args.device,
        dtype=args.dtype,
        device_kv_budget_bytes=budget,
        device_kv_budget_auto=budget_auto,
        host_kv_budget_bytes=host_budget,
        resv_preset=args.resv_preset,
        data_dir=args.data_dir,
        trace_dir=args.trace_dir,
        max_sessions=args.max_sessions,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        api_keys=api_keys,
        limits=Limits(**limit_overrides),
        grace_s=args.grace,
        durability=args.durability or "wal",
        snapshot_interval_s=args.snapshot_interval,
        snapshot_every_frames=args.snapshot_every,
        idle_timeout_s=args.idle_timeout,
        keep_closed_s=parse_keep(args.keep_closed),
        metrics_port=args.metrics_port,
        ready_file=args.ready_file,
    )


def _unwritable(folder: Path) -> str | None:
    """Why the server could not write under `folder` (made if missing), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vrex-write-check-"):
            pass
    except OSError as exc:
        return f"cannot write there ({exc.strerror or exc}); give a writable folder"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from server.backend import EngineUnavailable
    from server.logs import setup_logging
    from server.service import serve

    setup_logging("json" if args.json else args.log_format)
    config = server_config_from_args(args)
    # before the model loads (seconds): every path the server will write
    for flag, folder in (("--data-dir", config.data_dir), ("--trace-dir", config.trace_dir)):
        if folder is not None:
            problem = _unwritable(Path(folder))
            if problem:
                raise ValueError(f"{flag} {folder}: {problem}")
    if config.ready_file is not None:
        ready = Path(config.ready_file)
        problem = "is a folder; give a file path" if ready.is_dir() else _unwritable(ready.parent)
        if problem:
            raise ValueError(f"--ready-file {ready}: {problem}")
    try:
        return asyncio.run(serve(config))
    except EngineUnavailable as exc:
        raise ValueError(str(exc)) from None


# ====================================================================== stream


def _register_stream(subparsers) -> None:
    p = subparsers.add_parser(
        "stream",
        help="stream a video/camera/synthetic source to a server and ask questions",
        description="Stream frames to a `vrex serve` server, show live progress and streamed answers.",
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="server address")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--video",
        help="video file (read with PyAV, or OpenCV), or a sample name (bigbuckbunny.mp4, bikes.mp4, vtest.avi)",
    )
    src.add_argument(
        "--camera",
        type=_camera_arg,
        metavar="N|DEVICE|URL",
        help="camera: an index or /dev/video* path (OpenCV/V4L2), or a network stream URL "
        "(rtsp://, http:// MJPEG, ...; reconnects when the stream drops)",
    )
    src.add_argument("--synthetic", action="store_true", help="generated frames (a moving square)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second to send, > 0 (default 2)")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this much stream time (synthetic default 10)",
    )
    p.add_argument("--size", default="320x240", metavar="WxH", help="synthetic frame size (default 320x240)")
    p.add_argument(
        "--encoding",
        choices=("jpeg", "png", "webp", "raw"),
        default="jpeg",
        help="frame encoding (default jpeg)",
    )
    p.add_argument("--ask", action="append", default=[], metavar="TEXT", help="a question (repeatable)")
    p.add_argument(
        "--ask-at",
        action="append",
        type=float,
        default=[],
        metavar="SECONDS",
        help="stream time (>= 0, source time) of the matching --ask (default: at the end)",
    )
    p.add_argument("--interactive", action="store_true", help="read questions from stdin while streaming")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=0,
        help="answer length limit, up to the server's limit (0 = server default)",
    )
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="1 = real time; 2 = twice as fast; 0 = as fast as the server takes them (each frame waits "
        "for room in the server's queue, so none is dropped for backpressure)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="SESSION_ID",
        help="attach to an existing session instead of opening one; the source's timestamps are "
        "shifted to continue after the session's last frame",
    )
    p.add_argument("--tls-ca", type=Path, default=None, help="CA certificate (PEM) to trust; enables TLS")
    p.add_argument("--api-key", default=None, help="API key sent as metadata x-api-key")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up connecting after this (default 10)",
    )
    p.add_argument("--json", action="store_true", help="print JSON lines (progress, answers, summary)")
    p.set_defaults(func=cmd_stream)


@dataclass
class StreamReport:
    session_id: str = ""
    frames_sent: int = 0
    frames_accepted: int = 0
    frames_dropped: int = 0
    history_tokens: int = 0
    fetched_fraction: float = 0.0
    elapsed_s: float = 0.0
    answers: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    questions_failed: int = 0
    frames_out_of_order: int = 0  # dropped by the engine: timestamp before the session's last frame

    @property
    def sent_fps(self) -> float:
        return self.frames_sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _open_source(args: argparse.Namespace) -> Iterator[tuple[float, np.ndarray]]:
    """(timestamp_s, RGB frame) pairs from the chosen source, sampled to --fps (vrex.video).

    A video file is found and probed here, before connecting; a synthetic clip is only drawn
    once iterated, after the size was checked against the server's limits."""
    from vrex.video import CameraSource, FileSource, SyntheticSource, resolve_video

    if args.synthetic:
        w, h = _parse_size(args.size)
        seconds = args.duration if args.duration is not None else 10.0
        return _lazy(lambda: SyntheticSource(width=w, height=h, fps=args.fps, seconds=seconds))
    if args.video is not None:
        source = FileSource(resolve_video(args.video), fps=args.fps, on_warning=_warn)
    else:
        source = CameraSource(args.camera, fps=args.fps)
    return _until(source, args.duration)


def _warn(message: str) -> None:
    print(f"vrex stream: warning: {message}", file=sys.stderr, flush=True)


def _lazy(make) -> Iterator[tuple[float, np.ndarray]]:
    source = make()
    try:
        yield from source
    finally:
        source.close()


def _until(source, duration_s: float | None) -> Iterator[tuple[float, np.ndarray]]:
    try:
        for t_s, image in source:
            if duration_s is not None and t_s >= duration_s:
                return
            yield t_s, image
    finally:
        source.close()


def _camera_arg(text: str) -> int | str:
    from vrex.video import parse_camera

    try:
        return parse_camera(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# Drawing a synthetic frame takes tens of bytes per pixel: past 8K that is gigabytes, and no
# sensible server accepts the frame anyway (its own limit is checked once connected).
SYNTHETIC_MAX_PIXELS = 7680 * 4320


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 320x240, got {text!r}") from None
    if w < 8 or h < 8:
        raise ValueError(f"--size must be at least 8x8 pixels, got {text!r}")
    if w * h > SYNTHETIC_MAX_PIXELS:
        raise ValueError(
            f"--size {text} is {w * h} pixels, over the {SYNTHETIC_MAX_PIXELS} (7680x4320) a synthetic "
            "frame may have; pass a smaller --size"
        )
    return w, h


def _check_stream_args(args: argparse.Namespace) -> None:
    """Local checks of the flags, before anything is opened or sent."""
    import math

    check_fps("--fps", args.fps)
    check_seconds("--duration", args.duration)
    if not math.isfinite(args.speed) or args.speed < 0:
        raise ValueError(f"--speed must be >= 0 (0 = as fast as possible), got {args.speed}")
    check_seconds("--connect-timeout", args.connect_timeout)
    if args.max_new_tokens < 0:
        raise ValueError(
            f"--max-new-tokens must be >= 0 (0 = the server's default), got {args.max_new_tokens}"
        )
    if len(args.ask_at) > len(args.ask):
        raise ValueError("more --ask-at than --ask; give one --ask TEXT per --ask-at SECONDS")
    check_questions(args.ask)
    for at_s in args.ask_at:
        if not math.isfinite(at_s) or at_s < 0:
            raise ValueError(f"--ask-at must be >= 0 seconds of stream time, got {at_s}")
    if args.synthetic:
        _parse_size(args.size)
    host, sep, port = args.server.rpartition(":")
    unix_socket = args.server.startswith(("unix:", "unix-abstract:"))  # gRPC's own target names
    if not unix_socket and not (sep and host and port.isdigit()):
        raise ValueError(
            f"--server must be HOST:PORT (e.g. 127.0.0.1:50051, [::1]:50051) or unix:PATH, got {args.server!r}"
        )
    if args.resume is not None and not args.resume.strip():
        raise ValueError("--resume needs the session id a previous run printed, got an empty one")
    if args.tls_ca is not None:
        if not Path(args.tls_ca).is_file():
            raise ValueError(
                f"--tls-ca {args.tls_ca}: no such file; give the CA certificate (PEM) the server's was signed with"
            )
        import ssl

        try:
            ssl.create_default_context(cafile=str(args.tls_ca))
        except ssl.SSLError as exc:
            raise ValueError(
                f"--tls-ca {args.tls_ca}: not a PEM CA certificate ({exc.reason or exc})"
            ) from None


def _check_server_limits(args: argparse.Namespace, limits) -> None:
    """Checks against the server's limits (GetServerInfo), before the session opens."""
    if limits.max_new_tokens and args.max_new_tokens > limits.max_new_tokens:
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens} is over the server's limit of {limits.max_new_tokens}; "
            f"pass 1..{limits.max_new_tokens} (0 = the server's default)"
        )
    for text in args.ask:
        if limits.max_question_chars and len(text) > limits.max_question_chars:
            raise ValueError(
                f"an --ask question has {len(text)} characters, over the server's limit of "
                f"{limits.max_question_chars}; shorten it"
            )
    if args.synthetic:
        w, h = _parse_size(args.size)
        if limits.max_frame_pixels and w * h > limits.max_frame_pixels:
            raise ValueError(
                f"--size {args.size} is {w * h} pixels, over the server's max_frame_pixels of "
                f"{limits.max_frame_pixels}; pass a smaller --size"
            )


def cmd_stream(args: argparse.Namespace) -> int:
    _check_stream_args(args)
    frames = _open_source(args)
    asks = [(args.ask_at[i] if i < len(args.ask_at) else None, text) for i, text in enumerate(args.ask)]
    from vrex.client import VRexError

    report = StreamReport()
    try:
        asyncio.run(run_stream(args, frames, asks, report))
    except VRexError as exc:
        print(f"vrex stream: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"event": "error", "error": str(exc), **_summary(report)}), flush=True)
        return 1
    except ValueError as exc:  # a local check that needed the server (its limits, a frame's size)
        if args.json and report.session_id:
            print(json.dumps({"event": "error", "error": str(exc), **_summary(report)}), flush=True)
        raise
    except KeyboardInterrupt:
        if report.session_id:
            print(
                f"\nvrex stream: interrupted; session {report.session_id} can go on with "
                f"--resume {report.session_id} (a server with --data-dir keeps it)",
                file=sys.stderr,
            )
        raise
    if report.frames_out_of_order:
        _warn(f"{report.frames_out_of_order} frames were dropped as earlier than the session's last frame")
    if args.json:
        print(json.dumps({"event": "summary", **_summary(report)}), flush=True)
    else:
        s = _summary(report)
        failed = f", {report.questions_failed} failed" if report.questions_failed else ""
        print(
            f"\nsession {s['session_id']}: sent {s['frames_sent']} frames and got {len(report.answers)} "
            f"answers{failed} in this run; the session holds {s['frames_accepted']} accepted frames "
            f"({s['frames_dropped']} dropped) and {s['history_tokens']} history tokens",
            file=sys.stderr,
        )
    if report.questions_failed:
        return 1
    return 1 if report.errors and not report.frames_accepted else 0


def _summary(report: StreamReport) -> dict:
    return {
        "session_id": report.session_id,
        "frames_sent": report.frames_sent,
        "frames_accepted": report.frames_accepted,
        "frames_dropped": report.frames_dropped,
        "history_tokens": report.history_tokens,
        "fetched_fraction": report.fetched_fraction,
        "elapsed_s": round(report.elapsed_s, 3),
        "sent_fps": round(report.sent_fps, 3),
        "answers": report.answers,
        "questions_failed": report.questions_failed,
        "errors": report.errors,
    }


async def run_stream(
    args: argparse.Namespace, frames, asks: list[tuple[float | None, str]], report: StreamReport | None = None
) -> StreamReport:
    """Send `frames` paced by their timestamps, ask questions on time, print progress.

    `--ask-at` times are source times; questions are asked (and reported) at the session's
    video time, which on --resume continues after the session's last frame."""
    from vrex.client import Client, VRexError

    report = StreamReport() if report is None else report
    out_lock = asyncio.Lock()

    def on_ack(ack) -> None:
        report.frames_accepted = ack.frames_accepted
        report.frames_dropped = ack.frames_dropped
        report.history_tokens = ack.history_tokens
        if ack.accepted:
            report.fetched_fraction = ack.fetched_fraction
        elif "backwards" in ack.dropped_reason:
            report.frames_out_of_order += 1

    def on_error(err: VRexError) -> None:
        report.errors.append(str(err))
        print(f"vrex stream: {err}", file=sys.stderr)

    async def ask(session, text: str, at_s: float) -> None:
        async with out_lock:  # one answer printed at a time
            if not args.json:
                print(f"\n[{at_s:6.1f}s] Q: {text}\nA: ", end="", flush=True)
            try:
                async for delta in session.ask(text, max_new_tokens=args.max_new_tokens):
                    if not args.json:
                        print(delta, end="", flush=True)
            except VRexError as exc:
                report.errors.append(str(exc))
                report.questions_failed += 1
                print(f"\nvrex stream: question failed: {exc}", file=sys.stderr)
                return
            a = session.last_answer
            entry = {
                "question": text,
                "asked_at_s": round(at_s, 3),
                "answer": a.text,
                "num_tokens": a.num_tokens,
                "time_to_first_token_ms": round(a.time_to_first_token_ms, 1),
                "total_ms": round(a.total_ms, 1),
            }
            report.answers.append(entry)
            if args.json:
                print(json.dumps({"event": "answer", **entry}), flush=True)
            else:
                print(
                    f"\n   ({a.num_tokens} tokens, first after {a.time_to_first_token_ms:.0f} ms)", flush=True
                )

    async with Client(args.server, api_key=args.api_key, tls_ca=args.tls_ca) as client:
        try:
            await client.wait_ready(args.connect_timeout)
        except asyncio.TimeoutError:
            raise VRexError(
                "UNAVAILABLE",
                f"cannot reach {args.server} within {args.connect_timeout:g} s; is `vrex serve` running there? "
                "(a server with --tls-cert needs --tls-ca here, and the CA must have signed its certificate)",
            ) from None
        try:
            info = await client.server_info(args.connect_timeout)
        except VRexError as exc:
            if exc.code != "UNIMPLEMENTED":
                raise
            info = None  # an older server: only the local checks, and the server's own, apply
        if info is not None:
            _check_server_limits(args, info.limits)
        async with client.session(
            fps=args.fps, resume_session_id=args.resume or "", on_ack=on_ack, on_error=on_error
        ) as session:
            report.session_id = session.session_id
            if args.json:  # first, so a consumer has the id to resume with whatever follows
                print(json.dumps({"event": "opened", "session_id": session.session_id}), flush=True)
            else:
                print(f"session {session.session_id} open on {args.server}", file=sys.stderr)
            offset_s = await _resume_offset_s(client, session) if args.resume else 0.0
            video_s = offset_s  # session video time of the last frame sent
            tasks: list[asyncio.Task] = []
            pending = sorted((a for a in asks if a[0] is not None), key=lambda a: a[0])
            at_end = [text for at, text in asks if at is None]
            start = time.monotonic()
            last_progress = start
            stdin_task = (
                asyncio.create_task(_stdin_questions(ask, session, lambda: video_s))
                if args.interactive
                else None
            )
            in_flight: collections.deque[asyncio.Task] = collections.deque()

            async def send_acked(image, timestamp_s: float) -> None:
                """A --speed 0 frame: sent, then its ack awaited. The server refusing this frame
                fails it alone, reported like any other (on_error); the stream goes on."""
                try:
                    await session.send_frame(image, timestamp_s, encoding=args.encoding, wait=True)
                except VRexError as err:
                    if not err.request_id:  # the stream itself ended: that ends this run
                        raise
                    on_error(err)

            try:
                for ts, image in frames:
                    if args.speed > 0:
                        delay = start + ts / args.speed - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    elif len(in_flight) >= SPEED0_FRAMES_IN_FLIGHT:  # paced by the server's acks
                        await in_flight.popleft()
                    while pending and pending[0][0] <= ts:
                        at, text = pending.pop(0)
                        tasks.append(asyncio.create_task(ask(session, text, at + offset_s)))
                    if args.speed > 0:
                        await session.send_frame(image, ts + offset_s, encoding=args.encoding)
                    else:
                        in_flight.append(asyncio.create_task(send_acked(image, ts + offset_s)))
                        await asyncio.sleep(0)  # let it go out in order before the next frame
                    video_s = ts + offset_s
                    report.frames_sent += 1
                    now = time.monotonic()
                    # no status line while an answer prints (it would land inside the answer's text)
                    if now - last_progress >= 1.0 and (args.json or not out_lock.locked()):
                        last_progress = now
                        report.elapsed_s = now - start
                        _progress(report, args.json)
                await asyncio.gather(*in_flight)
                for at, text in pending:  # asked after the source ended: at the last frame's time
                    tasks.append(asyncio.create_task(ask(session, text, min(at + offset_s, video_s))))
                if tasks:
                    await asyncio.gather(*tasks)
                for text in at_end:
                    await ask(session, text, video_s)
                if stdin_task is not None:
                    async with out_lock:  # not inside an answer being printed
                        print(
                            "\nsource ended; type more questions, or an empty line to quit", file=sys.stderr
                        )
                    await stdin_task
            finally:  # a run that ends early leaves no task behind, and no error unread
                leftovers = [t for t in (*in_flight, *tasks, stdin_task) if t is not None]
                for task in leftovers:
                    task.cancel()
                await asyncio.gather(*leftovers, return_exceptions=True)
            try:  # the acks' history misses the tokens answers added since the last frame
                stats = await client.session_stats(session.session_id)
                report.history_tokens = stats.history_tokens
            except VRexError:
                pass
            await session.close()
            report.elapsed_s = time.monotonic() - start
            report.frames_accepted = session.frames_accepted or report.frames_accepted
            report.frames_dropped = session.frames_dropped or report.frames_dropped
    return report


# frames a `--speed 0` stream keeps unacknowledged: one in the engine, one waiting (the server
# keeps max_pending_frames, default 2, before it drops the oldest)
SPEED0_FRAMES_IN_FLIGHT = 2

# The engine's name for a session's last frame time; SessionStats.extra carries the engine's
# numeric stats, so a server whose engine reports it lets a resumed stream continue after it.
LAST_FRAME_TIME_KEY = "last_frame_ts"


async def _resume_offset_s(client, session) -> float:
    """Seconds to add to the source's timestamps so a resumed session's frames continue after
    its last one (an engine drops frames older than that); 0 for a session without frames."""
    from vrex.client import VRexError

    opened = session.opened
    if opened is None or not opened.frames_accepted:
        return 0.0
    try:
        extra = (await client.session_stats(session.session_id)).extra
    except VRexError:
        extra = {}
    last_s = extra.get(LAST_FRAME_TIME_KEY)
    if last_s is None:
        _warn(
            f"session {session.session_id} has {opened.frames_accepted} frames, but the server does not "
            "report its last frame time: frames timed before it will be dropped"
        )
        return 0.0
    fps = opened.settings.fps or 0.0
    # one sampling period on, so the first frame is not dropped as too soon after the last
    offset_s = last_s + (1.0 / fps if fps > 0 else 0.0)
    print(
        f"vrex stream: resumed session {session.session_id} ends at {last_s:.2f} s of video; "
        f"the source's timestamps are shifted by +{offset_s:.2f} s to continue after it",
        file=sys.stderr,
        flush=True,
    )
    return offset_s


async def _stdin_questions(ask, session, video_time_s) -> None:
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line or not line.strip():
            return
        await ask(session, line.strip(), video_time_s())


def _progress(report: StreamReport, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "event": "progress",
                    **{k: v for k, v in _summary(report).items() if k not in ("answers", "errors")},
                }
            ),
            flush=True,
        )
        return
    print(
        f"\rsent {report.frames_sent} accepted {report.frames_accepted} dropped {report.frames_dropped} "
        f"| {report.sent_fps:.1f} fps | history {report.history_tokens} tok | fetched {report.fetched_fraction:.2f}",
        end="",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vrex")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"vrex: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
