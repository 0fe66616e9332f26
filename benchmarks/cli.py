"""`vrex bench ...`: benchmarks that compare side by side in one run and print JSON or a table."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from vrex.memory import add_dtype_flag

# The flags of the torch-backed benchmarks (resv, fidelity, latency) are defined here, not in
# their modules: importing those loads torch and transformers (seconds), which `vrex --help`
# and `vrex bench NAME --help` should not wait for. A benchmark's module loads when it runs.
FIDELITY_PARTS = ("needle", "video", "budget", "default")
LATENCY_POLICIES = ("full", "rekv", "topk", "resv", "resv-paper")  # resv-paper: the paper preset
# copies, as importing the originals loads torch (tests check that they match)
RESV_SHAPES = ("llama3-8b", "smollm2")  # benchmarks.resv_micro.SHAPES
ENGINE_BLOCK_TOKENS = 2  # vrex.engine.EngineConfig.block_tokens


def register(sub) -> None:
    bench = sub.add_parser("bench", help="run a benchmark (JSON with --json)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bench_sub.required = True
    from benchmarks import server_load, server_wal  # no torch in these

    register_resv(bench_sub)
    register_fidelity(bench_sub)
    register_latency(bench_sub)
    server_load.register_bench(bench_sub)
    server_wal.register_bench(bench_sub)


def _lazy_main(module: str) -> Callable[[argparse.Namespace], int]:
    """The command's handler: ``module._main``, imported only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module)._main(args)

    return run


def register_resv(bench_sub) -> None:
    """`vrex bench resv`; runs benchmarks.resv_micro._main."""
    p = bench_sub.add_parser(
        "resv", help="ReSV micro-benchmark on synthetic streams (selectors side by side)"
    )
    p.add_argument("--quick", action="store_true", help="histories 1K and 5K only")
    p.add_argument("--shape", action="append", choices=sorted(RESV_SHAPES), help="model shape (repeatable)")
    p.add_argument("--history", action="append", type=int, help="history tokens (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--out", help="also write the JSON rows to this file")
    p.set_defaults(func=_lazy_main("benchmarks.resv_micro"))


def register_fidelity(bench_sub) -> None:
    """`vrex bench fidelity`; runs benchmarks.fidelity._main."""
    p = bench_sub.add_parser(
        "fidelity",
        help="ReSV vs full attention, ReKV-like, top-k and window on real weights (needle, video, budget sweep, default choice)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes: history 2K, 6 needle trials, 6 frames of bikes.mp4"
    )
    p.add_argument("--part", action="append", choices=FIDELITY_PARTS, help="run only this part (repeatable)")
    p.add_argument("--model", help="model folder (default: the demo model)")
    p.add_argument("--trials", type=int, help="needle trials per history (default 50, quick 6)")
    p.add_argument("--default-trials", type=int, help="needle trials per ReSV setting in the default sweep")
    p.add_argument("--history", action="append", type=int, help="needle history tokens (repeatable)")
    p.add_argument(
        "--chunk-tokens", type=int, default=64, help="tokens per prefilled text chunk (a frame step)"
    )
    p.add_argument(
        "--video",
        action="append",
        help="video file or sample name (repeatable; default bikes, bigbuckbunny, vtest)",
    )
    p.add_argument("--fps", type=float, default=1.0, help="sampling rate for --video")
    p.add_argument("--max-frames", type=int, help="at most this many frames per video")
    p.add_argument("--questions", type=int, default=2, help="questions per video, spread over the stream")
    p.add_argument("--answer-tokens", type=int, default=12, help="greedy answer tokens of full attention")
    p.add_argument(
        "--plot", default="docs/fidelity_budget.png", help="PNG of fidelity vs fetched fraction ('' = none)"
    )
    p.add_argument(
        "--heatmap",
        default="docs/fidelity_fetch_heatmap.png",
        help="PNG of fetched fraction per layer and KV head ('' = none)",
    )
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--raw", help="append every needle trial to this JSON-lines file as it ends")
    p.add_argument(
        "--variant",
        action="append",
        help="run only this needle/video variant (repeatable; full attention always runs)",
    )
    p.add_argument(
        "--merge-raw",
        action="append",
        metavar="FILE",
        help="no run: the needle tables from these --raw files (repeatable; seeds tell trials apart)",
    )
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--out", help="also write the JSON rows to this file")
    p.set_defaults(func=_lazy_main("benchmarks.fidelity"))


def register_latency(bench_sub) -> None:
    """`vrex bench latency`; runs benchmarks.latency._main."""
    p = bench_sub.add_parser(
        "latency", help="per-frame step latency vs history per selector, KV spread over device/host/disk"
    )
    p.add_argument("--quick", action="store_true", help="histories 1K and 5K only")
    p.add_argument(
        "--history", action="append", type=int, help="history tokens (repeatable; default 1K..40K)"
    )
    p.add_argument(
        "--policy", action="append", choices=LATENCY_POLICIES, help="policy (repeatable; default all)"
    )
    p.add_argument("--model", help="model folder (default: the demo model)")
    p.add_argument(
        "--device", default="cpu", help="torch device of the model and the device tier (cpu, cuda)"
    )
    add_dtype_flag(p)
    p.add_argument(
        "--device-fraction", type=float, default=0.25, help="device tier budget, share of the history KV"
    )
    p.add_argument(
        "--host-fraction", type=float, default=0.5, help="host tier budget, share of the history KV"
    )
    p.add_argument(
        "--steps", type=int, default=3, help="frame steps per point, >= 2 (the first is a warm-up)"
    )
    p.add_argument("--data-dir", help="where the disk tier's files go (default: the temp folder)")
    p.add_argument(
        "--history-source",
        choices=("recorded", "synthetic"),
        default="recorded",
        help="the model's own KV of the sample videos (cached after the first run) or random keys",
    )
    p.add_argument(
        "--record-cache", help="folder of the recorded history (default ~/.cache/vrex/latency-history)"
    )
    p.add_argument("--record-fps", type=float, default=6.0, help="video sampling rate of the recording")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument(
        "--block-tokens",
        type=int,
        action="append",
        help=f"tokens per KV block (repeatable, to compare sizes in one run; default {ENGINE_BLOCK_TOKENS})",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--raw", help="append every measured point to this JSON-lines file as it ends")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--out", help="also write the JSON rows to this file")
    p.set_defaults(func=_lazy_main("benchmarks.latency"))
