"""`vrex sim run|area|compare|validate|sensitivity|plot` (registered into the one `vrex` command)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from sim.config import BUILTIN_SYSTEMS, POLICIES, override_many, read_yaml_mapping, validate, with_hf_model
from sim.tech import CORNERS

RUN_METRICS = (
    "frame_latency_ms",
    "fps",
    "tpot_ms",
    "energy_per_frame_mj",
    "frame_step_energy_mj",  # all streams of a batch (printed at batch > 1)
    "energy_per_token_mj",
    "gops_per_w",
    "e2e_latency_ms",
    "e2e_energy_mj",
)


def _add_system_args(p: argparse.ArgumentParser, corners: tuple = CORNERS) -> None:
    p.add_argument(
        "--system",
        default=None,
        help=f"built-in system ({', '.join(BUILTIN_SYSTEMS)}) or a YAML file (default vrex8, or the --config base)",
    )
    p.add_argument("--config", metavar="FILE", help="YAML file of field overrides (may say `base: vrex8`)")
    p.add_argument(
        "--hf-config",
        metavar="PATH",
        help="model from a Hugging Face config.json or model folder (then --set model.* still applies)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any config field by dotted name, e.g. memory.link_bandwidth_gbps=8",
    )
    p.add_argument(
        "--tech-corner",
        choices=corners,
        default=None,
        help="technology numbers at their low / nominal / high values (default nominal)"
        + ("; all: the three side by side" if "all" in corners else ""),
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _system(args: argparse.Namespace, apply_set: bool = True):
    from sim.api import resolve_system
    from sim.config import load_system

    data = read_yaml_mapping(args.config, "config fields") if args.config else {}
    named = data.pop("base", None)
    if named and args.system and str(named) != args.system:
        raise ValueError(
            f"{args.config} says `base: {named}` but --system says {args.system}; keep one of them"
        )
    base = load_system(str(args.system or named or "vrex8"), complete=False)  # resolve_system validates
    if args.config:
        base = with_hf_model(base, data.pop("hf_config", None), Path(args.config).parent)
        base = override_many(base, data, prefix=f"{args.config}: ")
        validate(base, prefix=f"{args.config}: ", fields_only=True)
    base = with_hf_model(base, args.hf_config)
    return resolve_system(base, list(args.set) if apply_set else None, args.tech_corner)


def _tech_label(rep: dict, corner: str | None = None) -> str:
    pins = ", ".join(f"{k}={v:g}" for k, v in rep.get("tech_pinned", {}).items())
    return f"tech {corner or rep['tech_corner']}" + (f" ({pins})" if pins else "")


def _run_header(rep: dict, corner: str | None = None) -> str:
    trace = rep.get("trace")
    if trace:
        steps = ", ".join(f"{n} {name}" for name, n in trace["steps"].items() if n)
        source = f"replaying {trace['path']} ({steps} steps, up to {rep['kv_tokens']} KV tokens)"
        policy = f"policy {trace['policy']} (traced)"
    else:
        source, policy = f"{rep['kv_tokens']} KV tokens", f"policy {rep['policy']}"
    return (
        f"{rep['system']} ({rep['kind']}) running {rep['model']['name']}, {policy}, "
        f"{source}, batch {rep['batch']}, {_tech_label(rep, corner)}"
    )


def _print(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=2, default=float) if args.json else text)


def _kv_list(text: str) -> list[int]:
    try:
        numbers = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        numbers = None
    if numbers is None or not all(v.is_integer() for v in numbers):
        raise ValueError(f"--kv-tokens expects comma-separated whole numbers of tokens, got {text!r}")
    values = [int(v) for v in numbers]
    if not values:
        raise ValueError(f"--kv-tokens needs at least one value, got {text!r}")
    if min(values) < 0:
        raise ValueError(f"--kv-tokens values must be >= 0, got {min(values)}")
    return values


def _policy_name(text: str) -> str:
    """The paper's spelling (InfiniGen-P) names the same policy as infinigen_p."""
    return text.strip().lower().replace("-", "_")


