"""tegrastats parsing on recorded lines, energy integration, sampler plumbing, power mode."""

from __future__ import annotations

import datetime as dt
import importlib.machinery
import itertools
import shutil
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

import vrex.power as power
from vrex.power import (
    NO_SAMPLER_NOTE,
    PowerEvent,
    PowerSample,
    PowerSampler,
    TegrastatsParser,
    detect_sampler,
    energy_mj,
    no_sampler_report,
    parse_jetson_clocks_show,
    parse_nvpmodel_query,
    power_mode_info,
)

FIXTURES = Path(__file__).parent / "fixtures"


def _lines(name: str) -> list[str]:
    return [line for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


# --- parsing -------------------------------------------------------------------------------


def test_agx_orin_jetpack6_line():
    first, second, _ = (TegrastatsParser().parse(line) for line in _lines("tegrastats_agx_orin_jp6.log"))
    assert first.rails_mw == {"VDD_GPU_SOC": 3190.0, "VDD_CPU_CV": 797.0, "VIN_SYS_5V0": 3832.0}
    assert first.total_mw == 3190 + 797 + 3832
    assert first.total_source == "VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0"
    assert first.wallclock == dt.datetime(2024, 11, 14, 10, 15, 32)
    assert (first.ram_used_mb, first.ram_total_mb, first.swap_total_mb) == (3624, 62841, 31421)
    assert len(first.cpu_load_pct) == 12 and first.cpu_freq_mhz[4] == 2201
    assert (first.gpu_load_pct, first.gpu_freq_mhz) == (0.0, (0, 0))
    assert first.temps_c["tj"] == pytest.approx(45.437)

    assert second.total_mw == 14748 + 2790 + 5632
    assert second.rails_avg_mw["VDD_GPU_SOC"] == 8969.0
    assert second.cpu_load_pct[:2] == (35.0, 20.0) and second.cpu_load_pct[8:] == (None,) * 4
    assert (second.gpu_load_pct, second.gpu_freq_mhz) == (87.0, (1300, 1300))
    assert (second.emc_load_pct, second.emc_freq_mhz) == (23.0, 3199)


def test_agx_orin_jetpack5_line_with_ddr_rail_and_unconnected_channels():
    sample = TegrastatsParser().parse(_lines("tegrastats_agx_orin_jp5.log")[0])
    assert sample.rails_mw["VDDQ_VDD2_1V8AO"] == 2430.0
    assert "NC" not in sample.rails_mw
    # The DRAM I/O rail is reported but not added to the module total.
    assert sample.total_mw == 19586 + 3981 + 5732
    assert sample.wallclock is None  # JetPack 5 lines carry no time stamp
    assert sample.temps_c["CV0"] == -256.0 and sample.temps_c["GPU"] == pytest.approx(50.875)
    assert len(sample.cpu_load_pct) == 8


def test_orin_nano_line_uses_vdd_in_as_total():
    first, second = (TegrastatsParser().parse(line) for line in _lines("tegrastats_orin_nano_jp6.log"))
    assert first.rails_mw == {"VDD_IN": 7432.0, "VDD_CPU_GPU_CV": 2806.0, "VDD_SOC": 1931.0}
    assert (first.total_mw, first.total_source) == (7432.0, "VDD_IN")
    assert first.rails_avg_mw["VDD_IN"] == 6102.0
    assert (first.gpu_load_pct, first.gpu_freq_mhz) == (42.0, (624,))
    assert second.total_mw == 9876.0
    assert second.cpu_load_pct == (12.0, 6.0, 5.0, 3.0, None, None)
    assert first.ram_total_mb == 7620


def test_older_unitless_rails_xavier_nx_and_nano():
    nx = TegrastatsParser().parse(_lines("tegrastats_xavier_nx_jp4.log")[0])
    assert nx.rails_mw == {"VDD_IN": 4960.0, "VDD_CPU_GPU_CV": 1066.0, "VDD_SOC": 1412.0}
    assert nx.total_mw == 4960.0
    assert (nx.gpu_load_pct, nx.gpu_freq_mhz, nx.emc_freq_mhz) == (0.0, (), None)
    nano = TegrastatsParser().parse(_lines("tegrastats_nano_jp4.log")[0])
    assert nano.rails_mw == {"POM_5V_IN": 2987.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 500.0}
    assert (nano.total_mw, nano.total_source) == (2987.0, "POM_5V_IN")
    assert "IRAM" not in nano.rails_mw and nano.gpu_freq_mhz == (921,)


def test_unknown_rails_forced_rails_and_non_tegrastats_lines():
    line = "RAM 100/200MB CPU [1%@100] FOO_RAIL 1000mW/900mW BAR 250mW/250mW"
    sample = TegrastatsParser().parse(line)
    assert (sample.total_mw, sample.total_source) == (1250.0, "sum of all rails")
    assert TegrastatsParser(total_rails=["BAR"]).parse(line).total_mw == 250.0
    with pytest.raises(ValueError, match="total_rails"):
        TegrastatsParser(total_rails=["VDD_IN"]).parse(line)
    no_rails = TegrastatsParser().parse("RAM 100/200MB (lfb 1x4MB) CPU [1%@100]")
    assert no_rails.total_mw is None and "root" in no_rails.total_source
    with pytest.raises(ValueError, match="not a tegrastats line"):
        TegrastatsParser().parse("Traceback (most recent call last):")


# --- integration ---------------------------------------------------------------------------


def _ramp(t_end_s: float, step_s: float, f) -> list[PowerSample]:
    n = round(t_end_s / step_s)
    return [PowerSample(i * step_s, f(i * step_s), {}) for i in range(n + 1)]


def test_energy_of_constant_and_linear_power_is_exact():
    flat = _ramp(10.0, 0.1, lambda t: 5000.0)
    assert energy_mj(flat, 2.0, 3.0) == pytest.approx(5000.0)
    assert energy_mj(flat, 2.03, 2.07) == pytest.approx(200.0)  # inside one sampling interval
    ramp = _ramp(4.0, 0.1, lambda t: 1000.0 * t)  # mW
    assert energy_mj(ramp, 0.0, 4.0) == pytest.approx(500.0 * 4.0**2)
    # Edges between samples are interpolated, so a linear signal stays exact.
    assert energy_mj(ramp, 0.05, 3.95) == pytest.approx(500.0 * (3.95**2 - 0.05**2))
    assert energy_mj(ramp, 1.0, 1.0) == 0.0


def test_energy_of_curved_power_converges_to_the_integral():
    coarse = energy_mj(_ramp(2.0, 0.1, lambda t: 1000.0 * t * t), 0.0, 2.0)
    fine = energy_mj(_ramp(2.0, 0.01, lambda t: 1000.0 * t * t), 0.0, 2.0)
    exact = 1000.0 * 2.0**3 / 3
    assert abs(fine - exact) < abs(coarse - exact) < 0.01 * exact
    assert fine == pytest.approx(exact, rel=1e-4)


def test_energy_outside_the_sampled_time_is_unknown():
    samples = _ramp(1.0, 0.1, lambda t: 1000.0)
    assert energy_mj(samples, 0.5, 1.5, max_gap_s=0.2) is None
    assert energy_mj(samples, 0.9, 1.1, max_gap_s=0.2) == pytest.approx(200.0)  # edge value held
    assert energy_mj(samples[:1], 0.0, 0.0) is None
    with pytest.raises(ValueError, match="ends before it starts"):
        energy_mj(samples, 0.6, 0.5)


def test_attribute_energy_to_frames_and_answers():
    sampler = PowerSampler(interval_ms=100, clock=lambda: 0.0)
    for s in _ramp(10.0, 0.1, lambda t: 2000.0 + 1000.0 * t):
        sampler.add_sample(s.t_s, s.total_mw, {"VDD_IN": s.total_mw})
    frames = [PowerEvent("frame", k, k + 0.5, id=k) for k in range(4)]
    answer = PowerEvent("answer", 5.0, 7.0)
    late = PowerEvent("frame", 20.0, 20.5)  # after sampling stopped
    report = sampler.attribute([*frames, answer, late])

    def exact(t0, t1):
        return 2000.0 * (t1 - t0) + 500.0 * (t1**2 - t0**2)

    assert report.per_event_mj[:4] == pytest.approx([exact(k, k + 0.5) for k in range(4)])
    assert report.energy_per_frame_mj == pytest.approx(sum(exact(k, k + 0.5) for k in range(4)) / 4)
    assert report.energy_per_answer_mj == pytest.approx(exact(5.0, 7.0))
    assert report.per_event_mj[5] is None
    assert "1 of 6 events" in report.note and report.sampler == "tegrastats"
    # Average over 0..20.5 s is unknown: the samples stop at 10 s.
    assert report.average_power_mw is None
    covered = sampler.attribute([*frames, answer])
    assert covered.average_power_mw == pytest.approx(exact(0.0, 7.0) / 7.0)
    assert sampler.average_power_mw(1.0, 3.0) == pytest.approx(exact(1.0, 3.0) / 2.0)


def test_ring_is_bounded_and_time_ordered():
    sampler = PowerSampler(capacity=5)
    for i in range(10):
        sampler.add_sample(float(i), 100.0)
    assert [s.t_s for s in sampler.samples()] == [5.0, 6.0, 7.0, 8.0, 9.0]
    with pytest.raises(ValueError, match="older"):
        sampler.add_sample(3.0, 100.0)
    with pytest.raises(ValueError, match="source"):
        PowerSampler(source="ina3221")
    with pytest.raises(ValueError, match="interval_ms"):
        PowerSampler(interval_ms=0)


def test_no_sampler_means_no_numbers():
    report = no_sampler_report()
    assert report.note == NO_SAMPLER_NOTE == "no power sampler on this machine"
    assert report.energy_per_frame_mj is None and report.average_power_mw is None
    assert report.to_dict()["sampler"] is None


@pytest.mark.skipif(shutil.which("tegrastats") is not None, reason="this machine is a Jetson")
def test_detect_sampler_is_none_here(monkeypatch):
    monkeypatch.delenv("VREX_POWER_SAMPLER", raising=False)
    assert detect_sampler() is None
    assert power_mode_info() is None


def test_detect_sampler_finds_tegrastats_on_path_and_can_be_disabled(tmp_path, monkeypatch):
    fake = tmp_path / "tegrastats"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(power, "JTOP_SOCKET", tmp_path / "no-jtop.sock")
    sampler = detect_sampler(interval_ms=50)
    assert sampler is not None and sampler.source == "tegrastats"
    assert sampler.command == ["tegrastats", "--interval", "50"]
    monkeypatch.setenv("VREX_POWER_SAMPLER", "off")
    assert detect_sampler() is None


# --- the background reader -------------------------------------------------------------------


def test_sampler_reads_a_tegrastats_process(tmp_path):
    # A stand-in for tegrastats that prints recorded Orin Nano lines, one per 20 ms.
    script = tmp_path / "fake_tegrastats.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            lines = open({str(FIXTURES / "tegrastats_orin_nano_jp6.log")!r}).read().splitlines()
            for i in range(6):
                print(lines[i % 2], flush=True)
                time.sleep(0.02)
            print("garbage", flush=True)
            """
        )
    )
    sampler = PowerSampler(interval_ms=20, command=[sys.executable, str(script)])
    t0 = time.monotonic()
    sampler.start()
    deadline = time.monotonic() + 10
    while sampler.error is None and time.monotonic() < deadline:
        time.sleep(0.02)
    t1 = time.monotonic()
    sampler.stop()
    samples = sampler.samples()
    assert [s.total_mw for s in samples] == [7432.0, 9876.0] * 3
    assert all(t0 <= s.t_s <= t1 for s in samples)
    assert all(b.t_s >= a.t_s for a, b in itertools.pairwise(samples))
    assert sampler.num_unparsed_lines == 1
    assert "exited" in sampler.error
    assert sampler.last_parsed is not None and sampler.last_parsed.gpu_load_pct == 99.0


def test_missing_tegrastats_binary_says_what_to_do():
    sampler = PowerSampler(command=["/nonexistent/tegrastats", "--interval", "100"])
    with pytest.raises(FileNotFoundError, match="tegrastats ships with L4T"):
        sampler.start()


def test_sampler_reads_the_jtop_service(monkeypatch):
    agx_orin = {"VDD_GPU_SOC": 5000, "VDD_CPU_CV": 1000, "VIN_SYS_5V0": 3000, "VDDQ_VDD2_1V8AO": 700}
    readings = iter([
        {"rail": {"VDD_GPU_SOC": {"power": 5000}, "VDD_CPU_CV": {"power": 1000}}, "tot": {"power": 9000}},
        {"rail": {"VDD_IN": {"power": 7000}}, "tot": {}},
        # jtop's "tot" on an AGX Orin adds the DRAM I/O rail too; the module input does not
        {"rail": {k: {"power": v} for k, v in agx_orin.items()}, "tot": {"power": 9700}},
    ])  # fmt: skip

    class FakeJtop:
        def __init__(self, interval):
            self.interval = interval
            self.power = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def ok(self):
            self.power = next(readings, None)
            return self.power is not None

    module = types.ModuleType("jtop")
    module.jtop = FakeJtop
    module.__spec__ = importlib.machinery.ModuleSpec("jtop", None)
    monkeypatch.setitem(sys.modules, "jtop", module)
    ticks = iter(range(100))
    sampler = PowerSampler("jtop", interval_ms=100, clock=lambda: float(next(ticks)))
    sampler._run_jtop()  # the thread body, run inline
    assert [(s.t_s, s.total_mw) for s in sampler.samples()] == [(0.0, 9000.0), (1.0, 7000.0), (2.0, 9000.0)]
    assert sampler.samples()[0].rails_mw == {"VDD_GPU_SOC": 5000.0, "VDD_CPU_CV": 1000.0}
    # detect_sampler prefers jtop when its socket and API are both there.
    sock = Path(sys.prefix) / "definitely-missing.sock"
    monkeypatch.setattr(power, "JTOP_SOCKET", sock)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert detect_sampler() is None
    monkeypatch.setattr(power, "JTOP_SOCKET", FIXTURES / "nvpmodel_q_agx_orin.txt")  # any existing path
    chosen = detect_sampler()
    assert chosen is not None and chosen.source == "jtop"


def test_a_jtop_that_refuses_to_connect_falls_back_to_tegrastats(tmp_path, monkeypatch):
    class RefusingJtop:
        def __init__(self, interval):
            pass

        def __enter__(self):
            raise RuntimeError("Mismatch version jtop service: [4.2.12] and client: [4.3.2]")

        def __exit__(self, *exc):
            return False

    module = types.ModuleType("jtop")
    module.jtop = RefusingJtop
    module.__spec__ = importlib.machinery.ModuleSpec("jtop", None)
    monkeypatch.setitem(sys.modules, "jtop", module)
    monkeypatch.setattr(power, "JTOP_SOCKET", FIXTURES / "nvpmodel_q_agx_orin.txt")  # any existing path
    fake = tmp_path / "tegrastats"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.delenv("VREX_POWER_SAMPLER", raising=False)
    assert detect_sampler().source == "tegrastats"
    monkeypatch.setenv("VREX_POWER_SAMPLER", "jtop")  # asked for by name: no probe, jtop it is
    assert detect_sampler().source == "jtop"


# --- power mode ------------------------------------------------------------------------------


def test_power_mode_parsers():
    assert power.l4t_release((FIXTURES / "nv_tegra_release_r36").read_text()) == "36.4.0"
    assert parse_nvpmodel_query((FIXTURES / "nvpmodel_q_agx_orin.txt").read_text()) == {
        "nvpmodel_name": "MAXN",
        "nvpmodel_id": 0,
    }
    clocks = parse_jetson_clocks_show((FIXTURES / "jetson_clocks_show_agx_orin.txt").read_text())
    assert clocks["cpu_cur_mhz"] == [2201, 2201, 2201, None]
    assert (clocks["gpu_cur_mhz"], clocks["gpu_max_mhz"]) == (1300, 1300)
    assert (clocks["emc_cur_mhz"], clocks["emc_max_mhz"]) == (3199, 3199)
    assert clocks["nvpmodel_name"] == "MAXN"


def test_power_mode_info_on_a_fake_jetson(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, fixture in (
        ("nvpmodel", "nvpmodel_q_agx_orin.txt"),
        ("jetson_clocks", "jetson_clocks_show_agx_orin.txt"),
    ):
        exe = bin_dir / tool
        exe.write_text(f"#!/bin/sh\ncat {FIXTURES / fixture}\n")
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    info = power_mode_info(release_file=FIXTURES / "nv_tegra_release_r36")
    assert info["l4t"] == "36.4.0"
    assert (info["nvpmodel_name"], info["nvpmodel_id"]) == ("MAXN", 0)
    assert info["clocks"]["gpu_cur_mhz"] == 1300
    # jetson_clocks needs root on a real board: its failure leaves clocks None, not a crash.
    (bin_dir / "jetson_clocks").write_text("#!/bin/sh\nexit 1\n")
    assert power_mode_info(release_file=FIXTURES / "nv_tegra_release_r36")["clocks"] is None


def test_cli_reports_say_no_sampler(capsys, monkeypatch):
    import argparse
    import json

    monkeypatch.setenv("VREX_POWER_SAMPLER", "off")
    parser = argparse.ArgumentParser()
    power.register(parser.add_subparsers())
    args = parser.parse_args(["power", "sample", "--seconds", "0.01", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["note"] == NO_SAMPLER_NOTE and out["average_power_mw"] is None
    args = parser.parse_args(["power", "info", "--json"])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["power_sampler"] is None and info["note"] == NO_SAMPLER_NOTE
    assert isinstance(info["device_kv_budget_auto_bytes"], int) and info["device_kv_budget_auto_bytes"] >= 0
