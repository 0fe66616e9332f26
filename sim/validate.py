"""Paper-reproduction table: each published figure, ours, the tolerance, pass/fail.

Published numbers are read at run time from the reference file (never copied into code):
$VREX_PAPER_JSON, else sim/data/reference_vrex_paper.json (a copy of
../shared/reference/vrex_paper.json kept in sync with the shared reference, plus Table III's
area % column, which the shared file lacks), else that shared file.

Where the paper contradicts itself we say which figure is matched:
- Table III block areas are printed to 0.01 mm2 while the % column is finer (HCU 0.28 % of
  1.89 mm2 = 0.0053 mm2 is printed "0.01"); a printed value only says "within half a unit
  of the last digit", so area rows accept +-5 % or +-0.005 mm2, whichever is wider; the
  % column is checked too, +-5 % per block ("area share" rows).
- DRE power share: 2.2 % (abstract, table sum) is matched, not the text's 2.4 %.
- Fig. 16 says V-Rex8 is 8.1x AGX+FlexGen at 40K, Fig. 13 says 7.3x; both rows are shown.
- At edge 40K batch 4, Fig. 13 says 13.8x over AGX+FlexGen and Fig. 18 says 10.8x; both
  rows are shown (we land on Fig. 18's).
- Fig. 14's end-to-end labels are matched against AGX+InfiniGen; against FlexGen they
  contradict Fig. 13 (derived rows show what Fig. 13 implies, see _fig14_rows).
- Fig. 18's intensity and fractions fit only one reading of its op counts (sim/roofline.py).
- Batched rows that disagree with the rest of the paper keep their FAIL, with a note computed
  here from the reference and our model (_explain_batch_rows): the b4 1K energy gain and the
  b8 1K speedup, each paired with its published partner at the same point, mean the chip at
  ~95 % of its full-activity power for the whole frame (sim/cost.py power_ceiling_w); the b8
  40K speedup needs less link time per stream than the b1 figures spend on the long history.
Ranges ("2.2-7.3x") are compared end to end: our min over the KV sweep against the low end,
our max against the high end.
Fig. 19's ReSV ablation names no platform: read on V-Rex8 against AGX+FlexGen (_fig19_rows).
Published but not compared: Fig. 19's accuracy drops; Table II's
retrieval ratios and Fig. 20's per-layer range are inputs of the synthetic ReSV model
(sim/workload.py), not outputs.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from sim.api import area, compare, resolve_system, simulate
from sim.config import BUILTIN_SYSTEMS, SystemConfig, field_applies, load_system

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGED_REFERENCE = Path(__file__).parent / "data" / "reference_vrex_paper.json"
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference" / "vrex_paper.json"


def reference_path() -> Path:
    env = os.environ.get("VREX_PAPER_JSON")
    if env:
        return Path(env)
    if PACKAGED_REFERENCE.exists():
        return PACKAGED_REFERENCE
    return SHARED_REFERENCE


@lru_cache(maxsize=2)
def _load(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"reference figures not found at {p}; set VREX_PAPER_JSON to vrex_paper.json")
    return json.loads(p.read_text())


def load_reference() -> dict[str, Any]:
    return _load(str(reference_path()))


def _row(
    figure: str, published: float, ours: float, rel_tol: float, abs_tol: float = 0.0, note: str = ""
) -> dict:
    allowed = max(rel_tol * abs(published), abs_tol)
    return {
        "figure": figure,
        "published": published,
        "ours": ours,
        "error_pct": (ours / published - 1) * 100 if published else None,
        "tolerance": f"+-{rel_tol * 100:.0f}%" + (f" or +-{abs_tol:g}" if abs_tol else ""),
        "pass": abs(ours - published) <= allowed,
        "note": note,
    }


def _range_rows(figure: str, published: list[float], values: list[float], rel_tol: float) -> list[dict]:
    return [
        _row(f"{figure} (low end)", published[0], min(values), rel_tol),
        _row(f"{figure} (high end)", published[1], max(values), rel_tol),
    ]


def _systems(overrides: dict[str, Any] | list[str] | None) -> dict[str, SystemConfig]:
    """The built-in systems, each with the same overrides where it reads them (a calibration
    sensitivity check: `tech.<entry>=value` or `tech_corner=low` changes every system's
    technology table that has the entry)."""
    systems = {}
    for name in BUILTIN_SYSTEMS:
        kind = load_system(name).kind
        if isinstance(overrides, list):  # "field=value" items
            mine: Any = [i for i in overrides if field_applies(kind, i.partition("=")[0].strip())]
        else:
            mine = {k: v for k, v in (overrides or {}).items() if field_applies(kind, k)}
        systems[name] = resolve_system(name, mine)
    return systems


def validation_table(quick: bool = False, overrides: dict[str, Any] | list[str] | None = None) -> list[dict]:
    """Build the validation rows. quick=True skips batch>1 and end-to-end rows (tests);
    overrides apply to every system (see _systems)."""
    ref = load_reference()
    rows: list[dict] = []
    kvs = ref["kv_cache_sweep_tokens"]
    systems = _systems(overrides)

    # Table III: area and power of one core, DRE shares, chip areas.
    report = area(systems["vrex8"])
    table3 = ref["table_III_area_power_per_core"]
    names = {
        "lxe_dpe": "dpe",
        "lxe_vpe": "vpe",
        "lxe_sram": "sram",
        "dre_hcu": "hcu",
        "dre_wtu": "wtu",
        "dre_kvmu": "kvmu",
    }
    for key, comp in names.items():
        ours = report["per_core"][comp]
        rows.append(_row(f"Table III {key} area_mm2", table3[key]["area_mm2"], ours["area_mm2"], 0.05, 0.005))
        rows.append(_row(f"Table III {key} power_mw", table3[key]["power_mw"], ours["power_mw"], 0.05))
        if "area_percent" in table3[key]:  # the % column pins small blocks the mm2 rounding hides
            share = ours["area_mm2"] / report["core_total"]["area_mm2"]
            rows.append(_row(f"Table III {key} area share", table3[key]["area_percent"] / 100, share, 0.05))
    rows.append(
        _row("Table III core area_mm2", table3["total"]["area_mm2"], report["core_total"]["area_mm2"], 0.05)
    )
    rows.append(
        _row("Table III core power_mw", table3["total"]["power_mw"], report["core_total"]["power_mw"], 0.05)
    )
    share = table3["dre_share"]
    rows.append(
        _row(
            "DRE area share",
            share["area_fraction"],
            report["dre_share"]["area_fraction"],
            0.0,
            0.002,
            "+-0.2 pp",
        )
    )
    rows.append(
        _row(
            "DRE power share",
            share["power_fraction"],
            report["dre_share"]["power_fraction"],
            0.0,
            0.002,
            "+-0.2 pp; 2.2% (not the text's 2.4%)",
        )
    )
    for name in ("vrex8", "vrex48"):
        rows.append(
            _row(
                f"chip area {name} mm2",
                ref["chip_area_mm2"][name],
                area(systems[name])["chip_total"]["area_mm2"],
                0.05,
            )
        )

    # HC-table overhead (closed form of our layout).
    model = systems["vrex8"].model
    resv = ref["resv_defaults"]
    cluster_bytes = (
        model.num_kv_heads * model.head_dim * model.dtype_bytes + 4 + resv["mean_tokens_per_cluster"] * 4
    )
    overhead = cluster_bytes / (resv["mean_tokens_per_cluster"] * model.kv_bytes_per_token_layer)
    rows.append(
        _row("HC table overhead fraction of KV", resv["hc_table_overhead_fraction_of_kv"], overhead, 0.05)
    )

    # Fig. 13 edge: V-Rex8 vs AGX Orin + FlexGen, batch 1.
    fig13 = ref["fig13_edge_vrex8_batch1"]
    edge = compare(systems["vrex8"], systems["agx-orin"], "flexgen", kvs, 1)["points"]
    for kv, published, point in zip(kvs, fig13["frame_latency_ms"], edge, strict=True):
        rows.append(
            _row(f"Fig13 V-Rex8 frame_latency_ms @{kv // 1000}K", published, point["frame_latency_ms"], 0.15)
        )
    tpots = [p["tpot_ms"] for p in edge]
    rows += _range_rows("Fig13 V-Rex8 tpot_ms", fig13["tpot_ms_range"], tpots, 0.15)
    rows += _range_rows(
        "Fig13 speedup vs AGX+FlexGen b1",
        fig13["speedup_vs_agx_flexgen_range"],
        [p["speedup"] for p in edge],
        0.20,
    )
    rows += _range_rows(
        "Fig13 TPOT speedup vs AGX+FlexGen",
        fig13["tpot_speedup_range"],
        [p["tpot_speedup"] for p in edge],
        0.20,
    )
    eff = ref["fig13_energy_efficiency_vs_flexgen"]
    gains = [p["energy_efficiency_gain"] for p in edge]
    rows += _range_rows(
        "Fig13 energy gain edge b1 frame", [min(eff["edge_b1_frame"]), max(eff["edge_b1_frame"])], gains, 0.20
    )
    gains = [p["text_energy_efficiency_gain"] for p in edge]
    rows += _range_rows(
        "Fig13 energy gain edge b1 text", [min(eff["edge_b1_text"]), max(eff["edge_b1_text"])], gains, 0.20
    )

    # Fig. 13 server: V-Rex48 vs A100 + FlexGen, batch 1.
    server_ref = ref["fig13_server_vrex48"]
    server = compare(systems["vrex48"], systems["a100"], "flexgen", kvs, 1)["points"]
    rows += _range_rows(
        "Fig13 V-Rex48 frame_latency_ms",
        server_ref["frame_latency_ms_range"],
        [p["frame_latency_ms"] for p in server],
        0.15,
    )
    rows += _range_rows(
        "Fig13 V-Rex48 tpot_ms", server_ref["tpot_ms_range"], [p["tpot_ms"] for p in server], 0.15
    )
    rows += _range_rows(
        "Fig13 speedup vs A100+FlexGen b1",
        server_ref["speedup_vs_a100_flexgen_batch1_range"],
        [p["speedup"] for p in server],
        0.20,
    )
    rows += _range_rows(
        "Fig13 TPOT speedup vs A100+FlexGen",
        server_ref["tpot_speedup_range"],
        [p["tpot_speedup"] for p in server],
        0.20,
    )
    rows += _range_rows(
        "Fig13 energy gain server b1 frame",
        [min(eff["server_b1_frame"]), max(eff["server_b1_frame"])],
        [p["energy_efficiency_gain"] for p in server],
        0.20,
    )
    rows += _range_rows(
        "Fig13 energy gain server b1 text",
        [min(eff["server_b1_text"]), max(eff["server_b1_text"])],
        [p["text_energy_efficiency_gain"] for p in server],
        0.20,
    )

    # Fig. 16 hardware ablation at 40K, batch 1, frame (speedups over AGX + FlexGen).
    abl = ref["fig16_hw_ablation_40k_b1_frame"]
    kv40 = 40000
    base = simulate(systems["agx-orin"], {"kv_tokens": kv40, "policy": "flexgen"})
    agx_resv = simulate(systems["agx-orin"], {"kv_tokens": kv40, "policy": "resv"})
    kvpu = simulate(systems["vrex8"], {"kv_tokens": kv40}, overrides={"accel.use_kvmu": False})
    full = simulate(systems["vrex8"], {"kv_tokens": kv40})
    for label, res, key in (
        ("AGX+ReSV", agx_resv, "agx_plus_resv"),
        ("V-Rex8 KVPU only", kvpu, "vrex8_kvpu"),
        ("V-Rex8 all", full, "vrex8_all"),
    ):
        rows.append(
            _row(
                f"Fig16 {label} speedup @40K",
                abl[key]["speedup"],
                base["frame_latency_ms"] / res["frame_latency_ms"],
                0.20,
            )
        )
        rows.append(
            _row(
                f"Fig16 {label} energy gain @40K",
                abl[key]["energy_gain"],
                res["gops_per_w"] / base["gops_per_w"],
                0.20,
            )
        )
    share = agx_resv["stages"]["frame"]["latency_breakdown_ms"]["kv_predict"] / agx_resv["frame_latency_ms"]
    rows.append(
        _row(
            "Fig16 AGX+ReSV kv_prediction latency share",
            abl["agx_plus_resv"]["kv_prediction_latency_share"],
            share,
            0.25,
        )
    )
    rows += _fig19_rows(ref, systems, base, full)

    if not quick:
        b4 = compare(systems["vrex8"], systems["agx-orin"], "flexgen", kvs, 4)["points"]
        rows += _range_rows(
            "Fig13 speedup vs AGX+FlexGen b4",
            fig13["speedup_vs_agx_flexgen_batch4_range"],
            [p["speedup"] for p in b4],
            0.20,
        )
        rows[-1]["note"] = "Fig. 18 gives 10.8x for the same point (edge, 40K, batch 4), which we match"
        rows += _range_rows(
            "Fig13 energy gain edge b4 frame",
            [min(eff["edge_b4_frame"]), max(eff["edge_b4_frame"])],
            [p["energy_efficiency_gain"] for p in b4],
            0.20,
        )
        b8 = compare(systems["vrex48"], systems["a100"], "flexgen", kvs, 8)["points"]
        rows += _range_rows(
            "Fig13 speedup vs A100+FlexGen b8",
            server_ref["speedup_vs_a100_flexgen_batch8_range"],
            [p["speedup"] for p in b8],
            0.20,
        )
        rows += _range_rows(
            "Fig13 energy gain server b8 frame",
            [min(eff["server_b8_frame"]), max(eff["server_b8_frame"])],
            [p["energy_efficiency_gain"] for p in b8],
            0.20,
        )
        rows += _fig4b_rows(ref, systems)
        rows += _fig14_rows(ref, systems)
        rows += _fig18_rows(ref, systems)
        _explain_batch_rows(ref, rows, systems)
    _explain_energy_rows(ref, rows, systems, base, agx_resv)
    _explain_kvpu_energy_row(rows, kvpu, systems["vrex8"])
    return rows


def _set_note(rows: list[dict], figure: str, note: str) -> None:
    for r in rows:
        if r["figure"] == figure:
            r["note"] = f"{r['note']}; {note}" if r["note"] else note


def _frame_power_w(result: dict) -> float:
    frame = result["stages"]["frame"]
    return frame["energy_mj"] / frame["latency_ms"]


def implied_power_w(
    system: SystemConfig | str, baseline: SystemConfig | str, kv: int, batch: int, speedup: float, gain: float
) -> dict:
    """Power a published (speedup, energy gain) pair implies for `system` at one point,
    given our baseline's power there (running FlexGen, Fig. 13's reference):
    energy gain = speedup x P_baseline / P_system.
    Compared with the system's ceiling (sim/cost.py power_ceiling_w) and our own power."""
    from sim.cost import power_ceiling_w
    from sim.tech import tech_for

    system, baseline = resolve_system(system), resolve_system(baseline)
    base = simulate(baseline, {"kv_tokens": kv, "batch": batch, "policy": "flexgen"})
    ours = simulate(system, {"kv_tokens": kv, "batch": batch})
    base_w = _frame_power_w(base)
    return {
        "baseline_w": base_w,
        "implied_w": base_w * speedup / gain,
        "ceiling_w": power_ceiling_w(system, tech_for(system)),
        "ours_w": _frame_power_w(ours),
    }


