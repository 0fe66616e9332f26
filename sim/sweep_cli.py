"""`vrex sim sweep --space SPACE.yaml --out results.parquet [--workers N] [--executor local|dask]`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


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
    p.add_argument(
        "--max-points",
        type=int,
        default=None,
        help="refuse a space with more points than this (default 100000, about an hour here)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_sweep)


def _no_nan(value):
    """JSON has no NaN: an unmeasured objective (an infeasible point) is null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def cmd_sweep(args: argparse.Namespace) -> int:
    from sim.sweep import MAX_POINTS, cache_dir_for, load_space, run_sweep

    if not str(args.out).endswith(".parquet"):
        raise ValueError(f"--out {args.out}: results are written as Parquet; name the file *.parquet")
    if args.top < 1:
        raise ValueError(f"--top must be >= 1 Pareto rows, got {args.top}")
    if args.scheduler and args.executor != "dask":
        raise ValueError("--scheduler is for --executor dask")
    max_points = MAX_POINTS if args.max_points is None else args.max_points
    if max_points < 1:
        raise ValueError(f"--max-points must be >= 1, got {max_points}")
    space = load_space(args.space)
    show_bar = not args.no_progress and not args.json and os.isatty(2)
    try:
        res = run_sweep(
            space,
            args.out,
            workers=args.workers,
            executor=args.executor,
            scheduler_address=args.scheduler,
            progress=show_bar,
            max_points=max_points,
        )
    except KeyboardInterrupt:
        cache = cache_dir_for(args.out)
        done = len(list(cache.glob("*.json"))) if cache.is_dir() else 0
        print(
            f"\nvrex sim sweep: interrupted; {done} points are cached in {cache}: "
            "the same command goes on from there",
            file=sys.stderr,
        )
        raise
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
        "infeasible": int(res.results["infeasible"].notna().sum()) if "infeasible" in res.results else 0,
        "front": front[["point", *params, *objectives]].head(args.top).to_dict(orient="records"),
    }
    if args.json:
        print(json.dumps(_no_nan(summary), indent=2, default=str))
        return 0
    infeasible = f", {summary['infeasible']} infeasible" if summary["infeasible"] else ""
    print(
        f"{summary['points']} points ({res.computed} simulated, {res.cached} from the cache{infeasible}) "
        f"in {res.wall_s:.1f} s"
    )
    print(f"results: {res.out}\nPareto front ({len(res.pareto)} points): {res.pareto_out}")
    with_cols = ["point", *params, *objectives]
    print(front[with_cols].head(args.top).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