def _add_policy_flag(p: argparse.ArgumentParser, default: str | None, help: str) -> None:
    p.add_argument("--policy", type=_policy_name, choices=POLICIES, default=default, help=help)


def _metrics(result: dict) -> list[str]:
    """The headline metrics a run has; a batch's whole-step energy only where it differs."""
    skip = {"frame_step_energy_mj"} if result["batch"] == 1 else set()
    return [k for k in RUN_METRICS if result.get(k) is not None and k not in skip]


def _run_report(system, scenario: dict, stage: str, overrides: list[str] | None = None) -> tuple[dict, dict]:
    from sim.api import simulate

    res = simulate(system, scenario, overrides=overrides)
    if (
        stage == "decode"
        and scenario.get("trace")
        and "decode" not in res["stages"]
        and "text" in res["stages"]
    ):
        stage = "text"  # text = the answer's decode steps; a trace of only question prefills: those
    detail = res["stages"].get(stage)
    if detail is None:
        have = ", ".join(res["stages"])
        if scenario.get("trace") and stage == "decode":
            raise ValueError(
                f"{scenario['trace']} has no answer tokens to report for --stage text (it has {have} steps); "
                "record a trace with a question and its answer, or pick another --stage"
            )
        raise ValueError(f"this run has no {stage} steps to report (it has: {have}); pick another --stage")
    report = {k: v for k, v in res.items() if k not in ("stages", "system_config")}
    report["model"] = res["system_config"]["model"]
    report["system_config"] = res["system_config"]  # every field the run used, overrides applied
    # per step, like frame_latency_ms / tpot_ms (a trace has many steps per stage); e2e: total
    per = 1 if stage == "e2e" else detail["steps"]
    streams = f" of all {res['batch']} streams" if res["batch"] > 1 else ""
    report["breakdown_of"] = (
        f"the whole run{streams}"
        if stage == "e2e"
        else f"one {stage} step{streams}" + (f" (mean of {per})" if per > 1 else "")
    )
    report["latency_breakdown_ms"] = {k: v / per for k, v in detail["latency_breakdown_ms"].items()}
    report["energy_breakdown_mj"] = {k: v / per for k, v in detail["energy_breakdown_mj"].items()}
    bound = detail.get("roofline_bound_ms")
    report["roofline_bound_ms"] = None if bound is None else bound / per
    # Where the time went (V-Rex only; the GPU baselines are closed forms): the share of the
    # stage each channel spends moving data; and the traffic by kind, per step like the
    # breakdowns (the GPU rooflines count no activation spill).
    report["utilization"] = {
        k.removesuffix("_utilization"): detail[k]
        for k in ("dram_utilization", "link_utilization", "offload_utilization")
        if k in detail
    }
    counters = detail["counters"]
    report["traffic_mb"] = {
        "dram": counters.get("dram_bytes", 0.0) / per / 1e6,
        "activation_spill": counters.get("dram_spill_bytes", 0.0) / per / 1e6,
        "link_read": counters.get("link_read_bytes", 0.0) / per / 1e6,
    }
    return res, report


