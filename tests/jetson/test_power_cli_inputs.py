"""`vrex power` from a user review: say plainly when this is not a Jetson; check --interval-ms."""

from __future__ import annotations

import json

import pytest

import vrex.memory as memory
import vrex.power as power
from vrex.cli import main


@pytest.fixture
def not_a_jetson(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "TEGRA_RELEASE_FILE", tmp_path / "nv_tegra_release")
    monkeypatch.setattr(memory, "DEVICE_TREE_COMPATIBLE", tmp_path / "compatible")
    monkeypatch.setattr(power, "power_mode_info", lambda *a, **k: None)
    monkeypatch.setenv("VREX_POWER_SAMPLER", "off")


def test_info_off_a_jetson_says_so(capsys, not_a_jetson):
    assert main(["power", "info"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"platform: {power.NOT_JETSON_NOTE}"
    assert "not a Jetson" in out and "power_mode: None" not in out
    assert main(["power", "info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["platform"] == power.NOT_JETSON_NOTE and report["power_mode"] is None


def test_info_on_a_jetson_names_it(capsys, not_a_jetson, monkeypatch, tmp_path):
    (tmp_path / "compatible").write_bytes(b"nvidia,p3737-0000\x00nvidia,tegra234\x00")
    mode = {"l4t": "36.4.0", "model": "NVIDIA Jetson AGX Orin Developer Kit", "nvpmodel_name": "MAXN"}
    monkeypatch.setattr(power, "power_mode_info", lambda *a, **k: mode)
    assert main(["power", "info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["platform"] == "Jetson (NVIDIA Jetson AGX Orin Developer Kit, L4T 36.4.0)"


def test_sample_off_a_jetson_says_so(capsys, not_a_jetson):
    assert main(["power", "sample", "--seconds", "0.01"]) == 0
    assert "not a Jetson" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "needle"), [(["--interval-ms", "0"], "--interval-ms must be >= 1"),
                                               (["--seconds", "nan"], "--seconds")])  # fmt: skip
def test_sample_flags_are_checked(capsys, not_a_jetson, flags, needle):
    assert main(["power", "sample", "--seconds", "0.01", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vrex: error: ") and needle in err
