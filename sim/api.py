"""Plain Python API of the simulator (what the CLI, sweeps and notebooks call).

    from sim.api import simulate, load_system, make_scenario
    result = simulate("vrex8", {"kv_tokens": 40000}, overrides={"memory.link_bandwidth_gbps": 8})

`simulate` returns a JSON-ready dict; `result["config_hash"]` is a stable key for caching.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from sim.config import (
    FITTED_MAX_HISTORY_TOKENS,
    InfeasibleDesign,
    Scenario,
    SystemConfig,
    apply_overrides,
    config_hash,
    field_applies,
    load_system,
    make_scenario,
    override,
    to_dict,
    validate,
)
from sim.cost import area_power_report, run_energy_mj
from sim.gpu import simulate_gpu_steps
from sim.tech import pinned, tech_for
from sim.timing import roofline_bound_cycles, simulate_steps
from sim.workload import Step, build_steps, device_window_tokens, policy_table, step_macs

__all__ = [
    "simulate",
    "compare",
    "baseline_for",
    "area",
    "load_system",
    "make_scenario",
    "override",
    "config_hash",
    "resolve_system",
    "resolve_scenario",
]


def resolve_system(
    system: SystemConfig | str,
    overrides: dict[str, Any] | list[str] | None = None,
    tech_corner: str | None = None,
) -> SystemConfig:
    if isinstance(system, str):
        system = load_system(system)
    system = apply_overrides(system, overrides)
    if tech_corner:
        system = override(system, "tech_corner", tech_corner)
    validate(system)
    return system


def resolve_scenario(scenario: Scenario | dict[str, Any] | None) -> Scenario:
    if scenario is None:
        return Scenario()
    if isinstance(scenario, Scenario):
        validate(scenario)
        return scenario
    return make_scenario(**scenario)


class CapacityError(InfeasibleDesign):
    """The design point does not fit in device DRAM (a sweep records it as infeasible)."""


def check_capacity(system: SystemConfig, steps: dict[str, list[Step]], policy: str) -> None:
    """Device DRAM must hold the weights and every stream's device-resident KV (the whole
    history when the policy does not offload, else the device window). Activations and the
    per-layer fetch buffer (a few MB) are not counted."""
    model, mem = system.model, system.memory
    every = [s for group in steps.values() for s in group]
    if not every:
        return
    history = max(s.history_tokens + s.new_tokens for s in every)
    batch = max(s.batch for s in every)
    offloads = policy_table()[policy].get("offload", True)
    resident = history if not offloads else min(history, device_window_tokens(system, policy))
    kv_bytes = batch * resident * model.kv_bytes_per_token_layer * model.num_layers
    need_gb = (model.weight_bytes + kv_bytes) / 1e9
    if need_gb > mem.dram_capacity_gb:
        kept = "the whole history (the policy does not offload)" if not offloads else "the device window"
        raise CapacityError(
            f"memory.dram_capacity_gb={mem.dram_capacity_gb:g} is too small: {model.name} needs {need_gb:.1f} GB "
            f"of device DRAM (weights {model.weight_bytes / 1e9:.1f} GB + KV of {batch} stream(s) x {resident} "
            f"tokens, {kept}: {kv_bytes / 1e9:.1f} GB); raise it to at least {need_gb:.1f}, or keep less KV "
            "on the device (memory.recent_window_tokens, a smaller batch, a policy that offloads)"
        )


def _ops(system: SystemConfig, steps: list[Step]) -> float:
    """Useful operations (2 x dense MACs), identical on every system for the same steps."""
    return sum(2.0 * sum(step_macs(system.model, s).values()) for s in steps)


def _run_stage(system: SystemConfig, steps: list[Step], policy: str, record_timeline: bool = False) -> dict:
    """Latency, breakdowns and energy of a list of steps on one system."""
    tech = tech_for(system)
    ops = _ops(system, steps)
    if system.kind == "gpu":
        out = simulate_gpu_steps(system, steps, policy)
        time_s = out["time_s"]
        breakdown_ms = {k: v * 1e3 for k, v in out["breakdown_s"].items()}
        energy = out["energy_mj"]
        result = {"events": 0, "counters": out["counters"], "roofline_bound_ms": None}
    else:
        timing = simulate_steps(system, steps, record_timeline=record_timeline)
        clock_hz = system.accel.clock_mhz * 1e6
        time_s = timing.cycles / clock_hz
        breakdown_ms = {k: v / clock_hz * 1e3 for k, v in timing.breakdown_cycles.items()}
        energy = run_energy_mj(system, tech, timing.counters, time_s)
        result = {
            # every batch schedule tried counts: that is what the design point cost to simulate
            "events": timing.events_all_candidates,
            "stream_groups": timing.stream_groups,
            "cycles": timing.cycles,
            "counters": timing.counters,
            "roofline_bound_ms": roofline_bound_cycles(system, timing.counters) / clock_hz * 1e3,
            "dram_utilization": timing.dram_busy_cycles / max(timing.cycles, 1),
            "link_utilization": timing.link_busy_cycles / max(timing.cycles, 1),
            "offload_utilization": timing.offload_busy_cycles / max(timing.cycles, 1),
        }
        if record_timeline:
            result["timeline"] = timing.timeline
            result["clock_hz"] = clock_hz
    energy_total = sum(energy.values())
    result.update(
        {
            "latency_ms": time_s * 1e3,
            "latency_breakdown_ms": breakdown_ms,
            "energy_mj": energy_total,
            "energy_breakdown_mj": energy,
            "ops": ops,
            "gops_per_w": ops / (energy_total * 1e-3) / 1e9 if energy_total > 0 else 0.0,
            "steps": len(steps),
        }
    )
    return result


def simulate(
    system: SystemConfig | str,
    scenario: Scenario | dict[str, Any] | None = None,
    *,
    overrides: dict[str, Any] | list[str] | None = None,
    tech_corner: str | None = None,
    record_timeline: bool = False,
) -> dict[str, Any]:
    """Simulate one design point.

    Args:
        system: a SystemConfig or a built-in name / YAML path (vrex8, vrex48, agx-orin, a100).
        scenario: a Scenario or a dict of its fields (kv_tokens, batch, stage, policy, trace, ...).
        overrides: {dotted.field: value} (or ["dotted.field=value"]) applied to the system;
            with a trace, after the trace's model and device window (yours win).
        tech_corner: low | nominal | high (technology table column).
        record_timeline: keep DRAM/link transfer logs (for the bandwidth plot).

    Returns:
        dict with frame_latency_ms, fps, tpot_ms, energy_per_frame_mj, gops_per_w,
        latency/energy breakdowns per stage, events, sim_wall_s, config_hash, ...
    """
    start = time.perf_counter()
    scenario = resolve_scenario(scenario)
    traced_policy, hashed = None, [scenario]
    if scenario.trace:
        from sim.trace_replay import read_trace, system_for_trace, trace_policy

        header = read_trace(scenario.trace)[0]
        system = system_for_trace(resolve_system(system, None, tech_corner), header, str(scenario.trace))
        system = resolve_system(system, overrides)  # what the caller sets wins over the trace
        traced_policy = str(header.get("policy"))
        scenario = replace(scenario, policy=trace_policy(header))
        # what the replay depends on: the trace's content, not its path or the synthetic fields
        digest = hashlib.sha256(Path(scenario.trace).read_bytes()).hexdigest()[:16]
        hashed = [{"trace_sha256": digest, "batch": scenario.batch, "stage": scenario.stage}]
    else:
        system = resolve_system(system, overrides, tech_corner)
    steps = build_steps(system, scenario)
    check_capacity(system, steps, scenario.policy)
    stages = {}
    for name, stage_steps in steps.items():
        if stage_steps:
            stages[name] = _run_stage(
                system, stage_steps, scenario.policy, record_timeline and name == "frame"
            )
    wall = time.perf_counter() - start
    frame, decode = stages.get("frame"), stages.get("decode")
    events = sum(s["events"] for s in stages.values())
    n_frames = len(steps.get("frame", []))
    n_decode = len(steps.get("decode", []))
    result: dict[str, Any] = {
        "system": system.name,
        "kind": system.kind,
        "policy": scenario.policy,
        "kv_tokens": scenario.kv_tokens,
        "batch": scenario.batch,
        "tech_corner": system.tech_corner,
        "tech_pinned": pinned(system),
        "config_hash": config_hash(system, *hashed),
        "frame_latency_ms": frame["latency_ms"] / n_frames if frame else None,
        "fps": 1e3 * n_frames / frame["latency_ms"] if frame else None,
        "throughput_fps": 1e3 * n_frames * scenario.batch / frame["latency_ms"] if frame else None,
        "tpot_ms": decode["latency_ms"] / n_decode if decode else None,
        # per frame / per token of one stream; a batched step serves `batch` streams at once
        "energy_per_frame_mj": frame["energy_mj"] / (n_frames * scenario.batch) if frame else None,
        "energy_per_token_mj": decode["energy_mj"] / (n_decode * scenario.batch) if decode else None,
        "frame_step_energy_mj": frame["energy_mj"] / n_frames if frame else None,
        "decode_step_energy_mj": decode["energy_mj"] / n_decode if decode else None,
        "gops_per_w": frame["gops_per_w"] if frame else None,
        # batch schedule the frame stage ran with (1 = lockstep; see sim/timing.py)
        "stream_groups": frame.get("stream_groups", 1) if frame else None,
        "gops_per_w_text": decode["gops_per_w"] if decode else None,
        "events": events,
        # a batched step simulates one frame per stream
        "events_per_frame": frame["events"] / (n_frames * scenario.batch) if frame else None,
        "sim_wall_s": wall,
        "events_per_s": events / wall if wall > 0 else None,
        "stages": stages,
        "system_config": to_dict(system),
        "scenario": to_dict(scenario),
    }
    if scenario.trace:
        # what the trace holds, not the scenario's synthetic settings
        result["kv_tokens"] = max(s.history_tokens for group in steps.values() for s in group)
        result["trace"] = {
            "path": str(scenario.trace),
            "policy": traced_policy,
            "steps": {name: len(group) for name, group in steps.items()},
        }
        # the synthetic scenario's history and COIN counts did not apply
        result["scenario"] = {"trace": str(scenario.trace), "batch": scenario.batch, "stage": scenario.stage}
    if "e2e" in stages:
        result["e2e_latency_ms"] = stages["e2e"]["latency_ms"]
        result["e2e_energy_mj"] = stages["e2e"]["energy_mj"]
    result["notes"] = list(system.model.source_notes)
    if not scenario.trace and scenario.kv_tokens > FITTED_MAX_HISTORY_TOKENS:
        result["notes"].append(
            f"a {scenario.kv_tokens}-token history is beyond the {FITTED_MAX_HISTORY_TOKENS} that the "
            "synthetic ReSV statistics were fitted to: an extrapolation (replay a trace for measured ones)"
        )
    return result


def baseline_for(
    name: str,
    system: SystemConfig,
    overrides: dict[str, Any] | list[str] | None = None,
    tech_corner: str | None = None,
) -> SystemConfig:
    """Baseline hardware `name` running `system`'s workload: the same model, the same ReSV
    statistics (a GPU running ReSV in software) and the same pinned technology entries
    (PCIe and SSD energy); the baseline's own overrides apply on top."""
    base = resolve_system(name, None, tech_corner or system.tech_corner)
    # the pins it reads: a GPU baseline has no per-action energies (see field_applies)
    pins = {f.name: None for f in fields(system.tech) if not field_applies(base.kind, f"tech.{f.name}")}
    base = replace(base, model=system.model, resv=system.resv, tech=replace(system.tech, **pins))
    return resolve_system(base, overrides)


