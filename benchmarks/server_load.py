"""Server load benchmark (`vrex bench server`): N concurrent streams at F fps for T seconds.

Reports sustained accepted fps per stream, drop rate, p50/p99 frame-ack latency (client send
to ack) and time to the first answer token. `--sweep` doubles N until drops reach 1% and
reports the most streams held. Without `--server` it starts `vrex serve` on a free loopback
port (demo model unless --model) and stops it afterwards.

    python -m benchmarks.server_load --streams 4 --fps 1 --seconds 20 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import parse_size
from vrex.host import dumps, machine_info
from vrex.limits import add_preset_flag, check_fps, check_max_new_tokens, check_seconds

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LoadResult:
    streams: int
    fps: float
    seconds: float
    frames_sent: int
    frames_accepted: int
    frames_dropped: int
    drop_rate: float
    sustained_fps_per_stream: float
    ack_latency_p50_ms: float | None  # None: no frame was acked
    ack_latency_p99_ms: float | None
    ttft_p50_ms: float | None  # None: no question was asked (--ask-at past --seconds) or answered
    ttft_max_ms: float | None
    errors: int


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add `server` under `vrex bench`."""
    p = bench_subparsers.add_parser("server", help="load-test the gRPC server", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, metavar="HOST:PORT", help="existing server (default: start one)")
    p.add_argument("--model", default=None, help="checkpoint for the server started here (default: demo)")
    p.add_argument("--device", default="cpu", help="device for the server started here")
    p.add_argument("--streams", type=int, default=4, help="concurrent streams (default 4)")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second per stream (default 1)")
    add_preset_flag(
        p,
        "--resv-preset",
        "--preset",  # the name `vrex run` uses
        help="ReSV preset of the local server's sessions (ignored with --server)",
    )
    p.add_argument("--seconds", type=float, default=20.0, help="streaming time (default 20)")
    p.add_argument("--size", default="320x240", help="frame size WxH (default 320x240)")
    p.add_argument(
        "--ask-at",
        type=float,
        default=None,
        help="ask one question per stream at this time (default: half way)",
    )
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length (default 8)")
    p.add_argument("--sweep", action="store_true", help="double --streams from 1 until drops reach 1%%")
    p.add_argument("--max-streams", type=int, default=64, help="upper bound for --sweep")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for --server to answer before giving up (default 10)",
    )
    p.add_argument(
        "--api-key", default=None, help="API key, for a server started with --api-key or --api-keys-file"
    )
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM), for a server with --tls-cert")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _percentile(values: list[float], q: float, digits: int) -> float | None:
    # None, not 0: "nothing measured" must not read as "instant"
    return round(float(np.percentile(values, q)), digits) if values else None


async def run_load(target: str, streams: int, fps: float, seconds: float, *, size=(320, 240), ask_at_s=None,
                   max_new_tokens: int = 8, api_key=None, tls_ca=None,
                   connect_timeout_s: float = 30.0) -> LoadResult:  # fmt: skip
    """Drive `streams` sessions at `fps` for `seconds` against `target`.

    Raises ValueError naming `target` when no server answers there within `connect_timeout_s`.
    """
    from vrex.client import Client, VRexError, encode_image
    from vrex.video import SyntheticSource

    source = SyntheticSource(width=size[0], height=size[1], fps=fps, seconds=min(seconds, 8.0))
    frames = [encode_image(img, "jpeg") for _, img in source]  # encoded once: keep client CPU low
    ask_at_s = seconds / 2 if ask_at_s is None else ask_at_s
    ack_ms: list[float] = []
    ttft_ms: list[float] = []
    totals = {"sent": 0, "accepted": 0, "dropped": 0, "errors": 0}

    async def one_stream(client: Client, index: int) -> None:
        def on_ack(ack) -> None:
            ack_ms.append(ack.round_trip_ms)
            totals["accepted" if ack.accepted else "dropped"] += 1

        def on_error(_err) -> None:
            totals["errors"] += 1

        async with client.session(fps=fps, on_ack=on_ack, on_error=on_error) as s:
            start = time.monotonic() + index * (1.0 / fps) / max(1, streams)  # stagger streams
            asked = None
            for i in range(int(seconds * fps)):
                ts = i / fps
                delay = start + ts - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if asked is None and ts >= ask_at_s:
                    asked = asyncio.create_task(_ask(s))
                await s.send_frame(frames[i % len(frames)], ts)
                totals["sent"] += 1
            if asked is not None:
                await asked

    async def _ask(s) -> None:
        t0 = time.monotonic()
        first = None
        try:
            async for _ in s.ask("What is happening right now?", max_new_tokens=max_new_tokens):
                if first is None:
                    first = (time.monotonic() - t0) * 1000
        except VRexError:
            totals["errors"] += 1
            return
        if first is not None:
            ttft_ms.append(first)

    async with Client(target, api_key=api_key, tls_ca=tls_ca) as client:
        try:
            await client.wait_ready(connect_timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise ValueError(
                f"no V-Rex server answered at {target} within {connect_timeout_s:g} s; "
                "start one with `vrex serve` or check --server"
            ) from None
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(one_stream(client, i) for i in range(streams)), return_exceptions=True
        )
        elapsed_s = time.monotonic() - t0
    totals["errors"] += sum(isinstance(r, BaseException) for r in results)
    sent = max(1, totals["sent"])
    return LoadResult(
        streams=streams,
        fps=fps,
        seconds=round(elapsed_s, 2),
        frames_sent=totals["sent"],
        frames_accepted=totals["accepted"],
        frames_dropped=totals["dropped"],
        drop_rate=round(totals["dropped"] / sent, 4),
        sustained_fps_per_stream=round(totals["accepted"] / streams / max(seconds, 1e-9), 3),
        ack_latency_p50_ms=_percentile(ack_ms, 50, 2),
        ack_latency_p99_ms=_percentile(ack_ms, 99, 2),
        ttft_p50_ms=_percentile(ttft_ms, 50, 1),
        ttft_max_ms=_percentile(ttft_ms, 100, 1),
        errors=totals["errors"],
    )


