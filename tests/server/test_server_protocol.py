"""Protocol behaviour against an in-process server over loopback (fake engine: fast)."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import numpy as np
import pytest

from server.config import Limits
from vrex.api import vrex_pb2 as pb
from vrex.client import VRexError


def image(seed: int = 0, width: int = 64, height: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


async def test_open_frames_question_close(serve):
    server, client = await serve()
    async with client.session(fps=2.0) as s:
        assert s.opened.settings.fps == 2.0 and s.opened.settings.policy == "resv"
        acks = [await s.send_frame(image(i), i * 0.5, wait=True) for i in range(3)]
        assert [a.accepted for a in acks] == [True, True, True]
        assert [a.frame_index for a in acks] == [0, 1, 2]
        assert acks[-1].history_tokens > acks[0].history_tokens > 0
        deltas = [d async for d in s.ask("what do you see?")]
        assert len(deltas) > 1
        assert s.last_answer.text == "".join(deltas)
        assert "3 frames" in s.last_answer.text
        stats = await s.stats()
        assert stats.frames_accepted == 3 and stats.attached
        assert stats.kv_bytes["device"] > 0
    assert s.closed_event.session_id == s.session_id
    assert server.servicer.sessions == {}  # closed sessions are freed


async def test_per_request_errors_do_not_end_the_stream(serve):
    server, client = await serve(
        limits=Limits(max_question_chars=50, max_frame_bytes=10_000, max_message_bytes=2_000_000)
    )
    async with client.session() as s:
        cases = [
            (s.send_frame(b"\x89PNG but broken", 0.0, wait=True), "INVALID_ARGUMENT", "corrupt"),
            (s.send_frame(b"GIF89a....", 0.0, wait=True), "INVALID_ARGUMENT", "JPEG, PNG or WebP"),
            (s.send_frame(b"x" * 20_000, 0.0, wait=True), "INVALID_ARGUMENT", "over the limit"),
            (s.ask_text("x" * 51), "INVALID_ARGUMENT", "shorten"),
            (s.ask_text("ok", top_p=2.0), "INVALID_ARGUMENT", "top_p"),
            (
                s.ask_text("ok", temperature=10.0),
                "INVALID_ARGUMENT",
                "question.temperature must be in [0, 5]",
            ),
            (s.ask_text("ok", max_new_tokens=10**6), "INVALID_ARGUMENT", "max_new_tokens"),
            (s.send_raw_event(pb.ClientEvent(), wait=True), "INVALID_ARGUMENT", "empty"),
            (
                s.send_raw_event(pb.ClientEvent(open=pb.Open()), wait=True),
                "FAILED_PRECONDITION",
                "already carries",
            ),
        ]
        for call, code, words in cases:
            with pytest.raises(VRexError) as info:
                await call
            assert info.value.code == code and words in info.value.message, info.value
        ack = await s.send_frame(image(), 1.0, wait=True)
        assert ack.accepted
        with pytest.raises(VRexError, match="timestamps must not decrease"):
            await s.send_frame(image(), 0.5, wait=True)
        with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):  # refused before sending
            await s.ask_text("hi", max_new_tokens=-1)
        answer = await s.ask_text("still there?")
        assert "1 frames" in answer.text


async def test_a_frame_that_fails_does_not_hold_later_frames_to_its_timestamp(serve):
    _, client = await serve()
    async with client.session(fps=1.0) as s:
        assert not s.opened.HasField("last_frame_timestamp_s")  # no frame yet
        assert (await s.send_frame(image(0), 0.0, wait=True)).accepted
        with pytest.raises(VRexError, match="corrupt"):
            await s.send_frame(b"\x89PNG but broken", 100.0, wait=True)
        assert (await s.send_frame(image(1), 1.0, wait=True)).accepted
        with pytest.raises(VRexError, match="must not decrease"):  # the kept frame still counts
            await s.send_frame(image(2), 0.5, wait=True)


@pytest.mark.parametrize("bad_s", [float("inf"), float("-inf"), float("nan")])
async def test_non_finite_timestamps_are_refused_and_the_session_goes_on(serve, bad_s):
    _, client = await serve()
    async with client.session(fps=1.0) as s:
        assert (await s.send_frame(image(0), 10.0, wait=True)).accepted
        with pytest.raises(VRexError) as info:
            await s.send_frame(image(1), bad_s, wait=True)
        assert info.value.code == "INVALID_ARGUMENT" and "finite number >= 0" in info.value.message
        assert "seconds from the stream's start" in info.value.message
        ack = await s.send_frame(image(2), 20.0, wait=True)  # inf must not become the last timestamp
        assert ack.accepted and ack.frame_index == 1


async def test_sampler_drops_count_once_and_carry_their_index(serve):
    _, client = await serve()
    async with client.session(fps=1.0) as s:
        first = await s.send_frame(image(0), 0.0, wait=True)
        dropped = await s.send_frame(image(1), 0.2, wait=True)
        stats = await s.stats()
        kept = await s.send_frame(image(2), 1.0, wait=True)
    assert first.accepted and first.frame_index == 0
    # the fake engine words its reason like vrex.engine, never as "sampler"
    assert not dropped.accepted and dropped.dropped_reason == "above the session's target fps"
    assert dropped.frames_dropped == 1 and dropped.frame_index == 1
    assert stats.frames_dropped == 1 and stats.frames_dropped_backpressure == 0
    assert kept.accepted and kept.frame_index == 2 and kept.frames_dropped == 1


def test_server_max_fps_is_the_engines():
    from vrex.engine.config import SessionSettings
    from vrex.limits import MAX_FPS

    assert Limits().max_fps == MAX_FPS
    SessionSettings(fps=MAX_FPS)
    with pytest.raises(ValueError, match="fps must be in"):
        SessionSettings(fps=math.nextafter(MAX_FPS, math.inf))


async def test_sessions_take_the_engines_top_fps(serve):
    from vrex.limits import MAX_FPS

    _, client = await serve()
    async with client.session(fps=MAX_FPS) as s:
        assert s.opened.settings.fps == MAX_FPS == 120.0


async def test_events_before_open_and_bad_settings(serve):
    _, client = await serve()
    session = client.session(fps=1000.0)
    with pytest.raises(VRexError, match="fps must be in"):
        await session.start()
    session.cancel()
    call = client.stub.Stream()
    await call.write(pb.ClientEvent(request_id=7, question=pb.Question(text="hi")))
    event = await call.read()
    assert event.request_id == 7 and event.error.code_name == "FAILED_PRECONDITION"
    assert "send `open` first" in event.error.message
    call.cancel()


def test_server_preset_names_are_the_engines():
    import vrex.resv
    from vrex.limits import RESV_PRESETS

    assert sorted(RESV_PRESETS) == sorted(vrex.resv.PRESETS)


async def test_server_resv_preset_reaches_every_session(serve):
    _, client = await serve(resv_preset="paper")
    async with client.session(fps=1.0) as s:
        ack = await s.send_frame(image(0), 0.0, wait=True)
        assert ack.accepted
    _, client = await serve(resv_preset="bogus")  # the engine's own check answers
    with pytest.raises(VRexError, match="unknown ReSV preset 'bogus'"):
        await client.session(fps=1.0).start()


async def test_unary_info_stats_and_not_found(serve):
    server, client = await serve(max_sessions=3)
    info = await client.server_info()
    assert info.model_name == "fake-test-engine" and info.is_demo_model
    assert info.limits.max_sessions == 3 and info.limits.max_question_chars == Limits().max_question_chars
    assert info.limits.max_question_tokens == 0  # the test double does not report one
    assert "jpeg" in info.image_formats and not info.auth_required
    for call in (client.session_stats("nosuchsession"), client.resume_session("nosuchsession")):
        with pytest.raises(VRexError) as e:
            await call
        assert e.value.code == "NOT_FOUND"
    with pytest.raises(VRexError) as e:
        await client.session_stats("../../etc/passwd")
    assert e.value.code == "INVALID_ARGUMENT"
    session = client.session(resume_session_id="unknown123")
    with pytest.raises(VRexError) as e:
        await session.start()
    assert e.value.code == "NOT_FOUND"
    session.cancel()


async def test_too_many_sessions_is_resource_exhausted(serve):
    server, client = await serve(max_sessions=2)
    a = await client.session().__aenter__()
    b = await client.session().__aenter__()
    third = client.session()
    with pytest.raises(VRexError) as e:
        await third.start()
    assert e.value.code == "RESOURCE_EXHAUSTED" and "close one" in e.value.message
    third.cancel()
    await a.close()
    async with client.session() as c:  # a slot is free again
        assert c.session_id
    await b.close()


async def test_backpressure_drops_oldest_frames_and_counts_them(serve, monkeypatch):
    monkeypatch.setenv("VREX_FAKE_FRAME_MS", "40")  # the engine is slower than the input
    server, client = await serve(max_pending_frames=2)
    acks = []
    async with client.session(fps=60.0, on_ack=acks.append) as s:
        for i in range(40):
            await s.send_frame(image(i, 16, 16), i / 60, encoding="raw")
        await s.ask_text("done?")  # queued behind the frames: all acks have arrived
        stats = await s.stats()
    assert len(acks) == 40  # every frame is acked exactly once
    dropped = [a for a in acks if not a.accepted]
    assert dropped and all(a.dropped_reason == "backpressure" for a in dropped)
    assert stats.frames_dropped_backpressure == len(dropped) == stats.frames_dropped
    # a dropped frame carries the index the engine gives its next frame: indexes never go back
    indexes = [a.frame_index for a in sorted(acks, key=lambda a: a.timestamp_s)]
    assert indexes == sorted(indexes) and indexes[-1] == stats.frames_accepted - 1
    assert max(a.frame_index for a in dropped) > 0
    assert stats.frames_accepted == 40 - len(dropped)
    assert acks[-1].accepted  # the newest frame is kept, older ones dropped


async def test_deadline_and_cancel_free_the_session(serve, monkeypatch):
    monkeypatch.setenv("VREX_FAKE_TOKEN_MS", "200")  # a slow answer, cut short
    server, client = await serve()
    s = client.session(timeout_s=0.6)
    await s.start()
    await s.send_frame(image(), 0.0, wait=True)
    with pytest.raises(VRexError) as e:
        await s.ask_text("a long answer please")
    assert e.value.code in ("DEADLINE_EXCEEDED", "CANCELLED")
    for _ in range(50):
        if not server.servicer.sessions and not server.servicer.handlers:
            break
        await asyncio.sleep(0.05)
    assert server.servicer.sessions == {} and not server.servicer.handlers

    s2 = client.session()
    await s2.start()
    task = asyncio.create_task(s2.ask_text("slow"))
    await asyncio.sleep(0.3)
    s2.cancel()
    with pytest.raises(VRexError):
        await task
    for _ in range(50):
        if not server.servicer.sessions:
            break
        await asyncio.sleep(0.05)
    assert server.servicer.sessions == {}


async def test_half_close_finishes_queued_work(serve):
    server, client = await serve()
    s = client.session()
    await s.start()
    await s.send_frame(image(1), 0.0)
    await s.send_frame(image(2), 1.0)
    answer_task = asyncio.create_task(s.ask_text("anything?"))
    await asyncio.sleep(0)  # let the question be written before the half-close
    await s.done_writing()
    answer = await answer_task
    await s.wait_closed(10)
    assert "2 frames" in answer.text
    assert s.end_status == grpc.StatusCode.OK and s.closed_event is not None


async def test_resume_after_disconnect_with_data_dir(serve, tmp_path):
    server, client = await serve(data_dir=tmp_path / "data")
    async with client.session(fps=1.0) as s:
        for i in range(3):
            assert (await s.send_frame(image(i), float(i), wait=True)).accepted
    assert s.closed_event.resumable
    info = await client.resume_session(s.session_id)
    assert info.resumed and info.frames_accepted == 3
    async with client.session(resume_session_id=s.session_id) as again:
        assert again.opened.resumed is False  # live already, via ResumeSession
        assert again.opened.frames_accepted == 3 and again.opened.settings.fps == 1.0
        assert again.opened.last_frame_timestamp_s == 2.0
        with pytest.raises(VRexError, match="across a resume"):  # not silently dropped
            await again.send_frame(image(8), 0.0, wait=True)
        ack = await again.send_frame(image(9), 5.0, wait=True)
        assert ack.frame_index == 3
        with pytest.raises(VRexError, match="attached to another stream"):
            other = client.session(resume_session_id=s.session_id)
            try:
                await other.start()
            finally:
                other.cancel()


async def test_a_corrupt_snapshot_is_data_loss_not_a_bad_request(serve, tmp_path):
    server, client = await serve(data_dir=tmp_path / "data")
    async with client.session(fps=1.0) as s:
        assert (await s.send_frame(image(0), 0.0, wait=True)).accepted
    (tmp_path / "data" / s.session_id / "state.json").write_text("{not json")
    with pytest.raises(VRexError) as info:
        await client.resume_session(s.session_id)
    assert info.value.code == "DATA_LOSS" and "open a new session" in info.value.message


async def test_periodic_snapshot_mode_flushes_when_idle(serve, tmp_path):
    server, client = await serve(data_dir=tmp_path / "data", snapshot_interval_s=0.2)
    async with client.session(fps=1.0) as s:
        await s.send_frame(image(0), 0.0, wait=True)
        await s.send_frame(image(1), 1.0, wait=True)
        path = tmp_path / "data" / s.session_id / "state.json"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if path.exists() and '"frames_accepted": 2' in path.read_text():
                break
            await asyncio.sleep(0.05)
        assert '"frames_accepted": 2' in path.read_text()


async def test_unparseable_message_is_a_per_request_error(serve):
    server, client = await serve()
    async with client.session() as s:
        raw = client.channel.stream_stream("/vrex.v1.VRex/Stream")
        call = raw()
        await call.write(pb.ClientEvent(request_id=1, open=pb.Open()).SerializeToString())
        opened = pb.ServerEvent.FromString(await call.read())
        assert opened.opened.session_id
        await call.write(b"\xff\xff\xff")  # not a protobuf message
        error = pb.ServerEvent.FromString(await call.read())
        assert (
            error.error.code_name == "INVALID_ARGUMENT"
            and "not a valid vrex.v1.ClientEvent" in error.error.message
        )
        # a question whose text is not UTF-8: the error still answers its request id
        good = pb.ClientEvent(request_id=39, question=pb.Question(text="cafe")).SerializeToString()
        await call.write(good.replace(b"cafe", b"caf\xe9"))
        error = pb.ServerEvent.FromString(await call.read())
        assert error.request_id == 39 and "not valid UTF-8" in error.error.message, error
        await call.write(b"\x08" + b"\xff" * 9 + b"\x7f" + b"\x0f")  # a "request id" over 64 bits
        error = pb.ServerEvent.FromString(await call.read())
        assert error.request_id == 0 and error.error.code_name == "INVALID_ARGUMENT"
        frame = pb.Frame(raw=pb.RawImage(rgb=bytes(12), width=2, height=2), timestamp_s=0.0)
        await call.write(pb.ClientEvent(request_id=2, frame=frame).SerializeToString())
        ack = pb.ServerEvent.FromString(await call.read())
        assert ack.request_id == 2 and ack.frame_ack.accepted  # the same stream goes on
        call.cancel()
        assert (await s.send_frame(image(), 0.0, wait=True)).accepted
    for method in ("GetServerInfo", "GetSessionStats", "ResumeSession"):
        unary = client.channel.unary_unary(f"/vrex.v1.VRex/{method}")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(b"\xff\xff\xff")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value)
        assert "is not a valid vrex.v1." in info.value.details()