def _explain_batch_rows(ref: dict[str, Any], rows: list[dict], systems: dict[str, SystemConfig]) -> None:
    """Notes for the batched Fig. 13 rows, with the arithmetic on published figures that
    shows where they disagree with the rest of the paper (CALIBRATION.md, known misses)."""
    eff = ref["fig13_energy_efficiency_vs_flexgen"]
    kv_lo = eff["kv_tokens"][0]
    edge, server = ref["fig13_edge_vrex8_batch1"], ref["fig13_server_vrex48"]
    # (row, system, baseline, batch, published speedup and gain at 1K for that batch and b1,
    # the published figure we match instead)
    for figure, system, baseline, batch, speedup, gain, b1_speedup, b1_gain, matched in (
        (
            "Fig13 energy gain edge b4 frame (low end)",
            systems["vrex8"],
            systems["agx-orin"],
            4,
            edge["speedup_vs_agx_flexgen_batch4_range"][0],
            eff["edge_b4_frame"][0],
            edge["speedup_vs_agx_flexgen_range"][0],
            eff["edge_b1_frame"][0],
            "the b4 1K speedup and Table III",
        ),
        (
            "Fig13 speedup vs A100+FlexGen b8 (low end)",
            systems["vrex48"],
            systems["a100"],
            8,
            server["speedup_vs_a100_flexgen_batch8_range"][0],
            eff["server_b8_frame"][0],
            server["speedup_vs_a100_flexgen_batch1_range"][0],
            eff["server_b1_frame"][0],
            "the b8 1K energy gain and Table III",
        ),
    ):
        p = implied_power_w(system, baseline, kv_lo, batch, speedup, gain)
        p1 = implied_power_w(system, baseline, kv_lo, 1, b1_speedup, b1_gain)
        _set_note(
            rows,
            figure,
            f"contradicts Table III: {speedup:g}x at {gain:g}x energy (b{batch}, {kv_lo // 1000}K) means "
            f"{system.name} draws {p['implied_w']:.0f} W ({baseline.name} {p['baseline_w']:.0f} W), "
            f"{p['implied_w'] / p['ceiling_w']:.0%} of its {p['ceiling_w']:.0f} W ceiling (all units at "
            f"full activity, DRAM at peak) for the whole frame; at b1 the paper's pair gives "
            f"{p1['implied_w']:.0f} W; ours {p['ours_w']:.0f} W; we match {matched}",
        )
    # High ends at 40K: a batch is never slower than its streams one after another, so the
    # published b1 point bounds the baseline's batched frame and hence the batched speedup.
    for figure, system, batch, b1_short_ms, b1_ms, b1_speedup, speedup in (
        (
            "Fig13 speedup vs AGX+FlexGen b4 (high end)",
            systems["vrex8"],
            4,
            edge["frame_latency_ms"][0],
            edge["frame_latency_ms"][-1],
            edge["speedup_vs_agx_flexgen_range"][1],
            edge["speedup_vs_agx_flexgen_batch4_range"][1],
        ),
        (
            "Fig13 speedup vs A100+FlexGen b8 (high end)",
            systems["vrex48"],
            8,
            server["frame_latency_ms_range"][0],
            server["frame_latency_ms_range"][1],
            server["speedup_vs_a100_flexgen_batch1_range"][1],
            server["speedup_vs_a100_flexgen_batch8_range"][1],
        ),
    ):
        bound_ms = batch * b1_ms * b1_speedup / speedup
        kv = ref["kv_cache_sweep_tokens"][-1]
        res = simulate(system, {"kv_tokens": kv, "batch": batch})
        mem = system.memory
        floor_ms = res["stages"]["frame"]["counters"]["link_read_bytes"] / mem.fetch_bytes_per_s() * 1e3
        _set_note(
            rows,
            figure,
            f"with the b1 point ({b1_ms:g} ms, {b1_speedup:g}x) the baseline's b{batch} frame is at most "
            f"{batch} x {b1_ms * b1_speedup:.0f} ms, so {speedup:g}x needs {system.name} b{batch} <= "
            f"{bound_ms:.0f} ms ({bound_ms / batch:.1f} ms per stream), while at b1 the long history "
            f"adds {b1_ms - b1_short_ms:g} ms per stream ({b1_short_ms:g} -> {b1_ms:g} ms); ours "
            f"{res['frame_latency_ms']:.0f} ms, link floor {floor_ms:.0f} ms; we match the b1 points",
        )
    _set_note(
        rows,
        "Fig13 energy gain server b8 frame (high end)",
        "follows the b8 speed miss (the A100 burns near board power while it waits)",
    )


