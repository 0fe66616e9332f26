"""Fixtures shared across test folders."""

from __future__ import annotations

import http.server
import threading
from dataclasses import dataclass, field

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
