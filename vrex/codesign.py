"""The trace-driven co-design loop: stream a video through the engine with ReSV, record the
retrieval trace, and simulate it on V-Rex8 and on AGX Orin + FlexGen.

    vrex codesign --video bikes.mp4 [--model DIR] [--device-kv-budget 4MiB] [--json]

This module is where the two halves meet (the engine and the simulator); each half stays
free of the other. What is compared, per frame:

- **trace-driven**: the simulator replays what ReSV really selected and fetched, per step,
  layer and KV head (`vrex sim run --trace`);
- **synthetic**: the same model dimensions, histories and device window, with the
  paper-calibrated ReSV statistics of `sim.workload` (Table II ratios) instead of the trace;
- **baseline**: AGX Orin + FlexGen at the same histories. FlexGen fetches the whole history,
  so its numbers do not depend on ReSV's selection and are the same for both columns.

The simulated system takes the streamed model's shape from the trace, its vision tower too
(the trace carries the model's HF config), and computes in its own precision (BF16, whatever
the engine recorded in); its device-resident window is what the engine's device KV tier held,
so both columns replay the same offload.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any


def record_trace(
    video: str | Path,
    trace_path: str | Path,
    *,
    model: str | None = None,
    fps: float = 1.0,
    max_seconds: float | None = None,
    ask: tuple[str, ...] | list[str] = ("What is happening?",),
    max_new_tokens: int = 8,
    device_kv_budget_bytes: int | None = None,
    host_kv_budget_bytes: int | None = None,
    preset: str = "default",
    device: str = "cpu",
) -> dict[str, Any]:
    """Stream `video` through a ReSV session, ask the questions at the end; write the trace."""
    from vrex.engine import Engine, EngineConfig, SessionSettings
    from vrex.video import FileSource, resolve_video

    path = resolve_video(video)
    Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
    engine = Engine(
        EngineConfig(
            model_dir=model,
            device=device,
            device_kv_budget_bytes=device_kv_budget_bytes,
            host_kv_budget_bytes=host_kv_budget_bytes,
        )
    )
    settings = SessionSettings(fps=fps, policy="resv", resv_preset=preset, max_new_tokens=max_new_tokens)
    session = engine.open_session(settings, trace_path=str(trace_path))
    source = FileSource(path, fps=fps)  # sampled as the session samples: it keeps every pick
    answers = []
    try:
        for ts, image in source:
            if max_seconds is not None and ts > max_seconds:
                break
            session.add_frame(image, ts)
        for question in ask:
            answers.append(
                {"question": question, "text": "".join(d.text for d in session.generate(question))}
            )
    finally:
        source.close()
        stats = session.stats()
        session.close()
        engine.shutdown()
    stats.pop("last_step", None)
    return {"video": str(path), "model": engine.model_info, "answers": answers, "session": stats}


def _mean_over_histories(system, histories: Counter, stage: str, policy: str) -> dict[str, float]:
    """Per-step latency/energy of the synthetic model averaged over the traced histories."""
    from sim.api import simulate

    key_lat, key_e = (
        ("frame_latency_ms", "energy_per_frame_mj")
        if stage == "frame"
        else ("tpot_ms", "energy_per_token_mj")
    )
    total = sum(histories.values())
    lat = energy = 0.0
    for h, count in histories.items():
        res = simulate(system, {"kv_tokens": int(h), "policy": policy})
        lat += res[key_lat] * count
        energy += res[key_e] * count
    return {"latency_ms": lat / total, "energy_mj": energy / total}


def simulate_trace(
    trace: str | Path,
    *,
    system: str = "vrex8",
    baseline: str = "agx-orin",
    baseline_policy: str = "flexgen",
    device_kv_budget_bytes: int | None = None,
) -> dict[str, Any]:
    """Trace-driven vs synthetic V-Rex, and the GPU baseline, over the histories of a trace."""
    from dataclasses import replace

    from sim.api import resolve_system, simulate
    from sim.trace_replay import device_window_tokens, read_trace, recorded_token_bytes, system_for_trace
    from sim.workload import make_step

    header, steps = read_trace(trace)
    frames = [s for s in steps if s["stage"] == "frame"]
    decodes = [s for s in steps if s["stage"] == "decode"]
    if not frames:
        raise ValueError(f"{trace}: the trace has no frame steps; stream at least one frame")
    tokens_per_frame = sorted(s["new_tokens"] for s in frames)[len(frames) // 2]
    if "device_kv_budget_bytes" not in header:  # an older trace: the tier the caller streamed with
        header = {**header, "device_kv_budget_bytes": device_kv_budget_bytes}
    window = device_window_tokens(header)

    def shaped(name: str):
        # the header's device tier becomes V-Rex's recent window (system_for_trace)
        cfg = system_for_trace(resolve_system(name), header)
        return replace(cfg, model=replace(cfg.model, tokens_per_frame=int(tokens_per_frame)))

    vrex_cfg = shaped(system)
    base_cfg = shaped(baseline)
    if vrex_cfg.kind != "vrex":
        raise ValueError(f"--system {system!r} is a GPU baseline; give a V-Rex system (vrex8, vrex48)")
    if base_cfg.kind != "gpu":
        raise ValueError(f"--baseline {baseline!r} is a V-Rex system; give a GPU baseline (agx-orin, a100)")
    frame_h = Counter(s["history_tokens"] for s in frames)
    decode_h = Counter(s["history_tokens"] for s in decodes)

    traced = simulate(vrex_cfg, {"trace": str(trace)})
    synth_frame = _mean_over_histories(vrex_cfg, frame_h, "frame", "resv")
    base_frame = _mean_over_histories(base_cfg, frame_h, "frame", baseline_policy)
    synth_dec = _mean_over_histories(vrex_cfg, decode_h, "decode", "resv") if decodes else None
    base_dec = _mean_over_histories(base_cfg, decode_h, "decode", baseline_policy) if decodes else None

    # selection statistics: what ReSV picked (trace) vs the calibrated model
    m = vrex_cfg.model
    per_token = m.kv_bytes_per_token_head
    sel = hist = fetched = 0.0
    for s in frames:
        for layer in s["layers"]:
            for head in layer["heads"]:
                sel += head["selected_tokens"]
                hist += head["history_tokens"]
                moved = head.get("bytes") or {}
                fetched += moved.get("host", 0) + moved.get("disk", 0)
    fetched *= per_token / recorded_token_bytes(header)  # in the simulated precision, like the synthetic
    syn_sel = syn_hist = syn_fetched = 0.0
    for h, count in frame_h.items():
        st = make_step(vrex_cfg, "resv", "frame", int(h), int(tokens_per_frame), 1)
        syn_sel += float(st.selected_tokens.sum()) * count
        syn_hist += h * m.num_layers * m.num_kv_heads * count
        syn_fetched += float(st.fetched_tokens.sum()) * per_token * count

    def column(frame_ms, frame_mj, tpot_ms, token_mj, sel_frac, fetched_per_frame):
        out = {
            "frame_latency_ms": frame_ms,
            "fps": 1e3 / frame_ms,
            "energy_per_frame_j": frame_mj * 1e-3,
            "tpot_ms": tpot_ms,
            "energy_per_token_j": token_mj * 1e-3 if token_mj is not None else None,
            "selected_fraction": sel_frac,
            "fetched_bytes_per_frame": fetched_per_frame,
            "speedup": base_frame["latency_ms"] / frame_ms,
            "energy_gain": base_frame["energy_mj"] / frame_mj,
        }
        if tpot_ms and base_dec:
            out["tpot_speedup"] = base_dec["latency_ms"] / tpot_ms
        return out

    return {
        "trace": str(trace),
        "model": header["model"],
        "frames": len(frames),
        "decode_steps": len(decodes),
        "tokens_per_frame": int(tokens_per_frame),
        "history_tokens": [min(frame_h), max(frame_h)],
        "device_window_tokens": window,
        "system": vrex_cfg.name,
        "baseline": f"{base_cfg.name} + {baseline_policy}",
        "trace_driven": column(
            traced["frame_latency_ms"],
            traced["energy_per_frame_mj"],
            traced["tpot_ms"],
            traced["energy_per_token_mj"],
            sel / hist if hist else 0.0,
            fetched / len(frames),
        ),
        "synthetic": column(
            synth_frame["latency_ms"],
            synth_frame["energy_mj"],
            synth_dec["latency_ms"] if synth_dec else None,
            synth_dec["energy_mj"] if synth_dec else None,
            syn_sel / syn_hist if syn_hist else 0.0,
            syn_fetched / len(frames),
        ),
        "baseline_result": {
            "frame_latency_ms": base_frame["latency_ms"],
            "fps": 1e3 / base_frame["latency_ms"],
            "energy_per_frame_j": base_frame["energy_mj"] * 1e-3,
            "tpot_ms": base_dec["latency_ms"] if base_dec else None,
        },
    }


def run_codesign(video: str | Path, trace: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """record_trace + simulate_trace. kwargs: record_trace's, plus system/baseline/baseline_policy."""
    sim_keys = ("system", "baseline", "baseline_policy")
    sim_kwargs = {k: kwargs.pop(k) for k in sim_keys if k in kwargs}
    with tempfile.TemporaryDirectory(prefix="vrex-codesign-") as tmp:
        trace_path = Path(trace) if trace else Path(tmp) / "trace.jsonl"
        run = record_trace(video, trace_path, **kwargs)
        report = simulate_trace(
            trace_path, device_kv_budget_bytes=kwargs.get("device_kv_budget_bytes"), **sim_kwargs
        )
    report["trace"] = str(trace) if trace else None
    report["run"] = run
    return report