def _explain_energy_rows(
    ref: dict[str, Any],
    rows: list[dict],
    systems: dict[str, SystemConfig],
    flexgen_40k: dict,
    agx_resv_40k: dict,
) -> None:
    """Note for the edge energy row we miss, from published figures and our model."""
    gain = ref["fig16_hw_ablation_40k_b1_frame"]["agx_plus_resv"]["energy_gain"]
    frame = agx_resv_40k["stages"]["frame"]
    busy_ms = sum(frame["latency_breakdown_ms"][k] for k in ("vision", "layers", "lm_head"))
    module_w = systems["agx-orin"].gpu.power_w
    _set_note(
        rows,
        "Fig16 AGX+ReSV energy gain @40K",
        f"{gain:g}x allows {flexgen_40k['energy_per_frame_mj'] / gain * 1e-3:.1f} J per frame; its vision, "
        f"weight streaming and LM head alone take {busy_ms:.0f} ms at the {module_w:g} W module power "
        f"that Fig13's 1K frame gain needs, {busy_ms * module_w * 1e-3:.1f} J, before the link, SSD and "
        "prediction kernels",
    )


def _explain_kvpu_energy_row(rows: list[dict], kvpu_40k: dict, system: SystemConfig) -> None:
    """The KVPU-only energy row sits at the tolerance's edge; say what its last changes cost."""
    row = next(r for r in rows if r["figure"] == "Fig16 V-Rex8 KVPU only energy gain @40K")
    if row["pass"] or row["error_pct"] > 0:
        return
    frame = kvpu_40k["stages"]["frame"]
    spill_mb = frame["counters"].get("dram_spill_bytes", 0.0) / 1e6
    _set_note(
        rows,
        row["figure"],
        f"below the band; the SSD's first-read latency per layer and the vision tower's activation "
        f"spill at {system.accel.sram_kb:g} KB per core ({spill_mb:.0f} MB of DRAM traffic per frame), "
        "modelled since 2026-11-27, moved it from -19.5 % (at the shipped settings)",
    )


