"""Paper-reproduction table: each published figure, ours, the tolerance, pass/fail.

Published numbers are read at run time from the reference file (never copied into code):
$VREX_PAPER_JSON, else sim/data/reference_vrex_paper.json (a copy of
../shared/reference/vrex_paper.json kept in sync with the shared reference), else that shared file.

Where the paper contradicts itself we say which figure is matched:
- Table III block areas are printed to 0.01 mm2 while the % column is finer (HCU 0.28 % of
  1.89 mm2 = 0.0053 mm2 is printed "0.01"); a printed value only says "within half a unit
  of the last digit", so area rows accept +-5 % or +-0.005 mm2, whichever is wider.
- DRE power share: 2.2 % (abstract, table sum) is matched, not the text's 2.4 %.
- Fig. 16 says V-Rex8 is 8.1x AGX+FlexGen at 40K, Fig. 13 says 7.3x; both rows are shown.
- At edge 40K batch 4, Fig. 13 says 13.8x over AGX+FlexGen and Fig. 18 says 10.8x; both
  rows are shown (we land on Fig. 18's).
- Fig. 14's end-to-end labels are matched against AGX+InfiniGen; against FlexGen they
  contradict Fig. 13 (derived rows show what Fig. 13 implies, see _fig14_rows).
- Fig. 18's intensity and fractions fit only one reading of its op counts (sim/roofline.py).
Ranges ("2.2-7.3x") are compared end to end: our min over the KV sweep against the low end,
our max against the high end.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from sim.api import area, compare, simulate
from sim.config import load_system

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


def validation_table(quick: bool = False) -> list[dict]:
    """Build the validation rows. quick=True skips batch>1 and end-to-end rows (tests)."""
    ref = load_reference()
    rows: list[dict] = []
    kvs = ref["kv_cache_sweep_tokens"]

    # Table III: area and power of one core, DRE shares, chip areas.
    report = area("vrex8")
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
                area(name)["chip_total"]["area_mm2"],
                0.05,
            )
        )

    # HC-table overhead (closed form of our layout).
    model = load_system("vrex8").model
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
    edge = compare("vrex8", "agx-orin", "flexgen", kvs, 1)["points"]
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
    server = compare("vrex48", "a100", "flexgen", kvs, 1)["points"]
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
    base = simulate("agx-orin", {"kv_tokens": kv40, "policy": "flexgen"})
    agx_resv = simulate("agx-orin", {"kv_tokens": kv40, "policy": "resv"})
    kvpu = simulate("vrex8", {"kv_tokens": kv40}, overrides={"accel.use_kvmu": False})
    full = simulate("vrex8", {"kv_tokens": kv40})
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

    if not quick:
        b4 = compare("vrex8", "agx-orin", "flexgen", kvs, 4)["points"]
        rows += _range_rows(
            "Fig13 speedup vs AGX+FlexGen b4",
            fig13["speedup_vs_agx_flexgen_batch4_range"],
            [p["speedup"] for p in b4],
            0.20,
        )
        rows[-1]["note"] = "Fig. 18 gives 10.8x for the same point (edge, 40K, batch 4)"
        rows += _range_rows(
            "Fig13 energy gain edge b4 frame",
            [min(eff["edge_b4_frame"]), max(eff["edge_b4_frame"])],
            [p["energy_efficiency_gain"] for p in b4],
            0.20,
        )
        b8 = compare("vrex48", "a100", "flexgen", kvs, 8)["points"]
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
        rows += _fig14_rows(ref)
        rows += _fig18_rows(ref)
    return rows


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


def _fig14_rows(ref: dict[str, Any]) -> list[dict]:
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
        ours = simulate("vrex8", {"kv_tokens": kv, "stage": "e2e"})
        agx = simulate("agx-orin", {"kv_tokens": kv, "stage": "e2e", "policy": "infinigen"})
        rows.append(
            _row(
                f"Fig14 e2e speedup vs AGX+InfiniGen @{kv // 1000}K",
                published,
                agx["e2e_latency_ms"] / ours["e2e_latency_ms"],
                0.20,
            )
        )
        if kv in (kvs[0], kvs[-1]):
            base = simulate("agx-orin", {"kv_tokens": kv, "stage": "e2e", "policy": "flexgen"})
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


def _fig18_rows(ref: dict[str, Any]) -> list[dict]:
    """Fig. 18 roofline (edge, 40K, batch 4). The paper's intensity and fractions only fit
    one reading of its op counts (weight GEMMs on the x axis, all dense ops achieved); we
    match that reading and also report the consistent one (sim/roofline.py)."""
    from sim.roofline import roofline_point

    fig18 = ref["fig18_roofline_edge_40k_b4"]
    points = {
        key: roofline_point(name, policy, 40000, 4)
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
    passed = sum(r["pass"] for r in rows)
    lines.append(f"{passed}/{len(rows)} pass")
    return "\n".join(lines)