def format_report(rep: dict[str, Any]) -> str:
    from sim.config import RANGES

    unbounded = RANGES["memory.recent_window_tokens"][1]  # what an unbounded device tier becomes
    m = rep["model"]
    window = rep["device_window_tokens"]
    lines = [
        f"trace: {rep['frames']} frames ({rep['tokens_per_frame']} tokens each), {rep['decode_steps']} decode steps, "
        f"history {rep['history_tokens'][0]}-{rep['history_tokens'][1]} tokens; model {m['num_layers']} layers, "
        f"{m['num_heads']}/{m['num_kv_heads']} heads x {m['head_dim']}",
        "device window: " + ("unbounded (nothing offloaded)" if window >= unbounded else f"{window} tokens"),
        f"{rep['system']} with ReSV vs {rep['baseline']}",
        f"  {'':28s} {'trace-driven':>14s} {'synthetic':>14s}",
    ]
    t, s, b = rep["trace_driven"], rep["synthetic"], rep["baseline_result"]

    def row(label: str, key: str, fmt: str = "{:.3f}") -> None:
        tv, sv = t.get(key), s.get(key)
        if tv is None and sv is None:
            return
        cell = lambda v: fmt.format(v) if v is not None else "-"  # noqa: E731
        lines.append(f"  {label:28s} {cell(tv):>14s} {cell(sv):>14s}")

    row(f"{rep['system']} FPS", "fps", "{:.2f}")
    row(f"{rep['system']} J/frame", "energy_per_frame_j", "{:.4f}")
    row(f"{rep['system']} TPOT ms", "tpot_ms", "{:.2f}")
    row("selected fraction (frame)", "selected_fraction", "{:.3f}")
    row("fetched bytes per frame", "fetched_bytes_per_frame", "{:,.0f}")
    row(f"speedup vs {rep['baseline']}", "speedup", "{:.2f}x")
    row("energy gain (J/frame)", "energy_gain", "{:.2f}x")
    row("TPOT speedup", "tpot_speedup", "{:.2f}x")
    lines.append(
        f"  {rep['baseline']}: {b['fps']:.2f} FPS, {b['energy_per_frame_j']:.4f} J/frame"
        + (f", TPOT {b['tpot_ms']:.2f} ms" if b.get("tpot_ms") else "")
        + " (fetches the whole history: same for both columns)"
    )
    return "\n".join(lines)