def fig13_implied_e2e_speedup(ref: dict[str, Any], end: int) -> float:
    """End-to-end speedup over AGX+FlexGen that Fig. 13's own numbers imply for the COIN
    scenario (26 frames, 39 answer tokens; the short question prefill is left out), at the
    low (end=0, 1K) or high (end=1, 40K) end of the KV sweep: Fig. 13 gives the V-Rex8
    frame latency per KV size and the frame/TPOT speedup ranges, whose ends we take to
    belong to 1K and 40K (speedups grow with the KV size in every Fig. 13 panel)."""
    fig13 = ref["fig13_edge_vrex8_batch1"]
    coin = ref["coin_average_scenario"]
    frame_ms = fig13["frame_latency_ms"][0 if end == 0 else -1]
    tpot_ms = fig13["tpot_ms_range"][end]
    ours = coin["frames"] * frame_ms + coin["answer_tokens"] * tpot_ms
    agx = (
        coin["frames"] * frame_ms * fig13["speedup_vs_agx_flexgen_range"][end]
        + coin["answer_tokens"] * tpot_ms * fig13["tpot_speedup_range"][end]
    )
    return agx / ours


def _fig4b_rows(ref: dict[str, Any], systems: dict[str, SystemConfig]) -> list[dict]:
    """Fig. 4(b): InfiniGen on the A100, COIN scenario over an 80K history. Prefill (the 26
    frames and the question) against the whole scenario, and retrieval (KV prediction and
    fetch) against prefill. InfiniGen fetches every history token in the frame stage
    (Table II), so the retrieval share is fetch / (fetch + per-frame compute)."""
    fig4b = ref["fig4b_a100_infinigen_80k"]
    kv = 80000
    scenario = {"kv_tokens": kv, "stage": "e2e", "policy": "infinigen"}
    whole = simulate(systems["a100"], scenario)
    prefill = simulate(systems["a100"], {**scenario, "answer_tokens": 0})
    parts = prefill["stages"]["e2e"]["latency_breakdown_ms"]
    retrieval_ms = parts["kv_predict"] + parts["kv_fetch"]
    prefill_ms = prefill["e2e_latency_ms"]
    rows = [
        _row(
            "Fig4b A100+InfiniGen prefill share @80K",
            fig4b["prefill_share_of_latency"],
            prefill_ms / whole["e2e_latency_ms"],
            0.20,
        ),
        _row(
            "Fig4b A100+InfiniGen retrieval share of prefill @80K",
            fig4b["retrieval_share_of_prefill"],
            retrieval_ms / prefill_ms,
            0.20,
        ),
    ]
    if not rows[-1]["pass"]:
        share = fig4b["retrieval_share_of_prefill"]
        other_ms = prefill_ms - retrieval_ms
        needed_ms = retrieval_ms * (1 - share) / share
        steps = ref["coin_average_scenario"]["frames"] + 1
        rows[-1]["note"] = (
            f"our A100 prefill is {retrieval_ms / steps:.0f} ms of retrieval and {other_ms / steps:.0f} ms "
            f"of vision and LLM compute per step; {share:g} needs {needed_ms / steps:.0f} ms of compute "
            f"per step ({needed_ms / other_ms:.1f}x ours) at our fetch time, or a fetch "
            f"{other_ms * share / (1 - share) / retrieval_ms:.0%} as long with our compute"
        )
    return rows


