"""Baseline policies' device windows, the power ceiling and the implied-power arithmetic
that the validation notes use."""

import pytest

from sim.api import area, simulate
from sim.config import apply_overrides, load_system
from sim.cost import power_ceiling_w
from sim.tech import tech_values
from sim.validate import implied_power_w
from sim.workload import device_window_tokens, make_step, policy_table


def test_rekv_keeps_its_local_window_on_a_gpu_flexgen_keeps_none():
    agx = load_system("agx-orin")
    window = device_window_tokens(agx, "rekv")
    assert window == policy_table()["rekv"]["local_window_tokens"] > 0
    assert device_window_tokens(agx, "flexgen") == 0
    assert device_window_tokens(agx, "infinigen_p") == 0
    history = 8 * window
    rekv = make_step(agx, "rekv", "frame", history, 10, 1)
    flex = make_step(agx, "flexgen", "frame", history, 10, 1)
    assert (flex.fetched_tokens == history).all()
    offloaded = (history - window) / history
    assert rekv.fetched_tokens == pytest.approx(rekv.selected_tokens * offloaded, abs=0.5)
    # A history inside the window never crosses the link.
    short = make_step(agx, "rekv", "frame", window, 10, 1)
    assert short.fetched_tokens.sum() == 0


def test_rekv_window_moves_fewer_link_bytes_on_the_gpu():
    m = load_system("agx-orin").model
    res = simulate("agx-orin", {"kv_tokens": 40000, "policy": "rekv"})["stages"]["frame"]
    step = make_step(load_system("agx-orin"), "rekv", "frame", 40000, 10, 1)
    expected = float(step.fetched_tokens.sum()) * m.kv_bytes_per_token_head
    assert res["counters"]["link_read_bytes"] == pytest.approx(expected)
    assert expected < 0.584 * 40000 * m.num_kv_heads * m.num_layers * m.kv_bytes_per_token_head


def test_kvmu_window_rule_unchanged_on_vrex():
    vrex = load_system("vrex8")
    assert device_window_tokens(vrex, "resv") == vrex.memory.recent_window_tokens
    no_kvmu = apply_overrides(vrex, {"accel.use_kvmu": False})
    assert device_window_tokens(no_kvmu, "resv") == 0


def test_power_ceiling_closed_form_and_never_exceeded():
    tech = tech_values()
    vrex8 = load_system("vrex8")
    chip_w = area("vrex8")["chip_total"]["power_mw"] * 1e-3
    dram_w = vrex8.memory.dram_bandwidth_gbps * 8 * tech["lpddr5_energy_pj_per_bit"] * 1e-3
    ceiling = power_ceiling_w(vrex8, tech)
    assert ceiling == pytest.approx(chip_w + dram_w + tech["dram_background_w"])
    assert power_ceiling_w(apply_overrides(vrex8, {"accel.num_cores": 16}), tech) > ceiling
    # No run draws more than every unit at full activity plus DRAM at peak (link and
    # offload tier aside): the energy model never charges an action twice.
    for name, kv, batch in (("vrex8", 1000, 4), ("vrex8", 40000, 1), ("vrex48", 1000, 8)):
        system = load_system(name)
        frame = simulate(name, {"kv_tokens": kv, "batch": batch})["stages"]["frame"]
        e = frame["energy_breakdown_mj"]
        watts = (frame["energy_mj"] - e["link"] - e["offload"]) / frame["latency_ms"]
        assert watts < power_ceiling_w(system, tech), (name, kv, batch)


def test_implied_power_arithmetic():
    p = implied_power_w("vrex8", "agx-orin", 1000, 1, 2.0, 4.0)
    assert p["implied_w"] == pytest.approx(p["baseline_w"] / 2)
    base = simulate("agx-orin", {"kv_tokens": 1000, "policy": "flexgen"})["stages"]["frame"]
    assert p["baseline_w"] == pytest.approx(base["energy_mj"] / base["latency_ms"])
    assert p["ceiling_w"] == pytest.approx(power_ceiling_w(load_system("vrex8"), tech_values()))
    # Our own power at the point is below the ceiling.
    assert 0 < p["ours_w"] < p["ceiling_w"]
