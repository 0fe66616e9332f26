"""Plots (PNG, matplotlib Agg): latency breakdown, DRAM/PCIe bandwidth within one layer
(the paper's Fig. 17), roofline (Fig. 18). Every plot takes a built-in system name or any
SystemConfig; `make_all()` without a system draws the paper's figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sim.api import resolve_system, simulate  # noqa: E402
from sim.config import SystemConfig, make_scenario  # noqa: E402

KV_SWEEP = (1000, 5000, 10000, 20000, 40000)


def plot_latency_breakdown(
    out: Path,
    system: SystemConfig | str = "vrex8",
    baseline: SystemConfig | str = "agx-orin",
    kv_tokens=KV_SWEEP,
    batch: int = 1,
) -> Path:
    system, baseline = resolve_system(system), resolve_system(baseline)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels, stacks = [], []
    for kv in kv_tokens:
        for cfg, policy in ((system, "resv"), (baseline, "flexgen")):
            res = simulate(cfg, {"kv_tokens": kv, "batch": batch, "policy": policy})
            labels.append(f"{cfg.name}\n{kv / 1000:g}K")
            stacks.append(res["stages"]["frame"]["latency_breakdown_ms"])
    categories = sorted({k for s in stacks for k in s})
    bottom = [0.0] * len(stacks)
    for cat in categories:
        values = [s.get(cat, 0.0) for s in stacks]
        ax.bar(range(len(stacks)), values, bottom=bottom, label=cat)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for x, total in enumerate(bottom):  # linear axis: stacked segments keep their true share
        ax.annotate(f"{total:.0f}", (x, total), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(stacks)), labels, fontsize=7)
    ax.set_ylabel("frame latency (ms)")
    ax.set_title(f"Frame latency breakdown, batch {batch}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "latency_breakdown.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def layer_bandwidth(result: dict, layer: int) -> dict[str, list[tuple[float, float, float]]]:
    """Transfers of one layer as (start_us, end_us, GB/s) per channel, from a recorded timeline."""
    clock_hz = result["stages"]["frame"]["clock_hz"]
    timeline = result["stages"]["frame"]["timeline"]
    wanted = f"L{layer}"  # tags read "<op> L<layer>[ s<stream>]"
    series = {}
    for channel, log in timeline.items():
        rows = []
        for start, end, nbytes, tag in log:
            if wanted in tag.split() and not tag.startswith("vision") and end > start:
                seconds = (end - start) / clock_hz
                rows.append((start / clock_hz * 1e6, end / clock_hz * 1e6, nbytes / seconds / 1e9))
        series[channel] = rows
    return series


def _timeline_system(system: SystemConfig | str, layer: int) -> SystemConfig:
    system = resolve_system(system)
    if system.kind != "vrex":
        raise ValueError(
            f"system {system.name!r} is a GPU baseline; the layer timeline is simulated for V-Rex only"
        )
    if not 0 <= layer < system.model.num_layers:
        raise ValueError(
            f"layer={layer} is out of range; allowed range is [0, {system.model.num_layers - 1}]"
        )
    return system


def plot_layer_bandwidth(
    out: Path, system: SystemConfig | str = "vrex48", kv_tokens: int = 40000, layer: int = 16
) -> Path:
    system = _timeline_system(system, layer)
    res = simulate(system, {"kv_tokens": kv_tokens}, record_timeline=True)
    series = layer_bandwidth(res, layer)
    fig, ax = plt.subplots(figsize=(9, 4))
    t0 = min((r[0] for rows in series.values() for r in rows), default=0.0)
    for channel, rows in series.items():
        xs, ys = [], []
        for start, end, gbps in rows:
            xs += [start - t0, start - t0, end - t0, end - t0]
            ys += [0.0, gbps, gbps, 0.0]
        what = {"link": "PCIe", "dram": "device DRAM", "offload": f"{system.memory.offload_tier} reads"}
        ax.plot(xs, ys, label=f"{channel} ({what.get(channel, channel)})")
    ax.set_xlabel(f"time within layer {layer} (us)")
    ax.set_ylabel("bandwidth (GB/s)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title(f"{system.name}, {kv_tokens / 1000:g}K KV: DRAM, PCIe and offload traffic in one layer")
    ax.legend()
    fig.tight_layout()
    path = out / "layer_bandwidth.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def roofline_points(
    kv_tokens: int = 40000,
    batch: int = 4,
    system: SystemConfig | str = "vrex8",
    baseline: SystemConfig | str = "agx-orin",
) -> list[dict]:
    """Fig. 18 points: the dense frame workload's intensity, each system's achieved rate."""
    from sim.roofline import roofline_point

    points = []
    for cfg, policy in ((system, "resv"), (baseline, "flexgen"), (baseline, "rekv")):
        p = roofline_point(cfg, policy, kv_tokens, batch)
        points.append({"label": p["label"], "op_per_byte": p["op_per_byte"], "tflops": p["achieved_tflops"]})
    return points


def plot_roofline(
    out: Path,
    kv_tokens: int = 40000,
    batch: int = 4,
    system: SystemConfig | str = "vrex8",
    baseline: SystemConfig | str = "agx-orin",
) -> Path:
    from sim.roofline import peak_tflops

    system, baseline = resolve_system(system), resolve_system(baseline)
    fig, ax = plt.subplots(figsize=(7, 5))
    intensity = [0.1 * 1.25**i for i in range(60)]
    for cfg in (system, baseline):
        peak = peak_tflops(cfg)
        bw = cfg.memory.dram_bandwidth_gbps * 1e9
        ax.plot(intensity, [min(peak, i * bw / 1e12) for i in intensity], label=f"{cfg.name} roof")
    for p in roofline_points(kv_tokens, batch, system, baseline):
        ax.scatter([p["op_per_byte"]], [p["tflops"]], zorder=3)
        ax.annotate(p["label"], (p["op_per_byte"], p["tflops"]), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("operational intensity: weight-GEMM ops per compulsory byte (Fig. 18 reading)")
    ax.set_ylabel("achieved TFLOPS (dense LLM ops incl. attention)")
    ax.set_title(f"Roofline, {kv_tokens / 1000:g}K KV, batch {batch}, frame stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "roofline.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_all(
    out: str | Path = "sim-plots",
    system: SystemConfig | str | None = None,
    baseline: SystemConfig | str = "agx-orin",
    kv_tokens=KV_SWEEP,
    batch: int | None = None,
    layer: int = 16,
) -> list[Path]:
    """The three plots. Without a system: the paper's figures (V-Rex8 breakdown at batch 1,
    V-Rex48 layer traffic as in Fig. 17, V-Rex8 roofline at batch 4 as in Fig. 18). With one,
    every plot shows it, at `batch` (default 1), the traffic and roofline at the largest KV size."""
    _timeline_system(system or "vrex48", layer)  # fail before drawing anything
    if batch is not None:
        make_scenario(batch=batch)  # its range, before drawing anything
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kv_max = max(kv_tokens)
    paper = system is None
    return [
        plot_latency_breakdown(out, system or "vrex8", baseline, kv_tokens, 1 if batch is None else batch),
        plot_layer_bandwidth(out, system or "vrex48", kv_max, layer),
        plot_roofline(
            out, kv_max, (4 if paper else 1) if batch is None else batch, system or "vrex8", baseline
        ),
    ]