def _fig19_rows(
    ref: dict[str, Any], systems: dict[str, SystemConfig], flexgen_40k: dict, resv_40k: dict
) -> list[dict]:
    """Fig. 19: ReSV ablation at 40K (frame latency). The paper names no platform or
    baseline; we read it on V-Rex8 against AGX+FlexGen, the baseline of Figs. 13, 14 and 16,
    with "no clustering" as ReSV scoring every key (`accel.use_hcu=false`: all keys are
    fetched, then the selected values). The note gives the same-hardware reading (V-Rex8
    fetching everything) beside it. Its accuracy drops need COIN and Llama-3-8B; the engine's
    fidelity benchmark measures the demo model instead (BENCHMARKS.md)."""
    fig19 = ref["fig19_resv_ablation_40k"]
    kv = 40000
    vrex8 = systems["vrex8"]
    no_clustering = simulate(vrex8, {"kv_tokens": kv}, overrides={"accel.use_hcu": False})
    fetch_all = simulate(vrex8, {"kv_tokens": kv, "policy": "flexgen"})
    rows = []
    for label, res, key in (
        ("no clustering", no_clustering, "no_clustering"),
        ("full ReSV", resv_40k, "full"),
    ):
        row = _row(
            f"Fig19 V-Rex8 {label} speedup @40K",
            fig19[key]["speedup"],
            flexgen_40k["frame_latency_ms"] / res["frame_latency_ms"],
            0.20,
        )
        row["note"] = (
            f"same hardware (V-Rex8 fetching everything, {fetch_all['frame_latency_ms']:.0f} ms): "
            f"{fetch_all['frame_latency_ms'] / res['frame_latency_ms']:.2f}x"
        )
        rows.append(row)
    full_row = rows[-1]
    if not full_row["pass"]:
        fig16 = ref["fig16_hw_ablation_40k_b1_frame"]["vrex8_all"]["speedup"]
        fig13 = ref["fig13_edge_vrex8_batch1"]["speedup_vs_agx_flexgen_range"][1]
        frame_ms = ref["fig13_edge_vrex8_batch1"]["frame_latency_ms"][-1]
        full_row["note"] = (
            f"against AGX+FlexGen, {full_row['published']:g}x contradicts Fig16's {fig16:g}x and Fig13's "
            f"{fig13:g}x at the same point (we match both rows above); on V-Rex8 alone it needs a "
            f"fetch-everything frame of {full_row['published'] * frame_ms:.0f} ms, slower than AGX+FlexGen's "
            f"{fig13 * frame_ms:.0f} ms over the same link; {full_row['note']}"
        )
    return rows


