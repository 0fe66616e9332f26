"""`vrex bench ...`: benchmarks that compare side by side in one run and print JSON or a table."""

from __future__ import annotations


def register(sub) -> None:
    bench = sub.add_parser("bench", help="run a benchmark (JSON with --json)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bench_sub.required = True
    from benchmarks import fidelity, latency, resv_micro, server_load, server_wal

    resv_micro.register(bench_sub)
    fidelity.register(bench_sub)
    latency.register(bench_sub)
    server_load.register_bench(bench_sub)
    server_wal.register_bench(bench_sub)