def _run_all_corners(
    args: argparse.Namespace, system, scenario: dict, stage: str, overrides: list[str] | None
) -> int:
    """One design point at every technology corner (timing is the same; energy spreads)."""
    reports = {c: _run_report(replace(system, tech_corner=c), scenario, stage, overrides)[1] for c in CORNERS}
    if args.json:
        print(json.dumps({"corners": reports}, indent=2, default=float))
        return 0
    first = reports[CORNERS[0]]
    lines = [
        _run_header(first, "corners"),
        f"  {'metric':22s} " + " ".join(f"{c:>12s}" for c in CORNERS),
    ]
    for key in _metrics(first):
        lines.append(f"  {key:22s} " + " ".join(f"{reports[c][key]:12.3f}" for c in CORNERS))
    print("\n".join(lines))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    all_corners = args.tech_corner == "all"
    if all_corners:
        args.tech_corner = None
    coin = {
        "--frames": args.frames,
        "--question-tokens": args.question_tokens,
        "--answer-tokens": args.answer_tokens,
    }
    if args.trace:
        given = [flag for flag, value in {"--kv-tokens": args.kv_tokens, **coin}.items() if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} does not apply to a trace replay: the trace sets the histories and "
                "steps; drop it"
            )
    elif args.stage != "e2e":
        given = [flag for flag, value in coin.items() if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} shapes the COIN scenario of --stage e2e only; --stage {args.stage} "
                "simulates one step: add --stage e2e or drop it"
            )
    # with a trace, --set is applied after the trace's model and device window (yours win)
    system = _system(args, apply_set=not args.trace)
    overrides = list(args.set) if args.trace else None
    scenario = {
        "kv_tokens": 40000 if args.kv_tokens is None else args.kv_tokens,
        "batch": args.batch,
        "stage": args.stage,
        "policy": args.policy,
        "trace": args.trace,
        "frames": args.frames,
        "question_tokens": args.question_tokens,
        "answer_tokens": args.answer_tokens,
    }
    if args.trace:
        from sim.trace_replay import read_trace, trace_policy

        if not Path(args.trace).is_file():
            what = "is a folder" if Path(args.trace).is_dir() else "does not exist"
            raise ValueError(
                f"--trace {args.trace} {what}; give a vrex.trace/1 JSON-lines file (vrex serve --trace-dir)"
            )

        traced = read_trace(args.trace)[0]
        if args.policy and args.policy != trace_policy(traced):
            raise ValueError(
                f"--policy {args.policy} conflicts with the trace, which recorded policy {traced['policy']!r}: "
                "a replay costs what the trace selected; drop --policy"
            )
    stage = {"frame": "frame", "text": "decode", "e2e": "e2e"}[args.stage]
    if all_corners:
        return _run_all_corners(args, system, scenario, stage, overrides)
    res, report = _run_report(system, scenario, stage, overrides)
    if args.json:
        print(json.dumps(report, indent=2, default=float))
        return 0
    lines = [_run_header(report)]
    for key in _metrics(res):
        lines.append(f"  {key:22s} {res[key]:.3f}")
    lines.append(
        f"  latency breakdown of {report['breakdown_of']}, ms: "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["latency_breakdown_ms"].items())
    )
    lines.append(
        f"  energy breakdown of {report['breakdown_of']}, mJ: "
        + ", ".join(f"{k} {v:.1f}" for k, v in report["energy_breakdown_mj"].items())
    )
    if report["utilization"]:
        lines.append(
            "  moving data: "
            + ", ".join(f"{k} {v:.0%}" for k, v in report["utilization"].items())
            + f" of the time; traffic of {report['breakdown_of']}, MB: "
            + ", ".join(f"{k} {v:.1f}" for k, v in report["traffic_mb"].items())
        )
    lines += [f"  note: {note}" for note in res.get("notes", [])]
    ev = res["events_per_s"] or 0
    lines.append(
        f"  events {res['events']}  sim_wall_s {res['sim_wall_s']:.3f}  events/s {ev:,.0f}  hash {res['config_hash']}"
    )
    print("\n".join(lines))
    return 0


