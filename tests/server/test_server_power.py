"""Measured energy per frame and answer in the server (a fake tegrastats on PATH), the
"no power sampler" case, `--device-kv-budget auto`, and the power mode in `vrex bench server`."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from server.energy import SessionEnergy
from vrex.client import Client
from vrex.power import NO_SAMPLER_NOTE, PowerSampler

REPO = Path(__file__).resolve().parents[2]
JETSON_FIXTURES = REPO / "tests" / "jetson" / "fixtures"
FAKE_ENGINE = Path(__file__).resolve().parent / "fake_engine.py"
ORIN_NANO_MW = 7432.0  # VDD_IN of the first recorded Orin Nano line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_tegrastats(bin_dir: Path, started: Path) -> Path:
    """An executable `tegrastats` that prints one recorded Orin Nano line every --interval ms
    (and touches `started` after its first line)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    line = (JETSON_FIXTURES / "tegrastats_orin_nano_jp6.log").read_text().splitlines()[0]
    exe = bin_dir / "tegrastats"
    exe.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""
            import sys, time
            interval_ms = int(sys.argv[sys.argv.index("--interval") + 1])
            print({line!r}, flush=True)
            open({str(started)!r}, "w").close()
            while True:
                time.sleep(interval_ms / 1000)
                print({line!r}, flush=True)
            """
        )
    )
    exe.chmod(0o755)
    return exe


# ---------------------------------------------------------------------------- the ledger


def test_session_energy_charges_frames_and_answers():
    clock = {"now": 0.0}
    sampler = PowerSampler(interval_ms=100, clock=lambda: clock["now"])
    energy = SessionEnergy(sampler)
    for i in range(11):  # 2000 mW up to 1.0 s, then 4000 mW from 1.1 s
        sampler.add_sample(i * 0.1, 2000.0)
    energy.record("frame", 0.2, 0.3)  # 2000 mW x 0.1 s = 200 mJ
    energy.record("frame", 0.5, 0.9)  # 800 mJ
    energy.record("answer", 0.9, 1.5)  # after the last sample: waits
    clock["now"] = 1.0
    assert sorted(kind for kind, _ in energy.settle()) == ["frame", "frame"]
    stats = energy.stats()
    assert stats["energy_per_frame_mj"] == pytest.approx(500.0)
    assert stats["energy_frames_measured"] == 2 and "energy_per_answer_mj" not in stats
    for i in range(11, 21):
        sampler.add_sample(i * 0.1, 4000.0)
    stats = energy.stats()
    # 0.9..1.0 s at 2000 mW, 1.0..1.1 s ramping to 4000 mW, then 4000 mW to 1.5 s
    assert stats["energy_per_answer_mj"] == pytest.approx(0.1 * 2000 + 0.1 * 3000 + 0.4 * 4000)
    assert stats["average_power_mw"] == pytest.approx((200 + 800 + 2100) / (0.1 + 0.4 + 0.6))
    assert stats["power_sampler"] == "tegrastats" and "measured with tegrastats" in stats["power_note"]
    energy.record("frame", 5.0, 5.1)  # the sampler stalled: given up, not invented
    clock["now"] = 30.0
    energy.settle()
    assert energy.stats()["energy_frames_measured"] == 2


def test_no_sampler_says_so():
    energy = SessionEnergy(None)
    energy.record("frame", 0.0, 1.0)
    assert energy.settle() == []
    assert energy.stats() == {"power_sampler": None, "power_note": NO_SAMPLER_NOTE}


# ---------------------------------------------------------------------------- a real server process


async def test_server_reports_measured_energy_with_fake_tegrastats(start_server, tmp_path):
    pytest.importorskip("prometheus_client")
    bin_dir, started = tmp_path / "bin", tmp_path / "tegrastats-started"
    _fake_tegrastats(bin_dir, started)
    metrics_port = _free_port()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "VREX_POWER_SAMPLER": "tegrastats",
        "VREX_FAKE_TOKEN_MS": "20",
    }
    server = start_server("--metrics-port", str(metrics_port), env=env)
    for _ in range(200):  # frames before the first power sample could not be measured
        if started.exists():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    async with Client(server.target) as client:
        async with client.session(fps=1.0) as s:
            for i in range(4):
                await s.send_frame(np.full((16, 16, 3), i, np.uint8), float(i), wait=True)
            answer = await s.ask_text("how much energy?", max_new_tokens=5)
            await asyncio.sleep(0.4)  # let samples after the last event arrive (100 ms period)
            stats = await s.stats()
            metrics = (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            )
    assert stats.power_sampler == "tegrastats" and stats.power_note == "measured with tegrastats"
    extra = stats.extra
    assert extra["energy_frames_measured"] == 4 and extra["energy_answers_measured"] == 1
    # constant 7432 mW: a frame is charged for the engine's time (the fake reports 1 ms)
    assert extra["energy_per_frame_mj"] == pytest.approx(ORIN_NANO_MW * 0.001, rel=1e-6)
    assert extra["average_power_mw"] == pytest.approx(ORIN_NANO_MW, rel=1e-6)
    # an answer of 5 tokens at >= 20 ms each: at least 0.1 s at 7432 mW
    assert ORIN_NANO_MW * 0.1 <= extra["energy_per_answer_mj"] <= ORIN_NANO_MW * answer.total_ms / 1000 * 1.5
    assert "vrex_power_sampler_present 1.0" in metrics
    assert 'vrex_energy_measured_events_total{kind="frame"} 4.0' in metrics
    assert _gauge(metrics, "vrex_energy_per_frame_mj") == pytest.approx(ORIN_NANO_MW * 0.001, rel=1e-6)
    assert _gauge(metrics, "vrex_power_average_mw") == pytest.approx(ORIN_NANO_MW, rel=1e-6)
    assert '"event": "power_sampler", "source": "tegrastats"' in server.log()


def _gauge(metrics: str, name: str) -> float:
    return float(next(line for line in metrics.splitlines() if line.startswith(name + " ")).split()[1])


async def test_server_without_sampler_says_so(start_server):
    server = start_server(env={"VREX_POWER_SAMPLER": "off"})
    async with Client(server.target) as client:
        async with client.session(fps=1.0) as s:
            await s.send_frame(np.zeros((16, 16, 3), np.uint8), 0.0, wait=True)
            stats = await s.stats()
    assert stats.power_sampler == "" and stats.power_note == NO_SAMPLER_NOTE
    assert not any(k.startswith("energy") or k == "average_power_mw" for k in stats.extra)


# ---------------------------------------------------------------------------- --device-kv-budget


async def test_device_kv_budget_auto_is_sized_after_load_and_split_per_session(start_server):
    from vrex import memory

    server = start_server("--device-kv-budget", "auto", "--max-sessions", "4")
    event = next(json.loads(line) for line in server.log().splitlines() if "device_kv_budget_auto" in line)
    assert event["max_sessions"] == 4 and event["per_session_bytes"] == event["device_budget_bytes"] // 4
    headroom = max(
        memory.DEFAULT_HEADROOM_BYTES, int(memory.DEFAULT_HEADROOM_FRACTION * event["total_bytes"])
    )
    assert event["headroom_bytes"] == headroom
    assert event["device_budget_bytes"] == max(0, event["free_bytes"] - headroom)
    async with Client(server.target) as client:
        info = await client.server_info()
    assert info.limits.device_kv_budget_bytes == event["per_session_bytes"] > 0


def test_device_kv_budget_flag_parsing():
    import argparse

    from server.cli import register, server_config_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    config = server_config_from_args(parser.parse_args(["serve", "--device-kv-budget", "512MiB"]))
    assert config.device_kv_budget_bytes == 512 * 2**20 and not config.device_kv_budget_auto
    config = server_config_from_args(parser.parse_args(["serve", "--device-kv-budget", "AUTO"]))
    assert config.device_kv_budget_bytes is None and config.device_kv_budget_auto
    with pytest.raises(ValueError, match="--device-kv-budget"):
        server_config_from_args(parser.parse_args(["serve", "--device-kv-budget", "lots"]))
    with pytest.raises(ValueError, match="positive"):
        server_config_from_args(parser.parse_args(["serve", "--device-kv-budget", "0"]))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--grace", "-1"], "--grace must be >= 0"),
        (["--snapshot-interval", "-1"], "--snapshot-interval must be >= 0"),
        (["--idle-timeout", "0"], "--idle-timeout must be > 0"),
        (["--max-sessions", "0"], "--max-sessions must be >= 1"),
        (["--max-frame-bytes", "0"], "--max-frame-bytes must be >= 1"),
        (["--metrics-port", "-5"], "--metrics-port must be >= 1"),
        (["--durability", "wal"], "--durability wal needs --data-dir"),
        (["--data-dir", "FILE"], "is a file, not a folder"),
        (["--tls-cert", "JUNK", "--tls-key", "JUNK"], "not a PEM certificate chain"),
    ],
)
def test_serve_flag_errors_name_the_flag(argv, words, tmp_path):
    import argparse

    from server.cli import register, server_config_from_args

    (tmp_path / "f").write_text("")
    (tmp_path / "junk.pem").write_text("junk\n")
    argv = [{"FILE": str(tmp_path / "f"), "JUNK": str(tmp_path / "junk.pem")}.get(a, a) for a in argv]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    with pytest.raises(ValueError) as err:
        server_config_from_args(parser.parse_args(["serve", *argv]))
    assert words in str(err.value)


def test_a_data_dir_the_server_cannot_write_is_refused_with_the_flag(tmp_path, capsys, monkeypatch):
    """It crashed with a raw traceback (a read-only file system) or started and failed every
    Open; here the folder sits under a file, which fails the same way for root too."""
    import server.logs
    from server.cli import _unwritable
    from vrex.cli import main

    # the server's logging setup would keep a handler on this test's captured stderr
    monkeypatch.setattr(server.logs, "setup_logging", lambda *a, **k: None)

    (tmp_path / "f").write_text("")
    assert "cannot write there" in _unwritable(tmp_path / "f" / "sub")
    assert _unwritable(tmp_path / "ok" / "deep") is None and (tmp_path / "ok" / "deep").is_dir()
    assert main(["serve", "--trace-dir", str(tmp_path / "f" / "traces")]) == 2
    assert "vrex: error: --trace-dir" in capsys.readouterr().err
    # the ready file too, before the model loads (it was written after, with a traceback)
    assert main(["serve", "--ready-file", str(tmp_path / "f" / "ready.json")]) == 2
    assert "vrex: error: --ready-file" in capsys.readouterr().err
    assert main(["serve", "--ready-file", str(tmp_path / "ok")]) == 2
    assert "is a folder; give a file path" in capsys.readouterr().err


def test_tls_pair_check_accepts_a_real_pair(tls_files):
    from server.cli import check_tls_pair

    check_tls_pair(*tls_files)


def test_dtype_flag_reaches_the_engine_config(monkeypatch):
    import argparse

    import server.backend as backend
    from server.cli import register, server_config_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert server_config_from_args(parser.parse_args(["serve"])).dtype == "auto"
    config = server_config_from_args(parser.parse_args(["serve", "--dtype", "bf16"]))
    assert config.dtype == "bfloat16"
    with pytest.raises(SystemExit):  # argparse names the choices
        parser.parse_args(["serve", "--dtype", "int8"])
    seen = {}

    class Module:
        @staticmethod
        def EngineConfig(**kwargs):  # noqa: N802 - stands in for the class
            seen.update(kwargs)
            return kwargs

        @staticmethod
        def Engine(config):  # noqa: N802
            return config

    monkeypatch.setattr(backend, "load_engine_module", lambda: Module)
    backend.create_backend(config)
    assert seen["dtype"] == "bfloat16" and seen["device"] == "cpu"


# ---------------------------------------------------------------------------- bench power mode


def test_bench_server_records_the_power_mode(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvpmodel = bin_dir / "nvpmodel"  # a Jetson's `nvpmodel -q`, recorded on an AGX Orin
    nvpmodel.write_text(f"#!/bin/sh\ncat {JETSON_FIXTURES / 'nvpmodel_q_agx_orin.txt'}\n")
    nvpmodel.chmod(0o755)
    env = dict(
        os.environ,
        VREX_TEST_FAKE_ENGINE=str(FAKE_ENGINE),
        PYTHONPATH=str(REPO),
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.server_load",
        "--streams",
        "1",
        "--fps",
        "2",
        "--seconds",
        "1",
        "--json",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mode = json.loads(done.stdout)["power_mode"]
    assert (mode["nvpmodel_name"], mode["nvpmodel_id"]) == ("MAXN", 0)


@pytest.mark.slow
def test_vrex_run_device_kv_budget_auto(tmp_path):
    try:
        from vrex.video import sample_video

        video = sample_video("vtest.avi")
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"no sample video: {exc}")
    script = (
        "import argparse, sys\n"
        "from vrex.engine.cli import register\n"
        "p = argparse.ArgumentParser(); register(p.add_subparsers())\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    cmd = [sys.executable, "-c", script, "run", "--video", str(video), "--fps", "1", "--max-seconds", "1"]
    cmd += ["--ask", "hi", "--max-new-tokens", "2", "--device-kv-budget", "auto", "--json"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("--device-kv-budget auto:"))
    chosen = int(line.split()[2])
    from vrex.memory import read_meminfo

    assert 0 < chosen < read_meminfo()["MemTotal"]
    stats = json.loads(done.stdout)["stats"]
    assert stats["frames_accepted"] >= 1 and stats["kv_resident_bytes_device"] > 0
