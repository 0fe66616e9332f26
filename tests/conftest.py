"""Fixtures shared across test folders."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest


@dataclass
class MjpegCamera:
    """A network camera on loopback: HTTP multipart MJPEG, as many IP cameras serve it."""

    url: str
    frames_per_connection: int
    connections: list[int] = field(default_factory=list)  # frames sent on each connection


@pytest.fixture
def mjpeg_camera():
    """Factory: ``mjpeg_camera(frames=40, interval_s=0.02)`` starts a camera whose every
    connection sends ``frames`` JPEG frames (BGR (i, 0, 200): red in RGB) and then hangs up."""
    cv2 = pytest.importorskip("cv2")
    servers = []

    def start(frames: int = 40, interval_s: float = 0.02) -> MjpegCamera:
        cam = MjpegCamera(url="", frames_per_connection=frames)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server hook
                cam.connections.append(0)
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                for i in range(frames):
                    bgr = np.zeros((120, 160, 3), np.uint8)
                    bgr[..., 0] = i % 256
                    bgr[..., 2] = 200
                    jpg = cv2.imencode(".jpg", bgr)[1].tobytes()
                    head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpg)}\r\n\r\n"
                    try:
                        self.wfile.write(head.encode() + jpg + b"\r\n")
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    cam.connections[-1] += 1
                    threading.Event().wait(interval_s)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        cam.url = f"http://127.0.0.1:{server.server_port}/video.mjpg"
        return cam

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _write_noise_clip(path: Path, seconds: int = 8, fps: int = 10) -> bytes:
    """An H.264 mp4 of noise frames with its index first (as streamed files are); its bytes."""
    av = pytest.importorskip("av")
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(seconds * fps):
            image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


@pytest.fixture
def write_clip() -> Callable[..., bytes]:
    """`write_clip(path, seconds=8, fps=10)`: a small real video to damage or stream (needs PyAV)."""
    return _write_noise_clip


@pytest.fixture(scope="session")
def tiny_smolvlm_dir(tmp_path_factory):
    """A tiny random SmolVLM checkpoint (a few MB), for the tests that load a real model."""
    from vrex.models import tiny_random

    return tiny_random("smolvlm", folder=tmp_path_factory.mktemp("tiny-smolvlm"))


@pytest.fixture
def disk_full(monkeypatch) -> dict:
    """``disk_full["on"] = True`` makes the disk KV tier's file fail to grow, as on a full disk."""
    from vrex.kv import arena as arena_module

    real_allocate = arena_module._allocate
    state = {"on": False}

    def allocate(fd, size):
        if state["on"]:
            raise OSError(28, "No space left on device")
        real_allocate(fd, size)

    monkeypatch.setattr(arena_module, "_allocate", allocate)
    return state