def cmd_area(args: argparse.Namespace) -> int:
    from sim.api import area

    rep = area(_system(args))
    lines = [
        f"{rep['system']}: {rep['num_cores']} cores, {_tech_label(rep)}",
        f"  {'':10s} {'per core':>21s}   {'per chip':>21s}",
        f"  {'component':10s} {'area_mm2':>10s} {'power_mw':>10s}   {'area_mm2':>10s} {'power_mw':>10s}",
    ]
    rows = [(name, v, rep["per_chip"][name]) for name, v in rep["per_core"].items()]
    rows.append(("total", rep["core_total"], rep["chip_total"]))
    for name, core, chip in rows:
        lines.append(
            f"  {name:10s} {core['area_mm2']:10.4f} {core['power_mw']:10.2f}   "
            f"{chip['area_mm2']:10.3f} {chip['power_mw']:10.1f}"
        )
    lines.append(
        f"  DRE share: area {rep['dre_share']['area_fraction'] * 100:.2f}%, power {rep['dre_share']['power_fraction'] * 100:.2f}%"
    )
    _print(args, rep, "\n".join(lines))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from sim.api import baseline_for, compare

    system = _system(args)
    # the same workload; --set changes our system only, --baseline-set the baseline
    baseline = baseline_for(args.baseline, system, list(args.baseline_set), args.tech_corner)
    rep = compare(system, baseline, args.policy, _kv_list(args.kv_tokens), args.batch)
    rep["overrides"] = {"system": list(args.set), "baseline": list(args.baseline_set)}
    columns = (  # the JSON keys, so the table and --json read the same
        "kv_tokens",
        "frame_latency_ms",
        "baseline_frame_latency_ms",
        "speedup",
        "energy_efficiency_gain",
        "tpot_ms",
        "tpot_speedup",
        "text_energy_efficiency_gain",
    )
    lines = [f"{rep['system']} (resv) vs {rep['baseline']} + {rep['policy']}, batch {rep['batch']}"]
    for who, items in rep["overrides"].items():
        if items:
            lines.append(f"  {who} overrides: {', '.join(items)}")
    lines.append("  " + " ".join(columns))
    for p in rep["points"]:
        cells = (f"{p[c]:d}" if isinstance(p[c], int) else f"{p[c]:.2f}" for c in columns)
        lines.append("  " + " ".join(cell.rjust(len(c)) for cell, c in zip(cells, columns, strict=True)))
    _print(args, rep, "\n".join(lines))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from sim.validate import format_table, reference_path, validation_table

    rows = validation_table(quick=args.quick, overrides=list(args.set))
    payload = {"reference": str(reference_path()), "overrides": list(args.set), "rows": rows}
    _print(args, payload, format_table(rows))
    return 1 if args.strict and not all(r["pass"] for r in rows) else 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from sim.sweep import tech_sensitivity

    if args.min_pct < 0:
        raise ValueError(f"--min-pct must be >= 0 (a percentage change), got {args.min_pct:g}")
    system = _system(args)
    scenario = {"kv_tokens": args.kv_tokens, "batch": args.batch, "policy": args.policy}
    df = tech_sensitivity(system, scenario)
    df = df[df[["low_pct", "high_pct"]].abs().max(axis=1) >= args.min_pct]
    rows = df.to_dict(orient="records")
    lines = [
        f"{system.name}, {args.kv_tokens} KV tokens, batch {args.batch}: % change of each objective "
        f"with one technology entry at its low / high value (|change| >= {args.min_pct:g}%)",
        f"  {'entry':38s} {'objective':20s} {'low':>9s} {'high':>9s} {'low %':>8s} {'high %':>8s}",
    ]
    for r in rows:
        lines.append(
            f"  {r['knob']:38s} {r['objective']:20s} {r['low']:9.3g} {r['high']:9.3g} "
            f"{r['low_pct']:+8.1f} {r['high_pct']:+8.1f}"
        )
    _print(args, {"system": system.name, "scenario": scenario, "rows": rows}, "\n".join(lines))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from sim.api import baseline_for
    from sim.plots import make_all

    kwargs = {"kv_tokens": _kv_list(args.kv_tokens), "batch": args.batch, "layer": args.layer}
    if args.system or args.config or args.hf_config or args.set or args.tech_corner:
        system = _system(args)
        kwargs["system"] = system
        kwargs["baseline"] = baseline_for(args.baseline, system, None, args.tech_corner)
    else:
        kwargs["baseline"] = args.baseline
    paths = [str(p) for p in make_all(args.out, **kwargs)]
    _print(args, {"plots": paths}, "\n".join(paths))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `sim` with its sub-commands to the `vrex` command line."""
    sim = subparsers.add_parser("sim", help="cycle-level simulator of the V-Rex accelerator")
    sub = sim.add_subparsers(dest="sim_command", metavar="SIM_COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="simulate one design point")
    _add_system_args(run, corners=(*CORNERS, "all"))
    run.add_argument(
        "--kv-tokens", type=int, default=None, help="KV history per stream, tokens (default 40000)"
    )
    run.add_argument("--batch", type=int, default=1, help="streams served together (default 1)")
    run.add_argument(
        "--stage",
        choices=("frame", "text", "e2e"),
        default="frame",
        help="what the breakdowns show: one frame step (default), one answer token (text: a decode "
        "step), or a whole COIN question end to end (e2e)",
    )
    _add_policy_flag(run, None, "retrieval policy (default resv)")
    scenario = run.add_argument_group(
        "e2e scenario (--stage e2e without --trace; default: the paper's average COIN question)"
    )
    scenario.add_argument("--frames", type=int, default=None, help="frames streamed (default 26)")
    scenario.add_argument("--question-tokens", type=int, default=None, help="question length (default 25)")
    scenario.add_argument("--answer-tokens", type=int, default=None, help="answer length (default 39)")
    run.add_argument(
        "--trace",
        metavar="FILE",
        help="replay a vrex.trace/1 JSON-lines file (its model, policy and history replace the synthetic ones)",
    )
    run.set_defaults(func=cmd_run)

    ar = sub.add_parser("area", help="area and power per component, per core and per chip")
    _add_system_args(ar)
    ar.set_defaults(func=cmd_area)

    cmp_ = sub.add_parser("compare", help="speedup and energy-efficiency gain over a GPU baseline")
    _add_system_args(cmp_)
    cmp_.add_argument("--baseline", default="agx-orin", help="GPU baseline system (default agx-orin)")
    _add_policy_flag(cmp_, "flexgen", "the baseline's retrieval policy (default flexgen)")
    cmp_.add_argument(
        "--kv-tokens", default="1000,5000,10000,20000,40000", help="KV histories per stream, comma-separated"
    )
    cmp_.add_argument("--batch", type=int, default=1, help="streams per batch (default 1)")
    cmp_.add_argument(
        "--baseline-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the baseline (--set changes our system only)",
    )
    cmp_.set_defaults(func=cmd_compare)

    val = sub.add_parser("validate", help="paper-reproduction table (published, ours, tolerance, pass/fail)")
    val.add_argument("--quick", action="store_true", help="skip batch>1 and end-to-end rows")
    val.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of every system in the table, e.g. tech.lpddr5_energy_pj_per_bit=5 "
        "or tech_corner=low (a calibration sensitivity check)",
    )
    val.add_argument("--json", action="store_true", help="print the table as JSON")
    val.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when any row fails (9 of 83 fail on the shipped calibration: sim/CALIBRATION.md)",
    )
    val.set_defaults(func=cmd_validate)

    sens = sub.add_parser(
        "sensitivity", help="which technology numbers matter: each table entry alone at its low/high value"
    )
    _add_system_args(sens)
    sens.add_argument("--kv-tokens", type=int, default=40000, help="KV history per stream (default 40000)")
    sens.add_argument("--batch", type=int, default=1, help="streams per batch (default 1)")
    _add_policy_flag(sens, "resv", "retrieval policy (default resv)")
    sens.add_argument("--min-pct", type=float, default=1.0, help="hide rows that move no objective this much")
    sens.set_defaults(func=cmd_sensitivity)

    plot = sub.add_parser(
        "plot",
        help="write PNG plots (latency breakdown, layer bandwidth, roofline); without --system, "
        "the paper's figures",
    )
    _add_system_args(plot)
    plot.add_argument("--baseline", default="agx-orin", help="GPU baseline system (default agx-orin)")
    plot.add_argument(
        "--kv-tokens", default="1000,5000,10000,20000,40000", help="KV histories per stream, comma-separated"
    )
    plot.add_argument("--batch", type=int, default=None, help="default 1 (the paper's roofline: 4)")
    plot.add_argument("--layer", type=int, default=16, help="layer of the bandwidth-over-time plot")
    plot.add_argument("--out", default="sim-plots", help="folder for the PNGs (default sim-plots)")
    plot.set_defaults(func=cmd_plot)

    from sim.sweep_cli import add_sweep_parser  # `vrex sim sweep` (design-space exploration)

    add_sweep_parser(sub)
