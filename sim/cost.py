"""Cost model: area and power per core from per-unit technology numbers; energy of a run
from action counts x energy per action + leakage x time (Accelergy-style).

Table III "power" of a block is read as its power at full activity: every lane does one
action per cycle, every SRAM port moves its full width per cycle, plus leakage.
"""

from __future__ import annotations

from sim.config import SystemConfig
from sim.tech import pinned

COMPONENTS = ("dpe", "vpe", "sram", "hcu", "wtu", "kvmu")
DRE_COMPONENTS = ("hcu", "wtu", "kvmu")


def core_area_mm2(system: SystemConfig, tech: dict[str, float]) -> dict[str, float]:
    """Area of one core per component (mm2)."""
    acc = system.accel
    um2 = {
        "dpe": acc.dpe_trees * acc.dpe_tree_width * tech["dpe_mac_area_um2"],
        "vpe": acc.vpe_width * tech["vpe_lane_area_um2"],
        "sram": acc.sram_kb * tech["sram_area_um2_per_kb"],
        "hcu": acc.hcu_width * tech["hcu_lane_area_um2"]
        + acc.hcu_buffer_bytes / 1024 * tech["dre_buffer_area_um2_per_kb"],
        "wtu": acc.wtu_width * tech["wtu_lane_area_um2"]
        + acc.wtu_buffer_bytes / 1024 * tech["dre_buffer_area_um2_per_kb"],
        "kvmu": tech["kvmu_bytes_per_cycle"] * tech["kvmu_area_um2_per_byte_lane"],
    }
    return {k: v * 1e-6 for k, v in um2.items()}


def _logic_area_mm2(system: SystemConfig, tech: dict[str, float]) -> dict[str, float]:
    """Area that leaks at the logic rate (SRAM and DRE buffers have their own leakage)."""
    area = core_area_mm2(system, tech)
    acc = system.accel
    area["sram"] = 0.0
    area["hcu"] -= acc.hcu_buffer_bytes / 1024 * tech["dre_buffer_area_um2_per_kb"] * 1e-6
    area["wtu"] -= acc.wtu_buffer_bytes / 1024 * tech["dre_buffer_area_um2_per_kb"] * 1e-6
    return area


def core_leakage_mw(system: SystemConfig, tech: dict[str, float]) -> dict[str, float]:
    acc = system.accel
    logic = _logic_area_mm2(system, tech)
    leak = {k: a * tech["logic_leakage_mw_per_mm2"] for k, a in logic.items()}
    leak["sram"] = acc.sram_kb * tech["sram_leakage_mw_per_kb"]
    leak["hcu"] += acc.hcu_buffer_bytes / 1024 * tech["dre_buffer_leakage_mw_per_kb"]
    leak["wtu"] += acc.wtu_buffer_bytes / 1024 * tech["dre_buffer_leakage_mw_per_kb"]
    return leak


def core_dynamic_peak_mw(system: SystemConfig, tech: dict[str, float]) -> dict[str, float]:
    """Dynamic power of one core at full activity (one action per lane per cycle)."""
    acc = system.accel
    f_ghz = acc.clock_mhz * 1e-3  # pJ x GHz = mW
    code_bytes = system.resv.hash_bits / 8
    return {
        "dpe": acc.dpe_trees * acc.dpe_tree_width * tech["dpe_mac_energy_pj"] * f_ghz,
        "vpe": acc.vpe_width * tech["vpe_lane_energy_pj"] * f_ghz,
        "sram": tech["sram_port_bytes_per_cycle"] * tech["sram_energy_pj_per_byte"] * f_ghz,
        "hcu": acc.hcu_width
        * (tech["hcu_lane_energy_pj"] + code_bytes * tech["dre_buffer_energy_pj_per_byte"])
        * f_ghz,
        "wtu": acc.wtu_width
        * (tech["wtu_lane_energy_pj"] + 4 * tech["dre_buffer_energy_pj_per_byte"])
        * f_ghz,
        "kvmu": tech["kvmu_bytes_per_cycle"] * tech["kvmu_energy_pj_per_byte"] * f_ghz,
    }


def area_power_report(system: SystemConfig, tech: dict[str, float]) -> dict:
    """Per-component area_mm2 and power_mw per core and per chip, with DRE shares."""
    area = core_area_mm2(system, tech)
    leak = core_leakage_mw(system, tech)
    dyn = core_dynamic_peak_mw(system, tech)
    power = {k: dyn[k] + leak[k] for k in COMPONENTS}
    core_area, core_power = sum(area.values()), sum(power.values())
    cores = system.accel.num_cores
    return {
        "system": system.name,
        "num_cores": cores,
        "tech_corner": system.tech_corner,
        "tech_pinned": pinned(system),
        "per_core": {k: {"area_mm2": area[k], "power_mw": power[k]} for k in COMPONENTS},
        "per_chip": {k: {"area_mm2": area[k] * cores, "power_mw": power[k] * cores} for k in COMPONENTS},
        "core_total": {"area_mm2": core_area, "power_mw": core_power},
        "chip_total": {"area_mm2": core_area * cores, "power_mw": core_power * cores},
        "dre_share": {
            "area_fraction": _share(sum(area[k] for k in DRE_COMPONENTS), core_area),
            "power_fraction": _share(sum(power[k] for k in DRE_COMPONENTS), core_power),
        },
    }