def _fig14_rows(ref: dict[str, Any], systems: dict[str, SystemConfig]) -> list[dict]:
    """Fig. 14: end-to-end COIN scenario (26 frames, 25-token question, 39-token answer).

    The paper contradicts itself if Fig. 14's labels (2.0-5.4x) are read against FlexGen:
    Fig. 13's FlexGen numbers imply ~10x at 40K for the same scenario (derived rows below,
    which our FlexGen baseline matches). We match the labels against AGX+InfiniGen: the
    method of the paper's own end-to-end breakdown of this scenario (Fig. 4b) and the
    fastest AGX baseline once the 39 answer tokens are included (it fetches 6.8 % in the
    text stage; FlexGen fetches everything for every answer token).
    """
    rows = []
    fig14 = ref["fig14_end_to_end_speedup_vs_agx"]
    kvs = fig14["kv_tokens"]
    flexgen: dict[int, float] = {}
    for kv, published in zip(kvs, fig14["speedup"], strict=True):
        ours = simulate(systems["vrex8"], {"kv_tokens": kv, "stage": "e2e"})
        agx = simulate(systems["agx-orin"], {"kv_tokens": kv, "stage": "e2e", "policy": "infinigen"})
        rows.append(
            _row(
                f"Fig14 e2e speedup vs AGX+InfiniGen @{kv // 1000}K",
                published,
                agx["e2e_latency_ms"] / ours["e2e_latency_ms"],
                0.20,
            )
        )
        if kv in (kvs[0], kvs[-1]):
            base = simulate(systems["agx-orin"], {"kv_tokens": kv, "stage": "e2e", "policy": "flexgen"})
            flexgen[kv] = base["e2e_latency_ms"] / ours["e2e_latency_ms"]
    for end, kv in ((0, kvs[0]), (1, kvs[-1])):
        rows.append(
            _row(
                f"Fig14 e2e vs AGX+FlexGen @{kv // 1000}K, implied by Fig13",
                fig13_implied_e2e_speedup(ref, end),
                flexgen[kv],
                0.20,
                note="derived from Fig. 13's published numbers, not printed in the paper",
            )
        )
    return rows


