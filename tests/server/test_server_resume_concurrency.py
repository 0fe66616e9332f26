"""Resuming sessions concurrently: a long write-ahead-log replay must not block other sessions,
one id is restored once however many callers ask, and a failed or cancelled restore leaves
nothing behind (in-process server over the fake engine; backend calls held by `Gate`s)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from server import wal
from server.session import RequestError
from vrex.client import VRexError

PROMPT_S = 5.0  # "promptly": generous for a loaded 2-core box; a blocked call never finishes


def image(seed: int = 0, width: int = 32, height: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


class Gate:
    """Stands in for one backend method: calls for `session_id` wait until `open()` (then fail
    with `fail`, if given); calls for other sessions go straight through."""

    def __init__(self, monkeypatch, backend, method: str, session_id: str, fail: Exception | None = None):
        self.inner = getattr(backend, method)
        self.session_id = session_id
        self.fail = fail
        self.calls = 0
        self.entered = asyncio.Event()
        self._open = asyncio.Event()
        monkeypatch.setattr(backend, method, self)

    async def __call__(self, target, *args):
        sid = target if isinstance(target, str) else target.id
        if sid != self.session_id:
            return await self.inner(target, *args)
        self.calls += 1
        self.entered.set()
        await self._open.wait()
        if self.fail is not None:
            raise self.fail
        return await self.inner(target, *args)

    async def wait_entered(self) -> None:
        await asyncio.wait_for(self.entered.wait(), PROMPT_S)

    def open(self) -> None:
        self._open.set()


class RestoreCalls:
    """Counts calls of the servicer's `restore` (ResumeSession and stream attach both use it);
    a call counted here has reached its wait, as `restore` does not yield before that."""

    def __init__(self, monkeypatch, servicer):
        self.inner = servicer.restore
        self.calls = 0
        self.cancelled = 0
        monkeypatch.setattr(servicer, "restore", self)

    async def __call__(self, session_id: str):
        self.calls += 1
        try:
            return await self.inner(session_id)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def wait_for(self, num_calls: int, num_cancelled: int = 0) -> None:
        await until(lambda: self.calls >= num_calls and self.cancelled >= num_cancelled)


async def until(condition, timeout_s: float = PROMPT_S) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


async def open_and_send_a_frame(client) -> bool:
    async with client.session(fps=1.0) as s:
        return (await s.send_frame(image(9), 0.0, wait=True)).accepted


async def crashed_session(client, data: Path, num_frames: int) -> str:
    """A closed session left as after kill -9: its snapshot holds no frame, its log `num_frames`."""
    async with client.session(fps=1.0) as s:
        sid = s.session_id
        base = (data / sid / "state.json").read_text()  # the base snapshot taken at open
        for i in range(num_frames):
            assert (await s.send_frame(image(i), float(i), wait=True)).accepted
        log = wal.wal_path(data, sid).read_bytes()
    (data / sid / "state.json").write_text(base)
    wal.wal_path(data, sid).write_bytes(log)
    return sid


async def wal_server(serve, tmp_path, **overrides):
    data = tmp_path / "data"
    server, client = await serve(
        data_dir=data, snapshot_every_frames=1000, snapshot_interval_s=0, **overrides
    )
    return server, client, data


def engine_sessions(server) -> dict:
    return server.servicer.backend.engine._live  # the fake engine's open sessions


async def test_other_sessions_open_and_resume_while_a_replay_runs(serve, tmp_path, monkeypatch):
    server, client, data = await wal_server(serve, tmp_path)
    slow = await crashed_session(client, data, 3)
    other = await crashed_session(client, data, 2)
    gate = Gate(monkeypatch, server.servicer.backend, "replay_frame", slow)
    resuming = asyncio.create_task(client.resume_session(slow))
    try:
        await gate.wait_entered()
        # a new session opens and takes a frame, and another session resumes, all while the
        # first replay is held
        assert await asyncio.wait_for(open_and_send_a_frame(client), PROMPT_S)
        info = await asyncio.wait_for(client.resume_session(other), PROMPT_S)
        assert info.resumed and info.frames_accepted == 2
        assert not resuming.done() and slow not in server.servicer.sessions
    finally:
        gate.open()
    info = await asyncio.wait_for(resuming, PROMPT_S)
    assert info.resumed and info.frames_accepted == 3 and gate.calls == 3
    assert set(server.servicer.sessions) == {slow, other}


async def test_a_restore_in_flight_holds_its_slot(serve, tmp_path, monkeypatch):
    server, client, data = await wal_server(serve, tmp_path, max_sessions=2)
    slow = await crashed_session(client, data, 2)
    other = await crashed_session(client, data, 1)
    async with client.session(fps=1.0) as live:  # one of the two slots
        gate = Gate(monkeypatch, server.servicer.backend, "replay_frame", slow)
        resuming = asyncio.create_task(client.resume_session(slow))
        try:
            await gate.wait_entered()
            # the replay holds the second slot: both refusals come at once, not after the replay
            with pytest.raises(VRexError) as refused:
                await asyncio.wait_for(client.session(fps=1.0).start(), PROMPT_S)
            assert refused.value.code == "RESOURCE_EXHAUSTED"
            with pytest.raises(VRexError) as refused:
                await asyncio.wait_for(client.resume_session(other), PROMPT_S)
            assert refused.value.code == "RESOURCE_EXHAUSTED"
            assert "close one before resuming" in str(refused.value)
        finally:
            gate.open()
        assert (await asyncio.wait_for(resuming, PROMPT_S)).frames_accepted == 2
        assert set(server.servicer.sessions) == {live.session_id, slow}


async def test_concurrent_resumes_of_one_id_share_one_restore(serve, tmp_path, monkeypatch):
    server, client, data = await wal_server(serve, tmp_path)
    sid = await crashed_session(client, data, 3)
    gate = Gate(monkeypatch, server.servicer.backend, "resume", sid)
    restores = RestoreCalls(monkeypatch, server.servicer)
    unary = [asyncio.create_task(client.resume_session(sid)) for _ in range(3)]
    streams = [client.session(resume_session_id=sid) for _ in range(2)]
    starts = [asyncio.create_task(s.start()) for s in streams]
    try:
        await gate.wait_entered()
        await restores.wait_for(5)  # every caller waits on the one restore held by the gate
        assert not any(t.done() for t in unary + starts)
    finally:
        gate.open()
    infos = await asyncio.wait_for(asyncio.gather(*unary), PROMPT_S)
    opened = await asyncio.wait_for(asyncio.gather(*starts, return_exceptions=True), PROMPT_S)
    assert gate.calls == 1  # one restore, one engine session
    assert all(i.resumed and i.frames_accepted == 3 for i in infos)
    winners = [o for o in opened if not isinstance(o, BaseException)]
    losers = [o for o in opened if isinstance(o, BaseException)]
    assert len(winners) == 1 and winners[0].resumed and winners[0].frames_accepted == 3
    assert len(losers) == 1 and losers[0].code == "FAILED_PRECONDITION"
    assert list(server.servicer.sessions) == [sid] and list(engine_sessions(server)) == [sid]
    assert server.servicer.sessions[sid].engine_session is engine_sessions(server)[sid]
    for s in streams:
        s.cancel()


async def test_a_failed_replay_frees_its_slot_and_every_caller_gets_the_error(serve, tmp_path, monkeypatch):
    server, client, data = await wal_server(serve, tmp_path, max_sessions=1)
    sid = await crashed_session(client, data, 3)
    log_before = wal.read_log(wal.wal_path(data, sid)).records
    gate = Gate(monkeypatch, server.servicer.backend, "replay_frame", sid, fail=RuntimeError("disk on fire"))
    restores = RestoreCalls(monkeypatch, server.servicer)
    callers = [asyncio.create_task(client.resume_session(sid)) for _ in range(2)]
    await gate.wait_entered()
    await restores.wait_for(2)
    gate.open()
    errors = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), PROMPT_S)
    assert [e.code for e in errors] == ["DATA_LOSS"] * 2
    assert all("disk on fire" in str(e) and "move the log away" in str(e) for e in errors)
    assert gate.calls == 1  # the second caller shared the first one's failure
    # nothing half-registered: no session, no engine session, the log untouched on disk ...
    assert server.servicer.sessions == {} and engine_sessions(server) == {}
    assert wal.read_log(wal.wal_path(data, sid)).records == log_before
    # ... and the only slot is free again
    assert await asyncio.wait_for(open_and_send_a_frame(client), PROMPT_S)
    monkeypatch.setattr(server.servicer.backend, "replay_frame", gate.inner)
    info = await client.resume_session(sid)
    assert info.resumed and info.frames_accepted == 3


async def test_a_caller_that_gives_up_leaves_the_restore_to_finish(serve, tmp_path, monkeypatch):
    server, client, data = await wal_server(serve, tmp_path)
    sid = await crashed_session(client, data, 2)
    gate = Gate(monkeypatch, server.servicer.backend, "replay_frame", sid)
    restores = RestoreCalls(monkeypatch, server.servicer)
    giving_up = asyncio.create_task(client.resume_session(sid))
    await gate.wait_entered()
    giving_up.cancel()  # the client goes away: its call is cancelled on the server too
    await restores.wait_for(1, num_cancelled=1)
    assert sid not in server.servicer.sessions
    gate.open()
    await until(lambda: sid in server.servicer.sessions)
    info = await client.resume_session(sid)
    assert not info.resumed and info.frames_accepted == 2  # live already: restored once
    assert gate.calls == 2  # one replay per logged frame, no second restore
    assert not server.servicer.sessions[sid].attached  # the idle reaper closes it if nobody comes


async def test_resume_waits_for_a_release_in_progress(serve, tmp_path, monkeypatch):
    """A client that reconnects while its old stream's session is still being snapshotted and
    closed gets the session back from that snapshot, not the engine session being closed."""
    server, client, data = await wal_server(serve, tmp_path)
    s = client.session(fps=1.0)
    await s.start()
    sid = s.session_id
    for i in range(2):
        await s.send_frame(image(i), float(i), wait=True)
    old = server.servicer.sessions[sid].engine_session
    gate = Gate(monkeypatch, server.servicer.backend, "snapshot", sid)
    restores = RestoreCalls(monkeypatch, server.servicer)
    closing = asyncio.create_task(s.close())
    try:
        await gate.wait_entered()  # the release is snapshotting
        resuming = asyncio.create_task(client.resume_session(sid))
        await restores.wait_for(1)
        await asyncio.sleep(0.05)
        assert not resuming.done()  # it waits for the release
    finally:
        gate.open()
    assert (await asyncio.wait_for(closing, PROMPT_S)).resumable
    info = await asyncio.wait_for(resuming, PROMPT_S)
    assert info.resumed and info.frames_accepted == 2
    live = server.servicer.sessions[sid]
    assert live.engine_session is not old and engine_sessions(server)[sid] is live.engine_session
    assert live.wal is not None  # its log is open again


async def test_stopping_the_server_cancels_a_restore_in_flight(serve, tmp_path, monkeypatch):
    server, client, data = await wal_server(serve, tmp_path)
    sid = await crashed_session(client, data, 3)
    log_before = wal.read_log(wal.wal_path(data, sid)).records
    servicer = server.servicer
    gate = Gate(monkeypatch, servicer.backend, "replay_frame", sid)
    restoring = asyncio.create_task(servicer.restore(sid))
    await gate.wait_entered()
    await asyncio.wait_for(servicer.release_all(), PROMPT_S)
    with pytest.raises(RequestError) as stopped:
        await asyncio.wait_for(restoring, PROMPT_S)
    assert stopped.value.code == grpc.StatusCode.UNAVAILABLE
    assert servicer.sessions == {} and engine_sessions(server) == {}
    assert wal.read_log(wal.wal_path(data, sid)).records == log_before
    gate.open()  # a later resume (here: the same process) still finds everything
    live, resumed = await servicer.restore(sid)
    assert resumed and live.stats()["frames_accepted"] == 3