def _share(part: float, total: float) -> float:
    return part / total if total else 0.0  # a technology table of zeros is allowed (a what-if)


def power_ceiling_w(system: SystemConfig, tech: dict[str, float]) -> float:
    """Most a V-Rex system can draw: every unit of every core at full activity (Table III
    power), device DRAM moving data at its peak bandwidth, plus DRAM background power.
    The link and offload tier are left out (used to bound frames that fetch nothing)."""
    mem = system.memory
    chip_w = area_power_report(system, tech)["chip_total"]["power_mw"] * 1e-3
    if mem.dram_type == "lpddr5":
        pj_bit, background_w = tech["lpddr5_energy_pj_per_bit"], tech["dram_background_w"]
    else:
        pj_bit, background_w = tech["hbm2e_energy_pj_per_bit"], tech["hbm_background_w"]
    return chip_w + mem.dram_bandwidth_gbps * 1e9 * 8 * pj_bit * 1e-12 + background_w


def run_energy_mj(
    system: SystemConfig, tech: dict[str, float], counters: dict[str, float], time_s: float
) -> dict[str, float]:
    """Energy of a V-Rex run per component (mJ): actions x energy + idle + leakage + memory + link."""
    acc, mem = system.accel, system.memory
    cores = acc.num_cores
    c = counters.get
    pj = {
        "dpe": c("dpe_macs", 0.0) * tech["dpe_mac_energy_pj"],
        "vpe": c("vpe_ops", 0.0) * tech["vpe_lane_energy_pj"],
        "sram": c("dpe_busy_cycles", 0.0)
        * cores
        * tech["sram_port_bytes_per_cycle"]
        * tech["sram_energy_pj_per_byte"],
        "hcu": c("hcu_ops", 0.0)
        * (tech["hcu_lane_energy_pj"] + system.resv.hash_bits / 8 * tech["dre_buffer_energy_pj_per_byte"]),
        "wtu": c("wtu_ops", 0.0) * tech["wtu_lane_energy_pj"]
        + c("dre_buffer_bytes", 0.0) * tech["dre_buffer_energy_pj_per_byte"],
        "kvmu": c("kvmu_bytes", 0.0) * tech["kvmu_energy_pj_per_byte"],
    }
    energy = {k: v * 1e-9 for k, v in pj.items()}  # pJ -> mJ
    # Idle units still burn part of their dynamic power (clock tree, ungated registers):
    # charge the idle fraction on the time a unit was not doing its full-rate work.
    dyn = core_dynamic_peak_mw(system, tech)
    busy_s = {k: 0.0 for k in COMPONENTS}
    f_hz = acc.clock_mhz * 1e6
    busy_s["dpe"] = busy_s["sram"] = c("dpe_busy_cycles", 0.0) / f_hz
    idle_mj = 0.0
    for k in COMPONENTS:
        idle_s = max(0.0, time_s - busy_s[k])
        idle_mj += dyn[k] * cores * idle_s * tech["idle_power_fraction"]  # mW x s = mJ
    energy["core_idle"] = idle_mj
    energy["core_leakage"] = sum(core_leakage_mw(system, tech).values()) * cores * time_s
    dram_pj_bit = (
        tech["lpddr5_energy_pj_per_bit"] if mem.dram_type == "lpddr5" else tech["hbm2e_energy_pj_per_bit"]
    )
    background_w = tech["dram_background_w"] if mem.dram_type == "lpddr5" else tech["hbm_background_w"]
    energy["dram"] = c("dram_bytes", 0.0) * 8 * dram_pj_bit * 1e-9 + background_w * time_s * 1e3
    energy.update(link_offload_energy_mj(system, tech, counters, time_s))
    return energy


def link_offload_energy_mj(
    system: SystemConfig, tech: dict[str, float], counters: dict[str, float], time_s: float
) -> dict[str, float]:
    """PCIe (W per lane at full load x busy time) and the offload tier (SSD power or host DRAM).

    The SSD is active while reads are outstanding: `offload_busy_s`, each read's bytes at the
    rate of the slower of tier and link (it holds data the link has not taken yet). That is
    longer than the time it moves data (`offload_utilization` of a run) when the link is slower."""
    mem = system.memory
    link_bytes = counters.get("link_read_bytes", 0.0) + counters.get("link_write_bytes", 0.0)
    full_rate_s = link_bytes / (mem.link_bandwidth_gbps * 1e9)
    link_mj = tech["pcie_w_per_lane"] * mem.link_lanes * full_rate_s * 1e3
    read_s = counters.get("offload_busy_s", 0.0)
    if mem.offload_tier == "ssd":
        busy = min(time_s, read_s)
        offload_mj = (tech["ssd_active_w"] * busy + tech["ssd_idle_w"] * (time_s - busy)) * 1e3
    else:
        offload_mj = link_bytes * 8 * tech["ddr4_energy_pj_per_bit"] * 1e-9
    return {"link": link_mj, "offload": offload_mj}
