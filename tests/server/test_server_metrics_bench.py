"""Prometheus metrics endpoint and the server load benchmark (fake engine, short runs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from vrex.client import Client

REPO = Path(__file__).resolve().parents[2]
FAKE_ENGINE = Path(__file__).resolve().parent / "fake_engine.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_prometheus_metrics_endpoint(start_server):
    pytest.importorskip("prometheus_client")
    metrics_port = _free_port()
    server = start_server("--metrics-port", str(metrics_port))
    async with Client(server.target) as client:
        async with client.session(fps=1.0) as s:
            img = np.zeros((16, 16, 3), np.uint8)
            await s.send_frame(img, 0.0, wait=True)
            await s.send_frame(img, 0.5, wait=True)  # dropped by the 1 fps sampler
            await s.ask_text("hi")
            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            )
    assert "vrex_sessions_live 1.0" in text
    assert 'vrex_frames_total{outcome="accepted"} 1.0' in text
    assert 'vrex_frames_total{outcome="dropped_engine"} 1.0' in text
    assert "vrex_frame_ack_latency_seconds_count 2.0" in text
    assert "vrex_answer_first_token_seconds_count 1.0" in text
    assert 'vrex_kv_bytes{tier="device"}' in text


def test_server_load_benchmark_json():
    env = dict(os.environ, VREX_TEST_FAKE_ENGINE=str(FAKE_ENGINE), PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.server_load",
        "--streams",
        "3",
        "--fps",
        "4",
        "--seconds",
        "2",
        "--json",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    run = report["runs"][0]
    assert run["streams"] == 3 and run["frames_sent"] == 3 * 8
    assert run["frames_accepted"] + run["frames_dropped"] == run["frames_sent"]
    assert run["errors"] == 0 and run["ttft_p50_ms"] > 0
    assert 0 < run["ack_latency_p50_ms"] <= run["ack_latency_p99_ms"]
    assert report["max_streams_under_1pct_drops"] in (0, 3)
