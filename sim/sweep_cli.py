"""`vrex sim sweep --space SPACE.yaml --out results.parquet [--workers N] [--executor local|dask|ray]`."""

from __future__ import annotations

import argparse
import json
import os


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="design-space sweep (grid / random / Latin hypercube), cached and resumable, with a Pareto front",
    )
    p.add_argument("--space", required=True, metavar="SPACE.yaml", help="the sweep space (see sim/sweep.py)")
    p.add_argument(
        "--out", required=True, metavar="RESULTS.parquet", help="results; the front goes to *.pareto.parquet"
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1: in-process)")
    p.add_argument(
        "--executor",
        choices=("local", "dask"),
        default="local",
        help="local processes, or Dask (pip install 'dask[distributed]'; --scheduler for a running cluster)",
    )
    p.add_argument(
        "--scheduler", metavar="ADDRESS", help="Dask scheduler of a running cluster (tcp://host:8786)"
    )
    p.add_argument("--top", type=int, default=10, help="Pareto rows to print (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from sim.sweep import load_space, run_sweep

    if not str(args.out).endswith(".parquet"):
        raise ValueError(f"--out {args.out}: results are written as Parquet; name the file *.parquet")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1 Pareto rows, got {args.top}")
    if args.scheduler and args.executor != "dask":
        raise ValueError("--scheduler is for --executor dask")
    space = load_space(args.space)
    show_bar = not args.no_progress and not args.json and os.isatty(2)
    res = run_sweep(
        space,
        args.out,
        workers=args.workers,
        executor=args.executor,
        scheduler_address=args.scheduler,
        progress=show_bar,
    )
    params = [p.name for p in space.parameters]
    objectives = list(space.objectives)
    front = res.pareto.sort_values(objectives[0], ascending=space.objectives[objectives[0]] == "min")
    summary = {
        "points": len(res.results),
        "computed": res.computed,
        "cached": res.cached,
        "wall_s": res.wall_s,
        "sampler": space.sampler,
        "objectives": space.objectives,
        "results": str(res.out),
        "pareto": str(res.pareto_out),
        "cache": str(res.cache_dir),
        "pareto_points": len(res.pareto),
        "front": front[["point", *params, *objectives]].head(args.top).to_dict(orient="records"),
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(
        f"{summary['points']} points ({res.computed} simulated, {res.cached} from the cache) in {res.wall_s:.1f} s"
    )
    print(f"results: {res.out}\nPareto front ({len(res.pareto)} points): {res.pareto_out}")
    with_cols = ["point", *params, *objectives]
    print(front[with_cols].head(args.top).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