class _LocalServer:
    """`vrex serve` on a free loopback port, for the benchmark's own use."""

    def __init__(self, args: argparse.Namespace, max_sessions: int):
        self._dir = tempfile.TemporaryDirectory()
        ready = Path(self._dir.name) / "ready.json"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--ready-file", str(ready),
               "--max-sessions", str(max_sessions), "--device", args.device, "--log-format", "text",
               "--resv-preset", args.resv_preset]  # fmt: skip
        if args.model:
            cmd += ["--model", str(args.model)]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._log = open(Path(self._dir.name) / "server.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        try:
            while not ready.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    # read the log before close() deletes its folder: it holds the server's own error
                    log = (Path(self._dir.name) / "server.log").read_text(errors="replace")
                    code = self.proc.poll()
                    why = f"exited with code {code}" if code is not None else "did not start within 900 s"
                    raise ValueError(f"the benchmark's server (vrex serve) {why}: {_server_error(log)}")
                time.sleep(0.1)
        except BaseException:  # the error above, or Ctrl-C while it loads: leave nothing running
            self.close()
            raise
        self.target = f"127.0.0.1:{json.loads(ready.read_text())['port']}"

    def close(self) -> None:
        if self._log.closed:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
        self._dir.cleanup()


def _server_error(log: str) -> str:
    """The line of a server log that says why it stopped: its `vrex: error:` line, else the last
    line (a traceback's exception)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("vrex: error:"):
            return line.removeprefix("vrex: error:").strip()
    return lines[-1] if lines else "it printed nothing"


def _check_args(args: argparse.Namespace) -> tuple[int, int]:
    """Flag checks that need no server, so a typo fails at once; returns the frame size."""
    size = parse_size(args.size)
    if args.streams < 1:
        raise ValueError(f"--streams must be >= 1, got {args.streams}")
    if args.max_streams < 1:
        raise ValueError(f"--max-streams must be >= 1, got {args.max_streams}")
    check_fps("--fps", args.fps)
    check_seconds("--seconds", args.seconds)
    if args.ask_at is not None and (not math.isfinite(args.ask_at) or args.ask_at < 0):
        raise ValueError(f"--ask-at must be >= 0 seconds, got {args.ask_at:g}")
    check_max_new_tokens("--max-new-tokens", args.max_new_tokens)
    check_seconds("--connect-timeout", args.connect_timeout)
    return size


def run(args: argparse.Namespace) -> int:
    w, h = _check_args(args)
    counts = [args.streams]
    if args.sweep:
        counts, n = [], 1
        while n <= args.max_streams:
            counts.append(n)
            n *= 2
    local = None if args.server else _LocalServer(args, max(counts))
    target = args.server or local.target
    results: list[LoadResult] = []
    try:
        for n in counts:
            result = asyncio.run(
                run_load(
                    target,
                    n,
                    args.fps,
                    args.seconds,
                    size=(w, h),
                    ask_at_s=args.ask_at,
                    max_new_tokens=args.max_new_tokens,
                    api_key=args.api_key,
                    tls_ca=args.tls_ca,
                    # the local server is up once its ready file exists; a remote one may not be
                    connect_timeout_s=args.connect_timeout if args.server else 30.0,
                )  # fmt: skip
            )
            results.append(result)
            if not args.json:
                print(_line(result), file=sys.stderr)
            if args.sweep and (result.drop_rate >= 0.01 or result.errors):
                break
    finally:
        if local is not None:
            local.close()
    held = [r.streams for r in results if r.drop_rate < 0.01 and not r.errors]
    host = machine_info()
    report = {
        "benchmark": "server_load",
        "target": args.server or "local",
        "resv_preset": None if args.server else args.resv_preset,
        "max_streams_under_1pct_drops": max(held, default=0),
        "runs": [asdict(r) for r in results],
        # Jetson nvpmodel mode, L4T release and clocks of this machine (None off a Jetson); for a
        # remote --server it describes the client's machine, so run the benchmark on the board.
        "power_mode": host.get("power_mode"),
        "machine": host,
    }
    if args.json:
        print(dumps(report, indent=2))
    else:
        print(
            f"most streams held at {args.fps:g} fps with < 1% drops: {report['max_streams_under_1pct_drops']}"
        )
    return 0


def _ms(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} ms"


def _line(r: LoadResult) -> str:
    return (
        f"streams={r.streams} fps={r.fps:g}: sent {r.frames_sent} accepted {r.frames_accepted} "
        f"dropped {r.frames_dropped} ({r.drop_rate:.1%}), {r.sustained_fps_per_stream:.2f} fps/stream, "
        f"ack p50 {_ms(r.ack_latency_p50_ms, 1)} p99 {_ms(r.ack_latency_p99_ms, 1)}, "
        f"TTFT p50 {_ms(r.ttft_p50_ms, 0)}, errors {r.errors}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vrex bench server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
