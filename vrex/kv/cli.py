"""`vrex kv-bench`: measure the KV store's fetch throughput per tier."""

from __future__ import annotations

import argparse

from vrex.kv.bench import KVBenchConfig, check_config, measure_fetch_throughput, min_history_tokens


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("kv-bench", help="fetch throughput of the tiered KV store, per tier")
    defaults = KVBenchConfig()
    parser.add_argument(
        "--tokens",
        type=int,
        default=defaults.history_tokens,
        help="history tokens per KV head; at least 4 x (append tokens + 1) x block tokens "
        f"({min_history_tokens(defaults)} by default), so the host and disk rows time their own tier",
    )
    parser.add_argument(
        "--kv-heads",
        type=int,
        default=defaults.num_kv_heads,
        help=f"KV heads (default {defaults.num_kv_heads})",
    )
    parser.add_argument(
        "--head-dim",
        type=int,
        default=defaults.head_dim,
        help=f"head dimension (default {defaults.head_dim})",
    )
    parser.add_argument(
        "--block-tokens",
        type=int,
        default=defaults.block_tokens,
        help=f"tokens per KV block (default {defaults.block_tokens}, as recorded; the engine's is EngineConfig.block_tokens)",
    )
    parser.add_argument("--append-tokens", type=int, default=defaults.append_tokens, help="tokens per append")
    parser.add_argument(
        "--fraction", type=float, default=defaults.select_fraction, help="share of clusters fetched"
    )
    parser.add_argument(
        "--repeats", type=int, default=defaults.repeats, help=f"timed repeats (default {defaults.repeats})"
    )
    parser.add_argument(
        "--dtype",
        default=defaults.dtype,
        choices=["float16", "bfloat16", "float32"],
        help=f"KV precision (default {defaults.dtype})",
    )
    parser.add_argument("--device", default=defaults.device, help="compute device, e.g. cpu or cuda")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_kv_bench)


def run_kv_bench(args: argparse.Namespace) -> int:
    for name in ("tokens", "kv_heads", "head_dim", "block_tokens", "append_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {args.fraction:g}")
    from vrex.memory import check_device

    device = check_device(args.device)  # a friendly message for cuda on a CPU-only torch
    config = KVBenchConfig(
        history_tokens=args.tokens,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        block_tokens=args.block_tokens,
        select_fraction=args.fraction,
        append_tokens=args.append_tokens,
        repeats=args.repeats,
        dtype=args.dtype,
        device=device,
    )
    check_config(config)
    results = measure_fetch_throughput(config)
    if args.json:
        from vrex.host import dumps, machine_info

        results = {**results, "machine": machine_info()}
        print(dumps(results, indent=1))
        return 0
    print(f"{'tier':<8}{'fetch ms':>10}{'MB/fetch':>10}{'from tier':>11}{'GB/s':>8}")
    for tier, row in results["tiers"].items():
        print(
            f"{tier:<8}{row['fetch_ms']:>10.2f}{row['bytes_per_fetch'] / 1e6:>10.2f}"
            f"{row['share_from_tier']:>10.0%}{row['gb_per_s']:>8.2f}"
        )
    return 0