def _fig18_rows(ref: dict[str, Any], systems: dict[str, SystemConfig]) -> list[dict]:
    """Fig. 18 roofline (edge, 40K, batch 4). The paper's intensity and fractions only fit
    one reading of its op counts (weight GEMMs on the x axis, all dense ops achieved); we
    match that reading and also report the consistent one (sim/roofline.py)."""
    from sim.roofline import roofline_point

    fig18 = ref["fig18_roofline_edge_40k_b4"]
    points = {
        key: roofline_point(systems[name], policy, 40000, 4)
        for key, name, policy in (
            ("vrex8", "vrex8", "resv"),
            ("agx_flexgen", "agx-orin", "flexgen"),
            ("agx_rekv", "agx-orin", "rekv"),
        )
    }
    rows = [
        _row(
            "Fig18 op intensity op/B @40K b4",
            fig18["op_intensity_op_per_byte"],
            points["vrex8"]["op_per_byte"],
            0.20,
            note="weight-GEMM ops / compulsory bytes (the paper's reading, sim/roofline.py)",
        )
    ]
    for key, label in (("agx_flexgen", "AGX+FlexGen"), ("agx_rekv", "AGX+ReKV"), ("vrex8", "V-Rex8")):
        rows.append(
            _row(
                f"Fig18 {label} fraction of roof @40K b4",
                fig18["peak_fraction"][key],
                points[key]["peak_fraction"],
                0.20,
            )
        )
    frac = fig18["peak_fraction"]
    rows.append(
        _row(
            "Fig18 V-Rex8 over AGX+FlexGen (fraction ratio)",
            frac["vrex8"] / frac["agx_flexgen"],
            points["vrex8"]["peak_fraction"] / points["agx_flexgen"]["peak_fraction"],
            0.20,
            note="derived: 71.5 % / 6.6 % (the text's 10.8x)",
        )
    )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'figure':58s} {'published':>10s} {'ours':>10s} {'err%':>7s} {'tolerance':>16s}  result"]
    for r in rows:
        err = f"{r['error_pct']:+.1f}" if r["error_pct"] is not None else "-"
        lines.append(
            f"{r['figure']:58s} {r['published']:>10.4g} {r['ours']:>10.4g} {err:>7s} {r['tolerance']:>16s}  "
            + ("PASS" if r["pass"] else "FAIL")
        )
        if not r["pass"] and r["note"]:
            lines.append(f"    note: {r['note']}")  # why a known miss misses (CALIBRATION.md)
    passed = sum(r["pass"] for r in rows)
    lines.append(f"{passed}/{len(rows)} pass")
    return "\n".join(lines)
