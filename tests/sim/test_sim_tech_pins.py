"""Pinning single technology-table entries (`tech.<entry>=value`) on a system."""

import json

import pytest

from sim.api import compare, simulate
from sim.config import GPU_TECH_ENTRIES, apply_overrides, load_system
from sim.tech import load_entries, tech_for, tech_values
from sim.validate import validation_table
from vrex.cli import main as sim_main

PIN = "tech.lpddr5_energy_pj_per_bit"


def test_pinned_entry_changes_energy_not_timing_and_is_reported():
    plain = simulate("vrex8", {"kv_tokens": 20000})
    pinned = simulate("vrex8", {"kv_tokens": 20000}, overrides=[f"{PIN}=8"])
    assert pinned["frame_latency_ms"] == plain["frame_latency_ms"]
    dram = [r["stages"]["frame"]["energy_breakdown_mj"]["dram"] for r in (plain, pinned)]
    assert dram[1] > dram[0]
    assert pinned["tech_pinned"] == {"lpddr5_energy_pj_per_bit": 8.0} and plain["tech_pinned"] == {}
    assert pinned["config_hash"] != plain["config_hash"]


def test_pinned_entry_keeps_its_value_at_every_corner():
    system = apply_overrides(load_system("vrex8"), [f"{PIN}=5", "tech_corner=high"])
    values, high = tech_for(system), tech_values("high")
    assert values["lpddr5_energy_pj_per_bit"] == 5.0 != high["lpddr5_energy_pj_per_bit"]
    assert {k: v for k, v in values.items() if k != "lpddr5_energy_pj_per_bit"} == {
        k: v for k, v in high.items() if k != "lpddr5_energy_pj_per_bit"
    }
    # "none" unpins
    assert tech_for(apply_overrides(system, [f"{PIN}=none"])) == high


def test_yaml_system_pins_entries(tmp_path):
    f = tmp_path / "lp5x.yaml"
    f.write_text("base: vrex8\nname: vrex8-lp5x\ntech:\n  lpddr5_energy_pj_per_bit: 4.5\n")
    system = load_system(str(f))
    assert tech_for(system)["lpddr5_energy_pj_per_bit"] == 4.5
    assert system.accel.num_cores == 8


def test_compare_cli_gives_the_baseline_the_same_pins(capsys):
    args = ["sim", "compare", "--kv-tokens", "40000", "--set", "tech.pcie_w_per_lane=1.5", "--json"]
    assert sim_main(args) == 0
    gain = json.loads(capsys.readouterr().out)["points"][0]["energy_efficiency_gain"]
    vrex = apply_overrides(load_system("vrex8"), ["tech.pcie_w_per_lane=1.5"])
    shared = compare(vrex, "agx-orin", kv_tokens=[40000])  # by name: the system's pins too
    alone = compare(vrex, load_system("agx-orin"), kv_tokens=[40000])
    assert gain == pytest.approx(shared["points"][0]["energy_efficiency_gain"])
    assert gain != pytest.approx(alone["points"][0]["energy_efficiency_gain"])


def test_validate_with_pins_moves_energy_rows_only():
    plain = {r["figure"]: r["ours"] for r in validation_table(quick=True)}
    pinned = {r["figure"]: r["ours"] for r in validation_table(quick=True, overrides=[f"{PIN}=8"])}
    assert plain.keys() == pinned.keys()
    for figure in plain:
        if "area" in figure or "latency" in figure or "tpot" in figure or "speedup" in figure:
            assert pinned[figure] == pytest.approx(plain[figure]), figure
    # dearer DRAM costs the weight-streaming V-Rex8 more than the link-bound AGX
    text = "Fig13 energy gain edge b1 text (high end)"
    assert pinned[text] < plain[text]


def test_run_at_every_corner(capsys):
    args = ["sim", "run", "--kv-tokens", "5000", "--tech-corner", "all", "--set", f"{PIN}=5", "--json"]
    assert sim_main(args) == 0
    corners = json.loads(capsys.readouterr().out)["corners"]
    assert list(corners) == ["low", "nominal", "high"]
    energy = [corners[c]["energy_per_frame_mj"] for c in corners]
    assert energy[0] < energy[1] < energy[2]
    assert len({corners[c]["frame_latency_ms"] for c in corners}) == 1
    assert all(corners[c]["tech_pinned"] == {"lpddr5_energy_pj_per_bit": 5.0} for c in corners)
    assert sim_main(["sim", "run", "--kv-tokens", "5000", "--tech-corner", "all"]) == 0
    text = capsys.readouterr().out
    assert "tech corners" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("energy_per_frame_mj"))
    assert len(row.split()) == 4  # the metric and one value per corner


def test_tech_sensitivity_moves_energy_and_area_never_timing(capsys):
    from sim.sweep import tech_sensitivity

    objectives = ("frame_latency_ms", "energy_per_frame_j", "energy_per_token_mj")
    df = tech_sensitivity("vrex8", {"kv_tokens": 5000}, objectives)
    assert set(df["knob"]) == {f"tech.{n}" for n, e in load_entries().items() if e.low != e.high}
    timing = df[df["objective"] == "frame_latency_ms"]
    assert (timing[["low_pct", "high_pct"]].abs() < 1e-9).all().all()
    lp = df[(df["knob"] == f"tech.{PIN[5:]}") & (df["objective"] == "energy_per_token_mj")].iloc[0]
    assert lp["low_pct"] < 0 < lp["high_pct"]
    assert sim_main(["sim", "sensitivity", "--kv-tokens", "5000", "--min-pct", "5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows and all(max(abs(r["low_pct"]), abs(r["high_pct"])) >= 5 for r in rows)
    full = tech_sensitivity("vrex8", {"kv_tokens": 5000})  # the command's objectives
    shown = list(dict.fromkeys(r["knob"] for r in rows))
    order = list(dict.fromkeys(full["knob"]))
    assert shown == [k for k in order if k in shown]  # widest swing first, as the function ranks


def test_a_pin_the_baseline_does_not_read_stays_with_our_system(capsys):
    # compare --set pins our system's entries; the GPU baseline takes only those it reads
    args = [
        "sim",
        "compare",
        "--set",
        f"{PIN}=5",
        "--set",
        "tech.pcie_w_per_lane=1",
        "--kv-tokens",
        "1000",
        "--json",
    ]
    assert sim_main(args) == 0
    assert json.loads(capsys.readouterr().out)["points"][0]["speedup"] > 1
    # a GPU baseline's sensitivity moves only the entries it reads
    assert sim_main(["sim", "sensitivity", "--system", "agx-orin", "--kv-tokens", "5000", "--json"]) == 0
    knobs = {row["knob"] for row in json.loads(capsys.readouterr().out)["rows"]}
    assert knobs and all(k.removeprefix("tech.") in GPU_TECH_ENTRIES for k in knobs)
