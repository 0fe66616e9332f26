"""Per-frame durability cost (`vrex bench wal`): write-ahead log append vs full snapshot.

Streams frames through a real engine session (demo model unless --model) and, at a few history
lengths, times side by side what the server does before acking an accepted frame:
  - "wal":      append the frame's message (JPEG) to the session's log and fdatasync it
  - "snapshot": a full session snapshot (the KV store, HC tables, state), as --durability snapshot
Then it replays the whole log onto the first snapshot, as a restart after kill -9 does, and
reports the replay time per frame.

    python -m benchmarks.server_wal --frames 12 --at 3,6,12 --json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import parse_size
from vrex.host import check_output_path, dumps, machine_info


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add `wal` under `vrex bench`."""
    p = bench_subparsers.add_parser("wal", help="durability cost per frame: write-ahead log vs snapshot",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    p.add_argument("--device", default="cpu", help="torch device of the engine (default cpu)")
    p.add_argument("--frames", type=int, default=12, help="frames to stream (default 12)")
    p.add_argument("--at", default="3,6,12", help="history lengths (frames) to measure at (default 3,6,12)")
    p.add_argument("--size", default="320x240", help="frame size WxH (default 320x240)")
    p.add_argument("--data-dir", default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _check_args(args: argparse.Namespace) -> tuple[list[int], tuple[int, int]]:
    """Flag checks that need no model: the history points and the frame size."""
    if args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    try:
        at = sorted({int(v) for v in args.at.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--at must be comma-separated frame counts, e.g. 3,6,12, got {args.at!r}") from None
    if not at or at[0] < 1 or at[-1] > args.frames:
        raise ValueError(f"every --at value must be in 1..--frames ({args.frames}), got {args.at!r}")
    size = parse_size(args.size)
    check_output_path(args.data_dir, "--data-dir", folder=True)
    return at, size


def run(args: argparse.Namespace) -> int:
    at, (w, h) = _check_args(args)
    from vrex.memory import check_device

    check_device(args.device)
    from server import wal
    from server.config import Limits
    from server.images import decode_frame
    from vrex.api import vrex_pb2 as pb
    from vrex.client import encode_image
    from vrex.engine import Engine, EngineConfig, SessionSettings
    from vrex.video import SyntheticSource

    tmp = None
    if args.data_dir is None:
        tmp = tempfile.TemporaryDirectory()
    root = Path(args.data_dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        engine = Engine(EngineConfig(model_dir=args.model, device=args.device, data_dir=str(root)))
        session = engine.open_session(SessionSettings(fps=1.0))
        base = root / "base-snapshot"
        session.snapshot(base)
        frames = [
            pb.Frame(encoded=encode_image(img, "jpeg"), timestamp_s=float(i))
            for i, (_, img) in zip(range(args.frames), SyntheticSource(width=w, height=h, fps=1.0, seconds=args.frames), strict=False)
        ]  # fmt: skip
        log = wal.WriteAheadLog(root / "bench.wal")
        points, append_ms, prefill_ms = [], [], []
        for i, frame in enumerate(frames):
            image = decode_frame(frame, Limits())
            t0 = time.perf_counter()
            result = session.add_frame(image, frame.timestamp_s)
            prefill_ms.append((time.perf_counter() - t0) * 1e3)
            assert result.accepted, result.dropped_reason
            t0 = time.perf_counter()
            log.append(wal.frame_record(frame.SerializeToString(), result.frame_index, frame.timestamp_s))
            append_ms.append((time.perf_counter() - t0) * 1e3)
            if i + 1 in at:
                folder = root / f"snapshot-{i + 1}"
                t0 = time.perf_counter()
                session.snapshot(folder)
                snapshot_ms = (time.perf_counter() - t0) * 1e3
                points.append(
                    {
                        "history_frames": i + 1,
                        "history_tokens": session.history_tokens,
                        "wal_append_ms_median": round(statistics.median(append_ms), 3),
                        "wal_record_bytes": len(frame.SerializeToString()),
                        "snapshot_ms": round(snapshot_ms, 1),
                        "snapshot_bytes": _dir_bytes(folder),
                        "snapshot_over_wal": round(snapshot_ms / max(statistics.median(append_ms), 1e-6), 1),
                    }
                )
                shutil.rmtree(folder)
        log.close()
        session.close()
        # replay after a "crash": the first snapshot plus the whole log
        engine.sessions.clear()
        restored = type(session).restore(engine, base)
        contents = wal.read_log(root / "bench.wal")
        t0 = time.perf_counter()
        for record in contents.records:
            image = decode_frame(pb.Frame.FromString(record.payload), Limits())
            restored.replay_frame(image, record.meta["timestamp_s"], record.meta["frame_index"])
        replay_ms = (time.perf_counter() - t0) * 1e3
        same = restored.history_tokens == points[-1]["history_tokens"] if at[-1] == args.frames else None
        restored.close()
        engine.shutdown()
    finally:
        if tmp is not None:
            tmp.cleanup()
    last = points[-1]
    report = {
        "benchmark": "server_wal",
        "model": engine.model_info["name"],
        "device": args.device,
        "frame_prefill_ms_median": round(statistics.median(prefill_ms), 1),
        "points": points,
        "snapshot_mib_per_s": round(last["snapshot_bytes"] / 2**20 / (last["snapshot_ms"] / 1e3), 1),
        "replay_ms_per_frame": round(replay_ms / max(1, len(contents.records)), 1),
        "replay_history_matches": same,
        "machine": machine_info(),
    }
    if args.json:
        print(dumps(report, indent=2))
    else:
        for p in points:
            print(
                f"history {p['history_frames']:4d} frames ({p['history_tokens']} tokens): wal append "
                f"{p['wal_append_ms_median']:.2f} ms ({p['wal_record_bytes']} B) vs snapshot "
                f"{p['snapshot_ms']:.0f} ms ({p['snapshot_bytes'] / 2**20:.1f} MiB): x{p['snapshot_over_wal']}"
            )
        print(
            f"replay {report['replay_ms_per_frame']} ms/frame; prefill {report['frame_prefill_ms_median']} ms/frame"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vrex bench wal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
