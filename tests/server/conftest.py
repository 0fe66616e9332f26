"""Fixtures for the server tests: a real `vrex serve` process over loopback, or an in-process
server, backed by the real engine when it imports and by tests/server/fake_engine.py otherwise.

Tests that take the `engine_kind` fixture run once with the fake engine (fast) and once with the
real engine and demo model (marked slow; skipped while vrex.engine is missing)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_ENGINE = Path(__file__).resolve().parent / "fake_engine.py"


@functools.cache
def real_engine_available() -> bool:
    try:
        import vrex.engine.engine  # noqa: F401 (the package itself loads torch only on first use)
    except Exception:
        return False
    return True


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.slow)])
def engine_kind(request) -> str:
    if request.param == "real" and not real_engine_available():
        pytest.skip("vrex.engine is not importable yet")
    return request.param


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, kind: str):
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.kind = kind

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout_s: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def server_env(kind: str, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.pop("VREX_TEST_FAKE_ENGINE", None)
    if kind == "fake":
        env["VREX_TEST_FAKE_ENGINE"] = str(FAKE_ENGINE)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


@pytest.fixture
def start_server(tmp_path):
    """start_server(*flags, kind="fake", env={}) -> ServerProcess on a free loopback port."""
    started: list[ServerProcess] = []
    counter = iter(range(1000))

    def start(
        *flags: str, kind: str = "fake", env: dict | None = None, timeout_s: float | None = None
    ) -> ServerProcess:
        n = next(counter)
        ready = tmp_path / f"ready{n}.json"
        log_path = tmp_path / f"server{n}.log"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--ready-file", str(ready), *flags]
        log_file = open(log_path, "w")
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=server_env(kind, env), stdout=log_file, stderr=subprocess.STDOUT
        )
        log_file.close()
        deadline = time.monotonic() + (timeout_s or (30 if kind == "fake" else 600))
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"server not ready in time:\n{log_path.read_text()}")
            time.sleep(0.05)
        server = ServerProcess(proc, json.loads(ready.read_text())["port"], log_path, kind)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.alive():
            server.proc.kill()
            server.proc.wait(10)


@pytest.fixture
def fake_backend(monkeypatch):
    """A Backend over the fake engine for in-process servers (factory: config -> Backend)."""
    monkeypatch.setenv("VREX_TEST_FAKE_ENGINE", str(FAKE_ENGINE))
    from server.backend import create_backend

    return create_backend


@pytest.fixture
def tls_files(tmp_path) -> tuple[Path, Path]:
    """(cert, key): a self-signed cert for localhost / 127.0.0.1 made with openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def serve(fake_backend):
    """serve(**ServerConfig overrides) -> (in-process server over the fake engine, Client)."""
    from server.config import ServerConfig
    from server.service import create_server
    from vrex.client import Client

    running = []

    async def make(**overrides):
        config = ServerConfig(port=0, **overrides)
        server = await create_server(config, fake_backend(config))
        await server.start()
        client = Client(f"127.0.0.1:{server.port}")
        running.append((server, client))
        return server, client

    yield make
    for server, client in running:
        await client.close()
        await server.stop(0)