def _byte_flag(value: str | None, flag: str) -> int | None:
    from vrex.kv import parse_bytes

    if not value:
        return None
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def _check_args(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """The checks that need no model, so a typo fails at once, not after streaming the video;
    returns the two KV budgets in bytes."""
    from sim.api import resolve_system
    from vrex.host import check_output_path
    from vrex.limits import check_fps, check_max_new_tokens, check_questions, check_seconds
    from vrex.video import resolve_video

    resolve_video(args.video)
    check_fps("--fps", args.fps)
    # a negative or zero limit streams no frame, and the simulator then has nothing to replay
    check_seconds("--max-seconds", args.max_seconds)
    check_max_new_tokens("--max-new-tokens", args.max_new_tokens)
    check_questions(args.ask)
    budgets = (
        _byte_flag(args.device_kv_budget, "--device-kv-budget"),
        _byte_flag(args.host_kv_budget, "--host-kv-budget"),
    )
    if resolve_system(args.system).kind != "vrex":
        raise ValueError(f"--system {args.system!r} is a GPU baseline; give a V-Rex system (vrex8, vrex48)")
    if resolve_system(args.baseline).kind != "gpu":
        raise ValueError(
            f"--baseline {args.baseline!r} is a V-Rex system; give a GPU baseline (agx-orin, a100)"
        )
    check_output_path(args.trace, "--trace")
    return budgets


def _cmd(args: argparse.Namespace) -> int:
    from vrex.host import dumps
    from vrex.memory import check_device

    budget, host = _check_args(args)
    check_device(args.device)
    rep = run_codesign(
        args.video,
        trace=args.trace,
        model=args.model,
        fps=args.fps,
        max_seconds=args.max_seconds,
        ask=tuple(args.ask) if args.ask else ("What is happening?",),
        max_new_tokens=args.max_new_tokens,
        device_kv_budget_bytes=budget,
        host_kv_budget_bytes=host,
        preset=args.preset,
        device=args.device,
        system=args.system,
        baseline=args.baseline,
        baseline_policy=args.baseline_policy,
    )
    if args.json:
        print(dumps(rep, indent=1, default=float))
        return 0
    notice = rep["run"]["model"].get("notice")
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    print(format_report(rep))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vrex codesign` to the `vrex` command line."""
    from sim.config import POLICIES
    from vrex.limits import add_preset_flag

    p = subparsers.add_parser(
        "codesign",
        help="stream a video with ReSV, record the trace, simulate it on V-Rex8 and AGX Orin + FlexGen",
    )
    p.add_argument(
        "--video", required=True, help="video file, or a sample name (bikes.mp4, bigbuckbunny.mp4, vtest.avi)"
    )
    p.add_argument("--model", help="local model folder (default: the demo model)")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second kept (default 1)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop streaming after this much video")
    p.add_argument("--ask", action="append", default=[], help="question asked at the end (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="longest answer in tokens (default 8)")
    add_preset_flag(p, "--preset", "--resv-preset")
    p.add_argument(
        "--device-kv-budget",
        help="device KV tier per session, e.g. 4MiB (default: unbounded, nothing offloaded)",
    )
    p.add_argument(
        "--host-kv-budget", help="host KV tier per session (default: 0 on the CPU: evictions go to disk)"
    )
    p.add_argument("--device", default="cpu", help="torch device to stream on: cpu, cuda, ... (default cpu)")
    p.add_argument("--trace", help="keep the recorded trace here (default: a temporary file)")
    p.add_argument("--system", default="vrex8", help="simulated V-Rex system (default vrex8)")
    p.add_argument("--baseline", default="agx-orin", help="GPU baseline system (default agx-orin)")
    p.add_argument(
        "--baseline-policy",
        default="flexgen",
        choices=POLICIES,
        help="the baseline's retrieval policy (default flexgen)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd)