def compare(
    system: SystemConfig | str,
    baseline: SystemConfig | str,
    policy: str = "flexgen",
    kv_tokens: list[int] | tuple[int, ...] = (1000, 5000, 10000, 20000, 40000),
    batch: int = 1,
    *,
    system_policy: str = "resv",
    overrides: dict[str, Any] | list[str] | None = None,
    baseline_overrides: dict[str, Any] | list[str] | None = None,
    tech_corner: str | None = None,
) -> dict[str, Any]:
    """Speedup and energy-efficiency gain (GOPS/W ratio) of `system` over `baseline` + `policy`.
    A baseline given by name runs the system's workload (baseline_for); one given as a config
    must run the same model."""
    sys_cfg = resolve_system(system, overrides, tech_corner)
    if isinstance(baseline, str):
        base_cfg = baseline_for(baseline, sys_cfg, baseline_overrides, tech_corner)
    else:
        base_cfg = resolve_system(baseline, baseline_overrides, tech_corner)
    if base_cfg.model != sys_cfg.model:
        raise ValueError(
            f"{sys_cfg.name} runs {sys_cfg.model.name} and {base_cfg.name} runs {base_cfg.model.name}: "
            "compare the same model (give the baseline by name, or see sim.api.baseline_for)"
        )
    rows = []
    for kv in kv_tokens:
        ours = simulate(sys_cfg, {"kv_tokens": kv, "batch": batch, "policy": system_policy})
        base = simulate(base_cfg, {"kv_tokens": kv, "batch": batch, "policy": policy})
        rows.append(
            {
                "kv_tokens": kv,
                "frame_latency_ms": ours["frame_latency_ms"],
                "baseline_frame_latency_ms": base["frame_latency_ms"],
                "speedup": base["frame_latency_ms"] / ours["frame_latency_ms"],
                "energy_efficiency_gain": ours["gops_per_w"] / base["gops_per_w"],
                "tpot_ms": ours["tpot_ms"],
                "baseline_tpot_ms": base["tpot_ms"],
                "tpot_speedup": base["tpot_ms"] / ours["tpot_ms"],
                "text_energy_efficiency_gain": ours["gops_per_w_text"] / base["gops_per_w_text"],
            }
        )
    return {
        "system": sys_cfg.name,
        "system_policy": system_policy,
        "baseline": base_cfg.name,
        "policy": policy,
        "batch": batch,
        "points": rows,
    }


def area(system: SystemConfig | str, overrides=None, tech_corner: str | None = None) -> dict[str, Any]:
    """Per-component area and peak power per core and per chip, with DRE shares."""
    sys_cfg = resolve_system(system, overrides, tech_corner)
    if sys_cfg.kind != "vrex":
        raise ValueError(
            f"system {sys_cfg.name!r} is a GPU baseline; area is modelled for V-Rex systems only"
        )
    return area_power_report(sys_cfg, tech_for(sys_cfg))


def with_fields(system: SystemConfig, **dotted: Any) -> SystemConfig:
    """Convenience: with_fields(cfg, **{"accel.num_cores": 16})."""
    return apply_overrides(system, dotted)
